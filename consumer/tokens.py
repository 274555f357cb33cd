"""Per-installation Vercel access tokens: a directory of files, with one token as fallback.

The directory has the shape of a mounted Kubernetes Secret: one file per installation id whose
content is that installation's token. A lookup stats the file (microseconds) and re-reads it
only when its identity changed, so a rotated, added or removed token takes effect on the next
message without a restart; Kubernetes' atomic `..data` symlink swap changes the identity too.
Tokens never appear in an exception message or a log line from here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from consumer.errors import ConfigError, CredentialsError

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class _Cached(NamedTuple):
    identity: tuple[int, int, int, int]  # inode, device, size, mtime_ns
    token: str


class TokenStore:
    """Looks up the bearer token of an installation."""

    def __init__(self, directory: Path | None = None, fallback: str | None = None) -> None:
        if fallback and not BEARER_TOKEN.fullmatch(fallback):
            raise ConfigError("CONSUMER_VERCEL_TOKEN is not a bearer token (stray whitespace?)")
        self._directory = directory
        self._fallback = fallback or None
        self._cache: dict[str, _Cached] = {}
        self.reloads = 0  # how many times a token file was (re-)read

    def token_for(self, installation_id: str) -> str:
        """The installation's token; CredentialsError when none is configured."""
        token = self._from_directory(installation_id) if self._directory else None
        token = token or self._fallback
        if not token:
            raise CredentialsError(f"no Vercel token configured for installation {installation_id}")
        return token

    def _from_directory(self, installation_id: str) -> str | None:
        assert self._directory is not None
        if not _is_plain_file_name(installation_id):
            return None
        # os.stat on a joined string: half the cost of building a Path and stat-ing it (7 µs
        # of 14 per message), and this runs for every delivery.
        path = os.path.join(self._directory, installation_id)
        try:
            stat = os.stat(path)
        except OSError:
            self._cache.pop(installation_id, None)
            return None
        identity = (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)
        cached = self._cache.get(installation_id)
        if cached is not None and cached.identity == identity:
            return cached.token
        return self._read(installation_id, path, identity)

    def _read(self, installation_id: str, path: str, identity: tuple[int, int, int, int]) -> str:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            token = ""
        if token and not BEARER_TOKEN.fullmatch(token):
            token = ""  # not sendable in a header (a stray newline or space): treat as missing
        self._cache[installation_id] = _Cached(identity, token)
        self.reloads += 1
        return token


def _is_plain_file_name(name: str) -> bool:
    # An installation id names a file directly under the directory, never a path or a dotfile
    # (Kubernetes keeps its own `..data` entries there).
    return (
        bool(name)
        and not name.startswith(".")
        and os.sep not in name
        and (os.altsep is None or os.altsep not in name)
        and "\0" not in name
    )
