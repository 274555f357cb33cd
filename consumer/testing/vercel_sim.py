"""A local stand-in for Vercel Marketplace's Create Event API, with injectable faults.

`VercelSimulator` serves `POST /v1/installations/{installation_id}/events` on aiohttp and checks
a request the way Vercel does: bearer token (401 unknown, 403 another installation's, 404
unknown installation), then a strict body (400 in Vercel's `{"error": {"code", "message"}}`
shape, 413 above 64 KiB). An accepted event is recorded in `accepted` (never with its token)
and answered 201 with no body. Every answer carries an `x-vercel-id` header. Tokens come from a
mapping (installation id -> token) and/or a directory with one file per installation, named by
its id and holding its token, read afresh on every request so that a rotation applies at once.

A rate limit per installation (`set_rate_limit`) works like Vercel's: a fixed window of N
requests, `X-RateLimit-Limit/-Remaining/-Reset` (epoch seconds) on every answer for it, and
429 with `Retry-After` beyond it (counted in `by_status["429"]`).

Faults (`Fault`) turn it into a misbehaving Vercel: a status with an optional Retry-After and
any other headers (a redirect's `Location`, `X-RateLimit-*`), added latency, a body trickled
byte by byte after the status line and headers, a dropped
connection, or bytes that are not HTTP, for one installation or all, a number of times or until
cleared.

- Tests use it in-process: `async with VercelSimulator({"icfg_1": "tok"}) as sim:` starts it on
  a free port of 127.0.0.1 (`sim.url`), and assert on `sim.accepted` / `sim.add_fault(...)`.
  `sim.refused` lists every answer a status fault gave, with the request's event and the
  Retry-After sent, so a test can check when that same event came back.
- The demo and the benchmark run it as a separate process through `serve()` (the project CLI)
  and drive it over HTTP: `GET /_sim/accepted?since=N`, `GET /_sim/stats`, `POST /_sim/faults`
  (a Fault as JSON), `DELETE /_sim/faults`, `POST /_sim/reset`, and `GET /_sim/arrivals?since=N`
  (each accepted event's `resourceId` and arrival time only: compact enough for the benchmark
  to compute publish-to-delivery latency over 100,000 events).

The hot path does no logging (the access log is off) so that it can take benchmark load.
Memory is bounded: at most `max_recorded` (1,000,000) accepted and refused requests are kept,
the rest only counted (`unrecorded` in the stats). This module imports nothing from the
consumer it stands in front of.

Not for a shared network: the `/_sim/*` admin endpoints are unauthenticated (anyone who reaches
the port can inject faults or read the events), and the simulator binds 127.0.0.1 unless told
otherwise (`vercel-consumer sim --host`). Fault JSON is validated strictly (pydantic, unknown
fields refused, latency finite and at most 600 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 64 * 1024
EVENTS_PATH = "/v1/installations/{installation_id}/events"
_JSON = "application/json"
_EVENT_KEYS = {
    "resource.updated": ({"resourceId"}, {"productId"}),
    "installation.updated": (set(), {"billingPlanId"}),
}
_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    429: "too_many_requests",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
_GARBAGE = b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n"
MAX_FAULT_LATENCY = 600.0  # seconds: a longer one is a typo, not a test
MAX_RECORDED = 1_000_000  # accepted and refused requests kept; beyond, only counted


@dataclass
class Fault:
    """A misbehaviour for matching requests, applied before any other check."""

    status: int | None = None  # answer this status instead of handling the request
    retry_after: str | None = None  # Retry-After header on the `status` answer
    latency: float = 0.0  # seconds to sleep first; alone, the request is then handled normally
    # With `status`: the status line and headers at once, then the body one byte every
    # `trickle` seconds (a slow body after the answer is known, where `latency` delays it all).
    trickle: float = 0.0
    drop: bool = False  # close the connection without an answer
    garbage: bool = False  # write bytes that are not HTTP, then close
    truncate: bool = False  # answer `status` (201) promising 1000 bytes of body, send 3, close
    body: bytes | None = None  # body of the `status` answer; default: Vercel's error shape
    installation: str | None = None  # only requests for this installation id; None: all
    times: int | None = None  # apply to this many matching requests, then vanish; None: forever
    headers: dict[str, str] | None = None  # more headers on the `status` answer (Location, ...)


@dataclass(frozen=True)
class Accepted:
    """An event the simulator answered 201."""

    installation_id: str
    event: dict[str, Any]
    received_at: float  # time.time() when answered, after any latency
    vercel_id: str
    headers: dict[str, str]  # request headers without authorization
    arrived_at: float = 0.0  # time.time() when the request arrived, before any latency


@dataclass(frozen=True)
class Refused:
    """A request that a status (or truncate) fault answered instead of handling it."""

    installation_id: str
    status: int
    retry_after: str | None
    arrived_at: float  # time.time() when the request arrived
    answered_at: float  # time.time() when the fault's answer was sent
    event: dict[str, Any] | None  # the body's `event` object, when the body was JSON


class _ActiveFault:
    """A registered fault and how many more requests it applies to."""

    __slots__ = ("fault", "remaining")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.remaining = fault.times


class _Reject(Exception):
    """A request answered with a Vercel error; raised by the checks, caught by the handler."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class _RateWindow:
    """A fixed window of `limit` requests every `seconds` for one installation."""

    limit: int
    seconds: float
    reset_at: float = 0.0  # epoch seconds
    used: int = 0

    def take(self, now: float) -> dict[str, str]:
        """Count one request; the headers to answer with; _Reject(429) beyond the limit."""
        if now >= self.reset_at:
            self.reset_at, self.used = now + self.seconds, 0
        self.used += 1
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
        }
        if self.used <= self.limit:
            return headers
        headers["Retry-After"] = str(max(1, math.ceil(self.reset_at - now)))
        raise _Reject(429, "rate limit exceeded", headers)


