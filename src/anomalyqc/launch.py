"""`anomalyqc fit --nproc N`: re-run the same command under torchrun on this machine.

torchrun (torch.distributed.run) starts N copies of `anomalyqc fit ...` with RANK,
WORLD_SIZE and a loopback MASTER_ADDR/MASTER_PORT; each fits a shard (anomalyqc.distributed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_args(ctx: Any, drop: set[str]) -> list[str]:
    """A typer/click context's command and parsed parameters, back as command-line arguments
    (so every option of `fit`, present or future, reaches the workers unchanged)."""
    args = [ctx.info_name or ""]
    for param in ctx.command.params:
        if param.name in drop or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            values = value if isinstance(value, list | tuple) else [value]
            args += [_text(v) for v in values]
            continue
        opt = param.opts[0]
        if value is None:
            continue
        if getattr(param, "is_flag", False) and not param.multiple:
            secondary = param.secondary_opts[0] if param.secondary_opts else None
            if value:
                args.append(opt)
            elif secondary:
                args.append(secondary)
            continue
        for v in (value if param.multiple else [value]):
            args += [opt, _text(v)]
    return args


def _text(v: object) -> str:
    if isinstance(v, Enum):
        return str(v.value)
    return str(Path(v)) if isinstance(v, Path) else str(v)


DONE_DIR_ENV = "ANOMALYQC_RANKS_DONE_DIR"


def mark_rank_done(rank: int) -> None:
    """Tell the launcher this worker's fit returned (see relaunch_with_torchrun)."""
    folder = os.environ.get(DONE_DIR_ENV)
    if folder:
        (Path(folder) / f"rank-{rank}").touch()


def relaunch_with_torchrun(ctx: Any, nproc: int, console: Console) -> int:
    """Run the current command (minus --nproc) in `nproc` processes; returns the exit status.

    The workers' standard output passes through (rank 0 prints the fit summary); their
    standard error is collected so that a failure shows as the workers' one-line error,
    not torchrun's traceback of the child processes.
    """
    args = command_args(ctx, {"nproc"})
    env = dict(os.environ)
    # Each worker gets its share of the cores (torchrun would default every worker to 1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [*TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "anomalyqc.cli", *args]
    with (tempfile.TemporaryFile(mode="w+", prefix="anomalyqc-torchrun-") as err,
          tempfile.TemporaryDirectory(prefix="anomalyqc-ranks-") as done_dir):
        env[DONE_DIR_ENV] = done_dir
        rc = subprocess.run(cmd, env=env, stderr=err, check=False).returncode
        err.seek(0)
        log = err.read()
        finished = sorted(p.name for p in Path(done_dir).iterdir())
    if rc == 0:
        sys.stderr.write(log)
        return 0
    if finished == [f"rank-{r}" for r in range(nproc)]:
        # Every worker returned from its fit (run saved by rank 0, replicas checked, process
        # group destroyed) and only then died: gloo can abort a process in interpreter teardown
        # under load. Nothing is left undone, so the fit stands, and the crash is reported.
        sys.stderr.write(log)
        console.print(f"warning: a fit process exited with an error after every one of the "
                      f"{nproc} had finished its work (torchrun exit {rc}); the run is complete",
                      highlight=False, soft_wrap=True, markup=False)
        return 0
    errors = [line.strip() for line in log.splitlines() if line.strip().startswith("error:")]
    if errors:
        console.print(errors[0], highlight=False, soft_wrap=True, markup=False)
        return 2
    tail = "\n".join(log.splitlines()[-40:])
    console.print(f"error: the {nproc} fit processes failed (torchrun exit {rc}); their "
                  f"output ends:\n{tail}", highlight=False, soft_wrap=True, markup=False)
    return 1
