"""The inspection service: tokens, input validation, the bounded queue, hot reload, the strip
endpoint, and (through a real uvicorn process) a kill -9 that loses no acknowledged decision."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from anomalyqc.errors import ConfigError
from anomalyqc.serve.app import ServeSettings, create_app
from anomalyqc.serve.audit import AuditLog, verify_audit
from anomalyqc.serve.auth import TOKEN_ENV, TOKEN_FILE_ENV, load_tokens

TOKEN = secrets.token_urlsafe(24)  # made per test session: no token lives in the code
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    return None


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# line PLC\nplc-1 {TOKEN}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def calibrated_run(tiny_run: Path, tiny_vials: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalyqc.workflow import calibrate_run

    run = tmp_path_factory.mktemp("served") / "run_a"
    shutil.copytree(tiny_run, run)
    calibrate_run(run, tiny_vials)
    return run


@pytest.fixture(scope="module")
def other_run(tiny_vials: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different model (48 px input, uncalibrated) to reload into."""
    from anomalyqc.workflow import fit_run

    run = tmp_path_factory.mktemp("served") / "run_b"
    fit_run("padim", tiny_vials, run, {"image_size": 48}, 4)
    return run


@pytest.fixture(scope="module")
def good_png(tiny_vials: Path) -> bytes:
    return sorted((tiny_vials / "test" / "good").glob("*.png"))[0].read_bytes()


def _settings(tmp_path: Path, run: Path, token_file: Path, **kw: Any) -> ServeSettings:
    base: dict[str, Any] = {"reload_poll_s": 0.0, "audit": str(tmp_path / "audit.db")}
    base.update(kw)
    return ServeSettings(model=run, tokens=load_tokens(token_file), heatmaps=tmp_path / "heatmaps", **base)


@contextlib.contextmanager
def serving(settings: ServeSettings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready", headers=AUTH).status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready", headers=AUTH).text
            time.sleep(0.02)
        yield client


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _direct_score(run: Path, png: bytes, tmp_path: Path) -> float:
    """The score the bare library gives, to compare the service's with."""
    from anomalyqc.data.io import read_image
    from anomalyqc.models.storage import load_detector
    from anomalyqc.workflow import transform_for

    f = tmp_path / f"direct_{run.name}.png"
    f.write_bytes(png)
    det = load_detector(run)
    with torch.inference_mode():
        return float(det.predict(transform_for(det).image(read_image(f))[None]).score[0])


# ----------------------------------------------------------------------------- tokens
def test_tokens_come_from_configuration_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(ConfigError, match="no API token is configured"):
        load_tokens()
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_tokens()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    tokens = load_tokens()
    assert tokens.identify(TOKEN) is not None and tokens.identify(TOKEN + "x") is None
    assert TOKEN not in str(tokens.identify(TOKEN))
    f = tmp_path / "t"
    f.write_text(f"a {TOKEN}\nb {TOKEN}\n")
    with pytest.raises(ConfigError, match="line 2: the same token"):
        load_tokens(f)


def test_every_endpoint_but_health_needs_the_token(tmp_path: Path, calibrated_run: Path, token_file: Path,
                                                   good_png: bytes) -> None:
    with serving(_settings(tmp_path, calibrated_run, token_file)) as c:
        assert c.get("/health").status_code == 200
        calls = [("get", "/ready", {}), ("post", "/v1/inspect", {"files": {"image": ("a.png", good_png)}}),
                 ("post", "/v1/inspect-strip", {"files": {"frames": ("a.png", good_png)}}),
                 ("get", f"/v1/heatmaps/{'0' * 32}.png", {}), ("get", "/v1/decisions", {}),
                 ("post", "/v1/reload", {})]
        for method, url, kw in calls:
            r = getattr(c, method)(url, **kw)
            assert r.status_code == 401, (url, r.text)
            assert r.headers.get("www-authenticate") == "Bearer"
            r = getattr(c, method)(url, headers={"Authorization": "Bearer " + "x" * 32}, **kw)
            assert r.status_code == 403, (url, r.text)
            r = getattr(c, method)(url, headers={"X-API-Token": TOKEN[:-1]}, **kw)
            assert r.status_code == 403, (url, r.text)
        assert c.get("/ready", headers={"X-API-Token": TOKEN}).status_code == 200
        with AuditLog(tmp_path / "audit.db") as log:
            assert log.latest(kinds=("decision", "strip")) == []  # nothing refused got in


