"""Hostile configuration and hostile token files.

Every `CONSUMER_*` variable with wrong, empty, huge and non-ASCII values, given to the real
command line (`run`, `dlq stats`, `publish` and `outbox relay`, which all validate every
variable): it exits 2 with a message naming the variable, never a traceback, never a secret.
A valid value gets as far as the broker (port 1: exit 1, one sentence) or the taken health port
(exit 2 naming it). Outbox DSNs of any shape never show their password.
Token files of any bytes: the store returns exactly the token written there, or raises an error
of its own; it never answers with the fallback for an installation that has a file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumer.errors import ConfigError, TokenFileError
from consumer.settings import ENV_PREFIX, Settings, load_settings
from consumer.tokens import BEARER_TOKEN, TokenStore

AMQP_SECRET = "amqpSECRETpw"
TOKEN_SECRET = "tok_SECRETtoken"
PG_SECRET = "pgSECRETpw"
VARIABLES = sorted(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
_BROKER = ["AMQP_URL", "AMQP_CAFILE", "AMQP_CERTFILE", "AMQP_KEYFILE", "EXCHANGE"]
_RELAY = ["QUEUE", "OUTBOX_DSN", "OUTBOX_POLL_INTERVAL", "OUTBOX_BATCH_SIZE", "OUTBOX_RETENTION"]
_SERVER = ["MAX_BODY_BYTES", "LOG_FORMAT", "LOG_LEVEL", "HEALTH_HOST", "HEALTH_PORT"]
# The variables each command reads (every command validates them all, through one function:
# `run` is given every one, the others those they use).
READS = {
    "run": VARIABLES,
    "dlq stats": [f"{ENV_PREFIX}{name}" for name in [*_BROKER, "QUEUE"]],
    "publish": [f"{ENV_PREFIX}{name}" for name in _BROKER],
    "outbox relay": [f"{ENV_PREFIX}{name}" for name in [*_BROKER, *_RELAY, *_SERVER]],
}
# Each command (its argv, and what it needs on top of the base configuration); `dlq stats` and
# `publish` meet a broker on port 1 once the configuration is valid, `run` and `outbox relay`
# the taken health port.
COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "run": (["run"], {}),
    "dlq stats": (["dlq", "stats", "--wait", "0"], {}),
    "publish": (["publish", "resource.renamed", "--resource", "res_1"], {}),
    "outbox relay": (
        ["outbox", "relay"],
        {"CONSUMER_OUTBOX_DSN": f"postgresql://relay:{PG_SECRET}@127.0.0.1:1/db"},
    ),
}
ENV_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))
VALUES = st.one_of(
    st.sampled_from(["", " ", "0", "-1", "nan", "inf", "1e309", "²", "١٢", "true", "[]", "{}"]),
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(str),
    ENV_TEXT.filter(lambda text: len(text) < 40),
    st.integers(1000, 20_000).map(lambda size: "é" * size),
    st.sampled_from(
        ["amqp://u:p/w@h/", "amqp://h:port/", "http://", "https://a:b@h:x/", "ftp://h"]
    ),
    st.sampled_from(["/nonexistent", "/dev/null", "/proc/self/mem", ".."]),
)


# Runs `vercel-consumer` (consumer.cli.main) once per case inside ONE Python process, as a
# subprocess: starting a process per case would take a second each. Each case's environment
# replaces os.environ; its exit status, stdout and stderr (or the traceback of anything that
# escaped main) come back as one JSON line; a case still running after its alarm (5 s) is "ran"
# (a valid configuration that got past the taken health port: only CONSUMER_HEALTH_PORT can).
DRIVER = """
import contextlib, io, json, os, signal, sys, traceback
from consumer.cli import main
class Ran(BaseException):
    pass
def ran(*_):
    raise Ran
