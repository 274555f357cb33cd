"""Configuration: defaults, parsing, and one clear message for bad values."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from consumer.errors import ConfigError
from consumer.settings import load_settings, redact_url
from tests.helpers import run_cli


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


UNENCODED = [
    "amqp://user:s3cr3t/PW@mq:5672/",
    "amqp://user:s3cr3t?PW@mq/",
    "amqp://user:s3cr3t#PW@mq/",
    "amqp://user:s3cr3t@PW@mq/",
    "amqps://user:s3cr3t:PW@mq:5671/vh",
]


@pytest.mark.parametrize("url", UNENCODED)
def test_redaction_masks_a_password_that_is_not_percent_encoded(url: str) -> None:
    """Everything between `//` and the last `@` is user information: a raw '/', '?', '#',
    '@' or ':' in the password never lets any of it into a log line."""
    redacted = redact_url(url)
    assert "s3cr3t" not in redacted
    assert "PW" not in redacted
    assert redacted.endswith(url.rsplit("@", 1)[1])


@pytest.mark.parametrize("url", UNENCODED[:4])
@pytest.mark.parametrize("command", [("run",), ("dlq", "stats"), ("publish", "resource.x")])
def test_every_command_refuses_an_unencoded_password_in_one_sentence(
    url: str, command: tuple[str, ...]
) -> None:
    """Issue 11 case 2: `run`, `dlq` and `publish` with such a URL exit 2 with a sentence
    naming CONSUMER_AMQP_URL, never a traceback (it was `int(port)`'s ValueError) or the
    password."""
    env = {**os.environ, "CONSUMER_AMQP_URL": url, "CONSUMER_VERCEL_TOKEN": "tok"}
    result = run_cli(*command, env=env)
    assert result.returncode == 2, result.stderr
    assert "CONSUMER_AMQP_URL" in result.stderr
    assert "percent-encode" in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout
    assert "PW" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url", ["amqp://user:pw@mq:notaport/", "amqp://mq:99999/", "https://api.vercel.com:x"]
)
def test_a_port_that_is_not_a_number_is_a_configuration_error(url: str) -> None:
    """A bad port is a ConfigError naming the variable, not a ValueError at connect time."""
    field = "vercel_api_url" if url.startswith("https") else "amqp_url"
    with pytest.raises(ConfigError, match=r"port must be a number|not a valid URL") as caught:
        load_settings(**{field: url})
    assert "pw" not in str(caught.value)


def test_the_vercel_api_url_is_logged_without_its_credentials() -> None:
    """Credentials someone put in CONSUMER_VERCEL_API_URL are masked where it is logged."""
    settings = load_settings(vercel_api_url="https://proxyuser:pr0xy@egress.example/")
    assert settings.vercel_api_url_redacted == "https://proxyuser:***@egress.example"


def test_the_starting_line_masks_both_urls() -> None:
    """The `starting` log line of `run` shows neither the broker's password nor credentials
    put in CONSUMER_VERCEL_API_URL (it logged the latter raw)."""
    with socket.socket() as taken:  # the health port is taken: `run` stops right after
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **os.environ,
            "CONSUMER_AMQP_URL": "amqp://guest:amqpPW1@127.0.0.1:1/",
            "CONSUMER_VERCEL_API_URL": "https://proxyuser:apiPW2@127.0.0.1:1",
            "CONSUMER_VERCEL_TOKEN": "tok",
            "CONSUMER_HEALTH_HOST": "127.0.0.1",
            "CONSUMER_HEALTH_PORT": str(taken.getsockname()[1]),
        }
        result = run_cli("run", env=env)
    assert '"starting"' in result.stdout
    assert "proxyuser:***@127.0.0.1" in result.stdout
    assert "amqpPW1" not in result.stdout + result.stderr
    assert "apiPW2" not in result.stdout + result.stderr


def test_a_numeric_password_before_a_raw_slash_is_refused_too() -> None:
    """`amqp://user:5672/x@mq/` parses as host `user`, port 5672 (urllib finds nothing wrong,
    and the redaction of the time found no password): the raw '/' is refused all the same,
    in every URL of a failover list."""
    for url in ("amqp://user:5672/x@mq/", "amqp://a:b@mq1/,amqp://user:5672/x@mq2/"):
        with pytest.raises(ConfigError, match="percent-encode") as caught:
            load_settings(amqp_url=url)
        assert "5672/x" not in str(caught.value)
