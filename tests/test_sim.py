"""The local Vercel simulator answers like Vercel's Create Event API and misbehaves on demand."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from consumer.testing.vercel_sim import Fault, VercelSimulator

TOKENS = {"icfg_a": "token-a", "icfg_b": "token-b"}
RESOURCE_EVENT = {"event": {"type": "resource.updated", "resourceId": "db_1", "productId": "pg"}}


@pytest.fixture
async def sim() -> AsyncIterator[VercelSimulator]:
    async with VercelSimulator(TOKENS) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: VercelSimulator) -> AsyncIterator[httpx.AsyncClient]:
    assert sim.url is not None
    async with httpx.AsyncClient(base_url=sim.url, timeout=10.0) as http:
        yield http


async def post_event(
    client: httpx.AsyncClient,
    installation: str = "icfg_a",
    token: str = "token-a",
    body: Any = RESOURCE_EVENT,
) -> httpx.Response:
    return await client.post(
        f"/v1/installations/{installation}/events",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert response.headers["x-vercel-id"].startswith("sim1::")


async def test_resource_updated_is_accepted_and_recorded_without_the_token(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A valid resource.updated is answered 201 with no body and recorded without the token."""
    response = await post_event(client)
    assert response.status_code == 201
    assert response.content == b""
    assert response.headers["x-vercel-id"].startswith("sim1::")
    [accepted] = sim.accepted
    assert accepted.installation_id == "icfg_a"
    assert accepted.event == RESOURCE_EVENT["event"]
    assert accepted.vercel_id == response.headers["x-vercel-id"]
    assert "authorization" not in {name.lower() for name in accepted.headers}
    assert "token-a" not in repr(accepted)


async def test_installation_updated_is_accepted(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A valid installation.updated, with or without billingPlanId, is answered 201."""
    with_plan = {"event": {"type": "installation.updated", "billingPlanId": "pro"}}
    without_plan = {"event": {"type": "installation.updated"}}
    assert (await post_event(client, body=with_plan)).status_code == 201
    assert (await post_event(client, body=without_plan)).status_code == 201
    assert [entry.event for entry in sim.accepted] == [with_plan["event"], without_plan["event"]]


async def test_unknown_token_is_unauthorized(client: httpx.AsyncClient) -> None:
    """A token that belongs to no installation is answered 401 unauthorized."""
    assert_error(await post_event(client, token="nobody"), 401, "unauthorized")


async def test_missing_authorization_is_unauthorized(client: httpx.AsyncClient) -> None:
    """A request without an Authorization header is answered 401 unauthorized."""
    response = await client.post("/v1/installations/icfg_a/events", json=RESOURCE_EVENT)
    assert_error(response, 401, "unauthorized")


async def test_token_of_another_installation_is_forbidden(client: httpx.AsyncClient) -> None:
    """Installation b's token used for installation a is answered 403 forbidden."""
    assert_error(await post_event(client, token="token-b"), 403, "forbidden")


async def test_unknown_installation_is_not_found(client: httpx.AsyncClient) -> None:
    """A known token used for an installation the simulator does not know is answered 404."""
    assert_error(await post_event(client, installation="icfg_zz"), 404, "not_found")


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            {"type": "resource.updated", "resourceId": "db_1", "productId": None}, id="null"
        ),
        pytest.param({"type": "resource.updated", "resourceId": "db_1", "x": "y"}, id="unknown"),
        pytest.param({"type": "resource.updated", "productId": "pg"}, id="missing-resourceId"),
        pytest.param({"type": "resource.deleted", "resourceId": "db_1"}, id="wrong-type"),
        pytest.param({"type": "installation.updated", "billingPlanId": 7}, id="not-a-string"),
    ],
)
async def test_invalid_event_is_a_bad_request(
    sim: VercelSimulator, client: httpx.AsyncClient, event: dict[str, Any]
) -> None:
    """An event breaking the contract is answered 400 bad_request and not recorded."""
    assert_error(await post_event(client, body={"event": event}), 400, "bad_request")
    assert sim.accepted == []