signal.signal(signal.SIGALRM, ran)
base = dict(os.environ)
for line in sys.stdin:
    case = json.loads(line)
    os.environ.clear(); os.environ.update(base); os.environ.update(case["env"])
    out, err = io.TextIOWrapper(io.BytesIO()), io.StringIO()
    status, escaped = 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        signal.alarm(case.get("alarm", 5))
        try:
            main(case["argv"])
        except SystemExit as exc:
            status = exc.code
        except Ran:
            status = "ran"
        except BaseException:
            escaped = traceback.format_exc()
        finally:
            signal.alarm(0)
    out.flush()
    stdout = out.buffer.getvalue().decode(errors="replace")
    print(json.dumps({"status": status, "stdout": stdout, "stderr": err.getvalue(),
                      "escaped": escaped}), flush=True)
"""


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A port already in use: a configuration that passes validation then fails, at once and
    with exit 2, to bind its health endpoint, instead of running."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def base_env(port: int) -> dict[str, str]:
    """A valid configuration whose broker (port 1) refuses and whose health port is taken."""
    return {
        "CONSUMER_AMQP_URL": f"amqp://guest:{AMQP_SECRET}@127.0.0.1:1/",
        "CONSUMER_VERCEL_TOKEN": TOKEN_SECRET,
        "CONSUMER_HEALTH_HOST": "127.0.0.1",
        "CONSUMER_HEALTH_PORT": str(port),
        "CONSUMER_QUEUE_DEPTH_INTERVAL": "0",
    }


def run_cases(
    cases: list[tuple[str, str]], port: int, command: str = "run"
) -> list[dict[str, Any]]:
    """`command` with each (variable, value) on top of a valid configuration: the results."""
    argv, extra = COMMANDS[command]
    base = {**base_env(port), **extra}
    return drive([{"argv": argv, "env": {**base, var: value}} for var, value in cases])


def drive(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the DRIVER over `cases` ({"argv", "env", optional "alarm"}): their outcomes."""
    lines = [json.dumps(case) for case in cases]
    env = {key: val for key, val in os.environ.items() if not key.startswith(ENV_PREFIX)}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input="\n".join(lines) + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def is_valid(variable: str, value: str, port: int, command: str = "run") -> bool:
    """Whether the configuration of this case passes validation (as every command reads it)."""
    env = {**base_env(port), **COMMANDS[command][1], variable: value}
    try:
        with mock.patch.dict(os.environ, env, clear=True):
            load_settings()
    except ConfigError:
        return False
    return True


def check_outcome(
    variable: str, value: str, outcome: dict[str, Any], command: str = "run", *, valid: bool
) -> None:
    """Exit 2; one `vercel-consumer:` message naming the variable (or the health endpoint,
    when the value was valid); no traceback; no password or token. A valid value for `dlq
    stats` or `publish` reaches the broker instead: exit 1, ending with one sentence."""
    where = f"{command}: {variable}={value[:60]!r}"
    assert outcome["escaped"] is None, f"{where}: {outcome['escaped'][-1500:]}"
    output = outcome["stdout"] + outcome["stderr"]
    assert "Traceback" not in output, where
    assert AMQP_SECRET not in output, where
    assert PG_SECRET not in output, where
    if outcome["status"] == "ran" and variable == "CONSUMER_HEALTH_PORT":
        return  # a free port (or 0, no endpoint): the worker ran, as it should
    if valid and command in ("dlq stats", "publish"):
        # aio-pika's own warning line may come first (logging is not configured for these)
        assert outcome["status"] == 1, f"{where}: {output[-1500:]}"
        last = outcome["stderr"].splitlines()[-1]
        assert last.startswith("vercel-consumer: connecting to 127.0.0.1:1 failed"), where
        assert TOKEN_SECRET not in output or variable == "CONSUMER_VERCEL_TOKEN", where
        return
    assert outcome["status"] == 2, f"{where}: {output[-1500:]}"
    assert "Traceback" not in output, where
    assert AMQP_SECRET not in output, where
    assert TOKEN_SECRET not in output or variable == "CONSUMER_VERCEL_TOKEN", where
    assert outcome["stderr"].startswith("vercel-consumer: "), where
    stderr = outcome["stderr"]
    assert variable in stderr or "CONSUMER_HEALTH_PORT" in stderr, f"{where}: {stderr[-500:]}"
    if not valid:
        assert variable in stderr, f"{where}: {stderr[-500:]}"
    assert len(stderr) < 2000, where


