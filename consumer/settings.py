"""Configuration from `CONSUMER_*` environment variables, validated once at start-up.

Only the CLI builds a `Settings`; everything else receives plain values or objects built from
it. `load_settings()` turns pydantic's validation error into one `ConfigError` that names every
bad variable, so a wrong deployment fails with a sentence, not a traceback.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from consumer.amqpurl import list_problem, split_urls, with_tls
from consumer.errors import ConfigError

ENV_PREFIX = "CONSUMER_"


class Settings(BaseSettings):
    """Every knob of the worker; the README's configuration table documents each one."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    amqp_cafile: Path | None = None
    amqp_certfile: Path | None = None
    amqp_keyfile: Path | None = None
    exchange: str = Field("domain-events", min_length=1, max_length=255)
    queue: str = Field("vercel-events", min_length=1, max_length=200)
    vercel_api_url: str = "https://api.vercel.com"
    vercel_token: SecretStr | None = None
    vercel_tokens_dir: Path | None = None
    concurrency: int = Field(64, ge=1, le=10_000)
    http_timeout: float = Field(10.0, gt=0, le=300)
    retry_delays: Annotated[tuple[float, ...], NoDecode] = (1, 5, 30, 120, 600, 1800)
    max_attempts: int = Field(8, ge=1, le=1000)
    max_body_bytes: int = Field(256 * 1024, ge=1024, le=128 * 1024 * 1024)
    shutdown_timeout: float = Field(25.0, ge=0, le=3600)
    max_retry_age: float = Field(86_400.0, gt=0, le=30 * 86_400)
    max_redeliveries: int = Field(10, ge=1, le=1000)
    confirm_timeout: float = Field(30.0, gt=0, le=3600)
    breaker_failure_ratio: float = Field(0.8, gt=0, le=1)
    breaker_window: int = Field(50, ge=4, le=10_000)
    breaker_probe_delays: Annotated[tuple[float, ...], NoDecode] = (1, 2, 5, 10, 30)
    max_rps: float = Field(0.0, ge=0, le=1_000_000)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    health_port: int = Field(8080, ge=0, le=65535)
    health_host: str = Field("0.0.0.0", min_length=1)  # noqa: S104 - probes come from outside the pod
    queue_depth_interval: float = Field(15.0, ge=0, le=3600)
    coalesce: bool = True
    coalesce_window: float = Field(0.0, ge=0, le=60_000)  # milliseconds
    outbox_dsn: SecretStr | None = None
    outbox_poll_interval: float = Field(1.0, gt=0, le=3600)
    outbox_batch_size: int = Field(500, ge=1, le=10_000)
    outbox_retention: float = Field(86_400.0, ge=0, le=365 * 86_400)

    @field_validator(
        "vercel_token",
        "vercel_tokens_dir",
        "amqp_cafile",
        "amqp_certfile",
        "amqp_keyfile",
        "outbox_dsn",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # An empty variable (a Helm value left blank) means "not set", not "" or the cwd.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("retry_delays", "breaker_probe_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays", "breaker_probe_delays")
    @classmethod
    def _check_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("give at least one delay, e.g. 1,5,30")
        if any(delay <= 0 or delay > 86_400 for delay in value):
            raise ValueError("each delay must be > 0 and <= 86400 seconds")
        return value

    @field_validator("vercel_api_url")
    @classmethod
    def _check_api_url(cls, value: str) -> str:
        check_url(value, ("http", "https"), example="https://api.vercel.com")
        return value.rstrip("/")

    @field_validator("exchange", "queue")
    @classmethod
    def _check_name_bytes(cls, value: str, info: ValidationInfo) -> str:
        # AMQP names are short strings of at most 255 bytes (the queue's retry tiers add up to
        # 20 more to its name); max_length counts characters, and 'é' is two bytes.
        limit = 255 if info.field_name == "exchange" else 200
        if len(value.encode()) > limit:
            raise ValueError(f"must be at most {limit} bytes in UTF-8")
        return value

    @field_validator("health_host")
    @classmethod
    def _check_health_host(cls, value: str) -> str:
        # Checked here: the resolver raises UnicodeError (not OSError) for a non-ASCII name or
        # a label over 63 characters, which would end in a traceback at bind time.
        if not _HOST.fullmatch(value) or len(value) > 253:
            raise ValueError("must be an IP address or a host name, such as 0.0.0.0")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: SecretStr) -> SecretStr:
        # One URL, or several separated by commas (failover); each checked, none repeated.
        problem = list_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        urls = split_urls(value.get_secret_value())
        for position, url in enumerate(urls, start=1):
            try:  # what urlsplit lets through: a raw '@', or a '/' after a numeric "port"
                check_url(url, ("amqp", "amqps"), example="amqp://user:pw@host/")
            except ValueError as exc:
                where = f"URL {position} of {len(urls)}: " if len(urls) > 1 else ""
                raise ValueError(f"{where}{exc}") from None
        return value

    @field_validator("amqp_cafile", "amqp_certfile", "amqp_keyfile")
    @classmethod
    def _check_tls_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        try:
            readable = value.is_file() and os.access(value, os.R_OK)
        except OSError as exc:  # a name too long, a loop of links: is_file() lets these out
            raise ValueError(f"cannot be used: {exc.strerror}") from None
        if not readable:
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        """The TLS files load as OpenSSL will load them on connect: a CA, a matching pair."""
        if self.amqp_keyfile is not None and self.amqp_certfile is None:
            raise ValueError(
                "CONSUMER_AMQP_KEYFILE is set without CONSUMER_AMQP_CERTFILE (the client"
                " certificate it belongs to)"
            )
        context = ssl.create_default_context()
        if self.amqp_cafile is not None:
            try:
                context.load_verify_locations(cafile=self.amqp_cafile)
            except (ssl.SSLError, OSError):
                raise ValueError(
                    f"CONSUMER_AMQP_CAFILE={self.amqp_cafile} holds no PEM CA certificate"
                ) from None
        if self.amqp_certfile is not None:
            try:
                # No password: an encrypted key would make OpenSSL prompt on a terminal.
                context.load_cert_chain(self.amqp_certfile, self.amqp_keyfile, password=_no_pw)
            except (ssl.SSLError, OSError):
                raise ValueError(
                    "CONSUMER_AMQP_CERTFILE and CONSUMER_AMQP_KEYFILE are not a PEM certificate"
                    " and its unencrypted private key"
                ) from None
        return self

    @field_validator("outbox_dsn")
    @classmethod
    def _check_outbox_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        dsn = value.get_secret_value() if value is not None else ""
        if "://" in dsn and urlsplit(dsn).scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgresql:// URL or a libpq key=value string")
        return value

    @model_validator(mode="after")
    def _check_tokens_dir(self) -> Settings:
        tokens_dir = self.vercel_tokens_dir
        if tokens_dir is None:
            return self
        try:
            is_dir = tokens_dir.is_dir()
        except OSError as exc:  # a name too long, a loop of links: is_dir() lets these out
            raise ValueError(f"CONSUMER_VERCEL_TOKENS_DIR cannot be used: {exc.strerror}") from None
        if not is_dir:
            raise ValueError(f"CONSUMER_VERCEL_TOKENS_DIR={tokens_dir} is not a directory")
        return self

    @property
    def amqp_url_redacted(self) -> str:
        """The broker URLs with their passwords masked: the only form fit for a log line."""
        return ",".join(redact_url(url) for url in split_urls(self.amqp_url.get_secret_value()))

    @property
    def vercel_api_url_redacted(self) -> str:
        """The Vercel API URL with any credentials in it masked."""
        return redact_url(self.vercel_api_url)

    def broker_urls(self) -> str:
        """The failover list to connect to (a secret), with the TLS files of
        CONSUMER_AMQP_CAFILE/CERTFILE/KEYFILE added to its amqps:// URLs."""
        files = {
            "cafile": self.amqp_cafile,
            "certfile": self.amqp_certfile,
            "keyfile": self.amqp_keyfile,
        }
        given = {key: str(path) for key, path in files.items() if path is not None}
        return with_tls(self.amqp_url.get_secret_value(), given)


