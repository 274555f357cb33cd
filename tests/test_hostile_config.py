"""Hostile configuration and hostile token files.

Every `CONSUMER_*` variable with wrong, empty, huge and non-ASCII values, given to the real
command line: it exits 2 with a message naming the variable, never a traceback, never a secret.
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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.errors import TokenFileError
from consumer.settings import ENV_PREFIX, Settings
from consumer.tokens import BEARER_TOKEN, TokenStore

AMQP_SECRET = "amqpSECRETpw"
TOKEN_SECRET = "tok_SECRETtoken"
VARIABLES = sorted(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
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
# escaped main) come back as one JSON line; a case still running after 5 s is "ran" (a valid
# configuration that got past the taken health port: only CONSUMER_HEALTH_PORT can).
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
        signal.alarm(5)
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


def run_cases(cases: list[tuple[str, str]], port: int) -> list[dict[str, Any]]:
    """`run` with each (variable, value) on top of a valid configuration: the results."""
    base = {
        "CONSUMER_AMQP_URL": f"amqp://guest:{AMQP_SECRET}@127.0.0.1:1/",
        "CONSUMER_VERCEL_TOKEN": TOKEN_SECRET,
        "CONSUMER_HEALTH_HOST": "127.0.0.1",
        "CONSUMER_HEALTH_PORT": str(port),
        "CONSUMER_QUEUE_DEPTH_INTERVAL": "0",
    }
    lines = [json.dumps({"argv": ["run"], "env": {**base, var: value}}) for var, value in cases]
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


def check_outcome(variable: str, value: str, outcome: dict[str, Any]) -> None:
    """Exit 2; one `vercel-consumer:` message naming the variable (or the health endpoint,
    when the value was valid); no traceback; no password or token."""
    where = f"{variable}={value[:60]!r}"
    assert outcome["escaped"] is None, f"{where}: {outcome['escaped'][-1500:]}"
    output = outcome["stdout"] + outcome["stderr"]
    assert "Traceback" not in output, where
    assert AMQP_SECRET not in output, where
    if outcome["status"] == "ran" and variable == "CONSUMER_HEALTH_PORT":
        return  # a free port (or 0, no endpoint): the worker ran, as it should
    assert outcome["status"] == 2, f"{where}: {output[-1500:]}"
    assert "Traceback" not in output, where
    assert AMQP_SECRET not in output, where
    assert TOKEN_SECRET not in output or variable == "CONSUMER_VERCEL_TOKEN", where
    assert outcome["stderr"].startswith("vercel-consumer: "), where
    stderr = outcome["stderr"]
    assert variable in stderr or "CONSUMER_HEALTH_PORT" in stderr, f"{where}: {stderr[-500:]}"
    assert len(stderr) < 2000, where


FIXED = ["", " ", "-1", "nan", "1e309", "\u00b2", "\u00e9" * 300, "a" * 300, "x\ty", "[]"]


def test_every_variable_with_each_hostile_value(taken_port: int) -> None:
    """Every CONSUMER_* variable with each of FIXED (empty, blank, negative, NaN, overflowing,
    a superscript digit, 300 non-ASCII letters, 300 letters, a tab, a list)."""
    cases = [(variable, value) for variable in VARIABLES for value in FIXED]
    for (variable, value), outcome in zip(cases, run_cases(cases, taken_port), strict=True):
        check_outcome(variable, value, outcome)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cases=st.lists(st.tuples(st.sampled_from(VARIABLES), VALUES), min_size=40, max_size=40))
def test_any_value_of_any_variable_exits_2_with_a_sentence(
    taken_port: int, cases: list[tuple[str, str]]
) -> None:
    """Generated values (numbers of any size, any text, URLs with raw delimiters or bad
    ports, paths that are not directories) for generated variables: the same invariant."""
    for (variable, value), outcome in zip(cases, run_cases(cases, taken_port), strict=True):
        check_outcome(variable, value, outcome)


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
