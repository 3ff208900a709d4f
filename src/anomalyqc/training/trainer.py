"""The one training loop every trainable detector shares (see interface.py for the contract).

    trainer = Trainer({"epochs": 50, "schedule": "plateau", "checkpoint_every": 200}, out_dir)
    result = trainer.fit(detector, dataset, resume=True)

`out_dir` receives log.csv, checkpoint/ (checkpoint.py) and, at the end, loss_curves.png.
A budget (config max_steps, max_minutes) ends a run after the step that reaches it: that
step is checkpointed and a "stop" row goes into the log, so `resume=True` with a larger
budget continues from there as from a kill.
Under torchrun (RANK/WORLD_SIZE set) each process trains a shard of every epoch through
DistributedDataParallel (gloo on CPU, NCCL on GPU); only rank 0 reports progress and writes
files, and the replicas' weights are compared after every epoch (replicas.py). A run is a
pure function of its config and seed: data order, augmentations and the step's random stream
derive from (seed, epoch, step, rank) (sampling.py) and the global random states are
checkpointed, so `resume=True` after a kill continues to the same final weights.
"""

from __future__ import annotations

import atexit
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from anomalyqc import distributed
from anomalyqc.errors import ConfigError, DataError, ModelFileError
from anomalyqc.progress import Progress, check_progress
from anomalyqc.training import checkpoint as ckpt
from anomalyqc.training.augment import augment_batch
from anomalyqc.training.config import RESUME_MUST_MATCH, TrainConfig
from anomalyqc.training.devices import resolve_device, resolve_precision
from anomalyqc.training.interface import OptimGroup, StepContext, Trainable
from anomalyqc.training.log import CsvLog, TensorBoard
from anomalyqc.training.replicas import check_replicas
from anomalyqc.training.sampling import (
    AUGMENT,
    GLOBAL,
    LOADER,
    STEP,
    VALIDATE,
    derived_seed,
    epoch_batches,
    generator,
    seed_everything,
    split_indices,
)
from anomalyqc.training.schedules import CosineRestarts, Plateau, Schedule
from anomalyqc.types import Batch, Sample


@dataclass
class TrainResult:
    epochs: int  # epochs completed
    steps: int  # training steps completed
    stopped_early: bool
    stopped_by: str | None  # "early_stopping", "max_steps", "max_minutes" or None (all epochs)
    steps_per_epoch: int
    best_epoch: int | None  # 1-based epoch of the best monitored metric
    best_metric: float | None
    history: list[dict[str, float]]  # per epoch: train_<loss>, val_<loss>, lr factor
    seconds: float
    out_dir: Path
    # every process's training.replicas.weights_digest of the final networks, in rank order
    # (equal, else the run stopped with a ReplicaError); one entry for one process
    weights_sha256: list[str] = field(default_factory=list)


