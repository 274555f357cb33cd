"""The Vercel API client: sends one Create Event request and maps every answer to our types.

2xx → `Delivered`; 429 → `VercelThrottled`; 3xx (never followed), 408, 425, 5xx, network
errors, timeouts and answers that are not HTTP → `VercelUnavailable` (with `Retry-After`
parsed); any other status → `VercelRejected`. The installation's quota (`X-RateLimit-*`)
rides along on `Delivered` and `VercelThrottled`. aiohttp's exceptions stop here.
`CONSUMER_HTTP_TIMEOUT` bounds the whole call.

The client is built once and shared: one aiohttp session whose pool is sized to the worker's
concurrency and keeps connections alive between events. Plain aiohttp, because the HTTP client
is most of the relay's CPU: per request it costs about 0.09 ms of CPU where httpx on aiohttp's
pool (httpx-aiohttp) costs 0.23 ms and httpx on its own pool 1 to 2.7 ms (bench/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from consumer._version import __version__
from consumer.errors import VercelRejected, VercelThrottled, VercelUnavailable
from consumer.ratelimit import Quota, parse_quota
from consumer.retry import MAX_RETRY_AFTER, parse_retry_after
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

    def __init__(self, api_url: str, *, timeout: float = 10.0, max_connections: int = 64) -> None:
        self._api_url = api_url.rstrip("/")
        self._timeout = timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None  # made in the running event loop

    async def send(
        self, request: VercelRequest, token: str, extra_headers: Mapping[str, str] | None = None
    ) -> Delivered:
        """Deliver one event; raise VercelRejected, VercelThrottled or VercelUnavailable when it
        was not. `extra_headers` (such as `traceparent`) are sent along."""
        # The path is already percent-encoded (translate.events_path): sent exactly as it is.
        url = URL(self._api_url + request.path, encoded=True)
        headers = {"Authorization": f"Bearer {token}"}
        if extra_headers:
            headers = {**extra_headers, **headers}
        try:
            # Never follow a redirect: a 302 would re-send the POST as a GET elsewhere, and a
            # 2xx from there is not Vercel creating the event (docs/contract.md, "3xx").
            post = self._open().post(url, data=request.body, headers=headers, allow_redirects=False)
            async with post as response:
                if 200 <= response.status < 300:
                    # Vercel's answer has no body (Content-Length: 0): aiohttp has it at EOF
                    # already, and reading it would only cost a call chain per message.
                    if not response.content.at_eof():
                        await _drain_quietly(response.content)
                    vercel_id = response.headers.get("x-vercel-id")
                    return Delivered(response.status, vercel_id, parse_quota(response.headers))
                body = await _read_at_most(response.content, _MAX_BODY_READ)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_failure(exc) from None
        raise _failure(response.status, response.headers, body)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
                cookie_jar=aiohttp.DummyCookieJar(),  # an API client keeps no cookies
                auto_decompress=False,  # only the first bytes of an error are ever read
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _drain_quietly(stream: aiohttp.StreamReader) -> None:
    """Read a success's body (empty from Vercel) so the connection goes back to the pool.

    The event was created once the 2xx status line came: a body cut short or too slow is no
    failure, or the retry would create it twice."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        await _read_at_most(stream, _MAX_BODY_READ)


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    # Bounded: a runaway body only costs that connection, which is then closed.
    chunks = bytearray()
    while len(chunks) < limit and (chunk := await stream.read(limit - len(chunks))):
        chunks += chunk
    return bytes(chunks)


def _failure(
    status: int, headers: Mapping[str, str], body: bytes
) -> VercelRejected | VercelThrottled | VercelUnavailable:
    vercel_id = headers.get("x-vercel-id")
    detail = f"HTTP {status} from Vercel: {_error_summary(body)}"
    if 300 <= status < 400:
        detail = _redirect_detail(status, headers.get("location"))
    if status == THROTTLED:
        return _throttled(headers, detail)
    if status in RETRYABLE_STATUSES or status >= 500 or status < 400:
        retry_after = parse_retry_after(headers.get("retry-after"))
        return VercelUnavailable(
            detail, status=status, vercel_id=vercel_id, retry_after=retry_after
        )
    return VercelRejected(detail, status=status, vercel_id=vercel_id)


def _throttled(headers: Mapping[str, str], detail: str) -> VercelThrottled:
    """A 429: wait for Retry-After, or else until the quota resets."""
    quota = parse_quota(headers)
    retry_after = parse_retry_after(headers.get("retry-after"))
    if retry_after is None and quota is not None:
        retry_after = min(quota.reset_in, MAX_RETRY_AFTER)
    return VercelThrottled(
        detail,
        status=THROTTLED,
        vercel_id=headers.get("x-vercel-id"),
        retry_after=retry_after,
    )


def _redirect_detail(status: int, location: str | None) -> str:
    """Where a redirect pointed (host and path only: a query may carry anything)."""
    try:
        target = URL(location or "")
        shown = str(target.with_user(None).with_query(None).with_fragment(None))[:200]
    except ValueError:
        shown = "(unparseable)"
    return (
        f"HTTP {status} redirect to {shown or '(no Location)'}, not followed: Create Event never"
        " redirects; a proxy, a captive portal or a wrong CONSUMER_VERCEL_API_URL answered"
    )


def _error_summary(body: bytes) -> str:
    """Vercel's `{"error": {"code", "message"}}` as `code: message`, else the body's start."""
    try:
        error: Any = orjson.loads(body)["error"]
        return f"{error['code']}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body.decode("utf-8", errors="replace").strip()
        return text[:300] or "(no body)"


def _transport_failure(exc: BaseException) -> VercelUnavailable:
    if isinstance(exc, TimeoutError):  # the session's total timeout, or a socket's
        return VercelUnavailable(
            f"timed out talking to Vercel (CONSUMER_HTTP_TIMEOUT; {type(exc).__name__})"
        )
    return VercelUnavailable(f"could not reach Vercel: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    message = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
