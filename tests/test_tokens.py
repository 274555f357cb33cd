"""Per-installation tokens from a directory, with a fallback token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consumer.errors import ConfigError, CredentialsError, Reason
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


def test_empty_token_file_counts_as_missing(tmp_path: Path) -> None:
    """An empty file falls back like a missing one."""
    (tmp_path / "icfg_1").write_text("\n")
    assert TokenStore(tmp_path, fallback="tok_all").token_for("icfg_1") == "tok_all"


@pytest.mark.parametrize("content", ["tok en", "tok\nen", "tok\x00", "tøken"])
def test_token_that_cannot_be_sent_in_a_header_counts_as_missing(
    tmp_path: Path, content: str
) -> None:
    """A token with a space, newline, NUL or non-ASCII is unusable: no_credentials, not a
    request that fails on every retry."""
    (tmp_path / "icfg_1").write_text(content)
    with pytest.raises(CredentialsError):
        TokenStore(tmp_path).token_for("icfg_1")


def test_unusable_fallback_token_is_a_configuration_error() -> None:
    """CONSUMER_VERCEL_TOKEN with a newline inside fails at start-up, without echoing it."""
    with pytest.raises(ConfigError) as caught:
        TokenStore(None, fallback="tok\nsecret")
    assert "secret" not in str(caught.value)
