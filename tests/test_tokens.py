"""Per-installation tokens from a directory, with a fallback token."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import pytest

from consumer.errors import (
    ConfigError,
    CredentialsError,
    Reason,
    TokenFileError,
    TokenUnavailable,
)
from consumer.tokens import TokenStore


def test_token_comes_from_the_installation_file(tmp_path: Path) -> None:
    """The file named after the installation holds its token (surrounding whitespace dropped)."""
    (tmp_path / "icfg_1").write_text("  tok_1\n")
    assert TokenStore(tmp_path).token_for("icfg_1") == "tok_1"


def test_fallback_token_serves_installations_without_a_file(tmp_path: Path) -> None:
    """CONSUMER_VERCEL_TOKEN is used when the directory has no file for the installation."""
    (tmp_path / "icfg_1").write_text("tok_1")
    store = TokenStore(tmp_path, fallback="tok_all")
    assert store.token_for("icfg_2") == "tok_all"
    assert store.token_for("icfg_1") == "tok_1"


def test_missing_token_raises_without_revealing_anything(tmp_path: Path) -> None:
    """No file and no fallback → CredentialsError (no_credentials) naming the installation."""
    with pytest.raises(CredentialsError) as caught:
        TokenStore(tmp_path).token_for("icfg_9")
    assert caught.value.reason is Reason.NO_CREDENTIALS
    assert "icfg_9" in caught.value.detail


def test_rotated_added_and_removed_files_take_effect(tmp_path: Path) -> None:
    """Changes to the directory apply to the next lookup, without a new store."""
    store = TokenStore(tmp_path)
    token_file = tmp_path / "icfg_1"
    token_file.write_text("old")
    assert store.token_for("icfg_1") == "old"
    token_file.write_text("newer")
    assert store.token_for("icfg_1") == "newer"
    token_file.unlink()
    with pytest.raises(CredentialsError):
        store.token_for("icfg_1")


def test_kubernetes_style_symlink_swap_is_seen(tmp_path: Path) -> None:
    """A Secret volume's atomic `..data` symlink swap changes the token that is read."""
    for version, token in (("v1", "tok_v1"), ("v2", "tok_v2")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "icfg_1").write_text(token)
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/icfg_1", tmp_path / "icfg_1")
    store = TokenStore(tmp_path)
    assert store.token_for("icfg_1") == "tok_v1"
    os.symlink("v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert store.token_for("icfg_1") == "tok_v2"


def test_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    """Lookups of an unchanged file are served from memory; a change reads it once more."""
    (tmp_path / "icfg_1").write_text("tok")
    store = TokenStore(tmp_path)
    for _ in range(5):
        store.token_for("icfg_1")
    assert store.reloads == 1


@pytest.mark.parametrize("installation_id", ["../secret", "a/b", ".hidden", "..data", ""])
def test_ids_that_are_not_plain_file_names_never_touch_the_filesystem(
    tmp_path: Path, installation_id: str
) -> None:
    """An id with a path separator or a leading dot finds no token file, only the fallback."""
    (tmp_path / "secret").write_text("must-not-leak")
    store = TokenStore(tmp_path / "tokens")
    (tmp_path / "tokens").mkdir()
    with pytest.raises(CredentialsError):
        store.token_for(installation_id)


BROKEN_FILES = {
    "empty": (b"\n", "is empty"),
    "bom": (b"\xef\xbb\xbftok_1", "byte-order mark"),
    "inner space": (b"tok en", "whitespace or a line break"),
    "inner crlf": (b"tok\r\nen", "whitespace or a line break"),
    "nul": (b"tok\x00", "characters a bearer token cannot contain"),
    "non-ascii": ("tøken".encode(), "not ASCII"),
    "huge": (b"t" * 5000, "larger than 4096 bytes"),
}


@pytest.mark.parametrize(("content", "why"), BROKEN_FILES.values(), ids=list(BROKEN_FILES))
def test_a_broken_token_file_is_an_error_of_its_own_never_the_fallback(
    tmp_path: Path, content: bytes, why: str
) -> None:
    """A file that is there but unusable is a TokenFileError (no_credentials) saying what is
    wrong; the fallback token is never sent in its place, and its content is never shown."""
    (tmp_path / "icfg_1").write_bytes(content)
    with pytest.raises(TokenFileError) as caught:
        TokenStore(tmp_path, fallback="tok_all").token_for("icfg_1")
    assert caught.value.reason is Reason.NO_CREDENTIALS
    assert why in caught.value.detail
    assert "icfg_1" in caught.value.detail
    assert "tok" not in caught.value.detail.replace("token", "")


def test_a_directory_or_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A directory or a FIFO named after an installation is a broken file; the FIFO is never
    opened for a blocking read (this test would hang if it were)."""
    (tmp_path / "icfg_dir").mkdir()
    os.mkfifo(tmp_path / "icfg_fifo")
    store = TokenStore(tmp_path, fallback="tok_all")
    with pytest.raises(TokenFileError, match="is a directory"):
        store.token_for("icfg_dir")
    with pytest.raises(TokenFileError, match="not a regular file"):
        store.token_for("icfg_fifo")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused_and_its_fix_seen_at_once(tmp_path: Path) -> None:
    """EACCES is an error of its own, never cached: once fixed, the next lookup reads it."""
    token_file = tmp_path / "icfg_1"
    token_file.write_text("tok_1")
    token_file.chmod(0)
    store = TokenStore(tmp_path, fallback="tok_all")
    with pytest.raises(TokenFileError, match="cannot be read"):
        store.token_for("icfg_1")
    token_file.chmod(0o600)
    assert store.token_for("icfg_1") == "tok_1"


def test_running_out_of_file_descriptors_is_transient_and_never_cached(tmp_path: Path) -> None:
    """With no file descriptor left (EMFILE), the lookup raises TokenUnavailable (retried),
    not no_credentials and not the fallback; with descriptors back, the token is read."""
    (tmp_path / "icfg_1").write_text("tok_1")
    store = TokenStore(tmp_path, fallback="tok_all")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(TokenUnavailable) as caught:
            store.token_for("icfg_1")
        assert caught.value.reason is None
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert store.token_for("icfg_1") == "tok_1"


def test_a_dangling_symlink_is_retried_never_the_fallback(tmp_path: Path) -> None:
    """A link whose target is gone (kubelet between swapping `..data` and removing a dropped
    key's link) raises TokenUnavailable: the installation has an entry, so the fallback token
    is not sent; once the link is removed, the fallback serves it."""
    os.symlink("..data/icfg_1", tmp_path / "icfg_1")
    store = TokenStore(tmp_path, fallback="tok_all")
    with pytest.raises(TokenUnavailable) as caught:
        store.token_for("icfg_1")
    assert "symbolic link to nothing" in str(caught.value)
    assert "tok_all" not in str(caught.value)
    (tmp_path / "icfg_1").unlink()
    assert store.token_for("icfg_1") == "tok_all"


def test_unusable_fallback_token_is_a_configuration_error() -> None:
    """CONSUMER_VERCEL_TOKEN with a newline inside fails at start-up, without echoing it."""
    with pytest.raises(ConfigError) as caught:
        TokenStore(None, fallback="tok\nsecret")
    assert "secret" not in str(caught.value)