# ----------------------------------------------------------------------------- inspect
def test_inspect_answers_the_library_score_and_records_it(tmp_path: Path, calibrated_run: Path,
                                                          token_file: Path, good_png: bytes) -> None:
    from anomalyqc.workflow import load_threshold

    with serving(_settings(tmp_path, calibrated_run, token_file)) as c:
        r = c.post("/v1/inspect", headers=AUTH, files={"image": ("good.png", good_png, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        hm = c.get(body["heatmap_url"], headers=AUTH)
        assert hm.status_code == 200 and hm.content.startswith(b"\x89PNG")
        assert c.get("/v1/heatmaps/..%2Faudit.db.png", headers=AUTH).status_code == 404
        recent = c.get("/v1/decisions?limit=5", headers=AUTH).json()
    model_id = (calibrated_run / "manifest.json").read_text().split('"model_id": "')[1][:16]
    threshold = load_threshold(calibrated_run, model_id)
    score = _direct_score(calibrated_run, good_png, tmp_path)
    assert body["model_id"] == model_id and body["threshold"] == threshold
    assert body["score"] == pytest.approx(score, rel=1e-5)
    assert body["decision"] == ("defect" if score >= threshold else "good")
    assert set(body["timings_ms"]) >= {"decode", "predict", "heatmap", "audit", "total"}
    import hashlib

    with AuditLog(tmp_path / "audit.db") as log:
        row = log.find(body["request_id"])
    assert row is not None and recent[0]["request_id"] == body["request_id"]
    assert row["image_sha256"] == hashlib.sha256(good_png).hexdigest()
    assert (row["model_id"], row["threshold"], row["score"], row["decision"], row["token_id"]) == (
        model_id, threshold, body["score"], body["decision"], "plc-1")
    assert TOKEN.encode() not in (tmp_path / "audit.db").read_bytes()
    assert verify_audit(tmp_path / "audit.db").ok


def test_bad_input_is_refused_with_4xx_and_a_message(tmp_path: Path, calibrated_run: Path, token_file: Path,
                                                      good_png: bytes) -> None:
    rgb = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    thin = _png(np.zeros((20, 400), np.uint8))
    with serving(_settings(tmp_path, calibrated_run, token_file, max_image_bytes=200_000)) as c:
        def post(data: bytes, name: str = "x.png", field: str = "image") -> Any:
            return c.post("/v1/inspect", headers=AUTH, files={field: (name, data, "image/png")})

        cases = [
            (post(b"not an image at all" * 10), 422, "not a PNG, JPEG"),
            (post(good_png[: len(good_png) // 2]), 422, "truncated"),
            (post(rgb, "colour.png"), 422, "RGB (3 channels) but the model takes gray"),
            (post(thin, "thin.png"), 422, "stretch"),
            (post(good_png, field="picture"), 422, "no file in multipart field 'image'"),
            (post(b"\x89PNG" + b"\0" * 300_000), 413, "limit"),
            (c.post("/v1/inspect", headers=AUTH, content=b"raw bytes"), 415, "multipart/form-data"),
            (c.post("/v1/inspect-strip", headers=AUTH, files={"frames": ("a.png", good_png)}), 404,
             "without --layout"),
        ]
        for r, status, words in cases:
            assert r.status_code == status, r.text
            assert words in r.json()["error"], r.json()
        assert "'colour.png'" in cases[2][0].json()["error"]  # the upload is named, not a temp file
        assert post(good_png).status_code == 200  # and the service still works
    with AuditLog(tmp_path / "audit.db") as log:
        assert len(log.latest()) == 1  # only the good request was decided


def test_queue_full_answers_503_at_once(tmp_path: Path, calibrated_run: Path, token_file: Path,
                                        good_png: bytes) -> None:
    """One running, one queued; the third request is refused at once with Retry-After."""
    settings = _settings(tmp_path, calibrated_run, token_file, concurrency=1, queue=1)
    release = threading.Event()
    with serving(settings) as c:
        svc = c.app.state.service  # type: ignore[attr-defined]
        real = svc.inspect_image

        def held(*args: Any) -> Any:
            release.wait(20)  # a slow forward pass, held until the test lets it go
            return real(*args)

        svc.inspect_image = held
        results: list[int] = []

        def send() -> None:
            r = c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)})
            results.append(r.status_code)

        workers = [threading.Thread(target=send) for _ in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 10
        while svc.gate.active < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        r = c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "queue is full" in r.json()["error"]
        assert time.monotonic() - t0 < 2.0
        release.set()
        for w in workers:
            w.join(20)
        assert results == [200, 200]
        assert c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)}).status_code == 200


# ----------------------------------------------------------------------------- hot reload
def test_hot_reload_swaps_whole_models_and_a_failed_load_keeps_the_old(
        tmp_path: Path, calibrated_run: Path, other_run: Path, token_file: Path, good_png: bytes) -> None:
    """Requests run while the served symlink flips between two models and reloads happen:
    every answer's score, threshold and model id belong to one and the same model."""
    from anomalyqc.models.storage import run_model_id
    from anomalyqc.workflow import load_threshold

    expected = {}
    for run in (calibrated_run, other_run):
        mid = run_model_id(run)
        expected[mid] = (_direct_score(run, good_png, tmp_path), load_threshold(run, mid))
    a_id, b_id = run_model_id(calibrated_run), run_model_id(other_run)
    link = tmp_path / "current"
    link.symlink_to(calibrated_run)

    def point(target: Path) -> None:
        tmp = tmp_path / "current.new"
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic: the link always names a complete run

    answers: list[dict] = []
    stop = threading.Event()
    with serving(_settings(tmp_path, link, token_file, concurrency=2, reload_poll_s=0.1)) as c:
        def hammer() -> None:
            while not stop.is_set():
                r = c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)})
                assert r.status_code == 200, r.text
                answers.append(r.json())

        workers = [threading.Thread(target=hammer) for _ in range(2)]
        for w in workers:
            w.start()
        for target in (other_run, calibrated_run, other_run):
            point(target)
            r = c.post("/v1/reload", headers=AUTH)
            assert r.status_code == 200 and r.json()["reloaded"], r.text
            time.sleep(0.1)
        stop.set()
        for w in workers:
            w.join(30)
        assert c.get("/ready", headers=AUTH).json()["model_id"] == b_id

        broken = tmp_path / "broken"
        shutil.copytree(other_run, broken)
        (broken / "weights.safetensors").write_bytes(b"\0" * 64)
        point(broken)
        r = c.post("/v1/reload", headers=AUTH)
        assert r.status_code == 409 and "weights.safetensors" in r.json()["error"]
        ready = c.get("/ready", headers=AUTH).json()
        assert ready["model_id"] == b_id and "weights.safetensors" in ready["last_reload_error"]
        after = c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)}).json()
        assert after["model_id"] == b_id

        point(calibrated_run)  # the file watcher picks this one up by itself
        deadline = time.monotonic() + 10
        while c.get("/ready", headers=AUTH).json()["model_id"] != a_id:
            assert time.monotonic() < deadline, "the changed run was not reloaded"
            time.sleep(0.05)
    assert {a["model_id"] for a in answers} == {a_id, b_id}
    for a in [*answers, after]:
        score, threshold = expected[a["model_id"]]
        assert a["score"] == pytest.approx(score, rel=1e-5) and a["threshold"] == threshold
    with AuditLog(tmp_path / "audit.db") as log:
        reloads = [r for r in log.rows() if r["kind"] == "reload"]
    # the watcher may also catch a flip before the POST does: the count of reloads varies
    assert reloads[0]["token_id"] == "startup" and reloads[-1]["token_id"] == "file-watch"
    assert reloads[-1]["decision"] == "loaded" and reloads[-1]["model_id"] == a_id
    assert "plc-1" in {r["token_id"] for r in reloads}
    failed = [r for r in reloads if r["decision"] == "failed"]
    assert failed and all(r["model_id"] == b_id for r in failed)  # the old model stayed
    assert verify_audit(tmp_path / "audit.db").ok


