"""The Vercel client against the simulator over real HTTP: every answer mapped to our types."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from consumer.errors import VercelRejected, VercelUnavailable
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.translate import VercelRequest, events_path
from consumer.vercel import Delivered, VercelClient
from tests.helpers import TOKENS

REQUEST = VercelRequest(
    events_path("icfg_alpha"),
    b'{"event":{"type":"resource.updated","resourceId":"r1"}}',
)


@pytest.fixture
async def client(sim: VercelSimulator) -> AsyncIterator[VercelClient]:
    """The client with a short timeout, against the simulator."""
    vercel = VercelClient(sim.url, timeout=0.5)
    yield vercel
    await vercel.aclose()


async def test_created_is_delivered_with_vercel_id(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """201 → Delivered carrying the x-vercel-id of the answer."""
    delivered = await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert delivered == Delivered(201, sim.accepted[0].vercel_id)
    assert delivered.vercel_id


async def test_connections_are_reused(client: VercelClient, sim: VercelSimulator) -> None:
    """Sequential events travel over one kept-alive connection, not one connection each."""
    for _ in range(20):
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert len(sim.accepted) == 20
    assert len(sim.client_ports) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
async def test_permanent_4xx_is_rejected(
    client: VercelClient, sim: VercelSimulator, status: int
) -> None:
    """A 4xx other than 408/425/429 raises VercelRejected with the status."""
    sim.add_fault(Fault(status=status))
    with pytest.raises(VercelRejected) as caught:
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert caught.value.status == status
    assert caught.value.vercel_id


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_unavailable(
    client: VercelClient, sim: VercelSimulator, status: int
) -> None:
    """408, 425, 429 and 5xx raise VercelUnavailable with the status."""
    sim.add_fault(Fault(status=status))
    with pytest.raises(VercelUnavailable) as caught:
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert caught.value.status == status


async def test_retry_after_is_read_from_the_answer(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """The Retry-After header of a 429 becomes retry_after seconds."""
    sim.add_fault(Fault(status=429, retry_after="17"))
    with pytest.raises(VercelUnavailable) as caught:
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert caught.value.retry_after == 17


async def test_vercel_error_shape_becomes_the_detail(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """Vercel's {"error": {"code", "message"}} is summarised as 'HTTP n from Vercel: code: msg'."""
    with pytest.raises(VercelRejected) as caught:
        await client.send(REQUEST, "tok_nobody")
    assert caught.value.status == 401
    assert caught.value.detail.startswith("HTTP 401 from Vercel: unauthorized: ")
    assert "tok_nobody" not in caught.value.detail


async def test_non_json_error_body_is_kept_short(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """A huge non-JSON error body is cut to a few hundred characters in the detail."""
    sim.add_fault(Fault(status=500, body=b"<html>" + b"x" * 100_000))
    with pytest.raises(VercelUnavailable) as caught:
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert caught.value.detail.startswith("HTTP 500 from Vercel: <html>xxx")
    assert len(caught.value.detail) < 400


async def test_dropped_connection_is_unavailable(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """A connection closed without an answer raises VercelUnavailable without a status."""
    sim.add_fault(Fault(drop=True))
    with pytest.raises(VercelUnavailable) as caught:
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert caught.value.status is None


async def test_garbage_answer_is_unavailable(client: VercelClient, sim: VercelSimulator) -> None:
    """Bytes that are not HTTP raise VercelUnavailable."""
    sim.add_fault(Fault(garbage=True))
    with pytest.raises(VercelUnavailable, match="could not reach Vercel"):
        await client.send(REQUEST, TOKENS["icfg_alpha"])


async def test_slow_answer_times_out_as_unavailable(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """An answer slower than the timeout raises VercelUnavailable saying it timed out."""
    sim.add_fault(Fault(latency=2.0))
    with pytest.raises(VercelUnavailable, match="timed out"):
        await client.send(REQUEST, TOKENS["icfg_alpha"])


async def test_unreachable_vercel_is_unavailable() -> None:
    """Nothing listening on the port → VercelUnavailable naming the connect error, no crash."""
    vercel = VercelClient("http://127.0.0.1:9", timeout=1)
    with pytest.raises(VercelUnavailable, match=r"could not reach Vercel: .*Connect"):
        await vercel.send(REQUEST, "tok")
    await vercel.aclose()


async def test_runaway_success_body_is_not_read_whole(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """A 2xx with a huge body is still a delivery; only its first bytes are read."""
    sim.add_fault(Fault(status=200, body=b"x" * 5_000_000, times=1))
    delivered = await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert delivered.status == 200
    assert (await client.send(REQUEST, TOKENS["icfg_alpha"])).status == 201


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed_nor_a_delivery(
    client: VercelClient, sim: VercelSimulator, status: int
) -> None:
    """Issue 11 case 5: a 3xx pointing at a page that answers 200 (302/303 turned the POST
    into a GET there) or at the events endpoint itself (307/308 re-POST) is not followed: it
    is VercelUnavailable (retried) with a detail naming the redirect, and nothing is created."""
    assert sim.url is not None
    target = "/_sim/stats" if status in (301, 302, 303) else REQUEST.path
    location = f"{sim.url}{target}?token=secret"
    sim.add_fault(Fault(status=status, headers={"Location": location}, times=1))
    with pytest.raises(VercelUnavailable) as caught:
        await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert caught.value.status == status
    assert f"redirect to {sim.url}{target}, not followed" in caught.value.detail
    assert "secret" not in caught.value.detail
    assert sim.accepted == []
    assert sim.requests == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RateLimit-Remaining": "²", "X-RateLimit-Reset": "1"},
        {"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "9" * 400},
        {"X-RateLimit-Limit": "٣", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "x"},
        {"Retry-After": "9" * 400},
    ],
)
async def test_a_2xx_with_garbage_rate_limit_headers_is_delivered(
    client: VercelClient, sim: VercelSimulator, headers: dict[str, str]
) -> None:
    """Issue 11 case 4: non-ASCII digits or absurd numbers in X-RateLimit-* on a 2xx are
    ignored; the event is Delivered (an exception here made it an internal-error retry: a
    duplicate)."""
    sim.add_fault(Fault(status=201, body=b"", headers=headers, times=1))
    delivered = await client.send(REQUEST, TOKENS["icfg_alpha"])
    assert delivered.status == 201
    assert delivered.quota is None


async def test_a_2xx_whose_body_is_cut_short_is_still_delivered(
    client: VercelClient, sim: VercelSimulator
) -> None:
    """A 201 status line, then the connection closes mid-body: the event was created, so it
    is Delivered (a transport error here meant a retry, i.e. a duplicate); a 500 cut short is
    still a failure."""
    sim.add_fault(Fault(truncate=True, times=1))
    assert (await client.send(REQUEST, TOKENS["icfg_alpha"])).status == 201
    sim.add_fault(Fault(status=500, truncate=True, times=1))
    with pytest.raises(VercelUnavailable):
        await client.send(REQUEST, TOKENS["icfg_alpha"])
