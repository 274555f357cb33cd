"""Per-installation Vercel access tokens: a directory of files, with one token as fallback.

The directory has the shape of a mounted Kubernetes Secret: one file per installation id whose
content is that installation's token. A lookup stats the file (microseconds) and re-reads it
only when its identity changed, so a rotated, added or removed token takes effect on the next
message without a restart; Kubernetes' atomic `..data` symlink swap changes the identity too.

Only a missing file falls back to `CONSUMER_VERCEL_TOKEN` (a symbolic link to nothing is not
missing: it is retried). A file that is there but broken
(empty, a byte-order mark, whitespace inside, not a regular file, too large, unreadable) raises
`TokenFileError` with what is wrong, and a read that fails for a passing reason (out of file
descriptors, an I/O error) raises `TokenUnavailable`, to be retried: neither ever sends another
installation's credential, and neither is cached, so a fixed file is seen on the next message.
The file type is checked before reading and the file opened non-blocking, so a FIFO can never
stall the event loop. Tokens never appear in an exception message or a log line from here.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from consumer.errors import ConfigError, CredentialsError, TokenFileError, TokenUnavailable

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_FILE_BYTES = 4096  # Vercel tokens are tens of bytes; a bigger file is not a token
_BOM = b"\xef\xbb\xbf"
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR})
# Read errors that pass by themselves: the message is retried, not dead-lettered.
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR})
_TRANSIENT |= {errno.EIO, errno.ENOBUFS, errno.ETIMEDOUT, errno.ESTALE}


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
        """The installation's token. CredentialsError when none is configured, TokenFileError
        when its file is broken, TokenUnavailable when it cannot be read right now."""
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
            info = os.stat(path)
        except OSError as exc:
            self._cache.pop(installation_id, None)
            if exc.errno in _MISSING and not os.path.lexists(path):
                return None
            if exc.errno in _MISSING:  # a symbolic link to nothing: the entry is there
                raise _dangling(installation_id) from None
            raise _read_error(installation_id, exc) from None
        identity = (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)
        cached = self._cache.get(installation_id)
        if cached is not None and cached.identity == identity:
            return cached.token
        self._cache.pop(installation_id, None)
        _check_file(installation_id, info)
        token = _parse(installation_id, self._read(installation_id, path))
        self._cache[installation_id] = _Cached(identity, token)
        return token

    def _read(self, installation_id: str, path: str) -> bytes:
        """At most MAX_TOKEN_FILE_BYTES + 1 bytes of a regular file, never blocking."""
        self.reloads += 1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                _check_file(installation_id, os.fstat(fd))  # swapped since the stat?
                return os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _read_error(installation_id, exc) from None


def _check_file(installation_id: str, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise _broken(installation_id, "is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise _broken(installation_id, "is not a regular file (a FIFO, socket or device)")
    if info.st_size > MAX_TOKEN_FILE_BYTES:
        raise _broken(installation_id, f"is larger than {MAX_TOKEN_FILE_BYTES} bytes")


def _parse(installation_id: str, content: bytes) -> str:
    """The token in a file's bytes; surrounding whitespace (a trailing newline) is dropped."""
    if len(content) > MAX_TOKEN_FILE_BYTES:
        raise _broken(installation_id, f"is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    if content.startswith(_BOM):
        raise _broken(installation_id, "starts with a UTF-8 byte-order mark")
    try:
        token = content.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _broken(installation_id, "holds bytes that are not ASCII") from None
    if not token:
        raise _broken(installation_id, "is empty")
    if any(char.isspace() for char in token):
        raise _broken(installation_id, "holds whitespace or a line break inside the token")
    if not BEARER_TOKEN.fullmatch(token):
        raise _broken(installation_id, "holds characters a bearer token cannot contain")
    return token


def _read_error(installation_id: str, exc: OSError) -> TokenFileError | TokenUnavailable:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _TRANSIENT:
        return TokenUnavailable(
            f"could not read the token file of installation {installation_id} now: {reason}"
        )
    return _broken(installation_id, f"cannot be read: {reason}")


def _dangling(installation_id: str) -> TokenUnavailable:
    # Kubelet swaps `..data` first and removes a dropped key's link after, so a link that points
    # at nothing is usually a Secret update under way: retried, never the fallback, since the
    # installation has an entry of its own; one that stays dangling keeps its messages retrying.
    return TokenUnavailable(
        f"the token file of installation {installation_id} is a symbolic link to nothing"
        " (a Secret update under way?); retried, the fallback token is not used"
    )


def _broken(installation_id: str, what: str) -> TokenFileError:
    return TokenFileError(
        f"the token file of installation {installation_id} {what}; fix it (the fallback token"
        " is never used for an installation that has a file)"
    )


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
