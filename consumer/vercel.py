"""The Vercel API client: sends one Create Event request and maps every answer to our types.

2xx → `Delivered`; 429 → `VercelThrottled`; 408, 425, 5xx, network errors, timeouts and answers
that are not HTTP → `VercelUnavailable` (with `Retry-After` parsed); any other status →
`VercelRejected`. The installation's quota (`X-RateLimit-*`) rides along on `Delivered` and
`VercelThrottled`. httpx's and aiohttp's exceptions stop here. `CONSUMER_HTTP_TIMEOUT` bounds
the whole call.

The client is built once and shared; its connection pool is sized to the worker's concurrency
and keeps connections alive between events. It speaks httpx's API over aiohttp's connection
pool (`httpx-aiohttp`): httpcore's pool scans every pooled connection on every request, which
at 64 in flight cost 7 ms of CPU per event (141 events/s against a 50 ms Vercel, where
aiohttp's pool did 1,198/s at 0.45 ms; bench/README.md). Pass `transport=` to use another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from consumer import __version__
from consumer.errors import VercelRejected, VercelThrottled, VercelUnavailable
from consumer.ratelimit import Quota, parse_quota
from consumer.retry import parse_retry_after
from consumer.translate import VercelRequest

USER_AGENT = f"vercel-event-consumer/{__version__}"
RETRYABLE_STATUSES = frozenset({408, 425})
THROTTLED = 429
_MAX_BODY_READ = 2048  # bytes of an answer read: an error's go into the dead letter's detail


@dataclass(frozen=True, slots=True)
class Delivered:
    """Vercel accepted the event."""

    status: int
    vercel_id: str | None
    quota: Quota | None = None


class VercelClient:
    """POSTs Create Event requests to one Vercel API base URL."""

    def __init__(
        self,
        api_url: str,
        *,
        timeout: float = 10.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=api_url,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
            follow_redirects=False,
            transport=transport or _pooled_transport(max_connections),
        )

    async def send(
        self, request: VercelRequest, token: str, extra_headers: Mapping[str, str] | None = None
    ) -> Delivered:
        """Deliver one event; raise VercelRejected or VercelUnavailable when it was not.
        `extra_headers` (such as `traceparent`) are sent along."""
        headers = {"Authorization": f"Bearer {token}"}
        if extra_headers:
            headers = {**extra_headers, **headers}
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client.stream(
                    "POST", request.path, content=request.body, headers=headers
                ) as response,
            ):
                # Read the body (empty on success) so the connection goes back to the pool: an
                # unread response closes it, and against HTTPS that costs a handshake per event.
                # Bounded: a runaway body only costs that connection.
                body = await _read_at_most(response, _MAX_BODY_READ)
                if response.is_success:
                    vercel_id = response.headers.get("x-vercel-id")
                    return Delivered(response.status_code, vercel_id, parse_quota(response.headers))
        except (httpx.HTTPError, aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_failure(exc) from None
        raise _failure(response, body)

    async def aclose(self) -> None:
        await self._client.aclose()


def _pooled_transport(max_connections: int) -> httpx.AsyncBaseTransport:
    """aiohttp's pool, keeping every connection it may open alive between events."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return AiohttpTransport(limits=limits)


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    chunks = bytearray()
    async for chunk in response.aiter_raw():
        chunks += chunk
        if len(chunks) >= limit:
            break
    return bytes(chunks[:limit])


def _failure(response: httpx.Response, body: bytes) -> VercelRejected | VercelUnavailable:
    status = response.status_code
    vercel_id = response.headers.get("x-vercel-id")
    detail = f"HTTP {status} from Vercel: {_error_summary(body)}"
    if status == THROTTLED:
        return _throttled(response, detail)
    if status in RETRYABLE_STATUSES or status >= 500 or status < 400:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return VercelUnavailable(
            detail, status=status, vercel_id=vercel_id, retry_after=retry_after
        )
    return VercelRejected(detail, status=status, vercel_id=vercel_id)


def _throttled(response: httpx.Response, detail: str) -> VercelThrottled:
    """A 429: wait for Retry-After, or else until the quota resets."""
    quota = parse_quota(response.headers)
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if retry_after is None and quota is not None:
        retry_after = quota.reset_in
    return VercelThrottled(
        detail,
        status=THROTTLED,
        vercel_id=response.headers.get("x-vercel-id"),
        retry_after=retry_after,
    )


def _error_summary(body: bytes) -> str:
    """Vercel's `{"error": {"code", "message"}}` as `code: message`, else the body's start."""
    try:
        error = orjson.loads(body)["error"]
        return f"{error['code']}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body.decode("utf-8", errors="replace").strip()
        return text[:300] or "(no body)"


def _transport_failure(exc: BaseException) -> VercelUnavailable:
    # httpx-aiohttp re-raises aiohttp's errors as httpx ones, not always aptly (a dropped
    # connection becomes ConnectTimeout): describe the original.
    if isinstance(exc, TimeoutError):  # our deadline for the whole call
        return VercelUnavailable("timed out talking to Vercel (CONSUMER_HTTP_TIMEOUT)")
    cause = exc.__cause__ or exc
    timed_out = isinstance(cause, TimeoutError) or (
        isinstance(exc, httpx.TimeoutException) and not isinstance(cause, aiohttp.ClientError)
    )
    if timed_out:
        return VercelUnavailable(f"timed out talking to Vercel ({type(cause).__name__})")
    return VercelUnavailable(f"could not reach Vercel: {_describe(cause)}")


def _describe(exc: BaseException) -> str:
    message = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
