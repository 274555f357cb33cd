"""The command line as an operator uses it: publish, schema, sim — real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from consumer.contract import json_schema
from tests.helpers import AMQP_URL, drain_queue, run_cli


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={**os.environ, "CONSUMER_AMQP_URL": AMQP_URL, **env})


async def test_publish_sends_a_contract_event_with_the_documented_properties(
    channel: AbstractChannel, names: dict[str, str]
) -> None:
    """`publish` routes by type, persistent, JSON, message_id = id, and the body is valid."""
    exchange = await channel.declare_exchange(names["exchange"], "topic", durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "resource.#")
    result = cli(
        "publish",
        "resource.renamed",
        "--installation",
        "icfg_cli",
        "--resource",
        "db_1",
        "--product",
        "prod_1",
        "--id",
        "evt_cli",
        CONSUMER_EXCHANGE=names["exchange"],
    )
    assert result.returncode == 0, result.stderr
    assert "published resource.renamed evt_cli" in result.stdout
    [message] = await drain_queue(channel, queue.name)
    body = orjson.loads(message.body)
    assert (message.routing_key, message.message_id) == ("resource.renamed", "evt_cli")
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert body["installation_id"] == "icfg_cli"
    assert (body["resource_id"], body["product_id"]) == ("db_1", "prod_1")
    await channel.exchange_delete(names["exchange"])


async def test_publish_count_publishes_that_many_confirmed_events(
    channel: AbstractChannel, names: dict[str, str]
) -> None:
    """`publish --count 300` publishes 300 events with distinct ids (publish_many), prints
    each once confirmed, and all 300 are in the queue."""
    exchange = await channel.declare_exchange(names["exchange"], "topic", durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "billing.#")
    result = cli(
        "publish", "billing.plan_changed", "--count", "300", CONSUMER_EXCHANGE=names["exchange"]
    )
    assert result.returncode == 0, result.stderr
    printed = [line.split()[-1] for line in result.stdout.splitlines()]
    assert len(set(printed)) == 300
    messages = await drain_queue(channel, queue.name)
    assert {str(message.message_id) for message in messages} == set(printed)
    await channel.exchange_delete(names["exchange"])


async def test_publish_with_no_queue_bound_fails_loudly(
    channel: AbstractChannel, names: dict[str, str]
) -> None:
    """An unroutable publish is an error (exit 1, one line), not a silent loss."""
    result = cli(
        "publish", "resource.renamed", "--resource", "r", CONSUMER_EXCHANGE=names["exchange"]
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no queue is bound to routing key" in result.stderr
    await channel.exchange_delete(names["exchange"])


@pytest.mark.broker
def test_publish_refuses_an_event_that_breaks_the_contract() -> None:
    """Without --no-validate a bad event is refused before it reaches the broker (exit 2)."""
    result = cli("publish", "--body", '{"id": "x", "type": "resource.renamed"}')
    assert result.returncode == 2
    assert "occurred_at: Field required" in result.stderr


def test_schema_prints_the_shipped_json_schema() -> None:
    """`schema` prints the contract's JSON Schema."""
    result = cli("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == json_schema()


@pytest.fixture
def sim_process() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "consumer", "sim", "--port", str(port), "--token", "icfg_1=tok_1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert "listening on" in process.stdout.readline()
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def test_sim_command_serves_the_create_event_endpoint(sim_process: Any) -> None:
    """`sim` answers 201 for the right token and records the event; 401 for a wrong one."""
    path = f"{sim_process}/v1/installations/icfg_1/events"
    body = {"event": {"type": "installation.updated"}}
    assert httpx.post(path, json=body, headers={"Authorization": "Bearer tok_1"}).status_code == 201
    assert httpx.post(path, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    stats = httpx.get(f"{sim_process}/_sim/stats").json()
    assert (stats["accepted"], stats["requests"]) == (1, 2)


def test_sim_on_a_taken_port_fails_with_one_line(sim_process: str) -> None:
    """A second simulator on the same port says so and exits 2, without a traceback."""
    port = sim_process.rsplit(":", 1)[1]
    result = cli("sim", "--port", port)
    assert result.returncode == 2
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_publish_without_a_type_sends_nothing(
    channel: AbstractChannel, names: dict[str, str]
) -> None:
    """`publish` with no arguments exits 2 with one line and publishes no demo event to the
    configured (maybe production) exchange."""
    exchange = await channel.declare_exchange(names["exchange"], "topic", durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "#")
    result = cli("publish", CONSUMER_EXCHANGE=names["exchange"])
    assert result.returncode == 2
    assert "publish needs the event's type" in result.stderr
    assert "Traceback" not in result.stderr
    assert await drain_queue(channel, queue.name) == []
    await channel.exchange_delete(names["exchange"])


@pytest.mark.parametrize("latency", ["inf", "nan", "-1"])
def test_sim_refuses_a_latency_that_is_not_finite(latency: str) -> None:
    """`sim --latency-ms inf` would never answer: exit 2 with one line instead."""
    result = cli("sim", "--port", "0", f"--latency-ms={latency}")
    assert result.returncode == 2
    assert "--latency-ms" in result.stderr
