"""The verifier as a NATS micro service ("sled-verifier").

Endpoints:

- ``open`` on ``sled.v1.session.open`` in the ``verifiers`` queue group:
  prefill a prompt (or a resumed history) and answer the first token;
- ``verify`` on ``sled.v1.verify.<verifier_id>``: one round, batched with the
  rounds of other devices (see ``batcher``);
- ``close`` on ``sled.v1.session.close.<verifier_id>``.

The engine is synchronous and not reentrant, so every engine call (prefills,
batches, closes, evictions) runs on one dedicated thread, in arrival order;
torch releases the GIL there, so the event loop keeps taking requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client
from sled_shared import bus, subjects
from sled_shared.metrics import VerifierMetrics
from sled_shared.protocol import (
    ServiceError,
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
)
from sled_shared.settings import VerifierSettings

from .apex_loop import ApexLoop
from .batcher import Batcher, BatchLimits
from .engine import CapacityError, OpenResult, RoundResult, VerifierEngine, VerifyRound
from .service_apex import start_apex, worker_ids
from .service_stats import ServiceStats

log = logging.getLogger(__name__)

SERVICE_NAME = "sled-verifier"
SERVICE_VERSION = "0.1.0"
# A verifier id is one NATS subject token.
_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# Session slots free up only as other sessions finish; a guess that avoids hammering.
OPEN_RETRY_AFTER_S = 1.0
# Prefills are long and serialised with batches; more concurrent opens only queue.
OPEN_CONCURRENCY = 8
# Bound on any wait for the engine thread (a long CPU prefill takes tens of seconds).
ENGINE_WAIT_S = 600.0

T = TypeVar("T")


@dataclass(slots=True)
class _Record:
    device: str
    finished: bool = False
    last_used: float = field(default_factory=time.monotonic)


class VerifierService:
    def __init__(
        self,
        engine: VerifierEngine,
        settings: VerifierSettings,
        verifier_id: str,
        *,
        metrics: VerifierMetrics | None = None,
        max_queue: int = 0,  # 0: twice the session cap
        target_model: str = "",
    ) -> None:
        if not _ID.match(verifier_id):
            raise ValueError(f"verifier id {verifier_id!r}: use letters, digits, - and _")
        self.engine = engine
        self.settings = settings
        self.verifier_id = verifier_id
        self.target_model = target_model or settings.target_model
        self.metrics = metrics or VerifierMetrics()
        self.stats = ServiceStats(self.metrics)
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="sled-engine")
        self.apex: ApexLoop | None = None  # set by serve() when kvoffload workers are configured
        max_sessions = min(settings.max_sessions, engine.config.max_sessions)
        self.limits = BatchLimits(
            window_s=settings.batch_window_ms / 1000.0,
            max_tokens=min(settings.max_batch_tokens, engine.config.max_batch_tokens),
            max_sessions=max_sessions,
            max_queue=max_queue or 2 * max_sessions,
        )
        self.batcher = Batcher(
            self.limits,
            self._verify_on_engine,
            self.engine_thread,
            on_batch=self.stats.on_batch,
            on_queue=self.metrics.queue_depth.set,
            answer_timeout_s=ENGINE_WAIT_S,
        )
        # Device of each session (for per-batch device counts) and its lifecycle.
        self._sessions: OrderedDict[str, _Record] = OrderedDict()
        self._records_cap = 4 * self.limits.max_queue
        self._after_engine_op()

    @property
    def metadata(self) -> dict[str, str]:
        return {
            "verifier_id": self.verifier_id,
            "target_model": self.target_model,
            "device": self.engine.config.device,
            "max_sessions": str(self.limits.max_sessions),
        }

    def endpoints(self) -> list[bus.Endpoint]:
        lim = self.limits
        return [
            bus.Endpoint(
                "open",
                subjects.SESSION_OPEN,
                self.open,
                SessionOpen,
                queue_group=subjects.VERIFIER_QUEUE,
                max_concurrency=OPEN_CONCURRENCY,
            ),
            bus.Endpoint(
                "verify",
                subjects.verify(self.verifier_id),
                self.verify,
                VerifyRequest,
                # Queued + batched rounds, and retries waiting on them; the queue
                # bound (at_capacity) is what limits the work.
                max_concurrency=2 * lim.max_queue + lim.max_sessions,
                stats_data=self.stats_data,
            ),
            bus.Endpoint(
                "close", subjects.session_close(self.verifier_id), self.close, SessionClose
            ),
        ]

    async def serve(
        self,
        nc: Client,
        *,
        stop: asyncio.Event | None = None,
        on_started: Callable[[bus.BusService], None] | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        """Serve until SIGTERM/SIGINT (or ``stop``); drains in-flight rounds, then closes ``nc``."""
        if worker_ids(self.settings):  # APEX: plans per batch, a host KV tier on those workers
            self.apex = await start_apex(
                self.engine, self.settings, self.verifier_id, nc, self.engine_thread
            )
        tasks = [
            asyncio.create_task(self.batcher.run(), name="sled-batcher"),
            asyncio.create_task(self._evict_loop(), name="sled-evict"),
        ]
        try:
            await bus.run_service(
                nc,
                name=SERVICE_NAME,
                version=SERVICE_VERSION,
                endpoints=self.endpoints(),
                description=f"SLED verifier for {self.target_model}",
                metadata=self.metadata,
                stop=stop,
                on_started=on_started,
                drain_timeout_s=drain_timeout_s,
            )
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(self.engine_thread.shutdown, True)

    # ---------------------------------------------------------------- handlers

    async def open(self, req: SessionOpen) -> SessionOpened:
        try:
            res, seconds = await self._on_engine(self._open_on_engine, req)
        except CapacityError as exc:
            raise ServiceError("at_capacity", str(exc), OPEN_RETRY_AFTER_S) from None
        except ValueError as exc:
            raise ServiceError("bad_request", str(exc)) from None
        self._remember(res.session_id, _Record(req.device_name, finished=res.finished))
        self.metrics.sessions_opened.inc()
        self.metrics.prefill.observe(seconds)
        if res.finished:
            self.metrics.sessions_closed.inc()
        log.info(
            "session opened",
            extra={
                "session_id": res.session_id,
                "device": req.device_name,
                "draft_kind": req.draft_kind,
                "prompt_tokens": int(req.prompt_ids.size),
                "resume": req.resume,
                "prefill_s": round(seconds, 4),
            },
        )
        return SessionOpened(
            res.session_id, self.verifier_id, res.first_token, res.finished, res.reason
        )

    async def verify(self, req: VerifyRequest) -> VerifyResponse:
        rec = self._sessions.get(req.session_id)
        if rec is not None:
            rec.last_used = time.monotonic()
            self._sessions.move_to_end(req.session_id)
        resp = await self.batcher.submit(req, rec.device if rec else "?")
        if resp.finished and rec is not None and not rec.finished:
            rec.finished = True
            self.metrics.sessions_closed.inc()
        return resp

    async def close(self, req: SessionClose) -> SessionClosed:
        sid = req.session_id
        known = await self._on_engine(self._close_on_engine, sid)
        rec = self._sessions.pop(sid, None)
        self.batcher.forget(sid)
        if not known and rec is None:
            raise ServiceError("unknown_session", f"no session {sid!r} on {self.verifier_id}")
        if rec is None or not rec.finished:
            self.metrics.sessions_closed.inc()
        log.info("session closed", extra={"session_id": sid})
        return SessionClosed(sid)

    def stats_data(self) -> dict[str, Any]:
        """The verify endpoint's ``data`` in $SRV.STATS."""
        return self.stats.endpoint_data(self.batcher.queue_depth, len(self._sessions))

    # ------------------------------------------------------------- internals

    async def _on_engine(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self.engine_thread, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(call, ENGINE_WAIT_S)
        except TimeoutError:
            raise ServiceError(
                "at_capacity", f"the engine did not get to this within {ENGINE_WAIT_S:.0f}s", 1.0
            ) from None

    def _open_on_engine(self, req: SessionOpen) -> tuple[OpenResult, float]:
        start = time.perf_counter()
        try:
            res = self.engine.open_session(
                req.prompt_ids,
                req.params,
                req.max_new_tokens,
                req.stream,
                req.stop_ids.tolist(),
                resume=req.resume,
            )
        finally:
            self._after_engine_op()
        return res, time.perf_counter() - start

    def _verify_on_engine(self, rounds: list[VerifyRound], load: float) -> list[RoundResult]:
        try:
            if self.apex is not None:
                return self.apex.execute(rounds, load)
            return self.engine.verify(rounds, load)
        finally:
            self._after_engine_op()

    def _close_on_engine(self, session_id: str) -> bool:
        try:
            return self.engine.close(session_id)
        finally:
            self._after_engine_op()

    def _evict_on_engine(self) -> list[str]:
        try:
            return self.engine.evict_idle(self.settings.session_ttl_s)
        finally:
            self._after_engine_op()

    def _after_engine_op(self) -> None:
        self.stats.after_engine_op(self.engine)

    def _remember(self, session_id: str, record: _Record) -> None:
        self._sessions[session_id] = record
        while len(self._sessions) > self._records_cap:
            old, _ = self._sessions.popitem(last=False)
            self.batcher.forget(old)

    async def _evict_loop(self) -> None:
        ttl = self.settings.session_ttl_s
        interval = min(max(ttl / 4, 0.05), 10.0)
        while True:
            await asyncio.sleep(interval)
            try:
                evicted = await self._on_engine(self._evict_on_engine)
            except Exception:
                log.exception("idle-session eviction failed")
                continue
            for sid in evicted:
                rec = self._sessions.pop(sid, None)
                self.batcher.forget(sid)
                if rec is None or not rec.finished:
                    self.metrics.sessions_evicted.inc()
                log.info("session evicted after %.1fs idle", ttl, extra={"session_id": sid})
            # Finished sessions the engine dropped on its own leave no eviction to see.
            cutoff = time.monotonic() - 2 * ttl
            for sid in [s for s, r in self._sessions.items() if r.last_used < cutoff]:
                del self._sessions[sid]
                self.batcher.forget(sid)