FIXED = ["", " ", "-1", "nan", "1e309", "\u00b2", "\u00e9" * 300, "a" * 300, "x\ty", "[]"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_variable_with_each_hostile_value(taken_port: int, command: str) -> None:
    """Every CONSUMER_* variable the command reads with each of FIXED (empty, blank, negative,
    NaN, overflowing, a superscript digit, 300 non-ASCII letters, 300 letters, a tab, a list)."""
    assert set(READS[command]) <= set(VARIABLES)
    cases = [(variable, value) for variable in READS[command] for value in FIXED]
    outcomes = run_cases(cases, taken_port, command)
    for (variable, value), outcome in zip(cases, outcomes, strict=True):
        valid = is_valid(variable, value, taken_port, command)
        check_outcome(variable, value, outcome, command, valid=valid)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    command=st.sampled_from(list(COMMANDS)),
    cases=st.lists(st.tuples(st.sampled_from(VARIABLES), VALUES), min_size=40, max_size=40),
)
def test_any_value_of_any_variable_exits_2_with_a_sentence(
    taken_port: int, command: str, cases: list[tuple[str, str]]
) -> None:
    """Generated values (numbers of any size, any text, URLs with raw delimiters or bad
    ports, paths that are not directories) for generated variables, for a generated command:
    the same invariant."""
    outcomes = run_cases(cases, taken_port, command)
    for (variable, value), outcome in zip(cases, outcomes, strict=True):
        valid = is_valid(variable, value, taken_port, command)
        check_outcome(variable, value, outcome, command, valid=valid)


# ── hostile outbox DSNs ──────────────────────────────────────────────────────────────────────

# Text around the password that libpq reads as a delimiter, an escape or a quote.
DSN_JUNK = st.text(st.sampled_from(" '\\/?#@%[]:=x"), max_size=4)
DSNS = st.one_of(
    st.builds(
        "postgresql://u:{}{}{}@127.0.0.1:1/db".format, DSN_JUNK, st.just(PG_SECRET), DSN_JUNK
    ),
    st.builds(
        "host=127.0.0.1 port=1 password={}{}{}".format, DSN_JUNK, st.just(PG_SECRET), DSN_JUNK
    ),
)
# Each showed the password (or a part) before dsn_problem: in `outbox init`'s error, and on the
# relay's `outbox relay waiting` line at every outage.
LEAKING_DSNS = [
    f"host=127.0.0.1 port=1 password=x {PG_SECRET}",  # missing "=" after "<password>"
    f"host=127.0.0.1 port=1 password=x {PG_SECRET}=y",  # invalid connection option
    f"postgresql://u:{PG_SECRET}@[::1/db",  # the whole URI, quoted
    f"postgresql://u:{PG_SECRET}%zz@127.0.0.1:1/db",  # invalid percent-encoded token
    f"postgresql://u:{PG_SECRET}/x@127.0.0.1:1/db",  # the password became the port
    f"postgresql://u:x@{PG_SECRET}@127.0.0.1:1/db",  # a host name to resolve
]


