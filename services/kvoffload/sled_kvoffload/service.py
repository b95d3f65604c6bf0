"""The KV-offload worker as a NATS micro service ("sled-kvoffload").

Endpoints, each on ``sled.v1.kv.<worker_id>.<op>``: ``open``, ``append``,
``attend`` (the per-layer hot path), ``truncate``, ``evict``, ``migrate``
(export and import chunks) and ``stats`` (its load).

The cache is not thread-safe, so every operation on it runs on one owner
thread, in arrival order; the attention kernel fans out over its own pool
and numpy releases the GIL, so the event loop keeps answering (pings, stats,
the next requests' decoding) meanwhile. CPU attention times become profile
samples, sent to the scheduler on ``sled.v1.sched.profile`` every
``profile_interval_s`` (and right after the start-up sweep of a new
geometry); while no scheduler answers they wait in a bounded buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from nats.aio.client import Client
from sled_shared import bus, subjects
from sled_shared.apex.profiles import Component, Sample
from sled_shared.kv_migrate_protocol import (
    KVChunk,
    KVExport,
    KVImportBegin,
    KVImportEnd,
    KVMigrateAck,
)
from sled_shared.kv_protocol import (
    KVAppend,
    KVAppended,
    KVAttend,
    KVAttended,
    KVEvict,
    KVEvicted,
    KVGeometry,
    KVLoad,
    KVOpen,
    KVOpened,
    KVStats,
    KVTruncate,
    KVTruncated,
)
from sled_shared.metrics import KVOffloadMetrics
from sled_shared.protocol import Message
from sled_shared.sched_protocol import ProfileReport, ReportAck

from sled_kvoffload import calibrate
from sled_kvoffload.worker import KVWorker

log = logging.getLogger(__name__)

SERVICE_NAME = "sled-kvoffload"
SERVICE_VERSION = "0.1.0"
REPORT_TIMEOUT_S = 2.0
MAX_SAMPLES_PER_REPORT = 2000

T = TypeVar("T")


class KVOffloadService:
    def __init__(
        self,
        worker: KVWorker,
        metrics: KVOffloadMetrics,
        *,
        profile_interval_s: float = 5.0,
        calibrate_geometry: bool = True,
        max_buffered_samples: int = 8192,
        session_ttl_s: float = 900.0,
    ) -> None:
        if profile_interval_s <= 0 or session_ttl_s <= 0:
            raise ValueError("profile_interval_s and session_ttl_s must be > 0")
        self.worker = worker
        self.metrics = metrics
        self.profile_interval_s = profile_interval_s
        self.calibrate_geometry = calibrate_geometry
        self.session_ttl_s = session_ttl_s
        self.load: KVLoad = worker.load()
        self.samples: deque[Sample] = deque(maxlen=max_buffered_samples)
        self.reports_sent = 0
        self._owner = ThreadPoolExecutor(1, thread_name_prefix="kv-owner")
        self._calibrated: set[KVGeometry] = set()
        self._tasks: set[asyncio.Task] = set()
        self._flush = asyncio.Event()

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id

    # -- plumbing -----------------------------------------------------------

    async def _owned(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """Run ``fn`` on the owner thread; returns its result and its queueing time."""
        submitted = time.perf_counter()

        def call() -> tuple[T, float]:
            started = time.perf_counter()
            try:
                return fn(*args), started - submitted
            finally:
                self.load = self.worker.load()

        result = await asyncio.get_running_loop().run_in_executor(self._owner, call)
        self.metrics.sessions.set(self.load.sessions)
        self.metrics.kv_bytes.set(self.load.used_bytes)
        return result

    def _counted(self, op: str, handler: Callable[[Any], Awaitable[Message]]):
        async def run(msg: Any) -> Message:
            try:
                reply = await handler(msg)
            except Exception:
                self.metrics.record_request(op, "error")
                raise
            self.metrics.record_request(op, "ok")
            return reply

        return run

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- handlers -----------------------------------------------------------------

    async def open(self, msg: KVOpen) -> KVOpened:
        length, _ = await self._owned(self.worker.open, msg.session, msg.geometry)
        if self.calibrate_geometry and msg.geometry not in self._calibrated:
            self._calibrated.add(msg.geometry)
            self._spawn(self._calibrate(msg.geometry))
        return KVOpened(msg.session, length, self.load.free_blocks * self.load.block_size)

    async def append(self, msg: KVAppend) -> KVAppended:
        lengths, _ = await self._owned(self.worker.append, msg)
        return KVAppended(msg.forward_id, msg.layer, lengths)

    async def attend(self, msg: KVAttend) -> KVAttended:
        res, queue_s = await self._owned(self.worker.attend, msg)
        self.metrics.attention.observe(res.compute_s)
        self.samples.append(
            Sample(
                Component.CPU_ATTN,
                res.compute_s,
                tokens=msg.tokens,
                context=res.context,
                sessions=len(msg.sessions),
            )
        )
        return KVAttended(msg.forward_id, msg.layer, res.out, res.compute_s, queue_s, res.appended)

    async def truncate(self, msg: KVTruncate) -> KVTruncated:
        lengths, _ = await self._owned(self.worker.truncate, msg)
        return KVTruncated(msg.sessions, lengths)

    async def evict(self, msg: KVEvict) -> KVEvicted:
        held, _ = await self._owned(self.worker.evict, msg.session)
        return KVEvicted(msg.session, held, self.load.free_blocks * self.load.block_size)

    async def migrate(self, msg: KVExport | KVImportBegin | KVChunk | KVImportEnd) -> Message:
        if isinstance(msg, KVExport):
            chunk, _ = await self._owned(self.worker.export, msg)
            self.metrics.migrated_bytes.inc(chunk.keys.nbytes + chunk.values.nbytes)
            return chunk
        if isinstance(msg, KVImportEnd):
            (total, complete), _ = await self._owned(self.worker.import_end, msg)
            return KVMigrateAck(msg.session, total, 1.0 if complete else 0.0, complete)
        work = self.worker.import_chunk if isinstance(msg, KVChunk) else self.worker.import_begin

        def step() -> tuple[int, float]:
            imp = work(msg)
            return imp.total_len, imp.received_fraction

        (total, received), _ = await self._owned(step)
        if isinstance(msg, KVChunk):
            self.metrics.migrated_bytes.inc(msg.keys.nbytes + msg.values.nbytes)
        return KVMigrateAck(msg.session, total, received, False)

    async def stats(self, _msg: KVStats) -> KVLoad:
        return self.load

    def endpoints(self) -> list[bus.Endpoint]:
        # Bounds on concurrent handlers: the rest wait in the subscription's bounded queue.
        def ep(op: str, handler, types, concurrency: int = 16) -> bus.Endpoint:
            counted = self._counted(op, handler)
            return bus.Endpoint(
                op, subjects.kv(self.worker_id, op), counted, types, None, concurrency
            )

        migrate_types = (KVExport, KVImportBegin, KVChunk, KVImportEnd)
        return [
            ep("open", self.open, KVOpen),
            ep("append", self.append, KVAppend, 32),
            ep("attend", self.attend, KVAttend, 32),
            ep("truncate", self.truncate, KVTruncate),
            ep("evict", self.evict, KVEvict),
            ep("migrate", self.migrate, migrate_types, 32),
            bus.Endpoint(
                "stats",
                subjects.kv(self.worker_id, "stats"),
                self.stats,
                KVStats,
                stats_data=self.stats_data,
            ),
        ]

    def stats_data(self) -> dict[str, Any]:
        load = self.load
        return {
            "sessions": load.sessions,
            "used_blocks": load.used_blocks,
            "free_blocks": load.free_blocks,
            "used_bytes": load.used_bytes,
            "buffered_samples": len(self.samples),
        }

    # -- profiles -------------------------------------------------------------------

    async def _calibrate(self, geometry: KVGeometry) -> None:
        samples, _ = await self._owned(calibrate.sweep, geometry, self.worker.threads)
        self.samples.extend(samples)
        log.info("calibrated CPU attention", extra={"samples": len(samples)})
        self._flush.set()

    async def _report_loop(self, nc: Client) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush.wait(), self.profile_interval_s)
            self._flush.clear()
            await self.report(nc)

    async def _expire_loop(self) -> None:
        # A verifier that died leaves its offloaded sessions behind; nobody else frees them.
        while True:
            await asyncio.sleep(min(self.session_ttl_s / 4, 30.0))
            gone, _ = await self._owned(self.worker.expire, self.session_ttl_s)
            if gone:
                log.warning("evicted %d sessions idle for %.1fs", len(gone), self.session_ttl_s)

    async def report(self, nc: Client) -> bool:
        """Send the buffered samples; on failure they stay buffered (oldest dropped first)."""
        batch = [
            self.samples.popleft() for _ in range(min(len(self.samples), MAX_SAMPLES_PER_REPORT))
        ]
        if not batch:
            return True
        report = ProfileReport(self.worker_id, "kvoffload", tuple(batch))
        try:
            await bus.request(
                nc, subjects.sched("profile"), report, REPORT_TIMEOUT_S, expect=ReportAck
            )
        except bus.BusError as exc:
            log.debug("profile report not delivered: %s", exc)
            self.samples.extendleft(reversed(batch))
            return False
        self.reports_sent += 1
        return True

    # -- life cycle ----------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, str]:
        capacity = self.worker.num_blocks * self.worker.block_size
        return {"worker_id": self.worker_id, "capacity_tokens": str(capacity)}

    async def serve(
        self,
        nc: Client,
        *,
        stop: asyncio.Event | None = None,
        on_started: Callable[[bus.BusService], None] | None = None,
    ) -> None:
        self._spawn(self._report_loop(nc))
        self._spawn(self._expire_loop())
        try:
            await bus.run_service(
                nc,
                name=SERVICE_NAME,
                version=SERVICE_VERSION,
                endpoints=self.endpoints(),
                description="APEX KV offload: host-RAM KV cache and CPU attention",
                metadata=self.metadata,
                stop=stop,
                on_started=on_started,
            )
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._owner.shutdown(wait=True)
            self.worker.close()
