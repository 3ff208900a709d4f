"""API tokens: read from configuration (an environment variable or a file), never from code.

A token file holds one token per line, `ID TOKEN` or just `TOKEN` (then its id is
`token-` and the first 12 hex digits of its SHA-256); blank lines and `#` comments are
ignored. ANOMALYQC_API_TOKEN holds one token (id `env-...`, likewise). The audit trail
records the token's id, never the token. Tokens are compared as SHA-256 digests with
hmac.compare_digest, so the comparison takes the same time whichever byte differs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from anomalyqc.errors import ConfigError, DataWarning

TOKEN_ENV = "ANOMALYQC_API_TOKEN"
TOKEN_FILE_ENV = "ANOMALYQC_API_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
_HOW = (f"set {TOKEN_ENV}=<a random string of {MIN_TOKEN_CHARS}+ characters> or pass --token-file FILE "
        f"(or {TOKEN_FILE_ENV}) with lines 'ID TOKEN'; e.g. `python -c \"import secrets; "
        "print(secrets.token_urlsafe(32))\"` makes one")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Tokens:
    """token digest -> token id."""

    by_digest: dict[bytes, str]

    def identify(self, presented: str) -> str | None:
        """The id of `presented`, or None when it is not a configured token."""
        d = _digest(presented)
        found = None
        for known, token_id in self.by_digest.items():  # no early exit: same time for every token
            if hmac.compare_digest(known, d):
                found = token_id
        return found

    def __len__(self) -> int:
        return len(self.by_digest)


def _default_id(prefix: str, token: str) -> str:
    return f"{prefix}-{hashlib.sha256(token.encode()).hexdigest()[:12]}"


def _check(token: str, where: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: an API token must be at least {MIN_TOKEN_CHARS} characters without "
                          f"spaces; {_HOW}")
    return token


def read_token_file(path: str | Path) -> dict[bytes, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"token file {path} not found; {_HOW}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path}: cannot read it ({exc}); {_HOW}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"token file {path} can be read by other users: chmod 600 {path}", DataWarning,
                      stacklevel=2)
    out: dict[bytes, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(f"token file {path} line {n}: expected 'ID TOKEN' or 'TOKEN'")
        token = _check(parts[-1], f"token file {path} line {n}")
        token_id = parts[0] if len(parts) == 2 else _default_id("token", token)
        if _digest(token) in out:
            raise ConfigError(f"token file {path} line {n}: the same token is listed twice")
        if token_id in out.values():
            raise ConfigError(f"token file {path} line {n}: id {token_id} is used twice")
        out[_digest(token)] = token_id
    return out


def load_tokens(token_file: str | Path | None = None) -> Tokens:
    """The configured tokens: --token-file, else ANOMALYQC_API_TOKEN_FILE, plus
    ANOMALYQC_API_TOKEN. None at all is an error: the service never runs open."""
    found: dict[bytes, str] = {}
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        found.update(read_token_file(path))
    env = os.environ.get(TOKEN_ENV)
    if env:
        token = _check(env, TOKEN_ENV)
        found.setdefault(_digest(token), _default_id("env", token))
    if not found:
        raise ConfigError(f"no API token is configured; {_HOW}")
    return Tokens(found)


def presented_token(authorization: str | None, x_api_token: str | None) -> str | None:
    """The token of a request: `Authorization: Bearer T` or `X-API-Token: T`."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_token:
        return x_api_token.strip()
    return None