def check_dsn_outcome(dsn: str, outcome: dict[str, Any], *, source: str) -> None:
    """Never a traceback, never the password. Exit 2 naming where the DSN came from, or, for a
    DSN that libpq can use: `outbox init` fails on port 1 (exit 1, one sentence), `outbox relay`
    runs (waiting for the database) until the alarm."""
    where = f"{dsn!r}"
    assert outcome["escaped"] is None, f"{where}: {outcome['escaped'][-1500:]}"
    output = outcome["stdout"] + outcome["stderr"]
    assert "Traceback" not in output, where
    assert PG_SECRET not in output, f"{where}: {output[-1500:]}"
    assert AMQP_SECRET not in output, where
    if outcome["status"] == 2:
        assert outcome["stderr"].startswith("vercel-consumer: "), f"{where}: {output}"
        assert source in outcome["stderr"], f"{where}: {output}"
        assert len(outcome["stderr"]) < 500, where
    else:
        assert outcome["status"] in (1, "ran"), f"{where}: {output[-1500:]}"


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(dsns=LEAKING_DSNS)
@given(dsns=st.lists(DSNS, min_size=20, max_size=20))
def test_an_outbox_dsn_never_shows_its_password(dsns: list[str]) -> None:
    """Any DSN around a password, in CONSUMER_OUTBOX_DSN or --dsn: `outbox init` exits 2 naming
    where it came from (a DSN libpq cannot use, or one that moves the password into the port
    or the host) or 1 on the unreachable database, without the password in any output."""
    base = {**base_env(0), "CONSUMER_HEALTH_PORT": "0"}
    cases = [
        {"argv": ["outbox", "init"], "env": {**base, "CONSUMER_OUTBOX_DSN": dsn}} for dsn in dsns
    ] + [{"argv": ["outbox", "init", "--dsn", dsn], "env": base} for dsn in dsns]
    outcomes = drive(cases)
    for dsn, outcome in zip(dsns, outcomes[: len(dsns)], strict=True):
        check_dsn_outcome(dsn, outcome, source="CONSUMER_OUTBOX_DSN")
    for dsn, outcome in zip(dsns, outcomes[len(dsns) :], strict=True):
        check_dsn_outcome(dsn, outcome, source="--dsn")


def test_the_outbox_relay_never_logs_a_dsn_password() -> None:
    """The DSNs that leaked, given to `outbox relay` (no health port, so it would run): exit 2
    naming CONSUMER_OUTBOX_DSN at once, instead of logging libpq's message, password and all,
    on its `outbox relay waiting` line; a usable DSN runs (until the alarm) and logs none."""
    base = {**base_env(0), "CONSUMER_HEALTH_PORT": "0"}
    usable = f"postgresql://u:{PG_SECRET}@127.0.0.1:1/db"
    cases = [
        {"argv": ["outbox", "relay"], "env": {**base, "CONSUMER_OUTBOX_DSN": dsn}, "alarm": 3}
        for dsn in [*LEAKING_DSNS, usable]
    ]
    *refused, ran = drive(cases)
    for dsn, outcome in zip(LEAKING_DSNS, refused, strict=True):
        check_dsn_outcome(dsn, outcome, source="CONSUMER_OUTBOX_DSN")
        assert outcome["status"] == 2, dsn
    check_dsn_outcome(usable, ran, source="CONSUMER_OUTBOX_DSN")
    assert ran["status"] == "ran"
    assert "outbox relay waiting" in ran["stdout"]


# ── hostile token files ──────────────────────────────────────────────────────────────────────

FILE_CONTENT = st.one_of(
    st.binary(max_size=64),
    st.from_regex(r"[ \t\r\n]{0,3}[A-Za-z0-9._~+/-]{1,40}=*[ \t\r\n]{0,3}", fullmatch=True).map(
        str.encode
    ),
    st.sampled_from([b"\xef\xbb\xbftok", b"tok\r\nen", b"", b"\n", b"tok\x00", b"t" * 5000]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=FILE_CONTENT)
def test_a_token_file_gives_its_own_token_or_an_error_never_the_fallback(
    tmp_path: Path, content: bytes
) -> None:
    """Whatever bytes the file holds, the lookup returns the token they spell (stripped of
    surrounding whitespace, a valid bearer token), or raises TokenFileError; the fallback
    never answers for an installation that has a file, and no error repeats the content."""
    path = tmp_path / "icfg_x"
    path.write_bytes(content)
    store = TokenStore(tmp_path, fallback="tok_fallback")
    try:
        token = store.token_for("icfg_x")
    except TokenFileError as error:
        detail = error.detail
    else:
        assert token != "tok_fallback" or content.strip() == b"tok_fallback"
        assert token == content.decode("ascii").strip()
        assert BEARER_TOKEN.fullmatch(token)
        return
    secret = content.strip().decode(errors="replace")
    assert len(secret) < 8 or secret not in detail  # a short one matches any text
