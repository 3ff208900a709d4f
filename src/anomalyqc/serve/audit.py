"""The audit trail: every decision the service makes, appended to a hash-chained table.

Where: SQLite by default (a file path, or sqlite:///path), PostgreSQL by URL
(postgresql://user@host:port/db). Both hold the same two tables:

    audit_log   seq, ts, kind, request_id (unique), image_sha256, model_id, threshold, score,
                decision, token_id, detail (canonical JSON), prev_hash, row_hash
    audit_head  one row: the seq and row_hash of the last row

Each row's hash is SHA-256 over the previous row's hash and the row's own content (every
column but the hashes, as canonical JSON), starting from 64 zeros. Changing any stored
value breaks that row's hash; deleting a row breaks the next row's link (and leaves a gap in
seq); deleting the last rows leaves audit_head pointing past the end. `verify` reports the
first row where any of that happens. What a chain cannot show by itself is someone who
rewrites the whole tail *and* audit_head consistently: compare the head `verify` prints
with one recorded elsewhere (`anomalyqc audit verify --expect-head SEQ:HASH`).

Appends are serialised on the chain head inside one transaction (SQLite: BEGIN IMMEDIATE,
the database write lock; PostgreSQL: SELECT ... FOR UPDATE on audit_head), so several
threads, processes or service instances can append to one log without forking the chain.
`append` returns only after the transaction is committed (SQLite in WAL mode with
synchronous=FULL: a committed row survives a crash of the process and of the machine), so a
caller that acknowledges a decision after `append` never acknowledges one that is not stored.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyqc.errors import ConfigError, OutputError

GENESIS = "0" * 64
COLUMNS = ("seq", "ts", "kind", "request_id", "image_sha256", "model_id", "threshold", "score",
           "decision", "token_id", "detail")
_ALL = (*COLUMNS, "prev_hash", "row_hash")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit_log (
        seq BIGINT PRIMARY KEY,
        ts TEXT NOT NULL,
        kind TEXT NOT NULL,
        request_id TEXT NOT NULL UNIQUE,
        image_sha256 TEXT,
        model_id TEXT,
        threshold DOUBLE PRECISION,
        score DOUBLE PRECISION,
        decision TEXT,
        token_id TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        row_hash TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        row_hash TEXT NOT NULL)""",
)


def canonical(obj: Any) -> str:
    """JSON with sorted keys, no spaces and no NaN: one text per value, on every backend."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The chain link: SHA-256 of the previous hash and this row's content columns."""
    content = canonical({k: row[k] for k in COLUMNS})
    return hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def _finite_or_none(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class Entry:
    """One decision (or review) to record; seq, ts and the hashes are set by `append`."""

    kind: str
    request_id: str
    decision: str | None
    image_sha256: str | None = None
    model_id: str | None = None
    threshold: float | None = None
    score: float | None = None
    token_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyResult:
    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    bad_seq: int | None = None  # first row at fault (or where a deletion shows)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "head": f"{self.head_seq}:{self.head_hash}",
                "first_bad_seq": self.bad_seq, "reason": self.reason}


