"""The audit trail's hash chain on SQLite and on a real PostgreSQL server started here."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import invoke

from anomalyqc.errors import ConfigError
from anomalyqc.serve.audit import AuditLog, Entry, verify_audit


def _entry(i: int) -> Entry:
    return Entry("decision", uuid.uuid4().hex, "good" if i % 2 else "defect", f"{i:064x}", "model-a",
                 1.5, 0.25 * i, "token-x", {"reason": "score < threshold", "i": i})


def _fill(log: AuditLog, n: int = 6) -> list[dict]:
    return [log.append(_entry(i)) for i in range(n)]


# ----------------------------------------------------------------------------- backends
def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server programs off PATH, in /usr/lib/postgresql/<version>/bin.
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields its base URL (no db).
    The server refuses to run as root, so as root it runs as the postgres user (or nobody)."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) are not installed: "
                    "apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="anomalyqc-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        shutil.chown(base, user)
        prefix = ["runuser", "-u", user, "--"]
    data, port = base / "data", _free_port()
    try:
        subprocess.run([*prefix, initdb, "-D", str(data), "-U", "aqc", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as exc:
        log = (base / "log").read_text() if (base / "log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr.decode()} {log}") from None
    try:
        yield f"postgresql://aqc@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    """A fresh database on the session's server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    return str(request.getfixturevalue("pg_url"))


def _sql(target: str) -> Callable[[str], None]:
    """Run a statement directly on the database, as someone tampering with it would."""
    def run(stmt: str) -> None:
        if target.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(target, autocommit=True) as c:
                c.execute(stmt)
        else:
            with sqlite3.connect(target) as c:
                c.execute(stmt)
    return run


# ----------------------------------------------------------------------------- tests
def test_intact_chain_verifies_and_cli_exits_0(target: str) -> None:
    with AuditLog(target) as log:
        rows = _fill(log)
    res = verify_audit(target)
    assert res.ok and res.rows == 6 and res.head_seq == 6 and res.head_hash == rows[-1]["row_hash"]
    r = invoke("audit", "verify", "--db", target)
    assert r.exit_code == 0, r.output
    assert f"6:{rows[-1]['row_hash']}" in r.output


@pytest.mark.parametrize("stmt", ["UPDATE audit_log SET score = 99.0 WHERE seq = 3",
                                  "UPDATE audit_log SET decision = 'good' WHERE seq = 3",
                                  "UPDATE audit_log SET token_id = 'someone-else' WHERE seq = 3",
                                  "UPDATE audit_log SET detail = '{}' WHERE seq = 3"])
def test_modified_row_is_detected(target: str, stmt: str) -> None:
    with AuditLog(target) as log:
        _fill(log)
    _sql(target)(stmt)
    res = verify_audit(target)
    assert not res.ok and res.bad_seq == 3 and "changed" in (res.reason or "")
    r = invoke("audit", "verify", "--db", target)
    assert r.exit_code == 1 and '"first_bad_seq": 3' in r.output and "NOT intact" in r.output


def test_row_rewritten_with_a_new_hash_breaks_the_next_link(target: str) -> None:
    """Someone who recomputes the edited row's own hash is still caught by the next row."""
    from anomalyqc.serve.audit import row_hash

    with AuditLog(target) as log:
        rows = _fill(log)
    forged = dict(rows[2], score=99.0)
    new_hash = row_hash(forged["prev_hash"], forged)
    _sql(target)(f"UPDATE audit_log SET score = 99.0, row_hash = '{new_hash}' WHERE seq = 3")
    res = verify_audit(target)
    assert not res.ok and res.bad_seq == 4 and "does not link" in (res.reason or "")


def test_deleted_rows_are_detected(target: str) -> None:
    with AuditLog(target) as log:
        _fill(log)
    _sql(target)("DELETE FROM audit_log WHERE seq = 2")
    res = verify_audit(target)
    assert not res.ok and res.bad_seq == 2 and "deleted" in (res.reason or "")
    assert invoke("audit", "verify", "--db", target).exit_code == 1


def test_deleting_the_last_rows_is_detected(target: str) -> None:
    with AuditLog(target) as log:
        _fill(log)
    _sql(target)("DELETE FROM audit_log WHERE seq >= 5")
    res = verify_audit(target)
    assert not res.ok and res.bad_seq == 5 and "last rows were deleted" in (res.reason or "")


def test_truncation_with_a_consistent_head_needs_the_recorded_head(tmp_path: Path) -> None:
    """Deleting the tail and moving audit_head back is only visible against a head kept
    elsewhere (the module doc says so): --expect-head catches it."""
    db = str(tmp_path / "audit.db")
    with AuditLog(db) as log:
        rows = _fill(log)
    recorded = f"6:{rows[-1]['row_hash']}"
    assert verify_audit(db, recorded).ok
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM audit_log WHERE seq >= 5")
        c.execute(f"UPDATE audit_head SET seq = 4, row_hash = '{rows[3]['row_hash']}'")
    assert verify_audit(db).ok  # the chain alone cannot tell
    res = verify_audit(db, recorded)
    assert not res.ok and res.bad_seq == 6 and "rewritten" in (res.reason or "")
    assert invoke("audit", "verify", "--db", db, "--expect-head", recorded).exit_code == 1


def test_concurrent_appends_from_separate_connections_keep_one_chain(target: str) -> None:
    """Four writers, each with its own connection (as separate processes would have): the
    chain head is serialised, so no seq is used twice and the chain verifies."""
    AuditLog(target).close()  # tables exist before the race
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with AuditLog(target) as log:
                for i in range(15):
                    log.append(_entry(100 * k + i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    res = verify_audit(target)
    assert res.ok and res.rows == 60
    with AuditLog(target) as log:
        assert len(set(log.request_ids())) == 60


def test_bad_targets_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        verify_audit(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    r = invoke("audit", "verify", "--db", junk)
    assert r.exit_code == 2 and "junk.db" in r.output
    with pytest.raises(ConfigError, match="folder"):
        AuditLog(tmp_path)


def test_service_with_a_postgresql_audit_trail(tmp_path: Path, tiny_run: Path, tiny_vials: Path,
                                               pg_url: str) -> None:
    """The service end to end (in-process) with its decisions committed to PostgreSQL."""
    import secrets
    import time

    from fastapi.testclient import TestClient

    from anomalyqc.errors import OutputError
    from anomalyqc.serve.app import ServeSettings, create_app
    from anomalyqc.serve.auth import Tokens, _digest

    token = secrets.token_urlsafe(24)

    def settings(audit: str) -> ServeSettings:
        return ServeSettings(model=tiny_run, audit=audit, tokens=Tokens({_digest(token): "plc-9"}),
                             heatmaps=tmp_path / "heatmaps", reload_poll_s=0)

    png = sorted((tiny_vials / "test" / "good").glob("*.png"))[0].read_bytes()
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(settings(pg_url))) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready", headers=headers).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        body = c.post("/v1/inspect", headers=headers, files={"image": ("g.png", png)}).json()
    with AuditLog(pg_url) as log:
        row = log.find(body["request_id"])
    assert row is not None and row["score"] == body["score"] and row["token_id"] == "plc-9"
    assert verify_audit(pg_url).ok
    with pytest.raises(OutputError, match="cannot connect"):
        create_app(settings(pg_url.rsplit(":", 1)[0] + f":{_free_port()}/x"))
