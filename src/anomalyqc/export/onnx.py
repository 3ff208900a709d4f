"""ONNX export of a run folder, checked against the torch model, and the ONNX Runtime
inferencer that runs it behind the Detector predict interface.

`export_run` writes RUN/onnx/ as a whole (fileio.atomic_folder): model.onnx, optionally
model.int8.onnx, and export.json, which names the model it came from (the run's model id),
the file's SHA-256, the input it takes and the parity measured at export: the largest
absolute difference between ONNX Runtime's and torch's scores and maps on check images,
against a tolerance |a - b| <= atol + rtol * max|torch| (per output), and of any extra
output the graph has (the classifier's class probabilities within the same tolerance, its
class index exactly). An export outside the tolerance is refused, so a file that disagrees
with its model is never written.

A graph may state a looser relative tolerance for its map (`map_rtol` on the graph): the
classifier's Grad-CAM differentiates through ReLU/ReLU6, whose gradient jumps where a
pre-activation crosses 0 or 6, so a value within float32 rounding of a kink (-3e-6 in torch,
+1e-7 in ONNX Runtime) switches one element of the gradient and moves the map by a few
percent of its peak, while score and classes agree to 1e-5. export.json then records the
map tolerance used and how many images met the strict one.
Int8 (dynamic quantisation of the MatMul weights) is kept only if it meets its own, looser
tolerance; export.json records either way.

`OnnxDetector.load(run)` refuses a file whose hash or source model differs from what
export.json records (a stale export of a retrained run, an edited file).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyqc.errors import ConfigError, ModelFileError
from anomalyqc.fileio import atomic_folder, atomic_write_json, file_sha256
from anomalyqc.models.base import Detector
from anomalyqc.types import Batch, Prediction

EXPORT_DIR = "onnx"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INFO_FILE = "export.json"
OPSET = 18
RTOL, ATOL = 1e-4, 1e-4
INT8_RTOL = 2e-2  # int8 weights: scores within 2 % of the torch score's scale


def check_images(det: Detector, n: int = 8, data: str | Path | None = None,
                 seed: int = 0) -> Batch:
    """Images to compare the runtimes on: the first n of `data` read as the model reads its
    inputs (with their ROIs for a model that needs them), or seeded random images (half
    noise, half smooth blobs, so the maps vary; ROIs: a centred box, so the ROI matters)."""
    c = det.config.channels or 3
    h, w = det.input_size
    if data is not None:
        from anomalyqc.workflow import dataset_for

        ds = dataset_for(det, data, "test", masks=False)
        batch = Batch.collate([ds[i] for i in range(min(n, len(ds)))])
        return batch if det.needs_roi else Batch.from_images(batch.image)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n - n // 2, c, h, w, generator=g)
    smooth = torch.nn.functional.interpolate(torch.rand(n // 2, c, max(h // 16, 2), max(w // 16, 2),
                                                        generator=g), size=(h, w), mode="bilinear")
    batch = Batch.from_images(torch.cat([noise, smooth]).clamp(0, 1))
    if det.needs_roi:
        roi = torch.zeros(n, 1, h, w)
        roi[:, :, h // 5: h - h // 5, w // 5: w - w // 5] = 1.0
        batch.roi = roi
    return batch


def _feed(batch: Batch) -> dict[str, np.ndarray]:
    """The ONNX inputs of a batch: the images, and the ROIs for a graph that takes them."""
    feed = {"image": batch.image.float().contiguous().numpy()}
    if batch.roi is not None:
        feed["roi"] = batch.roi.float().contiguous().numpy()
    return feed


def parity(reference: Prediction, score: np.ndarray, amap: np.ndarray, rtol: float,
           atol: float, extras: dict[str, np.ndarray] | None = None,
           map_rtol: float | None = None) -> dict[str, Any]:
    """The largest differences and whether both outputs are within atol + rtol * max|ref|
    (the map within atol + map_rtol * max|ref| when map_rtol is given and larger);
    `extras` (outputs beyond score and map, named as in Prediction.extras) are checked too:
    an index ("..._index") must be equal, anything else within the same tolerance."""
    rs, rm = reference.score.numpy(), reference.anomaly_map.numpy()
    ds, dm = float(np.abs(score - rs).max()), float(np.abs(amap - rm).max())
    ts = atol + rtol * float(np.abs(rs).max())
    strict = atol + rtol * float(np.abs(rm).max())
    loose = map_rtol is not None and map_rtol > rtol
    tm = atol + map_rtol * float(np.abs(rm).max()) if loose else strict  # type: ignore[operator]
    out: dict[str, Any] = {
        "n_images": int(rs.shape[0]), "max_abs_score_diff": ds, "max_abs_map_diff": dm,
        "score_tolerance": ts, "map_tolerance": tm, "rtol": rtol, "atol": atol}
    if loose:
        per_image = np.abs(amap - rm).reshape(len(rm), -1).max(axis=1)
        out["map_rtol"] = map_rtol
        out["images_map_within_rtol"] = int((per_image <= strict).sum())
    ok = ds <= ts and dm <= tm
    for name, got in (extras or {}).items():
        ref = reference.extras[name].numpy()
        if name.endswith("_index"):
            wrong = int((got != ref).sum())
            out[name] = {"mismatches": wrong}
            ok = ok and wrong == 0
        else:
            diff = float(np.abs(got - ref).max())
            tol = atol + rtol * float(np.abs(ref).max())
            out[name] = {"max_abs_diff": diff, "tolerance": tol}
            ok = ok and diff <= tol
    out["within_tolerance"] = bool(ok)
    return out


def _outputs(session: Any, batch: Batch) -> dict[str, np.ndarray]:
    """ONNX Runtime's outputs of a batch, by name (score, anomaly_map, then any extras)."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feed(batch)), strict=True))


