"""The operator review page in headless Chromium (Debian's package), driven over the DevTools
protocol on a pipe (--remote-debugging-pipe: no driver, no websocket library), against a real
`anomalyqc serve` process."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anomalyqc.serve.audit import AuditLog, verify_audit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
TOKEN = secrets.token_urlsafe(24)


class Browser:
    """Just enough of the Chrome DevTools protocol: messages are JSON ended by a NUL byte,
    written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, profile: Path) -> None:
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire() -> None:  # in the child, before exec: the pipes become fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return dict(reply.get("result", {}))
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to {method}"
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buf += chunk

    def open_page(self) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")

    def js(self, expression: str) -> Any:
        got = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):  # a navigation in progress
                value = self.js(expression)
                if value:
                    return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && location.href === {json.dumps(url)}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(run: Path, db: Path) -> Iterator[str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1",
           "ANOMALYQC_API_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "anomalyqc.cli", "serve", "--model", str(run), "--port",
                             str(port), "--audit", str(db), "--threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the service exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", headers={"X-API-Token": TOKEN}, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_review_page_in_headless_chromium(tiny_run: Path, tiny_vials: Path, tmp_path: Path) -> None:
    import httpx

    from anomalyqc.workflow import calibrate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calibrate_run(run, tiny_vials)
    db = tmp_path / "audit.db"
    browser = None
    with server(run, db) as url:
        decided: dict[str, str] = {}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as h:
            for f in sorted((tiny_vials / "test").rglob("*.png")):
                body = h.post("/v1/inspect", files={"image": (f.name, f.read_bytes())}).json()
                decided[body["request_id"]] = body["decision"]
        assert set(decided.values()) == {"good", "defect"}, decided
        try:
            browser = Browser(tmp_path / "profile")
            browser.open_page()
            browser.goto(f"{url}/review")
            # no token yet: the sign-in form and no data
            assert browser.js("document.querySelectorAll('tr.decision').length") == 0
            browser.js(f"document.querySelector('input[name=token]').value = {json.dumps(TOKEN)};"
                       "document.querySelector('form').submit(); true")
            n = browser.wait_for("document.querySelectorAll('tr.decision').length")
            assert n == len(decided)
            # every heatmap is fetched (with the sign-in cookie) and decodes as an image
            assert browser.wait_for("Array.from(document.images).length > 0 && Array.from(document.images)"
                                    ".every(i => i.complete && i.naturalWidth > 0)")
            shown = browser.js("Array.from(document.querySelectorAll('tr.decision'))"
                               ".map(r => [r.dataset.id, r.dataset.decision])")
            assert dict(shown) == decided
            browser.goto(f"{url}/review?decision=defect")
            rows = browser.wait_for("Array.from(document.querySelectorAll('tr.decision'))"
                                    ".map(r => r.dataset.decision)")
            assert set(rows) == {"defect"} and len(rows) == list(decided.values()).count("defect")
            target = browser.js("document.querySelector('tr.decision').dataset.id")
            browser.js(f"const row = document.querySelector('tr[data-id=\"{target}\"]');"
                       "row.querySelector('input[name=note]').value = 'particle is a reflection';"
                       "row.querySelector('button[value=override]').click(); true")
            status = browser.wait_for(f"(document.querySelector('tr[data-id=\"{target}\"] td.status') || "
                                      "{}).textContent")
            assert "override" in status and "good" in status
        finally:
            if browser is not None:
                browser.close()
    with AuditLog(db) as log:
        reviews = [r for r in log.rows() if r["kind"] == "review"]
    assert len(reviews) == 1
    review = reviews[0]
    detail = json.loads(review["detail"])
    assert detail == {"reviews": target, "verdict": "override", "original_decision": "defect",
                      "decision": "good", "note": "particle is a reflection"}
    assert review["decision"] == "good" and review["token_id"].startswith("env-")
    with AuditLog(db) as log:
        original = log.find(target)
    assert original is not None and original["decision"] == "defect"  # the decision row is untouched
    assert verify_audit(db).ok
