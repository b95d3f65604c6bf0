"""NATS helpers every service is built on: connecting, typed requests, and
running a ``nats.micro`` service (so ``$SRV.PING/INFO/STATS`` answer).

A service's handlers take a decoded request message and return a reply
message. Undecodable requests are answered with an ErrorReply
(``bad_request`` / ``unsupported_version``), a raised ``ServiceError`` with its
own code, and any other exception with ``internal`` (and a logged traceback).
Requests are handled concurrently, at most ``max_concurrency`` per endpoint;
beyond that they wait in the subscription's (bounded) pending queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from nats import errors as nats_errors
from nats import micro
from nats.aio.client import Client
from nats.micro.request import ERROR_HEADER, Request
from nats.micro.service import EndpointStats, ServiceConfig

from sled_shared.protocol import ErrorReply, Message, ProtocolError, ServiceError, decode, encode
from sled_shared.settings import CommonSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Any], Awaitable[Message]]


class BusError(Exception):
    """A request that got no valid answer."""


class RemoteError(BusError):
    """The service answered with an ErrorReply."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply
        self.code = reply.code
        self.retry_after_s = reply.retry_after_s


class RequestTimeout(BusError, TimeoutError):
    pass


class NoResponders(BusError):
    """Nobody listens on the subject (service down or not started yet)."""