# ----------------------------------------------------------------------------- strips
def test_strip_acquisition_gives_the_line_decisions(tmp_path: Path, calibrated_run: Path, token_file: Path,
                                                    tiny_run: Path) -> None:
    from conftest import invoke

    from anomalyqc.evaluation.thresholds import ThresholdChoice
    from anomalyqc.line.inspect import LineModels, inspect_acquisition
    from anomalyqc.line.layout import load_layout
    from anomalyqc.line.thresholds import RegionThresholds
    from anomalyqc.models.storage import load_detector

    layout_file = tmp_path / "layout.yaml"
    assert invoke("line", "layout", "--out", layout_file, "--height", 64, "--patch-size", 32).exit_code == 0
    layout = load_layout(layout_file)
    det = load_detector(calibrated_run)
    frames = np.random.default_rng(1).integers(0, 256, (16, 64, 80), np.uint8)
    models = LineModels.shared(det, layout.region_names)
    raw = inspect_acquisition(torch.from_numpy(frames).float()[:, None] / 255, layout, models)
    # thresholds between the patch scores, so some regions reject and some do not
    ranked = np.sort(raw.scores.reshape(-1, raw.scores.shape[-1]), axis=0)
    values = (ranked[6] + ranked[7]) / 2  # between two scores: no tie at the threshold
    choices = [ThresholdChoice(float(v), "fixed", 0.0, 1, 1) for v in values]
    thr = RegionThresholds(layout.region_names, choices, models.model_ids(), (1, 8, 16), False)
    thr.save(tmp_path / "thr.json")
    want = inspect_acquisition(torch.from_numpy(frames).float()[:, None] / 255, layout, models, thr)

    settings = _settings(tmp_path, calibrated_run, token_file, layout=layout_file,
                         thresholds=tmp_path / "thr.json")
    with serving(settings) as c:
        files = [("frames", (f"frame_{i + 1}.png", _png(f), "image/png")) for i, f in enumerate(frames)]
        r = c.post("/v1/inspect-strip", headers=AUTH, files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        assert c.get(body["heatmap_url"], headers=AUTH).status_code == 200
        small = [("frames", ("f.png", _png(f[:32]), "image/png")) for f in frames]
        bad = c.post("/v1/inspect-strip", headers=AUTH, files=small)
        assert bad.status_code == 422 and "expects 64x80" in bad.json()["error"]
        few = c.post("/v1/inspect-strip", headers=AUTH, files=files[:4])
        assert few.status_code == 422 and "key frame 8" in few.json()["error"]
    assert body["decision"] == ("defect" if want.rejected else "good")
    assert body["regions_rejected"] == want.decisions["region"].tolist()
    assert body["vials_rejected"] == want.decisions["vial"].tolist()
    assert np.allclose(body["patch_scores"], want.scores, rtol=1e-5)
    with AuditLog(tmp_path / "audit.db") as log:
        row = log.find(body["request_id"])
    assert row is not None and row["kind"] == "strip" and row["decision"] == body["decision"]


# ----------------------------------------------------------------------------- a real server, kill -9
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kill_9_mid_load_loses_no_acknowledged_decision(tmp_path: Path, calibrated_run: Path,
                                                        token_file: Path, good_png: bytes) -> None:
    """A real uvicorn process under load from four clients is killed with SIGKILL; every
    request that got its 200 is in the audit trail, and the chain verifies."""
    import httpx

    port, db = _free_port(), tmp_path / "audit.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "anomalyqc.cli", "serve", "--model", str(calibrated_run),
                             "--port", str(port), "--audit", str(db), "--token-file", str(token_file),
                             "--concurrency", "2", "--queue", "64", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", headers=AUTH, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.1)
        acked: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=10) as h:
                while True:
                    try:
                        r = h.post("/v1/inspect", files={"image": ("g.png", good_png)})
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code == 200:
                        with lock:
                            acked.append(r.json()["request_id"])

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        while len(acked) < 40:
            assert proc.poll() is None and time.monotonic() < deadline + 60
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-load: requests are in flight
        proc.wait(10)
        for t in clients:
            t.join(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    res = verify_audit(db)
    assert res.ok, res.reason
    with AuditLog(db) as log:
        stored = set(log.request_ids())
    assert len(acked) >= 40 and set(acked) <= stored


def test_serve_command_refuses_to_run_open_or_without_a_run(tmp_path: Path, calibrated_run: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import invoke

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    r = invoke("serve", "--model", calibrated_run, "--audit", tmp_path / "a.db")
    assert r.exit_code == 2 and "no API token is configured" in r.output
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    r = invoke("serve", "--model", tmp_path / "nothing", "--audit", tmp_path / "a.db")
    assert r.exit_code == 2 and "not a run folder" in r.output


def test_no_decision_is_given_when_the_audit_trail_cannot_be_written(
        tmp_path: Path, calibrated_run: Path, token_file: Path, good_png: bytes) -> None:
    with serving(_settings(tmp_path, calibrated_run, token_file)) as c:
        audit = c.app.state.service.audit  # type: ignore[attr-defined]
        audit._conn.execute("PRAGMA query_only = ON")  # every write now fails, as on a full disk
        r = c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)})
        assert r.status_code == 503 and "could not be recorded" in r.json()["error"]
        assert "decision" not in r.json() and "score" not in r.json()
        audit._conn.execute("PRAGMA query_only = OFF")
        assert c.post("/v1/inspect", headers=AUTH, files={"image": ("g.png", good_png)}).status_code == 200
    assert verify_audit(tmp_path / "audit.db").ok