async def test_body_that_is_not_json_is_a_bad_request(client: httpx.AsyncClient) -> None:
    """A body that does not parse as JSON is answered 400 bad_request."""
    response = await client.post(
        "/v1/installations/icfg_a/events",
        content=b"{not json",
        headers={"Authorization": "Bearer token-a", "Content-Type": "application/json"},
    )
    assert_error(response, 400, "bad_request")


async def test_wrong_content_type_is_a_bad_request(client: httpx.AsyncClient) -> None:
    """A JSON body sent as text/plain is answered 400 bad_request."""
    response = await client.post(
        "/v1/installations/icfg_a/events",
        content=b'{"event": {"type": "installation.updated"}}',
        headers={"Authorization": "Bearer token-a", "Content-Type": "text/plain"},
    )
    assert_error(response, 400, "bad_request")


async def test_body_above_64_kib_is_too_large(client: httpx.AsyncClient) -> None:
    """A body larger than 64 KiB is answered 413."""
    body = {"event": {"type": "resource.updated", "resourceId": "x" * 70_000}}
    assert (await post_event(client, body=body)).status_code == 413


async def test_status_fault_applies_times_then_vanishes(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A 429 fault with Retry-After answers the next `times` requests, then normal handling."""
    sim.add_fault(Fault(status=429, retry_after="2", times=2))
    for _ in range(2):
        response = await post_event(client)
        assert_error(response, 429, "too_many_requests")
        assert response.headers["Retry-After"] == "2"
    assert (await post_event(client)).status_code == 201
    assert len(sim.accepted) == 1


async def test_installation_scoped_fault_spares_other_installations(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A fault for installation b leaves requests for installation a untouched."""
    sim.add_fault(Fault(status=503, installation="icfg_b"))
    assert (await post_event(client)).status_code == 201
    assert (await post_event(client, "icfg_b", "token-b")).status_code == 503


async def test_drop_fault_closes_the_connection(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A drop fault closes the connection without an answer: the client sees a transport error."""
    sim.add_fault(Fault(drop=True, times=1))
    with pytest.raises(httpx.TransportError):
        await post_event(client)
    assert (await post_event(client)).status_code == 201


async def test_garbage_fault_is_a_protocol_error(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A garbage fault answers bytes that are not HTTP: the client sees a protocol error."""
    sim.add_fault(Fault(garbage=True, times=1))
    with pytest.raises(httpx.RemoteProtocolError):
        await post_event(client)
    assert (await post_event(client)).status_code == 201


async def test_latency_fault_delays_then_handles_normally(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """A latency-only fault delays the answer and then handles the request normally."""
    sim.add_fault(Fault(latency=0.3))
    started = time.monotonic()
    response = await post_event(client)
    assert time.monotonic() - started >= 0.25
    assert response.status_code == 201


async def test_tokens_dir_picks_up_a_rotated_token(tmp_path: Path) -> None:
    """Rewriting an installation's token file while running makes the new token valid."""
    (tmp_path / "icfg_d").write_text("old-token\n")
    (tmp_path / ".hidden").write_text("hidden-token")
    async with VercelSimulator(tokens_dir=tmp_path) as sim, httpx.AsyncClient() as client:
        url = f"{sim.url}/v1/installations/icfg_d/events"
        body = {"event": {"type": "installation.updated"}}
        assert (await client.post(url, json=body, headers=_auth("old-token"))).status_code == 201
        (tmp_path / "icfg_d").write_text("new-token\n")
        assert (await client.post(url, json=body, headers=_auth("new-token"))).status_code == 201
        assert (await client.post(url, json=body, headers=_auth("old-token"))).status_code == 401
        assert (await client.post(url, json=body, headers=_auth("hidden-token"))).status_code == 401


async def test_admin_fault_is_reflected_in_stats_and_accepted(client: httpx.AsyncClient) -> None:
    """A fault posted to /_sim/faults applies, and /_sim/stats and /_sim/accepted report it."""
    await _add_fault_over_http(client, Fault(status=500, times=1))
    assert (await post_event(client)).status_code == 500
    assert (await post_event(client)).status_code == 201
    stats = (await client.get("/_sim/stats")).json()
    assert stats == {
        "accepted": 1,
        "requests": 2,
        "max_in_flight": 1,
        "by_status": {"500": 1, "201": 1},
        "unrecorded": 0,
    }
    accepted = (await client.get("/_sim/accepted")).json()
    assert accepted["count"] == 1
    assert accepted["accepted"][0]["event"] == RESOURCE_EVENT["event"]
    assert (await client.get("/_sim/accepted", params={"since": 1})).json()["accepted"] == []


async def test_admin_arrivals_lists_resource_ids_and_arrival_times(
    client: httpx.AsyncClient,
) -> None:
    """/_sim/arrivals gives each accepted event's resourceId and arrival time, from `since`."""
    before = time.time()
    assert (await post_event(client)).status_code == 201
    arrivals = (await client.get("/_sim/arrivals")).json()
    assert arrivals["count"] == 1
    [[resource_id, received_at]] = arrivals["arrivals"]
    assert resource_id == RESOURCE_EVENT["event"]["resourceId"]
    assert before <= received_at <= time.time()
    assert (await client.get("/_sim/arrivals", params={"since": 1})).json()["arrivals"] == []


async def test_admin_reset_and_clear_faults(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """DELETE /_sim/faults removes faults and POST /_sim/reset forgets accepted and counters."""
    await _add_fault_over_http(client, Fault(status=500))
    assert (await client.delete("/_sim/faults")).status_code == 204
    assert (await post_event(client)).status_code == 201
    assert (await client.post("/_sim/reset")).status_code == 204
    assert sim.accepted == []
    assert (await client.get("/_sim/stats")).json()["requests"] == 0


async def test_admin_rejects_an_invalid_fault(client: httpx.AsyncClient) -> None:
    """A fault with an unknown field is answered 400 and not registered."""
    response = await client.post("/_sim/faults", json={"status": 500, "explode": True})
    assert response.status_code == 400
    assert (await post_event(client)).status_code == 201


@pytest.mark.parametrize(
    "fault",
    [
        {"latency": 1e400},  # JSON's way to say Infinity: the simulator would never answer
        {"latency": "1"},
        {"status": "500"},
        {"status": 700},
        {"drop": 1},
        {"times": 0},
        {"headers": {"Location": 5}},
        [],
    ],
)
async def test_admin_validates_faults_strictly(client: httpx.AsyncClient, fault: Any) -> None:
    """Fault JSON is checked by a strict model: wrong types, out-of-range values and infinite
    latency are answered 400 naming the field, and nothing is registered."""
    response = await client.post(
        "/_sim/faults", content=json.dumps(fault), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert (await post_event(client)).status_code == 201


async def test_recorded_requests_are_capped(client: httpx.AsyncClient) -> None:
    """Beyond `max_recorded`, answered requests are counted, not kept: bounded memory."""
    async with VercelSimulator(TOKENS, max_recorded=2) as small:
        async with httpx.AsyncClient(base_url=str(small.url)) as http:
            for _ in range(5):
                assert (await post_event(http)).status_code == 201
        assert len(small.accepted) == 2
        assert small.stats()["unrecorded"] == 3


def test_infinite_latency_is_refused() -> None:
    """A simulator that would never answer is a mistake, refused at construction."""
    with pytest.raises(ValueError, match="finite"):
        VercelSimulator(TOKENS, latency=math.inf)


async def test_remove_installation_makes_it_unknown(
    sim: VercelSimulator, client: httpx.AsyncClient
) -> None:
    """After remove_installation its token is unknown (401) and its id unknown (404)."""
    sim.remove_installation("icfg_b")
    assert_error(await post_event(client, "icfg_a", "token-b"), 401, "unauthorized")
    assert_error(await post_event(client, "icfg_b", "token-a"), 404, "not_found")


async def test_start_returns_the_bound_port() -> None:
    """start() with port 0 returns the URL of the real bound port, and stop() releases it."""
    sim = VercelSimulator(TOKENS)
    url = await sim.start()
    try:
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
    finally:
        await sim.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"{url}/_sim/stats")


async def _add_fault_over_http(client: httpx.AsyncClient, fault: Fault) -> None:
    payload = {
        "status": fault.status,
        "retry_after": fault.retry_after,
        "latency": fault.latency,
        "drop": fault.drop,
        "garbage": fault.garbage,
        "installation": fault.installation,
        "times": fault.times,
    }
    response = await client.post("/_sim/faults", json=payload)
    assert response.status_code == 204


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
