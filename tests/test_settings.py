"""Configuration: defaults, parsing, and one clear message for bad values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consumer.errors import ConfigError
from consumer.settings import load_settings, redact_url
from tests.conftest import run_cli


def test_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CONSUMER_* variables every setting has its documented default."""
    for name in list(os.environ):
        if name.startswith("CONSUMER_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert (settings.exchange, settings.queue) == ("domain-events", "vercel-events")
    assert settings.vercel_api_url == "https://api.vercel.com"
    assert settings.concurrency == 64
    assert settings.retry_delays == (1, 5, 30, 120, 600, 1800)
    assert settings.max_attempts == 8
    assert settings.log_format == "json"
    assert (settings.coalesce, settings.coalesce_window) == (True, 0.0)


def test_retry_delays_parse_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONSUMER_RETRY_DELAYS=0.5, 2,10 → (0.5, 2.0, 10.0)."""
    monkeypatch.setenv("CONSUMER_RETRY_DELAYS", "0.5, 2,10")
    assert load_settings().retry_delays == (0.5, 2.0, 10.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONSUMER_CONCURRENCY", "zero"),
        ("CONSUMER_CONCURRENCY", "0"),
        ("CONSUMER_RETRY_DELAYS", "1,-5"),
        ("CONSUMER_RETRY_DELAYS", ""),
        ("CONSUMER_LOG_FORMAT", "xml"),
        ("CONSUMER_VERCEL_API_URL", "ftp://example"),
        ("CONSUMER_AMQP_URL", "http://broker"),
        ("CONSUMER_HTTP_TIMEOUT", "-1"),
        ("CONSUMER_COALESCE", "sometimes"),
        ("CONSUMER_COALESCE_WINDOW", "-5"),
        ("CONSUMER_COALESCE_WINDOW", "60001"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A bad value raises ConfigError whose message names the offending variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_missing_tokens_dir_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A tokens directory that does not exist is a configuration error, named."""
    monkeypatch.setenv("CONSUMER_VERCEL_TOKENS_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="CONSUMER_VERCEL_TOKENS_DIR"):
        load_settings()


def test_redacted_url_hides_the_password() -> None:
    """The loggable broker URL keeps user and host but masks the password."""
    assert redact_url("amqp://app:s3cret@mq:5672/vh") == "amqp://app:***@mq:5672/vh"
    assert redact_url("amqp://mq/") == "amqp://mq/"


def test_run_with_bad_configuration_exits_2_with_one_message(tmp_path: Path) -> None:
    """`vercel-consumer run` with bad settings prints the problems, no traceback, exit 2."""
    env = {**os.environ, "CONSUMER_CONCURRENCY": "lots", "CONSUMER_AMQP_URL": "amqp://u:pw@h/"}
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert "CONSUMER_CONCURRENCY" in result.stderr
    assert "Traceback" not in result.stderr
    assert "pw" not in result.stderr


def test_run_without_any_token_source_exits_2(tmp_path: Path) -> None:
    """Neither CONSUMER_VERCEL_TOKEN nor CONSUMER_VERCEL_TOKENS_DIR → a clear start-up error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMER_VERCEL_TOKEN")}
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert "CONSUMER_VERCEL_TOKENS_DIR or CONSUMER_VERCEL_TOKEN" in result.stderr


def test_blank_token_settings_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty CONSUMER_VERCEL_TOKEN or CONSUMER_VERCEL_TOKENS_DIR is unset, not '' or cwd."""
    monkeypatch.setenv("CONSUMER_VERCEL_TOKEN", "")
    monkeypatch.setenv("CONSUMER_VERCEL_TOKENS_DIR", " ")
    settings = load_settings()
    assert settings.vercel_token is None
    assert settings.vercel_tokens_dir is None
