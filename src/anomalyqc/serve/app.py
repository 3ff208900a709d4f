"""The inspection service: FastAPI app over a loaded model and the audit trail.

Endpoints (all but /health need the API token, `Authorization: Bearer T` or `X-API-Token: T`):

    GET  /health                     the process answers (no token)
    GET  /ready                      200 with the model's id once loaded, else 503
    POST /v1/inspect                 multipart field `image`: one image -> score, decision, ...
    POST /v1/inspect-strip           multipart fields `frames` (in order), with --layout: one
                                     strip acquisition -> region, vial and strip decisions
    GET  /v1/heatmaps/{id}.png       the heatmap overlay of a request
    GET  /v1/decisions               the latest decisions from the audit trail
    GET  /review                     the operator review page (serve/review.py; signs in with
                                     the token once, as a cookie)
    POST /v1/reload                  load the model again (or {"run": PATH}) and swap it in

Every decision is appended to the audit trail and committed before its 200 goes out; when the
append fails the request fails (503) and no decision is given. Requests beyond `concurrency`
wait in a queue of `queue` places; past that, or after `queue_timeout_s` in the queue, they
get 503 with Retry-After at once rather than unbounded latency. The request body is read only
after a place is taken, so a full service does not buffer uploads either.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from anomalyqc.data.notes import InputNotes
from anomalyqc.data.transforms import MAX_STRETCH, as_hw
from anomalyqc.errors import AnomalyQCError, DataError
from anomalyqc.fileio import atomic_write_bytes, json_safe
from anomalyqc.serve.audit import AuditLog, Entry
from anomalyqc.serve.auth import Tokens, presented_token
from anomalyqc.serve.model import LoadedModel, ModelHolder
from anomalyqc.serve.review import COOKIE, add_review_routes

_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_CHANNELS = {1: "gray (1 channel)", 3: "RGB (3 channels)"}


@dataclass
class ServeSettings:
    model: Path
    audit: str
    tokens: Tokens
    heatmaps: Path
    layout: Path | None = None
    thresholds: Path | None = None
    max_image_bytes: int = 20 << 20
    max_frames: int = 64
    concurrency: int = 2
    queue: int = 16
    queue_timeout_s: float = 30.0
    reload_poll_s: float = 2.0  # 0: reload only on POST /v1/reload
    keep_heatmaps: int = 10_000
    torch_threads: int | None = None
    runtime: str = "torch"  # or "onnx" / "onnx-int8": the run's checked ONNX export
    extra: dict[str, Any] = field(default_factory=dict)


class Refused(Exception):
    """A request refused with an HTTP status and a message saying what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Gate:
    """Bounded concurrency with a bounded queue. Runs on the event loop (no locks needed)."""

    def __init__(self, concurrency: int, queue: int, timeout_s: float) -> None:
        self.concurrency, self.queue, self.timeout_s = concurrency, queue, timeout_s
        self._sem = asyncio.Semaphore(concurrency)
        self.active = 0  # running + waiting
        self.refused = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.concurrency + self.queue:
            self.refused += 1
            raise Refused(503, f"the service is busy ({self.concurrency} running, {self.queue} queued, "
                               "the queue is full); retry shortly")
        self.active += 1
        try:
            try:
                await asyncio.wait_for(self._sem.acquire(), self.timeout_s)
            except TimeoutError:
                self.refused += 1
                raise Refused(503, f"waited {self.timeout_s:g} s for a place in the queue; "
                                   "retry shortly") from None
            try:
                yield
            finally:
                self._sem.release()
        finally:
            self.active -= 1