def _check(reference: Prediction, out: dict[str, np.ndarray], rtol: float,
           atol: float, map_rtol: float | None = None) -> dict[str, Any]:
    extras = {k: v for k, v in out.items() if k not in ("score", "anomaly_map")}
    return parity(reference, out["score"], out["anomaly_map"], rtol, atol, extras, map_rtol)


LEVELS = ("all", "extended")


def _session(path: Path, threads: int | None = None, providers: list[str] | None = None,
             level: str = "all") -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = threads
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    opts.log_severity_level = 3
    available = ort.get_available_providers()
    chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                           if p in available]
    return ort.InferenceSession(str(path), opts, providers=chosen)


LINE_BATCH = 60  # the line's 60-patch acquisition batch (SPEC: ResGANAD on the BFS line)
CHUNKS = (1, 4, 8, 16, 32, LINE_BATCH)


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000)
    return round(float(np.median(times)), 3)


def fastest_session(path: Path, images: Batch, repeats: int = 3) -> dict[str, Any]:
    """How the export runs fastest on this CPU, timed with one thread: the graph
    optimisation level, on the check images, then the chunk size a large batch is run in,
    on a line batch of LINE_BATCH images cut from the check images. ORT_ENABLE_ALL adds the
    NCHWc layout transform, which speeds the backbones up but for the small convolutional
    auto-encoders costs more in layout reorders than it saves; and a whole line batch's
    activations spill out of the caches, so chunks of it can run faster than the batch.
    Both are measured, not assumed; results are the same either way, only the speed
    differs."""
    feed = _feed(images)
    ms: dict[str, float] = {}
    for level in LEVELS:
        sess = _session(path, 1, ["CPUExecutionProvider"], level)
        ms[level] = _median_ms(lambda: sess.run(None, feed), repeats)  # noqa: B023
    best = min(ms, key=ms.__getitem__)
    sess = _session(path, 1, ["CPUExecutionProvider"], best)
    line = _feed(_head(_repeat(images, LINE_BATCH), LINE_BATCH))
    chunk_ms = {c: _median_ms(lambda: _run_chunked(sess, None, line, c), repeats)  # noqa: B023
                for c in CHUNKS}
    return {"graph_optimization_level": best, "timed_ms": ms,
            "timed_on": f"{len(images)} check images, 1 thread, median of {repeats}",
            "chunk": min(chunk_ms, key=chunk_ms.__getitem__),
            "chunk_timed_ms": {str(c): v for c, v in chunk_ms.items()},
            "chunk_timed_on": f"a {LINE_BATCH}-image batch of the check images, 1 thread, "
                              f"median of {repeats}"}