def _backoff(base_s: float, cap_s: float):
    """Exponential reconnect delay with jitter, so a fleet of devices does
    not hammer a restarting server in lockstep."""

    def pick(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        attempts = min(servers[0].reconnects, 16) if servers else 0
        return None, min(cap_s, base_s * 2**attempts) * random.uniform(0.5, 1.0)

    return pick


def _is_auth_error(exc: BaseException) -> bool:
    return "authorization" in str(exc).lower()


async def connect(
    settings: CommonSettings,
    *,
    name: str | None = None,
    connect_timeout_s: float = 30.0,
    reconnect_base_s: float = 0.1,
    reconnect_cap_s: float = 2.0,
    drain_timeout_s: float = 30.0,
) -> Client:
    """Connect to ``settings.nats_url`` and stay connected: once up, the
    client reconnects forever (and resubscribes) after the server goes away.
    The first connection must succeed within ``connect_timeout_s``."""
    last_error: list[BaseException] = []
    # Before the first connection the caller gets the last error in the
    # exception; logging every retry would only be noise.
    connected = False

    async def on_error(exc: Exception) -> None:
        # A refused login is followed by the server dropping the socket; keep the
        # refusal, which is the error the user can act on.
        if not (last_error and _is_auth_error(last_error[0])) or _is_auth_error(exc):
            last_error[:] = [exc]
        log.log(
            logging.WARNING if connected else logging.DEBUG, "nats: %s: %s", type(exc).__name__, exc
        )

    async def on_disconnected() -> None:
        # A close() we asked for also reports a disconnect: only an unplanned one is news.
        if connected and not nc.is_closed:
            log.warning("nats: disconnected from %s", settings.nats_url)

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    nc = Client()
    options: dict[str, Any] = {
        "servers": [settings.nats_url],
        "name": name,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": reconnect_base_s,  # used between first-connect attempts
        "reconnect_to_server_handler": _backoff(reconnect_base_s, reconnect_cap_s),
        "connect_timeout": 2,
        "drain_timeout": max(1, round(drain_timeout_s)),
    }
    if settings.nats_user:
        options.update(user=settings.nats_user, password=settings.nats_password)
    try:
        await asyncio.wait_for(nc.connect(**options), connect_timeout_s)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await nc.close()
        why = f": {last_error[0]}" if last_error else ""
        raise BusError(
            f"cannot connect to NATS at {settings.nats_url} within {connect_timeout_s}s{why}"
        ) from None
    except nats_errors.Error as exc:  # e.g. a malformed URL: retrying will not help
        raise BusError(f"cannot connect to NATS at {settings.nats_url}: {exc}") from None
    connected = True
    return nc


async def request(
    nc: Client, subject: str, msg: Message, timeout: float, *, expect: type[M] = Message
) -> M:
    """Send ``msg`` and return the decoded reply; an ErrorReply raises RemoteError."""
    try:
        reply = await nc.request(subject, encode(msg), timeout=timeout)
    except nats_errors.NoRespondersError:
        raise NoResponders(f"no service listens on {subject}") from None
    except nats_errors.TimeoutError:
        raise RequestTimeout(f"no reply on {subject} within {timeout}s") from None
    except nats_errors.Error as exc:  # connection closed or draining
        raise BusError(f"request on {subject} failed: {type(exc).__name__}: {exc}") from None
    if reply.headers and ERROR_HEADER in reply.headers:
        raise RemoteError(ErrorReply("internal", reply.headers[ERROR_HEADER]))
    out = decode(reply.data, (expect, ErrorReply))
    if isinstance(out, ErrorReply):
        raise RemoteError(out)
    return out  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # letters, digits, '-', '_' (shown in $SRV.INFO/STATS)
    subject: str
    handler: Handler  # async (request message) -> reply message
    request_type: type[Message] | tuple[type[Message], ...]
    queue_group: str | None = None  # None: nats.micro's default group "q"
    max_concurrency: int = 64
    metadata: dict[str, str] | None = None
    # Extra figures for this endpoint's ``data`` in $SRV.STATS (JSON-able values).
    stats_data: Callable[[], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"{self.name}: max_concurrency must be >= 1")


@dataclass(slots=True)
class _Counters:
    errors: int = 0
    busy_ns: int = 0
    done: int = 0
    last_error: str | None = None
    in_flight: int = 0


class BusService:
    """A nats.micro service whose endpoints speak sled protocol messages."""

    def __init__(
        self,
        nc: Client,
        name: str,
        version: str,
        *,
        description: str = "",
        metadata: dict[str, str] | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = metadata or {}
        self.drain_timeout_s = drain_timeout_s
        self._micro: micro.service.Service | None = None
        self._counters: dict[str, _Counters] = {}
        self._stats_data: dict[str, Callable[[], dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def id(self) -> str:
        if self._micro is None:
            raise RuntimeError("service not started")
        return self._micro.id

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self._counters.values())

    async def start(self, endpoints: Sequence[Endpoint] = ()) -> None:
        config = ServiceConfig(
            name=self.name,
            version=self.version,
            description=self.description,
            metadata=self.metadata,
            stats_handler=self._endpoint_stats,
        )
        self._micro = await micro.add_service(self.nc, config)
        for ep in endpoints:
            await self.add_endpoint(ep)

    async def add_endpoint(self, ep: Endpoint) -> None:
        if self._micro is None:
            raise RuntimeError("start() the service before adding endpoints")
        if ep.name in self._counters:
            raise ValueError(f"endpoint {ep.name!r} added twice")
        counters = self._counters[ep.name] = _Counters()
        if ep.stats_data is not None:
            self._stats_data[ep.name] = ep.stats_data
        slots = asyncio.Semaphore(ep.max_concurrency)

        async def on_request(req: Request) -> None:
            await slots.acquire()
            if self._stopping:
                # While draining, finish each remaining request before nats-py
                # may close the connection (it waits for these callbacks only).
                try:
                    await self._handle(ep, counters, req)
                finally:
                    slots.release()
                return
            task = asyncio.create_task(self._handle(ep, counters, req))
            self._tasks.add(task)
            task.add_done_callback(done)

        def done(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            slots.release()

        await self._micro.add_endpoint(
            name=ep.name,
            subject=ep.subject,
            handler=on_request,
            queue_group=ep.queue_group,
            metadata=ep.metadata,
        )
        # A round trip, so the server knows the subscription when this returns
        # and a request sent right after does not get "no responders".
        await self.nc.flush()

    async def _handle(self, ep: Endpoint, counters: _Counters, req: Request) -> None:
        start = time.perf_counter_ns()
        counters.in_flight += 1
        try:
            try:
                reply = await ep.handler(decode(req.data, ep.request_type))
                if not isinstance(reply, Message):
                    raise TypeError(f"handler returned {type(reply).__name__}, not a Message")
            except ServiceError as exc:
                reply = ErrorReply.from_exception(exc)
                if not isinstance(exc, ProtocolError):
                    log.info("%s: %s", ep.name, exc)
            except Exception as exc:
                log.exception("%s: handler failed", ep.name)
                reply = ErrorReply("internal", f"{type(exc).__name__}: {exc}")
            if isinstance(reply, ErrorReply):
                counters.errors += 1
                counters.last_error = f"{reply.code}: {reply.message}"
            try:
                await req.respond(encode(reply))
            except Exception as exc:  # no reply subject, or the connection is gone
                log.warning("%s: could not send the reply: %s", ep.name, exc)
        finally:
            counters.in_flight -= 1
            counters.done += 1
            counters.busy_ns += time.perf_counter_ns() - start

    def _endpoint_stats(self, stats: EndpointStats) -> dict[str, Any]:
        # nats.micro times only our (instant) dispatch callback and never sees
        # an error, since we answer errors ourselves: report our own figures.
        c = self._counters.get(stats.name)
        if c is None:
            return {}
        stats.num_errors = c.errors
        stats.last_error = c.last_error
        stats.processing_time = c.busy_ns
        stats.average_processing_time = c.busy_ns // c.done if c.done else 0
        extra = self._stats_data.get(stats.name)
        return {**(extra() if extra else {}), "in_flight": c.in_flight}

    async def stop(self) -> None:
        """Drain: stop taking requests, finish those in flight, close the connection."""
        if self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + self.drain_timeout_s
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        if self._tasks:
            log.warning("drain timed out with %d requests in flight", len(self._tasks))
        try:
            # Unsubscribes, handles what the server already sent, then closes.
            await asyncio.wait_for(self.nc.drain(), max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # reconnecting, closed, or timed out
            log.warning("nats drain incomplete (%s); closing", type(exc).__name__)
        await self.nc.close()


async def run_service(
    nc: Client,
    *,
    name: str,
    version: str,
    endpoints: Sequence[Endpoint],
    description: str = "",
    metadata: dict[str, str] | None = None,
    stop: asyncio.Event | None = None,
    drain_timeout_s: float = 30.0,
    on_started: Callable[[BusService], None] | None = None,
) -> None:
    """Serve ``endpoints`` until SIGTERM/SIGINT (or ``stop`` is set), then drain
    and close ``nc``. The service survives NATS server restarts: nats-py
    reconnects and resubscribes by itself."""
    stop = stop or asyncio.Event()
    service = BusService(
        nc,
        name,
        version,
        description=description,
        metadata=metadata,
        drain_timeout_s=drain_timeout_s,
    )
    await service.start(endpoints)
    log.info("service %s %s started (id %s)", name, version, service.id)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
    try:
        if on_started is not None:
            on_started(service)
        await stop.wait()
        log.info("service %s stopping: draining %d in-flight requests", name, service.in_flight)
    finally:
        if in_main:
            for sig in signals:
                loop.remove_signal_handler(sig)
        await service.stop()