def test_a_request_waits_in_the_queue_no_longer_than_the_timeout() -> None:
    import asyncio

    from anomalyqc.serve.app import Gate, Refused

    async def scenario() -> tuple[str, float]:
        gate = Gate(concurrency=1, queue=4, timeout_s=0.2)
        hold = asyncio.Event()

        async def first() -> None:
            async with gate.slot():
                await hold.wait()

        task = asyncio.create_task(first())
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        try:
            async with gate.slot():
                return "admitted", 0.0
        except Refused as exc:
            waited = time.monotonic() - t0
            assert exc.status == 503 and gate.active == 1  # the refused one left the queue
            return str(exc), waited
        finally:
            hold.set()
            await task

    message, waited = asyncio.run(scenario())
    assert "waited 0.2 s" in message and 0.15 < waited < 2.0


def test_the_service_runs_the_onnx_export_with_the_torch_score(tmp_path: Path, calibrated_run: Path,
                                                               token_file: Path, good_png: bytes) -> None:
    import shutil

    from anomalyqc.export.onnx import export_run

    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)
    export_run(run)
    with serving(_settings(tmp_path, run, token_file, runtime="onnx")) as c:
        r = c.post("/v1/inspect", headers=AUTH, files={"image": ("good.png", good_png, "image/png")})
    assert r.status_code == 200, r.text
    score = _direct_score(calibrated_run, good_png, tmp_path)
    assert r.json()["score"] == pytest.approx(score, rel=1e-4, abs=1e-4)
    # a run without an export is refused at start, not per request
    with pytest.raises(Exception, match="no ONNX export"), \
            serving(_settings(tmp_path / "b", calibrated_run, token_file, runtime="onnx")) as c:
        assert c.get("/ready", headers=AUTH).status_code == 200