def _repeat(batch: Batch, n: int) -> Batch:
    pick = torch.arange(n) % len(batch)
    return Batch(image=batch.image[pick], label=batch.label[pick],
                 roi=None if batch.roi is None else batch.roi[pick])


def _run_chunked(session: Any, names: list[str] | None, feed: dict[str, np.ndarray],
                 chunk: int | None) -> list[np.ndarray]:
    """session.run over the batch in chunks of `chunk` images (None: at once), outputs
    concatenated along the batch."""
    n = len(next(iter(feed.values())))
    if not chunk or n <= chunk:
        return list(session.run(names, feed))
    parts = [session.run(names, {k: v[i:i + chunk] for k, v in feed.items()})
             for i in range(0, n, chunk)]
    return [np.concatenate(out) for out in zip(*parts, strict=True)]


def _export_file(graph: torch.nn.Module, example: Batch, path: Path, opset: int) -> None:
    """`graph` to `path`; its outputs are score and anomaly_map, or the names it lists in
    `output_names` (score and anomaly_map first, then Prediction.extras names)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    roi = example.roi is not None
    args = (example.image, example.roi) if roi else (example.image,)
    names = ["image", "roi"] if roi else ["image"]
    # The exporter prints its progress to stdout: the CLI's output stays one JSON object.
    with warnings.catch_warnings(), open(os.devnull, "w") as quiet:
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(quiet):
            torch.onnx.export(graph, args, str(path), input_names=names,
                              output_names=list(getattr(graph, "output_names",
                                                        ("score", "anomaly_map"))),
                              dynamic_shapes=tuple({0: batch} for _ in args), dynamo=True,
                              opset_version=opset, external_data=False)


def export_run(run: str | Path, data: str | Path | None = None, n_check: int = 8,
               rtol: float = RTOL, atol: float = ATOL, int8: bool = False,
               int8_rtol: float = INT8_RTOL, opset: int = OPSET, overwrite: bool = False,
               map_rtol: float | None = None) -> dict[str, Any]:
    """Export the model of `run` to RUN/onnx/ and return what export.json records.
    `map_rtol` overrides the graph's own looser map tolerance (see the module docstring).
    ConfigError when the detector cannot be exported or ONNX Runtime disagrees with torch
    beyond the tolerance (nothing is written then)."""
    from anomalyqc.export.graphs import export_graph
    from anomalyqc.models.storage import load_detector
    from anomalyqc.provenance import package_versions

    run = Path(run)
    det = load_detector(run)
    graph = export_graph(det)
    images = check_images(det, n_check, data)
    with torch.inference_mode():
        reference = det.predict(images if images.roi is not None else images.image)

    def refuse_existing(folder: Path) -> None:
        if not overwrite:
            raise ConfigError(f"{folder} holds an export already; pass --overwrite to replace it")

    with atomic_folder(run / EXPORT_DIR, refuse_existing) as tmp:
        target = tmp / MODEL_FILE
        started = time.perf_counter()
        try:
            _export_file(graph, _head(images, 2), target, opset)
        except Exception as exc:  # the exporter's own errors say little to a user
            raise ConfigError(f"{det.name}: the ONNX exporter failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]})") from exc
        export_s = time.perf_counter() - started
        session = fastest_session(target, images)
        outputs = _outputs(_session(target, level=session["graph_optimization_level"]), images)
        if map_rtol is None:
            map_rtol = getattr(graph, "map_rtol", None)
        check = _check(reference, outputs, rtol, atol, map_rtol)
        if not check["within_tolerance"]:
            extra = "".join(f", {k} {v}" for k, v in check.items() if isinstance(v, dict))
            raise ConfigError(
                f"ONNX Runtime disagrees with the torch model of {run}: max |score diff| "
                f"{check['max_abs_score_diff']:.3g} (tolerance {check['score_tolerance']:.3g}), "
                f"max |map diff| {check['max_abs_map_diff']:.3g} (tolerance "
                f"{check['map_tolerance']:.3g}){extra}; nothing was written. Report this with "
                f"the run")
        info: dict[str, Any] = {
            "format": "onnx", "opset": opset, "file": MODEL_FILE, "sha256": file_sha256(target),
            "source_model_id": det.model_id, "detector": det.name,
            "input": {"name": "image", "shape": ["batch", det.config.channels, *det.input_size],
                      "dtype": "float32", "range": [0.0, 1.0]},
            **({"roi_input": {"name": "roi", "shape": ["batch", 1, *det.input_size],
                              "dtype": "float32", "meaning": "nonzero = inspect"}}
               if images.roi is not None else {}),
            "outputs": {"score": ["batch"], "anomaly_map": ["batch", 1, *det.input_size],
                        **{k: ["batch", *outputs[k].shape[1:]] for k in outputs
                           if k not in ("score", "anomaly_map")}},
            "parity": check,
            "session": session,
            "check_images": str(data) if data else f"{len(images)} seeded random",
            "export_seconds": round(export_s, 3),
            "versions": package_versions(("torch", "onnx", "onnxruntime")),
        }
        if int8:
            info["int8"] = _quantise(target, tmp / INT8_FILE, images, reference, int8_rtol, atol,
                                     map_rtol)
        atomic_write_json(tmp / INFO_FILE, info)
    return info


def _quantise(src: Path, dst: Path, images: Batch, reference: Prediction,
              rtol: float, atol: float, map_rtol: float | None = None) -> dict[str, Any]:
    """Dynamic int8 quantisation of the weights; kept only within its tolerance."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as t:
        pre = Path(t) / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantise the raw graph then
            pre = src
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
    check = _check(reference, _outputs(_session(dst), images), rtol, atol, map_rtol)
    if not check["within_tolerance"]:
        dst.unlink()
        return {"kept": False, "parity": check,
                "why": "int8 scores outside the tolerance: the float model is the export"}
    return {"kept": True, "file": INT8_FILE, "sha256": file_sha256(dst), "parity": check}