class AuditLog:
    """An open audit log (see the module doc). Thread-safe; one connection per log."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self._lock = threading.Lock()
        self._pg = self.target.startswith(("postgresql://", "postgres://"))
        self._conn: Any = None
        self._connect()

    # ------------------------------------------------------------------ connection
    @property
    def where(self) -> str:
        """The target, without a password a URL may carry."""
        if self._pg and "@" in self.target:
            scheme, rest = self.target.split("://", 1)
            cred, host = rest.rsplit("@", 1)
            return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
        return self.target

    def _connect(self) -> None:
        if self._pg:
            self._connect_pg()
        else:
            self._connect_sqlite()

    def _connect_sqlite(self) -> None:
        path = Path(self.target.removeprefix("sqlite:///").removeprefix("sqlite://"))
        if path.is_dir():
            raise ConfigError(f"audit log {path} is a folder; give a file path such as {path}/audit.db")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed decision survives a power cut
            for stmt in _SCHEMA:
                conn.execute(stmt.replace("BIGINT PRIMARY KEY", "INTEGER PRIMARY KEY"))
            conn.execute("INSERT OR IGNORE INTO audit_head (id, seq, row_hash) VALUES (1, 0, ?)",
                         (GENESIS,))
        except sqlite3.DatabaseError as exc:
            raise OutputError(f"audit log {path}: cannot open it as an SQLite database ({exc}); "
                              "give a new file path or restore the file") from None
        except OSError as exc:
            raise OutputError(f"audit log {path}: {exc.strerror or exc}; choose a writable path") from None
        self._conn = conn

    def _connect_pg(self) -> None:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency
            raise ConfigError("a PostgreSQL audit log needs psycopg: pip install 'psycopg[binary]'") from None
        try:
            conn = psycopg.connect(self.target, autocommit=True, connect_timeout=10)
            with conn.transaction():
                # Two services starting at once both create: serialise on an advisory lock.
                conn.execute("SELECT pg_advisory_xact_lock(7411061)")
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute("INSERT INTO audit_head (id, seq, row_hash) VALUES (1, 0, %s) "
                             "ON CONFLICT (id) DO NOTHING", (GENESIS,))
        except psycopg.Error as exc:
            raise OutputError(f"audit log {self.where}: cannot connect or create the tables "
                              f"({str(exc).strip()}); check the URL, the server and the user's "
                              "rights") from None
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def append(self, entry: Entry) -> dict[str, Any]:
        """Append `entry` as the next row of the chain and commit; returns the stored row."""
        row: dict[str, Any] = {
            "seq": 0, "ts": utc_now(), "kind": entry.kind, "request_id": entry.request_id,
            "image_sha256": entry.image_sha256, "model_id": entry.model_id,
            "threshold": _finite_or_none(entry.threshold), "score": _finite_or_none(entry.score),
            "decision": entry.decision, "token_id": entry.token_id,
            "detail": canonical(entry.detail),
        }
        with self._lock:
            if self._pg:
                return self._append_pg(row)
            return self._append_sqlite(row)

    def _link(self, row: dict[str, Any], head_seq: int, head_hash: str) -> dict[str, Any]:
        row["seq"] = head_seq + 1
        row["prev_hash"] = head_hash
        row["row_hash"] = row_hash(head_hash, row)
        return row

    def _append_sqlite(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")  # the write lock, across processes too
        try:
            seq, head = c.execute("SELECT seq, row_hash FROM audit_head WHERE id = 1").fetchone()
            self._link(row, seq, head)
            c.execute(f"INSERT INTO audit_log ({', '.join(_ALL)}) VALUES ({', '.join('?' * len(_ALL))})",
                      [row[k] for k in _ALL])
            c.execute("UPDATE audit_head SET seq = ?, row_hash = ? WHERE id = 1",
                      (row["seq"], row["row_hash"]))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return row

    def _append_pg(self, row: dict[str, Any]) -> dict[str, Any]:
        import psycopg

        for attempt in (1, 2):
            try:
                with self._conn.transaction():
                    seq, head = self._conn.execute(
                        "SELECT seq, row_hash FROM audit_head WHERE id = 1 FOR UPDATE").fetchone()
                    self._link(row, seq, head)
                    self._conn.execute(
                        f"INSERT INTO audit_log ({', '.join(_ALL)}) VALUES ({', '.join(['%s'] * len(_ALL))})",
                        [row[k] for k in _ALL])
                    self._conn.execute("UPDATE audit_head SET seq = %s, row_hash = %s WHERE id = 1",
                                       (row["seq"], row["row_hash"]))
                return row
            except psycopg.OperationalError:
                if attempt == 2 or not self._conn.closed:
                    raise
                self._connect_pg()  # the server restarted: one new connection, then give up
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ reading
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._pg:
                return list(self._conn.execute(sql.replace("?", "%s"), params).fetchall())
            return list(self._conn.execute(sql, params).fetchall())

    def head(self) -> tuple[int, str]:
        seq, h = self._query("SELECT seq, row_hash FROM audit_head WHERE id = 1")[0]
        return int(seq), str(h)

    def rows(self, batch: int = 2000) -> Iterator[dict[str, Any]]:
        """All rows in seq order, read in pages (a log of millions is not held in memory)."""
        last = -1
        while True:
            page = self._query(f"SELECT {', '.join(_ALL)} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
                               (last, batch))
            if not page:
                return
            for values in page:
                yield dict(zip(_ALL, values, strict=True))
            last = page[-1][0]

    def latest(self, limit: int = 50, decision: str | None = None,
               kinds: tuple[str, ...] = ("decision", "strip")) -> list[dict[str, Any]]:
        where = f"kind IN ({', '.join('?' * len(kinds))})"
        params: tuple[Any, ...] = kinds
        if decision is not None:
            where += " AND decision = ?"
            params += (decision,)
        got = self._query(f"SELECT {', '.join(_ALL)} FROM audit_log WHERE {where} ORDER BY seq DESC LIMIT ?",
                          (*params, limit))
        return [dict(zip(_ALL, v, strict=True)) for v in got]

    def find(self, request_id: str) -> dict[str, Any] | None:
        got = self._query(f"SELECT {', '.join(_ALL)} FROM audit_log WHERE request_id = ?", (request_id,))
        return dict(zip(_ALL, got[0], strict=True)) if got else None

    def request_ids(self) -> list[str]:
        return [str(r[0]) for r in self._query("SELECT request_id FROM audit_log ORDER BY seq")]

    def verify(self) -> VerifyResult:
        """Walk the chain from the first row; stop at the first row that does not hold."""
        head_seq, head_hash = self.head()
        prev, expected, n = GENESIS, 1, 0
        for row in self.rows():
            seq = int(row["seq"])
            if seq != expected:
                return VerifyResult(False, n, head_seq, head_hash, expected,
                                    f"row {expected} is missing (the next row is {seq}): rows were deleted")
            if row["prev_hash"] != prev:
                return VerifyResult(False, n, head_seq, head_hash, seq,
                                    f"row {seq} does not link to row {seq - 1} (prev_hash differs): "
                                    "a row before it was changed, deleted or inserted")
            if row_hash(prev, row) != row["row_hash"]:
                return VerifyResult(False, n, head_seq, head_hash, seq,
                                    f"row {seq} (request {row['request_id']}) was changed after it was "
                                    "written: its content does not match its hash")
            prev, expected, n = row["row_hash"], expected + 1, n + 1
        if (head_seq, head_hash) != (n, prev):
            if head_seq > n:
                why = f"the head says {head_seq} rows but the log ends at row {n}: the last rows were deleted"
            else:
                why = f"the head ({head_seq}) does not match the last row ({n}): the head was changed"
            return VerifyResult(False, n, head_seq, head_hash, n + 1, why)
        return VerifyResult(True, n, head_seq, head_hash)


def open_audit(target: str | Path) -> AuditLog:
    return AuditLog(target)


def verify_audit(target: str | Path, expect_head: str | None = None) -> VerifyResult:
    """Verify the log at `target`; `expect_head` ("SEQ:HASH", recorded elsewhere earlier) must
    be a row of the chain with that hash (the log may have grown since)."""
    if not str(target).startswith(("postgresql://", "postgres://")):
        path = Path(str(target).removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(f"audit log {path} not found; give the --audit path the service writes to")
    with AuditLog(target) as log:
        result = log.verify()
        if result.ok and expect_head:
            seq_text, _, want = expect_head.partition(":")
            if not seq_text.isdigit() or len(want) != 64:
                raise ConfigError(f"--expect-head {expect_head!r}: expected SEQ:HASH as printed by "
                                  "`anomalyqc audit verify`")
            seq = int(seq_text)
            got = log._query("SELECT row_hash FROM audit_log WHERE seq = ?", (seq,))
            if not got or got[0][0] != want:
                have = "is missing" if not got else f"has hash {got[0][0]}"
                return VerifyResult(False, result.rows, result.head_seq, result.head_hash, seq,
                                    f"row {seq} {have}, but the recorded head says {want}: the log "
                                    "was rewritten from there on")
        return result