class VercelSimulator:
    """Serves Vercel's Create Event endpoint locally; see the module docstring."""

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        tokens_dir: Path | None = None,
        latency: float = 0.0,
        max_recorded: int = MAX_RECORDED,
    ) -> None:
        if not (math.isfinite(latency) and latency >= 0):
            raise ValueError("latency must be a finite number of seconds, at least 0")
        self.max_recorded = max_recorded
        self.unrecorded = 0
        self._tokens: dict[str, str] = dict(tokens or {})
        self._tokens_dir = tokens_dir
        self._removed: set[str] = set()
        self._latency = latency
        self._faults: list[_ActiveFault] = []
        self._id_prefix = secrets.token_hex(3)
        self._next_id = 0
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.accepted: list[Accepted] = []
        self.refused: list[Refused] = []
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests ever open at once: shows client concurrency
        self.client_ports: set[int] = set()  # one per TCP connection: shows connection reuse
        self.by_status: Counter[str] = Counter()
        self._rate_windows: dict[str, _RateWindow] = {}

    # -- control -----------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Registers a fault; the first registered fault that matches a request applies."""
        self._faults.append(_ActiveFault(fault))

    def clear_faults(self) -> None:
        """Removes every fault."""
        self._faults.clear()

    def reset(self) -> None:
        """Forgets accepted events, counters and faults; tokens stay."""
        self.accepted.clear()
        self.refused.clear()
        self.requests = 0
        self.unrecorded = 0
        self.max_in_flight = 0
        self.client_ports.clear()
        self.by_status.clear()
        self.clear_faults()

    def set_rate_limit(self, installation_id: str, limit: int, seconds: float = 1.0) -> None:
        """Allow `installation_id` `limit` requests per fixed window of `seconds`."""
        self._rate_windows[installation_id] = _RateWindow(limit, seconds)

    def set_token(self, installation_id: str, token: str) -> None:
        """Adds an installation, or replaces its token."""
        self._tokens[installation_id] = token
        self._removed.discard(installation_id)

    def remove_installation(self, installation_id: str) -> None:
        """Makes an installation unknown (404), also when it comes from the tokens directory."""
        self._tokens.pop(installation_id, None)
        self._removed.add(installation_id)

    def stats(self) -> dict[str, Any]:
        """Counters as served by `GET /_sim/stats`.

        `by_status` counts answers by status code, plus "dropped", "garbage" and "truncated" for
        connections a fault broke instead of answering.
        """
        return {
            "accepted": len(self.accepted),
            "requests": self.requests,
            "max_in_flight": self.max_in_flight,
            "by_status": dict(self.by_status),
            "unrecorded": self.unrecorded,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def app(self) -> web.Application:
        """The aiohttp application, built on first use."""
        if self._app is None:
            self._app = self._build_app()
        return self._app

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=4 * MAX_BODY_BYTES)
        app.router.add_post(EVENTS_PATH, self._handle_event)
        app.router.add_get("/_sim/accepted", self._admin_accepted)
        app.router.add_get("/_sim/arrivals", self._admin_arrivals)
        app.router.add_get("/_sim/stats", self._admin_stats)
        app.router.add_post("/_sim/faults", self._admin_add_fault)
        app.router.add_delete("/_sim/faults", self._admin_clear_faults)
        app.router.add_post("/_sim/reset", self._admin_reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Starts serving; returns the base URL with the bound port (a free one for port 0)."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.url = f"http://{_url_host(bound_host)}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        """Stops serving; in-flight requests get a second to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the events endpoint -----------------------------------------------------------------

    async def _handle_event(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        if request.transport is not None:
            self.client_ports.add(request.transport.get_extra_info("peername")[1])
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer_event(request)
        finally:
            self.in_flight -= 1

    async def _answer_event(self, request: web.Request) -> web.StreamResponse:
        installation_id = request.match_info["installation_id"]
        arrived_at = time.time()
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        fault = self._take_fault(installation_id)
        if fault is not None:
            answer = await self._apply_fault(request, fault, arrived_at)
            if answer is not None:
                return answer
        headers = {"x-vercel-id": self._new_vercel_id()}
        try:
            self._authorize(request, installation_id)
            if installation_id in self._rate_windows:
                headers.update(self._rate_windows[installation_id].take(time.time()))
            event = await _read_event(request)
        except _Reject as reject:
            self.by_status[str(reject.status)] += 1
            return _error_response(reject.status, reject.message, {**headers, **reject.headers})
        vercel_id, request_headers = headers["x-vercel-id"], _safe_headers(request)
        accepted = Accepted(
            installation_id, event, time.time(), vercel_id, request_headers, arrived_at
        )
        self._record(self.accepted, accepted)
        self.by_status["201"] += 1
        return web.Response(status=201, headers=headers)

    def _record(self, entries: list[Any], entry: Any) -> None:
        """Keep an answered request for the tests, up to `max_recorded` of each kind: memory is
        bounded however long the simulator runs; `unrecorded` counts what was not kept."""
        if len(entries) < self.max_recorded:
            entries.append(entry)
        else:
            self.unrecorded += 1

    def _take_fault(self, installation_id: str) -> Fault | None:
        for active in self._faults:
            wanted = active.fault.installation
            if wanted is not None and wanted != installation_id:
                continue
            if active.remaining is not None:
                active.remaining -= 1
                if active.remaining <= 0:
                    self._faults.remove(active)
            return active.fault
        return None

    async def _apply_fault(
        self, request: web.Request, fault: Fault, arrived_at: float
    ) -> web.StreamResponse | None:
        """The fault's answer, or None to continue with normal handling."""
        if fault.latency > 0:
            await asyncio.sleep(fault.latency)
        if fault.truncate:  # recorded: its status line is an answer
            await self._record_refused(request, fault.status or 201, fault, arrived_at)
        if fault.drop or fault.garbage or fault.truncate:
            return self._break_connection(request, fault)
        if fault.status is None:
            return None
        vercel_id = self._new_vercel_id()
        headers = {"x-vercel-id": vercel_id}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        headers.update(fault.headers or {})
        self.by_status[str(fault.status)] += 1
        await self._record_refused(request, fault.status, fault, arrived_at)
        if fault.trickle > 0:
            return await _trickled(request, fault, headers)
        if fault.body is None:
            return _error_response(fault.status, "fault injected by the simulator", headers)
        content_type = _JSON if fault.body.lstrip()[:1] in (b"{", b"[") else "text/plain"
        headers["Content-Type"] = content_type
        return web.Response(status=fault.status, body=fault.body, headers=headers)

    async def _record_refused(
        self, request: web.Request, status: int, fault: Fault, arrived_at: float
    ) -> None:
        event = await _event_or_none(request)
        installation_id = request.match_info["installation_id"]
        refused = Refused(
            installation_id, status, fault.retry_after, arrived_at, time.time(), event
        )
        self._record(self.refused, refused)

    def _break_connection(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        kind = "garbage" if fault.garbage else "truncated" if fault.truncate else "dropped"
        self.by_status[kind] += 1
        transport = request.transport
        if transport is not None:
            if fault.garbage:
                transport.write(_GARBAGE)
            elif fault.truncate:
                status = fault.status or 201
                transport.write(f'HTTP/1.1 {status} X\r\nContent-Length: 1000\r\n\r\n{{"a'.encode())
            transport.close()
        return web.Response()  # never sent: aiohttp discards it on the closed transport

    def _authorize(self, request: web.Request, installation_id: str) -> None:
        token = _bearer_token(request.headers.get("Authorization", ""))
        if not token:
            raise _Reject(401, "missing or malformed Authorization: Bearer header")
        expected = self._token_of(installation_id)
        if expected is not None and expected == token:
            return
        if token not in self._all_tokens():
            raise _Reject(401, "the bearer token is not valid")
        if expected is None:
            raise _Reject(404, f"installation {installation_id} not found")
        raise _Reject(403, f"the token does not grant access to installation {installation_id}")

    def _new_vercel_id(self) -> str:
        self._next_id += 1
        return f"sim1::{self._id_prefix}-{self._next_id:06x}"

    # -- tokens ------------------------------------------------------------------------------

    def _token_of(self, installation_id: str) -> str | None:
        if installation_id in self._removed:
            return None
        token = self._tokens.get(installation_id)
        if token is None and self._tokens_dir is not None:
            token = self._token_from_file(installation_id)
        return token

    def _token_from_file(self, installation_id: str) -> str | None:
        """The token in the installation's file, read afresh: a rotated token applies at once."""
        assert self._tokens_dir is not None
        if not installation_id or installation_id.startswith(".") or "/" in installation_id:
            return None
        return _read_token(self._tokens_dir / installation_id) or None

    def _all_tokens(self) -> set[str]:
        """Every installation's token; only needed when a token is not the installation's."""
        ids = set(self._tokens)
        if self._tokens_dir is not None:
            ids.update(_token_file_names(self._tokens_dir))
        tokens = (self._token_of(installation_id) for installation_id in ids)
        return {token for token in tokens if token}

    # -- admin endpoints ---------------------------------------------------------------------

    async def _admin_accepted(self, request: web.Request) -> web.Response:
        return self._accepted_since(request, "accepted", _accepted_json)

    async def _admin_arrivals(self, request: web.Request) -> web.Response:
        return self._accepted_since(request, "arrivals", _arrival_json)

    def _accepted_since(
        self, request: web.Request, key: str, render: Callable[[Accepted], Any]
    ) -> web.Response:
        """`{"count", "since", key: [render(entry) for accepted entries from index since]}`."""
        try:
            since = max(0, int(request.query.get("since", "0")))
        except ValueError:
            return _error_response(400, "since must be an integer", {})
        entries = [render(entry) for entry in self.accepted[since:]]
        return web.json_response({"count": len(self.accepted), "since": since, key: entries})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _admin_add_fault(self, request: web.Request) -> web.Response:
        try:
            fault = fault_from_json(await request.json())
        except (ValueError, TypeError) as exc:
            return _error_response(400, f"invalid fault: {exc}", {})
        self.add_fault(fault)
        return web.Response(status=204)

    async def _admin_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.Response(status=204)

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)


# -- request checks ----------------------------------------------------------------------------


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


async def _read_event(request: web.Request) -> dict[str, Any]:
    """The validated `event` object of the body; _Reject(400/413) otherwise."""
    media_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media_type != _JSON:
        raise _Reject(400, "Content-Type must be application/json")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise _Reject(413, f"the body exceeds {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Reject(413, f"the body exceeds {MAX_BODY_BYTES} bytes") from None
    if len(raw) > MAX_BODY_BYTES:
        raise _Reject(413, f"the body exceeds {MAX_BODY_BYTES} bytes")
    return _validate_body(_parse_json(raw))


async def _event_or_none(request: web.Request) -> dict[str, Any] | None:
    """The request body's `event` object, or None: what a refused request was about."""
    try:
        event = json.loads(await request.read()).get("event")
    except (ValueError, AttributeError, web.HTTPException):
        return None
    return event if isinstance(event, dict) else None


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Reject(400, f"the body is not valid UTF-8 JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _validate_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Reject(400, "the body must be a JSON object")
    if set(body) != {"event"}:
        raise _Reject(400, f"the body must have exactly the key 'event', got {sorted(body)}")
    event = body["event"]
    if not isinstance(event, dict):
        raise _Reject(400, "event must be an object")
    event_type = event.get("type")
    if not isinstance(event_type, str) or event_type not in _EVENT_KEYS:
        allowed = " or ".join(sorted(_EVENT_KEYS))
        raise _Reject(400, f"event.type must be {allowed}, got {event_type!r}")
    _validate_fields(event, *_EVENT_KEYS[event_type])
    return event


def _validate_fields(event: dict[str, Any], required: set[str], optional: set[str]) -> None:
    unknown = set(event) - required - optional - {"type"}
    if unknown:
        raise _Reject(400, f"event has unknown key(s): {', '.join(sorted(unknown))}")
    for key in sorted(required):
        if key not in event:
            raise _Reject(400, f"event.{key} is required for {event['type']}")
    for key in sorted(required | optional):
        if key not in event:
            continue
        value = event[key]
        if value is None:
            raise _Reject(400, f"event.{key} must not be null (omit it instead)")
        if not isinstance(value, str) or not value:
            raise _Reject(400, f"event.{key} must be a non-empty string")


def _safe_headers(request: web.Request) -> dict[str, str]:
    return {
        name: value
        for name, value in request.headers.items()
        if name.lower() not in ("authorization", "proxy-authorization")
    }


async def _trickled(
    request: web.Request, fault: Fault, headers: dict[str, str]
) -> web.StreamResponse:
    """The fault's status and headers now, its body (default: Vercel's error shape) slowly."""
    status = fault.status or 201
    body = fault.body
    if body is None:
        error = {"code": _ERROR_CODES.get(status, "simulated_error"), "message": "slow"}
        body = json.dumps({"error": error}).encode()
    response = web.StreamResponse(status=status, headers={**headers, "Content-Type": _JSON})
    response.content_length = len(body)
    with contextlib.suppress(ConnectionError):  # the client gave up waiting: its right
        await response.prepare(request)
        for index in range(len(body)):
            await asyncio.sleep(fault.trickle)
            await response.write(body[index : index + 1])
        await response.write_eof()
    return response


def _error_response(status: int, message: str, headers: dict[str, str]) -> web.Response:
    code = _ERROR_CODES.get(status, "simulated_error")
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


# -- helpers -----------------------------------------------------------------------------------


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _token_file_names(directory: Path) -> list[str]:
    try:
        return [
            path.name
            for path in directory.iterdir()
            if not path.name.startswith(".") and path.is_file()
        ]
    except OSError:
        return []


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _accepted_json(entry: Accepted) -> dict[str, Any]:
    return asdict(entry)


def _arrival_json(entry: Accepted) -> list[Any]:
    return [entry.event.get("resourceId"), entry.received_at]


class _FaultSpec(BaseModel):
    """A Fault as `POST /_sim/faults` takes it: strict types, no unknown fields, finite
    numbers; the bounds keep a test's typo from wedging a shared simulator."""

    model_config = ConfigDict(strict=True, extra="forbid")

    status: int | None = Field(None, ge=100, le=599)
    retry_after: str | None = Field(None, max_length=1024)
    latency: float = Field(0.0, ge=0, le=MAX_FAULT_LATENCY, allow_inf_nan=False)
    trickle: float = Field(0.0, ge=0, le=MAX_FAULT_LATENCY, allow_inf_nan=False)
    drop: bool = False
    garbage: bool = False
    truncate: bool = False
    body: str | None = Field(None, max_length=MAX_BODY_BYTES)
    installation: str | None = Field(None, max_length=256)
    times: int | None = Field(None, ge=1)
    headers: dict[str, str] | None = Field(None, max_length=32)


def fault_from_json(data: Any) -> Fault:
    """A Fault from its JSON form (as `POST /_sim/faults` takes it); ValueError when invalid."""
    try:
        spec = _FaultSpec.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_input=False, include_url=False, include_context=False)
        raise ValueError(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'fault'}: {e['msg']}" for e in problems)
        ) from None
    fields = spec.model_dump()
    if fields["body"] is not None:
        fields["body"] = fields["body"].encode("utf-8")
    return Fault(**fields)


async def serve(
    host: str,
    port: int,
    tokens: Mapping[str, str] | None,
    tokens_dir: Path | None,
    latency: float,
) -> None:
    """Runs a simulator until cancelled, announcing its URL on one line of stdout."""
    simulator = VercelSimulator(tokens, tokens_dir=tokens_dir, latency=latency)
    url = await simulator.start(host, port)
    print(f"vercel simulator listening on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await simulator.stop()