def read_export(run: str | Path) -> dict[str, Any]:
    path = Path(run) / EXPORT_DIR / INFO_FILE
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelFileError(f"{run} has no ONNX export ({path} is missing); run "
                             f"`anomalyqc export {run} --format onnx` first") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is unreadable ({exc}); export the run again") from None


def _head(batch: Batch, n: int) -> Batch:
    return Batch(image=batch.image[:n], label=batch.label[:n],
                 roi=None if batch.roi is None else batch.roi[:n])


class OnnxDetector:
    """A run's exported model in ONNX Runtime, with the Detector attributes the workflows,
    the line and the service read (name, config, input_size, model_id, ROI flags, predict).
    A graph with extra outputs (the classifier's class index and probabilities) returns them
    in Prediction.extras, and the detector's own readers of them (prediction_fields for
    predict's rows, classification_metrics for evaluate) are offered here too."""

    supervised = False
    prediction_fields: Callable[[Prediction, int], dict[str, Any]]
    classification_metrics: Callable[..., dict[str, Any]]

    def __init__(self, run: str | Path, int8: bool = False, threads: int | None = None) -> None:
        from anomalyqc.models import storage

        info = read_export(run)
        which = info.get("int8") if int8 else info
        if int8 and not (which and which.get("kept")):
            raise ModelFileError(f"{run} has no int8 export (export with --int8; it is kept only "
                                 f"within its tolerance: see {EXPORT_DIR}/{INFO_FILE})")
        assert which is not None
        path = Path(run) / EXPORT_DIR / which["file"]
        if not path.is_file() or file_sha256(path) != which["sha256"]:
            raise ModelFileError(f"{path} is missing or does not match the hash in "
                                 f"{INFO_FILE}; export the run again")
        current = storage.run_model_id(run)
        if current != info["source_model_id"]:
            raise ModelFileError(f"the ONNX export in {run} is of model {info['source_model_id']}, "
                                 f"but the run now holds {current}; export it again")
        det = storage.detector_from_config(storage.read_run_config(run),
                                           Path(run) / storage.CONFIG_FILE)
        self.name = det.name
        self.config = det.config
        self.model_id = current
        self.export_info = info
        self.runtime = "onnxruntime-int8" if int8 else "onnxruntime"
        self.fitted = True
        # a graph with an ROI input is a model that scores inside ROIs and needs them
        self.uses_roi = self.needs_roi = "roi_input" in info
        self.supervised = det.supervised
        # Bound to the config-built (unfitted) detector: they read only its class names.
        for reader in ("prediction_fields", "classification_metrics"):
            if hasattr(det, reader):
                setattr(self, reader, getattr(det, reader))
        timed = info.get("session") or {}
        level = timed.get("graph_optimization_level", "all")
        self._session = _session(path, threads, level=level if level in LEVELS else "all")
        chunk = timed.get("chunk")
        self.chunk = chunk if isinstance(chunk, int) and chunk > 0 else None
        self._outputs = [o.name for o in self._session.get_outputs()]

    @property
    def input_size(self) -> tuple[int, int]:
        from anomalyqc.data.transforms import as_hw

        return as_hw(self.config.crop_size or self.config.image_size)

    def predict(self, images: torch.Tensor | Batch) -> Prediction:
        x = images.image if isinstance(images, Batch) else images
        want = (self.config.channels, *self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ConfigError(f"this {self.name} export takes images (B, "
                              f"{', '.join(map(str, want))}), got {tuple(x.shape)}")
        roi = images.roi if isinstance(images, Batch) else None
        if self.needs_roi and (roi is None or tuple(roi.shape) != (x.shape[0], 1, *want[1:])):
            raise ConfigError(f"this {self.name} export scores inside ROIs and needs one per "
                              f"image: give a Batch with roi (B, 1, {want[1]}, {want[2]})")
        started = time.perf_counter()
        got = _run_chunked(self._session, self._outputs, _feed(Batch(
            image=x, label=torch.zeros(len(x)), roi=roi if self.needs_roi else None)),
            self.chunk)
        ms = (time.perf_counter() - started) * 1000
        out = {k: torch.from_numpy(v) for k, v in zip(self._outputs, got, strict=True)}
        return Prediction(score=out.pop("score"), anomaly_map=out.pop("anomaly_map"), extras=out,
                          timings={"total_ms": ms})


def compare_runtimes(run: str | Path, images: Batch, batch_sizes: tuple[int, ...] = (1, 60),
                     repeats: int = 20, warmup: int = 2, int8: bool = False) -> dict[str, Any]:
    """Latency of torch eager and ONNX Runtime on the same inputs, interleaved call by call so
    both see the same machine load; ORT gets as many threads as torch. Ratios are
    torch / ORT (above 1: ORT faster). Also the largest score difference on these inputs."""
    import statistics

    from anomalyqc.models.storage import load_detector

    det = load_detector(run)
    runtimes: dict[str, Any] = {"torch": det,
                                "onnxruntime": OnnxDetector(run, threads=torch.get_num_threads())}
    if int8:
        runtimes["onnxruntime_int8"] = OnnxDetector(run, int8=True,
                                                    threads=torch.get_num_threads())
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "batches": {}}
    for n in batch_sizes:
        pick = torch.arange(n) % len(images)
        x = Batch(image=images.image[pick].contiguous(), label=images.label[pick],
                  roi=None if images.roi is None else images.roi[pick].contiguous())
        ms: dict[str, list[float]] = {k: [] for k in runtimes}
        scores: dict[str, torch.Tensor] = {}
        for i in range(warmup + repeats):
            for name, model in runtimes.items():
                t = time.perf_counter()
                with torch.inference_mode():
                    pred = model.predict(x)
                if i >= warmup:
                    ms[name].append((time.perf_counter() - t) * 1000)
                scores[name] = pred.score
        row: dict[str, Any] = {
            name: {"median_ms": round(statistics.median(v), 2),
                   "p95_ms": round(float(np.percentile(v, 95)), 2), "n": len(v)}
            for name, v in ms.items()}
        for name in runtimes:
            if name != "torch":
                row[f"speedup_{name}"] = round(statistics.median(ms["torch"])
                                               / statistics.median(ms[name]), 3)
                row[f"max_abs_score_diff_{name}"] = float(
                    (scores[name] - scores["torch"]).abs().max())
        out["batches"][str(n)] = row
    return out
