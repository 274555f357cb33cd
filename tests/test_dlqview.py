"""Reading, filtering, counting and exporting dead letters: the pure half of `dlq`."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.dlq.cli import parse_moment, parse_reason, parse_status
from consumer.dlq.export import ExportedMessage, ExportFile, decode_line, encode_line
from consumer.dlq.model import DeadLetterInfo, Filter, summarize
from consumer.dlq.progress import ProgressBar, ProgressLines
from consumer.dlq.render import render_list, render_stats
from consumer.dlq.replay import replay_headers
from consumer.dlq.restore import check_export, imported
from consumer.errors import ConfigError

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def ours(**extra: Any) -> dict[str, Any]:
    """Headers as consumer/deadletter.py writes them for a rejected event."""
    return {
        "dead-letter-reason": "rejected_by_vercel",
        "dead-letter-detail": "404 not found",
        "dead-letter-http-status": 404,
        "delivery-attempts": 3,
        "first-attempt-at": "2026-11-26T09:00:00.000Z",
        "dead-lettered-at": "2026-11-26T10:00:00.000Z",
        "original-exchange": "domain-events",
        "original-routing-key": "resource.renamed",
        **extra,
    }


def brokers(queue: str = "vercel-events") -> dict[str, Any]:
    """Headers RabbitMQ itself writes when it dead-letters (a delivery limit, say)."""
    return {
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": queue,
                "time": datetime(2026, 11, 26, 10, 30, tzinfo=UTC),
                "exchange": "domain-events",
                "routing-keys": ["billing.plan_changed"],
            }
        ],
        "x-first-death-reason": "delivery_limit",
        "x-first-death-queue": queue,
        "x-first-death-exchange": "domain-events",
    }


BODY = orjson.dumps(
    {"id": "evt_1", "type": "resource.renamed", "installation_id": "icfg_1", "resource_id": "r"}
)


def test_reads_our_dead_letter() -> None:
    """Id, type and installation come from the body; reason, status, attempts, time, detail
    from our headers."""
    info = DeadLetterInfo.read(BODY, ours())
    assert (info.event_id, info.event_type, info.installation_id) == (
        "evt_1",
        "resource.renamed",
        "icfg_1",
    )
    assert (info.reason, info.status, info.attempts, info.detail) == (
        "rejected_by_vercel",
        404,
        3,
        "404 not found",
    )
    assert info.dead_lettered_at == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    assert info.valid_json


@pytest.mark.parametrize("body", [b"\xff\xfe not json", b"[1, 2]", b"", b'{"id": 7}'])
def test_a_body_that_is_not_an_event_still_reads(body: bytes) -> None:
    """Garbage, a JSON array, an empty body or wrong field types: the row still has the
    message id, the routing key as type, and the reason."""
    headers = ours(**{"dead-letter-reason": "invalid_message"})
    info = DeadLetterInfo.read(body, headers, message_id="m-1")
    assert (info.event_id, info.event_type, info.installation_id) == (
        "m-1",
        "resource.renamed",
        None,
    )
    assert info.reason == "invalid_message"
    assert info.body_bytes == len(body)
    assert render_list([info])  # and it renders


def test_reads_a_dead_letter_the_broker_made() -> None:
    """Without our headers, reason, time, type and detail come from x-death."""
    info = DeadLetterInfo.read(b"{}", brokers())
    assert info.reason == "delivery_limit"
    assert info.dead_lettered_at == datetime(2026, 11, 26, 10, 30, tzinfo=UTC)
    assert info.event_type == "billing.plan_changed"
    assert "vercel-events" in info.detail
    assert DeadLetterInfo.read(b"{}", {}).reason == "unknown"


CASES: list[tuple[Filter, bool]] = [
    (Filter(), True),
    (Filter(reason="rejected_by_vercel"), True),
    (Filter(reason="no_credentials"), False),
    (Filter(type_glob="resource.*"), True),
    (Filter(type_glob="billing.*"), False),
    (Filter(installation="icfg_1"), True),
    (Filter(installation="icfg_2"), False),
    (Filter(status="404"), True),
    (Filter(status="4xx"), True),
    (Filter(status="401"), False),
    (Filter(status="5xx"), False),
    (Filter(since=datetime(2026, 11, 26, 10, 0, tzinfo=UTC)), True),  # inclusive
    (Filter(since=datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC)), False),
    (Filter(until=datetime(2026, 11, 26, 10, 0, tzinfo=UTC)), False),  # exclusive
    (Filter(until=datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC)), True),
    (Filter(reason="rejected_by_vercel", installation="icfg_2"), False),  # all must hold
]


@pytest.mark.parametrize(("wanted", "expected"), CASES)
def test_filter_criteria(wanted: Filter, expected: bool) -> None:
    """Each criterion matches what it names and nothing else; all given must hold."""
    assert wanted.matches(DeadLetterInfo.read(BODY, ours())) is expected


def test_time_filters_never_match_a_dead_letter_without_a_time() -> None:
    """A dead letter with no dead-lettered-at is outside every time window."""
    info = DeadLetterInfo.read(BODY, {})
    assert not Filter(since=NOW - timedelta(days=999)).matches(info)
    assert Filter(reason="unknown").matches(info)


def test_parsing_filter_values() -> None:
    """Times as ISO 8601 (UTC when naive) or an age; statuses as codes or classes; reasons
    only from the known vocabulary, so a typo is an error, not an empty result."""
    assert parse_moment("2026-11-26T10:00:00Z") == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_moment("2026-11-26T10:00:00") == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_moment("2h", now=NOW) == NOW - timedelta(hours=2)
    assert parse_moment("7d", now=NOW) == NOW - timedelta(days=7)
    assert parse_status("4XX") == "4xx"
    assert parse_reason("delivery_limit") == "delivery_limit"
    for bad in (lambda: parse_moment("yesterday"), lambda: parse_status("4040")):
        with pytest.raises(ConfigError):
            bad()
    with pytest.raises(ConfigError, match="no_credentials"):
        parse_reason("no_credential")


def test_replay_headers_restart_the_attempts_and_count_replays() -> None:
    """A replayed copy loses the failure and the broker's history, keeps its origin and
    anything else, and counts the replay."""
    headers = {**ours(**{"replay-count": 2, "trace": "abc"}), "x-delivery-count": 4}
    fresh = replay_headers(headers, NOW)
    assert fresh == {
        "original-exchange": "domain-events",
        "original-routing-key": "resource.renamed",
        "trace": "abc",
        "replay-count": 3,
        "replayed-at": "2026-11-26T12:00:00.000Z",
    }


def test_replay_headers_take_the_origin_from_x_death() -> None:
    """A broker-made dead letter keeps where it came from, for a later --to-origin."""
    fresh = replay_headers(brokers(), NOW)
    assert fresh["original-exchange"] == "domain-events"
    assert fresh["original-routing-key"] == "billing.plan_changed"
    assert not any(name.startswith("x-") for name in fresh)


def test_stats_count_every_dimension_and_the_span() -> None:
    """Counts by reason, type, installation and status; oldest and newest times."""
    infos = [
        DeadLetterInfo.read(BODY, ours()),
        DeadLetterInfo.read(BODY, ours(**{"dead-lettered-at": "2026-11-26T11:00:00Z"})),
        DeadLetterInfo.read(b"nope", brokers()),
    ]
    stats = summarize(infos)
    figures = stats.as_json()
    assert figures["total"] == 3
    assert figures["by_reason"] == {"rejected_by_vercel": 2, "delivery_limit": 1}
    assert figures["by_status"] == {"404": 2, "-": 1}
    assert figures["by_installation"] == {"icfg_1": 2, "-": 1}
    assert figures["oldest_dead_lettered_at"] == "2026-11-26T10:00:00.000Z"
    assert figures["newest_dead_lettered_at"] == "2026-11-26T11:00:00.000Z"
    assert "3 dead letters" in render_stats(stats)


HEADER_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text()
    | st.binary().map(bytearray)
    | st.datetimes(timezones=st.just(UTC))
    | st.decimals(allow_nan=False, allow_infinity=False, places=2),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@given(body=st.binary(), headers=st.dictionaries(st.text(max_size=12), HEADER_VALUES))
def test_export_lines_round_trip_exactly(body: bytes, headers: dict[str, Any]) -> None:
    """Any body and any AMQP header values (bytes, times, decimals, nested tables, tables
    that look like our tags) come back from an export line as they went in."""
    message = ExportedMessage(body, {"message_id": "m", "priority": 0, "headers": headers})
    line = encode_line(message)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_line(line, number=1) == message


def test_export_keeps_a_tag_lookalike_table_apart() -> None:
    """A header table whose one key is `$bytes` is a table on the way back, not bytes."""
    headers = {"odd": {"$bytes": "not base64!"}, "dec": Decimal("1.50")}
    message = ExportedMessage(b"x", {"headers": headers})
    assert decode_line(encode_line(message), number=1).headers == headers


@pytest.mark.parametrize("line", [b"{}", b"not json", b'{"format": "other"}'])
def test_a_line_that_is_not_an_export_names_its_number(line: bytes) -> None:
    """A broken export is refused with the line number, before anything is published."""
    with pytest.raises(ConfigError, match="line 7"):
        decode_line(line, number=7)


def test_progress_lines_are_plain_and_few() -> None:
    """Off a terminal, progress is whole lines, not one per message."""
    stream = io.StringIO()
    progress = ProgressLines(stream, 1000, "replay")
    for done in range(1, 1001):
        progress.update(done, f"moved {done}")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) <= 2
    assert "\r" not in stream.getvalue()


def test_progress_bar_redraws_one_line() -> None:
    """On a terminal, the bar redraws in place and ends with a newline."""
    stream = io.StringIO()
    bar = ProgressBar(stream, 10, "replay")
    bar.update(5, "moved 5")
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\rreplay [")
    assert text.endswith("\n")
    assert "5/10" in text


# ── hostile headers and files (issue 11) ──────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "not a time", ""]
)
def test_an_odd_dead_lettered_at_never_crashes_the_views(stamp: str) -> None:
    """A `dead-lettered-at` UTC cannot hold (or no time at all) reads as unknown: stats,
    the list and the time filters work, and the row says `-`."""
    info = DeadLetterInfo.read(b"{}", ours(**{"dead-lettered-at": stamp}))
    assert info.dead_lettered_at is None
    assert render_stats(summarize([info])).startswith("1 dead letters")
    assert "-" in render_list([info])
    assert not Filter(since=NOW).matches(info)
    assert info.as_json()["dead_lettered_at"] is None


@given(st.text())
def test_printed_values_cannot_forge_or_hide_rows(value: str) -> None:
    """Whatever an id, type or installation holds (newlines, escape sequences, bidi
    controls), `dlq list` prints one line per dead letter and no character a terminal acts
    on."""
    body = orjson.dumps({"id": value, "type": value, "installation_id": value})
    table = render_list([DeadLetterInfo.read(body, ours())])
    lines = table.split("\n")
    assert len(lines) == 2  # the header and this one row
    assert all(char.isprintable() for line in lines for char in line)


def test_import_drops_expiration_and_keeps_user_id_as_a_header() -> None:
    """An imported dead letter cannot expire from the DLQ; its user_id becomes a header."""
    record = ExportedMessage(b"{}", {"expiration": "1000", "user_id": "someone", "headers": {}})
    message = imported(record)
    assert message.expiration is None
    assert message.user_id is None
    assert message.headers["original-user-id"] == "someone"


@pytest.mark.parametrize(
    ("properties", "says"),
    [
        ({"priority": 1000}, "record 2 cannot be published"),
        ({"headers": {"at": {"$datetime": "0001-01-01T00:00:00"}}}, "record 2 cannot be"),
        ({"headers": "not a table"}, "line 2 is not a dead-letter export record"),
    ],
)
def test_check_export_names_the_first_bad_record(
    properties: dict[str, Any], says: str, tmp_path: Path
) -> None:
    """A record that AMQP cannot carry is found before anything is published, by number."""
    good = encode_line(ExportedMessage(b"{}", {"message_id": "evt_1", "headers": {}}))
    bad = orjson.dumps(
        {"format": "vercel-consumer.dlq-export.v1", "body_base64": "e30=", "properties": properties}
    )
    path = tmp_path / "export.jsonl"
    path.write_bytes(good + bad + b"\n" + good)
    with pytest.raises(ConfigError, match=says):
        check_export(path)


def test_check_export_refuses_an_endless_line(tmp_path: Path, monkeypatch: Any) -> None:
    """A line longer than MAX_LINE_BYTES (as /dev/zero gives) ends in one sentence, having
    read no more than that."""
    monkeypatch.setattr("consumer.dlq.export.MAX_LINE_BYTES", 1024)
    path = tmp_path / "zeros"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="line 1 is longer than"):
        check_export(path)


def test_an_export_is_cut_back_to_what_was_committed(tmp_path: Path) -> None:
    """Closing an export keeps exactly the committed records (whose messages were deleted);
    discarding one frees its name."""
    record = ExportedMessage(b"{}", {"headers": {}})
    kept = ExportFile(tmp_path / "kept.jsonl")
    kept.append(record)
    kept.commit()
    kept.append(record)  # its message was never deleted
    kept.close()
    assert (tmp_path / "kept.jsonl").read_bytes() == encode_line(record)
    dropped = ExportFile(tmp_path / "dropped.jsonl")
    dropped.append(record)
    dropped.discard()
    assert not (tmp_path / "dropped.jsonl").exists()
    ExportFile(tmp_path / "dropped.jsonl").discard()  # the name is free again


ODD_TIMES = st.datetimes(
    timezones=st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)).map(
        timezone
    )
)
OUR_NAMES = (
    "dead-letter-reason",
    "dead-letter-detail",
    "dead-letter-http-status",
    "dead-lettered-at",
    "delivery-attempts",
    "first-attempt-at",
    "original-exchange",
    "original-routing-key",
    "replay-count",
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
)
ANY_VALUE = HEADER_VALUES | ODD_TIMES | ODD_TIMES.map(lambda moment: moment.isoformat())
DEATHS = st.lists(st.dictionaries(st.sampled_from(["time", "reason", "exchange"]), ANY_VALUE))


@given(
    body=st.binary(max_size=64),
    headers=st.dictionaries(st.sampled_from(OUR_NAMES), ANY_VALUE | DEATHS),
)
def test_no_header_value_crashes_a_view(body: bytes, headers: dict[str, Any]) -> None:
    """Whatever our headers and the broker's hold (any type, times at any offset and at the
    ends of the calendar, forged x-death lists), a dead letter reads, filters, counts, renders
    and gets replay headers without an error."""
    info = DeadLetterInfo.read(body, headers)
    Filter(since=NOW, until=NOW, status="4xx", type_glob="*").matches(info)
    render_stats(summarize([info, info]))
    render_list([info])
    info.as_json()
    replay_headers(headers, NOW)