class Service:
    """State shared by the endpoints: settings, model, audit log, worker threads."""

    def __init__(self, settings: ServeSettings) -> None:
        self.s = settings
        self.holder = ModelHolder(settings.model, settings.layout, settings.thresholds,
                                  settings.runtime)
        self.audit = AuditLog(settings.audit)
        settings.heatmaps.mkdir(parents=True, exist_ok=True)
        self.spool = Path(tempfile.mkdtemp(prefix="anomalyqc-serve-"))
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency + 1, thread_name_prefix="inspect")
        self.gate = Gate(settings.concurrency, settings.queue, settings.queue_timeout_s)
        self._heatmaps_written = 0
        self._prune_lock = threading.Lock()
        self.load_error: str | None = None

    # ------------------------------------------------------------------ helpers
    def model(self) -> LoadedModel:
        m = self.holder.current
        if m is None:
            why = f": {self.holder.last_error}" if self.holder.last_error else " yet"
            raise Refused(503, f"no model loaded{why}")
        return m

    def heatmap_path(self, request_id: str) -> Path:
        return self.s.heatmaps / f"{request_id}.png"

    def save_heatmap(self, request_id: str, png: bytes) -> None:
        # Not durable: a heatmap can be recomputed from the image; the audit row is the record.
        atomic_write_bytes(self.heatmap_path(request_id), png, durable=False)
        self._heatmaps_written += 1
        if self._heatmaps_written % 500 == 0:
            self._prune_heatmaps()

    def _prune_heatmaps(self) -> None:
        """Keep the newest `keep_heatmaps` files so a service running for months does not fill the disk."""
        with self._prune_lock:
            files = sorted(self.s.heatmaps.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
            for p in files[: max(0, len(files) - self.s.keep_heatmaps)]:
                p.unlink(missing_ok=True)

    def read_upload(self, data: bytes, name: str, channels: int | None) -> np.ndarray:
        """Bytes of an uploaded file -> float (H, W, C), through anomalyqc.data.io's checks."""
        from anomalyqc.data.io import read_image

        fd, tmp = tempfile.mkstemp(dir=self.spool, suffix=Path(name).suffix[:8] or ".img")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                img = read_image(tmp, notes=InputNotes())
            except DataError as exc:
                raise Refused(422, str(exc).replace(tmp, f"upload {name!r}")) from None
        finally:
            os.unlink(tmp)
        if channels is not None and img.shape[2] != channels:
            have = _CHANNELS.get(img.shape[2], f"{img.shape[2]} channels")
            raise Refused(422, f"upload {name!r} is {have} "
                               f"but the model takes {_CHANNELS[channels]}; send images as the model was "
                               "trained on")
        return img

    def audit_entry(self, entry: Entry) -> dict[str, Any]:
        try:
            return self.audit.append(entry)
        except Exception as exc:  # noqa: BLE001 - no decision without its record
            raise Refused(503, f"the decision could not be recorded in the audit trail "
                               f"({type(exc).__name__}: {exc}); it is not given. Retry") from None

    # ------------------------------------------------------------------ the work (worker threads)
    def inspect_image(self, data: bytes, name: str, token_id: str) -> dict[str, Any]:
        from anomalyqc.workflow import decide, overlay_png

        t0 = time.perf_counter()
        m = self.model()  # this request's model, whatever a reload does meanwhile
        det = m.detector
        img = self.read_upload(data, name, det.config.channels)
        h, w = img.shape[:2]
        th, tw = as_hw(det.config.image_size)
        stretch = (w / h) / (tw / th)
        if max(stretch, 1 / stretch) > MAX_STRETCH:
            raise Refused(422, f"upload {name!r} is {h}x{w} (HxW) but the model takes {th}x{tw}: resizing "
                               f"would stretch it by {max(stretch, 1 / stretch):.3g}x (more than "
                               f"{MAX_STRETCH:g}); send the region the model was trained on")
        t1 = time.perf_counter()
        x = m.transform.image(img, name)[None]
        with torch.inference_mode():
            pred = det.predict(x)
        t2 = time.perf_counter()
        score = float(pred.score[0])
        decision, reason = decide(score, m.threshold)
        request_id = uuid.uuid4().hex
        self.save_heatmap(request_id, overlay_png(x[0], pred.anomaly_map[0, 0].float(), m.threshold))
        t3 = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        self.audit_entry(Entry("decision", request_id, decision, digest, m.model_id, m.threshold,
                               score, token_id, {"reason": reason, "filename": name,
                                                 "image_hw": [h, w], "run": str(m.run)}))
        t4 = time.perf_counter()
        ms = {"decode": t1 - t0, "predict": t2 - t1, "heatmap": t3 - t2, "audit": t4 - t3, "total": t4 - t0}
        return {
            "request_id": request_id, "score": score if math.isfinite(score) else None,
            "decision": decision, "reason": reason, "threshold": m.threshold,
            "model_id": m.model_id, "image_sha256": digest,
            "timings_ms": {k: round(v * 1e3, 3) for k, v in ms.items()},
            "heatmap_url": f"/v1/heatmaps/{request_id}.png",
        }

    def inspect_strip(self, frames: list[tuple[bytes, str]], token_id: str) -> dict[str, Any]:
        from anomalyqc.line.inspect import inspect_acquisition
        from anomalyqc.line.rank import KEY_FRAMES
        from anomalyqc.workflow import overlay_png

        t0 = time.perf_counter()
        m = self.model()
        if m.layout is None:
            raise Refused(404, "this service was started without --layout: POST single images to /v1/inspect")
        arrays = [self.read_upload(data, name, None) for data, name in frames]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise Refused(422, f"the frames differ in shape ({sorted(shapes)}); an acquisition's frames "
                               "all have one size and channel count")
        h, w, _ = arrays[0].shape
        if (h, w) != m.layout.image_size:
            raise Refused(422, f"the frames are {h}x{w} (HxW) but layout {m.layout.name!r} expects "
                               f"{m.layout.image_height}x{m.layout.image_width}")
        stack = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
        thr = m.line_thresholds
        key_frames, rank = (thr.key_frames, thr.rank) if thr is not None else (KEY_FRAMES, False)
        t1 = time.perf_counter()
        try:
            res = inspect_acquisition(stack, m.layout, m.line_models, thr, key_frames, rank)
        except DataError as exc:
            raise Refused(422, str(exc)) from None
        t2 = time.perf_counter()
        request_id = uuid.uuid4().hex
        heat = torch.from_numpy(np.ascontiguousarray(res.heatmap))
        self.save_heatmap(request_id, overlay_png(stack[0], heat, 1.0 if thr is not None else None))
        t3 = time.perf_counter()
        digests = [hashlib.sha256(d).hexdigest() for d, _ in frames]
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
        scores = res.scores
        detail: dict[str, Any] = {"frames_sha256": digests, "sources": res.sources,
                                  "layout": m.layout.name, "key_frames": list(key_frames), "rank": rank,
                                  "scores": json_safe(scores.tolist())}
        if thr is not None and res.decisions is not None:
            ratio = scores / np.where(thr.values != 0, thr.values, 1.0)
            finite = np.isfinite(ratio)
            score = float(ratio[finite].max()) if finite.all() else float("inf")
            decision: str | None = "defect" if res.rejected else "good"
            threshold: float | None = 1.0
            detail["thresholds"] = thr.as_dict()
            detail["vials_rejected"] = res.decisions["vial"].tolist()
            detail["regions_rejected"] = res.decisions["region"].tolist()
        else:
            finite = np.isfinite(scores)
            score = float(scores.max()) if finite.all() else float("inf")
            decision, threshold = ("defect" if not finite.all() else None), None
        self.audit_entry(Entry("strip", request_id, decision, digest, m.model_id, threshold,
                               score, token_id, detail))
        t4 = time.perf_counter()
        ms = {"decode": t1 - t0, "inspect": t2 - t1, "heatmap": t3 - t2, "audit": t4 - t3, "total": t4 - t0}
        return {
            "request_id": request_id, "decision": decision,
            "score": score if math.isfinite(score) else None,
            "score_units": "threshold (1.0 = at a region's threshold)" if thr is not None else "raw",
            "threshold": threshold, "model_id": m.model_id, "layout": m.layout.name,
            "sources": res.sources, "patch_scores": json_safe(scores.tolist()),
            "region_thresholds": None if thr is None else thr.as_dict(),
            "vials_rejected": detail.get("vials_rejected"),
            "regions_rejected": detail.get("regions_rejected"),
            "line_timings_ms": {k: round(v, 3) for k, v in res.timings_ms.items()},
            "timings_ms": {k: round(v * 1e3, 3) for k, v in ms.items()},
            "heatmap_url": f"/v1/heatmaps/{request_id}.png",
        }

    def reload(self, run: str | None, token_id: str) -> dict[str, Any]:
        before = self.holder.current.model_id if self.holder.current else None
        ok, why = self.holder.reload(run)
        m = self.holder.current
        after = m.model_id if m else None
        self.audit_entry(Entry("reload", uuid.uuid4().hex, "loaded" if ok else "failed", None, after,
                               None if m is None else m.threshold, None, token_id,
                               {"previous_model_id": before, "run": str(run or self.holder.run),
                                "error": why}))
        return {"reloaded": ok, "error": why, "model_id": after, "previous_model_id": before,
                "model": None if m is None else m.describe()}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(settings: ServeSettings) -> FastAPI:
    svc = Service(settings)

    async def watch() -> None:
        while settings.reload_poll_s > 0:
            await asyncio.sleep(settings.reload_poll_s)
            if svc.holder.current is not None and svc.holder.changed():
                await asyncio.get_running_loop().run_in_executor(svc.pool, svc.reload, None, "file-watch")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        loop = asyncio.get_running_loop()
        # Loaded in the background: /health answers at once, /ready says when the model is in.
        first = loop.run_in_executor(svc.pool, svc.reload, None, "startup")
        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.gather(first, return_exceptions=True)
            svc.pool.shutdown(wait=True)
            svc.audit.close()
            import shutil

            shutil.rmtree(svc.spool, ignore_errors=True)

    app = FastAPI(title="anomalyqc inspection service", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return _error(exc.status, str(exc), {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(AnomalyQCError)
    async def user_error(request: Request, exc: AnomalyQCError) -> JSONResponse:
        return _error(422, str(exc))

    def authorise(request: Request) -> str:
        token = (presented_token(request.headers.get("authorization"), request.headers.get("x-api-token"))
                 or request.cookies.get(COOKIE))  # the review page's sign-in
        if token is None:
            raise HTTPException(401, "an API token is required: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        token_id = settings.tokens.identify(token)
        if token_id is None:
            raise HTTPException(403, "the API token is not valid for this service")
        return token_id

    def check_length(request: Request, limit: int) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refused(413, f"the request is {int(length)} bytes, over the {limit} byte limit "
                               f"(--max-image-bytes {settings.max_image_bytes} per image)")

    async def uploads(request: Request, name: str, most: int) -> list[tuple[bytes, str]]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Refused(415, f"send the image as multipart/form-data, field {name!r}; e.g. "
                               f"curl -F {name}=@image.png")
        try:
            form = await request.form(max_files=most, max_fields=4, max_part_size=settings.max_image_bytes)
        except MultiPartException as exc:
            raise Refused(413 if "exceeded maximum size" in str(exc) else 400,
                          f"multipart body refused: {exc} (limit {settings.max_image_bytes} bytes per "
                          "image, --max-image-bytes)") from None
        except (AssertionError, ValueError) as exc:  # not multipart at all
            raise Refused(400, f"send the image as multipart/form-data field {name!r} ({exc})") from None
        files = [f for f in form.getlist(name) if isinstance(f, UploadFile)]
        if not files:
            raise Refused(422, f"no file in multipart field {name!r}; e.g. curl -F {name}=@image.png")
        out = []
        for f in files:
            data = await f.read()
            if not data:
                raise Refused(422, f"upload {f.filename!r} is empty")
            out.append((data, f.filename or name))
        return out

    async def in_pool(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(svc.pool, fn, *args)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        authorise(request)
        m = svc.holder.current
        if m is None:
            why = f": {svc.holder.last_error}" if svc.holder.last_error else " yet"
            return _error(503, f"model not loaded{why}")
        return JSONResponse({"ready": True, **m.describe(), "last_reload_error": svc.holder.last_error,
                             "audit": svc.audit.where, "concurrency": settings.concurrency,
                             "queue": settings.queue})

    @app.post("/v1/inspect")
    async def inspect(request: Request) -> JSONResponse:
        token_id = authorise(request)
        check_length(request, settings.max_image_bytes + 64 * 1024)
        async with svc.gate.slot():
            svc.model()  # 503 before reading the body when there is no model
            (data, name), *_ = await uploads(request, "image", 1)
            return JSONResponse(await in_pool(svc.inspect_image, data, name, token_id))

    @app.post("/v1/inspect-strip")
    async def inspect_strip(request: Request) -> JSONResponse:
        token_id = authorise(request)
        check_length(request, settings.max_image_bytes * settings.max_frames + 64 * 1024)
        async with svc.gate.slot():
            if svc.model().layout is None:
                raise Refused(404, "this service was started without --layout: POST single images to "
                                   "/v1/inspect")
            frames = await uploads(request, "frames", settings.max_frames)
            return JSONResponse(await in_pool(svc.inspect_strip, frames, token_id))

    @app.get("/v1/heatmaps/{name}")
    async def heatmap(name: str, request: Request) -> FileResponse:
        authorise(request)
        request_id = name.removesuffix(".png")
        if not name.endswith(".png") or not _REQUEST_ID.match(request_id):
            raise Refused(404, "heatmaps are /v1/heatmaps/<request_id>.png (32 hex digits)")
        path = svc.heatmap_path(request_id)
        if not path.is_file():
            raise Refused(404, f"no heatmap for request {request_id} (unknown, or pruned: the service keeps "
                               f"the newest {settings.keep_heatmaps})")
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/decisions")
    async def decisions(request: Request, limit: int = 50, decision: str | None = None) -> JSONResponse:
        authorise(request)
        if not 1 <= limit <= 1000:
            raise Refused(422, "limit must be 1..1000")
        rows = await in_pool(svc.audit.latest, limit, decision)
        return JSONResponse(rows)

    @app.post("/v1/reload")
    async def reload(request: Request) -> JSONResponse:
        token_id = authorise(request)
        run = None
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.json()
            run = body.get("run") if isinstance(body, dict) else None
            if run is not None and not isinstance(run, str):
                raise Refused(422, '"run" must be a run folder path')
        result = await in_pool(svc.reload, run, token_id)
        return JSONResponse(result, status_code=200 if result["reloaded"] else 409)

    add_review_routes(app, svc, lambda token: settings.tokens.identify(token) if token else None)
    return app
