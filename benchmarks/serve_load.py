"""Bounded load test of `anomalyqc serve` on loopback, and the HTTP layer's cost.

A small PaDiM run is fitted on `anomalyqc synth vials` data (under --work), calibrated, and
served by a real `anomalyqc serve` process (uvicorn, one torch thread, its own SQLite audit
trail; --server-concurrency requests at once, --server-queue waiting). For each client
concurrency level (--levels, default 1 4 16) --requests POSTs of the generated test images
are sent by that many client threads, each with its own keep-alive connection, and the
script reports:

- latency percentiles (p50/p90/p99/max) of the 200 answers, client side (end to end) and
  the service's own `timings_ms.total` (decode, forward pass, heatmap, audit commit);
- the 503 count (the clients exceed concurrency + queue at the top level, so some requests
  must be refused at once rather than queued without bound) and any other status;
- the audit trail after the level: every acknowledged request id stored exactly once, no
  stored decision nobody was answered for, and `audit verify` on the chain.

And the bare predict call in this process (read_image, transform, detector.predict, decide,
one torch thread) against one service request, alternately on the same images (--bare-repeats
pairs, before the levels): the difference is the cost of HTTP, multipart, the heatmap and the
audit commit, measured under the same machine load. Clients and server share the machine's
2 cores, so the client threads' own CPU is part of the figures at the higher levels; the JSON
records the load average.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --work /tmp/serve_bench \
        --out benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(values)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 3),
            "p90": round(float(np.percentile(a, 90)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "anomalyqc.cli", *args], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, image_size: int, n_train: int) -> tuple[Path, list[Path]]:
    data, run = work / "vials", work / "run"
    if not (run / "threshold.json").is_file():
        _cli("synth", "vials", "--out", str(data), "--seed", "0", "--n-train", str(n_train),
             "--n-test-good", "20", "--n-test-defect", "20")
        _cli("fit", "padim", "--data", str(data), "--out", str(run), "--image-size", str(image_size),
             "--overwrite")
        _cli("calibrate", str(run), "--data", str(data))
    images = sorted(p for p in (data / "test").rglob("*.png"))
    return run, images


def bare_predictor(run: Path) -> Any:
    """The library call the service wraps (file read, transform, predict, decide) as a
    function of an image file returning its wall time in ms; one torch thread."""
    import torch

    from anomalyqc.data.io import read_image
    from anomalyqc.models.storage import load_detector
    from anomalyqc.workflow import decide, load_threshold, transform_for

    torch.set_num_threads(1)
    det = load_detector(run)
    tf = transform_for(det)
    thr = load_threshold(run, det.model_id or "")

    def timed(f: Path) -> float:
        t0 = time.perf_counter()
        x = tf.image(read_image(f), f)[None]
        with torch.inference_mode():
            score = float(det.predict(x).score[0])
        decide(score, thr)
        return (time.perf_counter() - t0) * 1e3

    return timed


def paired(url: str, token: str, images: list[Path], bare: Any, n: int) -> dict[str, Any]:
    """Bare call and service request on the same image, alternately, n times: both see the
    same machine load (the 2 cores are shared), so their difference is the service's cost."""
    import httpx

    b, s, d = [], [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as h:
        for i in range(n + 10):
            f = images[i % len(images)]
            data = f.read_bytes()
            tb = bare(f)
            t0 = time.perf_counter()
            r = h.post("/v1/inspect", files={"image": (f.name, data, "image/png")})
            ts = (time.perf_counter() - t0) * 1e3
            assert r.status_code == 200, r.text
            if i >= 10:  # warm-up
                b.append(tb)
                s.append(ts)
                d.append(ts - tb)
    return {"pairs": n, "bare_predict_ms": _pct(b), "service_end_to_end_ms": _pct(s),
            "difference_ms": _pct(d), "ratio_of_medians": round(float(np.median(s) / np.median(b)), 3)}


def run_level(url: str, token: str, payloads: list[tuple[str, bytes]], clients: int, requests: int,
              ) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    lat503: list[float] = []
    server_total: list[float] = []
    stages: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    acked: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as h:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                r = h.post("/v1/inspect", files={"image": (name, data, "image/png")})
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 503:
                        lat503.append(ms)
                    if r.status_code == 200:
                        body = r.json()
                        lat.append(ms)
                        server_total.append(body["timings_ms"]["total"])
                        for k, v in body["timings_ms"].items():
                            stages.setdefault(k, []).append(v)
                        acked.append(body["request_id"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 3),
            "ok_per_s": round(statuses.get(200, 0) / wall, 2), "statuses": statuses,
            "refused_503": statuses.get(503, 0), "latency_ms_503": _pct(lat503),
            "latency_ms_end_to_end": _pct(lat), "latency_ms_server_total": _pct(server_total),
            "server_stage_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
            "_acked": acked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--server-concurrency", type=int, default=2)
    ap.add_argument("--server-queue", type=int, default=8)
    ap.add_argument("--bare-repeats", type=int, default=300)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from anomalyqc.fileio import atomic_write_json
    from anomalyqc.provenance import provenance
    from anomalyqc.serve.audit import AuditLog, verify_audit

    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    run, images = prepare(args.work, args.image_size, args.n_train)
    payloads = [(p.name, p.read_bytes()) for p in images]
    bare = bare_predictor(run)

    db = args.work / f"audit_{int(time.time())}.db"
    token = secrets.token_urlsafe(24)
    port = _free_port()
    env = {**os.environ, "ANOMALYQC_API_TOKEN": token, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "anomalyqc.cli", "serve", "--model", str(run),
                             "--port", str(port), "--audit", str(db), "--threads", "1",
                             "--concurrency", str(args.server_concurrency), "--queue", str(args.server_queue),
                             "--heatmaps", str(args.work / "heatmaps")], env=env)
    url = f"http://127.0.0.1:{port}"
    levels: list[dict[str, Any]] = []
    http_cost: dict[str, Any] | None = None
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", headers={"X-API-Token": token}, timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start")
            time.sleep(0.2)
        run_level(url, token, payloads, 1, 20)  # warm-up, not reported
        http_cost = paired(url, token, images, bare, args.bare_repeats)
        print("paired", http_cost, flush=True)
        with AuditLog(db) as log:
            before = set(log.request_ids())
        for clients in args.levels:
            res = run_level(url, token, payloads, clients, args.requests)
            acked = res.pop("_acked")
            with AuditLog(db) as log:
                rows = [r for r in log.rows() if r["kind"] == "decision"]
            ids = [r["request_id"] for r in rows if r["request_id"] not in before]
            before |= set(ids)
            res["audit"] = {"acknowledged": len(acked), "stored": len(ids),
                            "lost": len(set(acked) - set(ids)), "duplicated": len(ids) - len(set(ids)),
                            "stored_not_acknowledged": len(set(ids) - set(acked))}
            levels.append(res)
            print(clients, {k: res[k] for k in ("ok_per_s", "statuses")}, res["latency_ms_end_to_end"],
                  res["audit"], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    verify = verify_audit(db).to_dict()
    result = {
        "benchmark": "serve_load",
        "settings": {"image_size": args.image_size, "detector": "padim", "requests_per_level": args.requests,
                     "levels": args.levels, "server_concurrency": args.server_concurrency,
                     "server_queue": args.server_queue, "torch_threads": 1,
                     "audit": "sqlite (WAL, synchronous=FULL)", "images": len(images)},
        "service_vs_bare_predict_paired": http_cost,
        "levels": levels,
        "audit_verify": verify,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "provenance": provenance(packages={"anomalyqc": ("anomalyqc",), "torch": ("torch",),
                                           "fastapi": ("fastapi",), "uvicorn": ("uvicorn",),
                                           "httpx": ("httpx",)}),
    }
    print({k: result[k] for k in ("service_vs_bare_predict_paired", "audit_verify")})
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