def _no_pw() -> str:
    raise ValueError(
        "CONSUMER_AMQP_KEYFILE (or the key in CONSUMER_AMQP_CERTFILE) is encrypted;"
        " give it unencrypted (in a Secret)"
    )


# An IPv4/IPv6 literal or a DNS name whose labels are 1-63 ASCII letters, digits or hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"[0-9A-Fa-f:.]+|{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_URL_DELIMITERS = "/?#@"  # may not appear raw in a URL's user name or password


def check_url(url: str, schemes: tuple[str, ...], *, example: str) -> None:
    """Raise ValueError, in one sentence that never quotes the URL, unless `url` has one of
    `schemes`, a host, a numeric port if any, and a percent-encoded user name and password.

    An unencoded `/`, `?`, `#` or `@` in a password moves the URL's boundaries: the password
    becomes the host or the port, and would be printed by whatever fails to parse it."""
    userinfo = _userinfo(url)
    if userinfo is not None and any(char in userinfo for char in _URL_DELIMITERS):
        raise ValueError(
            "the user name or password holds a raw '/', '?', '#' or '@': percent-encode it"
            " (e.g. / as %2F)"
        )
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a {' or '.join(schemes)} URL with a host, such as {example}")
    try:
        parts.port  # noqa: B018 - urllib parses (and checks) the port only when asked
    except ValueError:
        raise ValueError("its port must be a number from 0 to 65535") from None


def redact_url(url: str) -> str:
    """`amqp://user:secret@host/` → `amqp://user:***@host/`: the only form fit for a log line.

    Whatever lies between `//` and the last `@` is user information, so a password with raw
    delimiters in it is masked too; only a user name free of them is kept."""
    userinfo = _userinfo(url)
    if userinfo is None:
        return url
    start = url.index("//") + 2
    user, has_password, _ = userinfo.partition(":")
    if any(char in user for char in _URL_DELIMITERS):
        masked = "***"
    else:
        masked = f"{user}:***" if has_password else user
    return url[:start] + masked + url[start + len(userinfo) :]


def _userinfo(url: str) -> str | None:
    """The text between `//` and the last `@` (None when there is no `@` after `//`)."""
    start = url.find("//")
    if start < 0:
        return None
    end = url.rfind("@")
    return url[start + 2 : end] if end > start else None


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides); raise ConfigError naming each problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        name = f"{ENV_PREFIX}{field.upper()}" if field else "configuration"
        lines.append(f"{name}: {error['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