@dataclass
class _Progress:
    """Counters and running sums; all of it goes into the checkpoint's JSON."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # global steps done
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): steadier under load
    stopped: bool = False  # by early stopping
    budget_stop: str | None = None  # the budget that ended the run: "max_steps"/"max_minutes"
    log_sums: dict[str, float] = field(default_factory=dict)
    log_steps: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_steps: int = 0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    last_lr: dict[str, float] = field(default_factory=dict)  # learning rates of the last step


def make_schedule(config: TrainConfig, total_steps: int) -> Schedule:
    if config.schedule == "plateau":
        return Plateau(config.plateau_patience, config.plateau_alpha, config.plateau_threshold,
                       config.min_lr_factor)
    if config.schedule == "cosine":
        return CosineRestarts(config.cosine_period or total_steps, config.cosine_restart_peak,
                              config.min_lr_factor)
    return Schedule()



def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

class Trainer:
    """Trains a `Trainable` on a dataset of good images (anomalyqc.types.Sample items)."""

    def __init__(self, config: TrainConfig | dict[str, Any] | None = None,
                 out_dir: str | Path = "training", progress: Progress | None = None,
                 label: str = "train") -> None:
        self.config = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
        self.out_dir = Path(out_dir)
        self.progress = check_progress(progress)
        self.label = label

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    # ------------------------------------------------------------------------------ setup
    def fit(self, model: Trainable, dataset: Dataset[Sample] | Sequence[Sample],
            resume: bool = False) -> TrainResult:
        """Train `model` in place; returns what happened. resume=True continues the run whose
        checkpoint is in out_dir (or starts one when there is none)."""
        cfg = self.config
        if cfg.tensorboard:
            TensorBoard.check()  # up front, and on every rank: all fail alike
        self.device = self._join_processes(cfg.device)
        self.autocast_dtype, scaled = resolve_precision(cfg.precision, self.device)
        self.model, self.dataset = model, dataset
        self.nets = self._networks(model)
        self.optimizers = self._optimizers(model.optimizer_groups())
        self.scaler = torch.amp.GradScaler("cuda") if scaled else None
        n = len(dataset)  # type: ignore[arg-type]
        self.train_idx, self.val_idx = split_indices(n, cfg.val_fraction, cfg.seed)
        if len(self.train_idx) < self.world or 0 < len(self.val_idx) < self.world:
            raise DataError(f"{n} images ({len(self.train_idx)} training, {len(self.val_idx)} "
                            f"validation) are too few for {self.world} processes")
        self.steps_per_epoch = len(self._batches(0))
        self.schedule = make_schedule(cfg, cfg.epochs * self.steps_per_epoch)
        self.state = _Progress()
        self.best_weights: dict[str, torch.Tensor] | None = None
        lead = self.rank == 0
        self.log = CsvLog(self.out_dir / "log.csv", enabled=lead)
        resuming = ckpt.has_checkpoint(self.checkpoint_dir)
        if resuming and not resume:
            raise ConfigError(f"{self.checkpoint_dir} holds a checkpoint of an earlier run; pass "
                              f"resume=True (--resume) to continue it, or choose another folder")
        rng_state = self._restore(n) if resuming else None
        if not resuming:
            self.log.start()
            seed_everything(derived_seed(cfg.seed, GLOBAL, self.rank))
        self.tensorboard = TensorBoard(self.out_dir / "tensorboard") if cfg.tensorboard and lead \
            else None
        self.wrapped = self._wrap(self.nets)
        if rng_state is not None:
            ckpt.restore_rng(rng_state)
        try:
            self._loop()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            # The DDP wrappers hold the process group's reducers: freed here, not at
            # interpreter exit after the group is gone (which can abort the process).
            self.wrapped = dict(self.nets)
        if cfg.restore_best and self.best_weights is not None and not self._last_beats_best():
            self._load_weights(self.best_weights, "best weights")
        for net in self.nets.values():
            net.eval()
        digests = check_replicas(self.nets, "by the end of training")
        if lead and cfg.loss_curves:  # every epoch logged a training row: there is a curve
            from anomalyqc.training.curves import plot_loss_curves

            plot_loss_curves(self.log.path, self.out_dir / "loss_curves.png", self.label)
        s = self.state
        stopped_by = s.budget_stop or ("early_stopping" if s.stopped else None)
        return TrainResult(epochs=s.epoch, steps=s.step, stopped_early=s.stopped,
                           stopped_by=stopped_by, steps_per_epoch=self.steps_per_epoch,
                           best_epoch=s.best_epoch, best_metric=s.best, history=list(s.history),
                           seconds=s.seconds, out_dir=self.out_dir, weights_sha256=digests)

    def _join_processes(self, spec: str) -> torch.device:
        """This process's device; under torchrun, also join the process group (NCCL when the
        device is a GPU, gloo on CPU) and set self.rank/self.world."""
        rank, world = distributed.world_from_env()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1 and torch.cuda.is_available() and spec == "auto" and \
                local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} has no GPU of its own "
                              f"({torch.cuda.device_count()} visible): run at most that many "
                              f"processes, or set device=cpu")
        device = resolve_device(spec, local_rank)
        if world > 1 and not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch with "
                                      f"torchrun or `anomalyqc fit --nproc N`")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            # The group outlives fit (the caller may still use it) but must be torn down
            # before the interpreter exits: left to the runtime's exit, gloo's threads can
            # abort the process ("terminate called without an active exception").
            atexit.register(_destroy_group)
        if distributed.active():
            rank, world = dist.get_rank(), dist.get_world_size()
            backend = dist.get_backend()
            if (backend == "nccl") != (device.type == "cuda"):
                raise ConfigError(f"the process group uses {backend} but training runs on "
                                  f"{device}; set device to match (cuda for nccl, cpu for gloo)")
        self.rank, self.world = (rank, world) if distributed.active() else (0, 1)
        return device

    def _networks(self, model: Trainable) -> dict[str, nn.Module]:
        nets = model.networks()
        if not nets or not all(isinstance(m, nn.Module) for m in nets.values()):
            raise ConfigError(f"{type(model).__name__}.networks() must return a non-empty dict of "
                              f"torch modules")
        for net in nets.values():
            net.to(self.device)
            if self.config.channels_last:
                net.to(memory_format=torch.channels_last)
        return nets

    def _optimizers(self, groups: dict[str, OptimGroup]) -> dict[str, torch.optim.Adam]:
        seen: set[str] = set()
        out = {}
        for name, g in groups.items():
            unknown = [n for n in g.networks if n not in self.nets]
            twice = [n for n in g.networks if n in seen]
            if unknown or twice or not g.networks:
                raise ConfigError(f"optimizer {name!r}: networks {list(g.networks)} must be "
                                  f"among {sorted(self.nets)}, each in one optimizer only")
            seen.update(g.networks)
            params = [p for n in g.networks for p in self.nets[n].parameters() if p.requires_grad]
            out[name] = torch.optim.Adam(params, lr=g.lr, betas=g.betas,
                                         weight_decay=g.weight_decay)
        self.base_lr = {name: g.lr for name, g in groups.items()}
        return out

    def _wrap(self, nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """DistributedDataParallel around each network with trainable parameters."""
        if self.world == 1:
            return dict(nets)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return {name: DDP(net, device_ids=ids,
                          find_unused_parameters=self.config.find_unused_parameters)
                if any(p.requires_grad for p in net.parameters()) else net
                for name, net in nets.items()}

    def _batches(self, epoch: int) -> list[list[int]]:
        cfg = self.config
        return epoch_batches(self.train_idx, cfg.batch_size, cfg.seed, epoch, self.rank,
                             self.world, cfg.drop_last)

    def _loader(self, batches: list[list[int]], seed_parts: tuple[int, ...]) -> DataLoader:
        # An own generator: creating the loader must not draw from the global random state.
        return DataLoader(self.dataset, batch_sampler=batches,  # type: ignore[arg-type]
                          collate_fn=Batch.collate, num_workers=self.config.num_workers,
                          generator=generator(*seed_parts))

    def _to_device(self, batch: Batch) -> Batch:
        dev = self.device
        image = batch.image.to(dev, non_blocking=True)
        if self.config.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return replace(batch, image=image, label=batch.label.to(dev),
                       mask=None if batch.mask is None else batch.mask.to(dev),
                       roi=None if batch.roi is None else batch.roi.to(dev))

    # ------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        cfg, s = self.config, self.state
        started = time.perf_counter() - s.seconds
        # checked against this config's budget: a resume within the same one trains no more
        s.budget_stop = self._over_budget()
        cpu_started = time.process_time() - s.cpu_seconds
        while s.epoch < cfg.epochs and not s.stopped and not s.budget_stop:
            batches = self._batches(s.epoch)
            total = len(batches)
            for net in self.nets.values():
                net.train()
            self._report(s.batch, total)
            for batch in self._loader(batches[s.batch:], (cfg.seed, LOADER, s.epoch, self.rank)):
                self._train_step(batch)
                s.batch += 1
                s.step += 1
                s.seconds = time.perf_counter() - started
                s.cpu_seconds = time.process_time() - cpu_started
                if s.step % cfg.log_every == 0:
                    self._log_train()
                s.budget_stop = self._over_budget()
                if s.budget_stop and s.batch < total:  # mid-epoch (at its end: validate first)
                    self._stop_for_budget()
                    return
                if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0:
                    self._checkpoint()
                self._report(s.batch, total)
            self._end_epoch()
            s.seconds = time.perf_counter() - started
            if s.budget_stop and s.epoch < cfg.epochs and not s.stopped:
                self._stop_for_budget()
                return
            s.budget_stop = None  # reached together with the last epoch: not what ended it
            s.cpu_seconds = time.process_time() - cpu_started
            self._checkpoint()

    def _last_beats_best(self) -> bool:
        """After a budget stop mid-epoch, are the last weights (never validated: their epoch
        did not end) at least as good as the best epoch's? Validated now, on the validation
        split; without one they are kept, being the most trained. Nothing is recorded, so a
        resume is unaffected."""
        s = self.state
        if not s.budget_stop or s.batch == 0:
            return False
        if not self.val_idx:
            return True
        metric = self._validate().get(self.model.monitor)
        return metric is not None and (s.best is None or metric <= s.best)

    def _over_budget(self) -> str | None:
        """The budget spent ("max_steps", "max_minutes"), or None. Under torchrun rank 0's
        clock decides, so every process stops after the same step."""
        cfg, s = self.config, self.state
        if cfg.max_steps is not None and s.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_minutes is None:
            return None
        spent = torch.tensor([float(s.seconds >= 60 * cfg.max_minutes)])
        if distributed.active():
            distributed.broadcast_(spent)
        return "max_minutes" if spent.item() else None

    def _stop_for_budget(self) -> None:
        """End the run here: the partial log interval, a "stop" row saying which budget, and
        a checkpoint that a resume with a larger budget continues from."""
        cfg, s = self.config, self.state
        self._sync_buffers()
        self._log_train()
        limit = cfg.max_steps if s.budget_stop == "max_steps" else cfg.max_minutes
        self.log.append({"epoch": s.epoch + 1, "step": s.step, "phase": "stop",
                         "stopped_by": f"{s.budget_stop}={limit}",
                         "seconds": round(s.seconds, 3)})
        self._checkpoint()

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None and self.rank == 0:
            self.progress(f"{self.label}: epoch {self.state.epoch + 1}/{self.config.epochs}",
                          done, total)

    def _train_step(self, batch: Batch) -> None:
        cfg, s = self.config, self.state
        parts = (cfg.seed, s.epoch, s.batch, self.rank)
        batch = self._to_device(batch)
        batch = augment_batch(batch, cfg.rotation, cfg.vflip, generator(AUGMENT, *parts),
                              cfg.padding)
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.base_lr[name] * self.schedule.factor
        ctx = StepContext(self.wrapped, s.epoch, s.step, generator(STEP, *parts,
                          device=self.device), self.device, self.autocast_dtype, self._step)
        self._stepped: set[str] = set()
        losses = self.model.training_step(batch, ctx)
        if self.scaler is not None and self._stepped:
            self.scaler.update()
        if s.epoch_steps and set(losses) != set(s.epoch_sums):
            raise ConfigError(f"training_step returned keys {sorted(losses)}, earlier "
                              f"{sorted(s.epoch_sums)}: it must return the same keys every step")
        bad = [k for k, v in losses.items() if not math.isfinite(float(v))]
        if bad and self.scaler is None:
            raise ConfigError(f"training diverged: {', '.join(bad)} became {losses[bad[0]]} at "
                              f"epoch {s.epoch + 1}, step {s.step + 1}; lower the learning rate "
                              f"(the last checkpoint in {self.checkpoint_dir} is intact)")
        if not bad:  # under fp16 the scaler skipped a step with an overflow: not averaged in
            for k, v in losses.items():
                s.log_sums[k] = s.log_sums.get(k, 0.0) + float(v)
                s.epoch_sums[k] = s.epoch_sums.get(k, 0.0) + float(v)
            s.log_steps += 1
            s.epoch_steps += 1
        s.last_lr = {f"lr_{n}": self.base_lr[n] * self.schedule.factor for n in self.optimizers}
        self.schedule.after_step()

    def _step(self, name: str, loss: torch.Tensor, retain_graph: bool) -> None:
        if name not in self.optimizers:
            raise ConfigError(f"training_step stepped optimizer {name!r}; optimizer_groups() has "
                              f"{sorted(self.optimizers)}")
        for net in self.nets.values():
            net.zero_grad(set_to_none=True)
        opt = self.optimizers[name]
        if self.scaler is not None and name in self._stepped:
            # a second step of one optimizer in a training_step: the scaler unscales each
            # optimizer once per update
            self.scaler.update()
            self._stepped.clear()
        if self.scaler is not None:
            self.scaler.scale(loss).backward(retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph)
        if self.config.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt)
        else:
            opt.step()
        self._stepped.add(name)

    def _log_train(self) -> None:
        s = self.state
        if not s.log_steps:
            return
        means = {k: v / s.log_steps for k, v in s.log_sums.items()}
        self._write_row({"epoch": s.epoch + 1, "step": s.step, "phase": "train", **means,
                         **s.last_lr, "seconds": round(s.seconds, 3),
                         "cpu_seconds": round(s.cpu_seconds, 3)})
        s.log_sums, s.log_steps = {}, 0

    def _write_row(self, row: dict[str, Any]) -> None:
        self.log.append(row)
        if self.tensorboard is not None:
            self.tensorboard.append(row)

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (batch-norm statistics) everywhere: DDP copies them at the start of
        each forward, so each rank's last forward leaves its own."""
        if distributed.active():
            for net in self.nets.values():
                for buf in net.buffers():
                    distributed.broadcast_(buf.data)

    def _end_epoch(self) -> None:
        cfg, s = self.config, self.state
        self._sync_buffers()
        if self.world > 1:
            check_replicas(self.nets, f"in epoch {s.epoch + 1}")
        self._log_train()
        train = self._all_mean(s.epoch_sums, s.epoch_steps)
        val = self._validate()
        if val:
            self._write_row({"epoch": s.epoch + 1, "step": s.step, "phase": "val", **val,
                             "seconds": round(s.seconds, 3)})
        monitor = self.model.monitor
        metric = val.get(monitor, train.get(monitor)) if val else train.get(monitor)
        if metric is None and (cfg.schedule == "plateau" or cfg.early_stopping or
                               (cfg.restore_best and self.val_idx)):
            raise ConfigError(f"{type(self.model).__name__} monitors {monitor!r}, which neither "
                              f"validation_step ({sorted(val)}) nor training_step "
                              f"({sorted(train)}) returns")
        s.history.append({**{f"train_{k}": v for k, v in train.items()},
                          **{f"val_{k}": v for k, v in val.items()},
                          "lr_factor": self.schedule.factor})
        if metric is not None and math.isfinite(metric):
            if s.best is None or metric < s.best:
                s.best, s.best_epoch, s.bad_epochs = metric, s.epoch + 1, 0
                self._keep_best()
            else:
                s.bad_epochs += 1
        self.schedule.after_epoch(metric)
        if cfg.early_stopping and s.bad_epochs >= cfg.early_stopping:
            s.stopped = True
        s.epoch_sums, s.epoch_steps = {}, 0
        s.epoch += 1
        s.batch = 0

    def _all_mean(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Means over every process (the same dict on every rank)."""
        keys = sorted(sums)
        if not distributed.active():
            return {k: sums[k] / count for k in keys} if count else {}
        t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
        distributed.all_reduce_(t)
        return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)} if t[-1] > 0 else {}

    def _validate(self) -> dict[str, float]:
        """The validation losses, averaged over every validation image of every process."""
        if not self.val_idx:
            return {}
        cfg, s = self.config, self.state
        mine = self.val_idx[self.rank::self.world]
        chunks = [mine[i: i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        sums: dict[str, float] = {}
        for net in self.nets.values():
            net.eval()
        with torch.no_grad():
            loader = self._loader(chunks, (cfg.seed, LOADER, VALIDATE, s.epoch, self.rank))
            for i, batch in enumerate(loader):
                ctx = StepContext(dict(self.nets), s.epoch, s.step,
                                  generator(VALIDATE, cfg.seed, s.epoch, i, self.rank,
                                            device=self.device),
                                  self.device, self.autocast_dtype)
                out = self.model.validation_step(self._to_device(batch), ctx)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
        return self._all_mean(sums, len(mine))

    def _keep_best(self) -> None:
        self.best_weights = {f"{name}.{k}": v.detach().cpu().clone()
                             for name, net in self.nets.items() for k, v in net.state_dict().items()}
        if self.rank == 0:
            ckpt.save_tensors(self.checkpoint_dir / ckpt.BEST, self.best_weights)

    def _load_weights(self, tensors: dict[str, torch.Tensor], what: str, prefix: str = "") -> None:
        for name, net in self.nets.items():
            head = f"{prefix}{name}."
            own = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
            try:
                net.load_state_dict(own)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ModelFileError(f"{self.checkpoint_dir}: the {what} of network {name!r} do not "
                                     f"fit this model ({first}); resume with the same detector "
                                     f"parameters or start a new run") from None

    # -------------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        """Save everything a resume needs (a collective: every rank calls it)."""
        s = self.state
        tensors: dict[str, torch.Tensor] = {}
        for name, net in self.nets.items():
            for k, v in net.state_dict().items():
                tensors[f"net.{name}.{k}"] = v
        optimizers = {name: ckpt.encode(opt.state_dict(), f"opt.{name}", tensors)
                      for name, opt in self.optimizers.items()}
        blob = ckpt.rng_to_bytes(ckpt.rng_tensors())
        blobs = distributed.all_gather_rows(blob) if distributed.active() else [blob]
        if self.rank != 0:
            return
        for r, b in enumerate(blobs):
            for k, v in ckpt.rng_from_bytes(b).items():
                tensors[f"rng.{r}.{k}"] = v
        self.log.sync()
        progress = dict(vars(s))
        meta = {
            "config": self.config.model_dump(), "world": self.world, "n_images": len(self.dataset),  # type: ignore[arg-type]
            "networks": sorted(self.nets), "optimizers": optimizers,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": self.schedule.state(), "progress": progress,
            "log": {"rows": self.log.rows, "columns": self.log.columns},
        }
        ckpt.save_checkpoint(self.checkpoint_dir, s.step, tensors, meta)

    def _restore(self, n_images: int) -> dict[str, torch.Tensor]:
        """Load the checkpoint into the networks, optimizers and counters; returns this rank's
        random states (restored last, just before the loop)."""
        tensors, meta = ckpt.load_checkpoint(self.checkpoint_dir)
        where = self.checkpoint_dir / ckpt.POINTER
        old = meta["config"]
        changed = [f"{k} ({old.get(k)!r} vs {getattr(self.config, k)!r})" for k in RESUME_MUST_MATCH
                   if old.get(k) != getattr(self.config, k)]
        if changed:
            raise ConfigError(f"{where}: the run was started with other settings: "
                              f"{', '.join(changed)}; resume with the same ones")
        if meta["world"] != self.world:
            raise ConfigError(f"{where}: written by {meta['world']} processes; resume with "
                              f"--nproc {meta['world']}")
        if meta["n_images"] != n_images:
            raise DataError(f"{where}: the run trained on {meta['n_images']} images, the data "
                            f"now has {n_images}; resume on the same data")
        if meta["networks"] != sorted(self.nets) or set(meta["optimizers"]) != set(self.optimizers):
            raise ModelFileError(f"{where}: networks {meta['networks']} and optimizers "
                                 f"{sorted(meta['optimizers'])} differ from this model's")
        self._load_weights(tensors, "weights", prefix="net.")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt.decode(meta["optimizers"][name], tensors))
        if self.scaler is not None and meta["scaler"] is not None:
            self.scaler.load_state_dict(meta["scaler"])
        self.schedule.load_state(meta["schedule"])
        self.state = _Progress(**meta["progress"])
        self.log.start(meta["log"]["rows"], meta["log"]["columns"])
        best = ckpt.load_best(self.checkpoint_dir) if self.state.best is not None else None
        self.best_weights = best
        head = f"rng.{self.rank}."
        return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


__all__ = ["TrainResult", "Trainer", "make_schedule"]
