"""The host tier: sessions whose KV lives on kvoffload workers, seen from the engine thread.

Every call here runs on the engine thread and blocks on the event loop's
NATS client through ``run_coroutine_threadsafe`` with a timeout. Capacity
is tracked here from each worker's reported capacity and this verifier's
own sessions on it (a worker is assumed to serve one verifier).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
from nats.aio.client import Client
from sled_shared.apex.plan import WorkerState
from sled_shared.kv_client import KVClient
from sled_shared.kv_protocol import KVGeometry

from .offload import UNREACHABLE, WorkerAttention

log = logging.getLogger(__name__)
T = TypeVar("T")
# A worker that did not answer gets no new sessions for this long.
DOWN_S = 30.0


class HostTierError(RuntimeError):
    """A worker refused or failed an operation; the message names it."""


class HostTier:
    def __init__(
        self,
        nc: Client,
        loop: asyncio.AbstractEventLoop,
        geometry: KVGeometry,
        capacities: dict[str, int],  # worker id -> capacity in tokens
        block_size: int,
        timeout_s: float = 5.0,
    ) -> None:
        if not capacities:
            raise ValueError("a host tier needs at least one kvoffload worker")
        self.loop = loop
        self.geometry = geometry
        self.block_size = block_size
        self.capacity = dict(capacities)
        self.executors = {w: WorkerAttention(KVClient(nc, w, timeout_s), loop) for w in capacities}
        self.timeout_s = timeout_s
        self.where: dict[str, str] = {}  # session -> worker
        self.lengths: dict[str, int] = {}  # session -> tokens the worker holds
        self._truncates: dict[str, int] = {}  # session -> length, sent by flush()
        self._evicting: dict[str, Future] = {}
        self.failed: dict[str, str] = {}  # session -> why (besides attention failures)

    @classmethod
    def connect(
        cls,
        nc: Client,
        loop: asyncio.AbstractEventLoop,
        geometry: KVGeometry,
        worker_ids: list[str],
        block_size: int,
        timeout_s: float = 5.0,
    ) -> HostTier:
        """Ask each worker for its capacity; unreachable workers are left out (logged)."""
        capacities: dict[str, int] = {}
        for w in worker_ids:
            try:
                load = _call(loop, KVClient(nc, w, timeout_s).stats(), 2 * timeout_s + 1)
            except Exception as exc:
                log.warning("kvoffload worker %s left out: %s", w, exc)
                continue
            capacities[w] = load.capacity_tokens
        return cls(nc, loop, geometry, capacities, block_size, timeout_s)

    # ------------------------------------------------------------------ state

    def _wait(self) -> float:
        return 2 * self.timeout_s + 1.0  # a call and its one retry

    def client(self, worker: str) -> KVClient:
        return self.executors[worker].client

    def used_tokens(self, worker: str) -> int:
        bs = self.block_size
        return sum(-(-n // bs) * bs for s, n in self.lengths.items() if self.where[s] == worker)

    def up(self, worker: str) -> bool:
        return time.monotonic() - self.executors[worker].unreachable_at > DOWN_S

    def free_tokens(self, worker: str) -> int:
        """Room for more tokens; none on a worker that recently failed to answer."""
        return self.capacity[worker] - self.used_tokens(worker) if self.up(worker) else 0

    def states(self) -> tuple[WorkerState, ...]:
        return tuple(WorkerState(w, c, c - self.free_tokens(w)) for w, c in self.capacity.items())

    def pick(self, tokens: int) -> str | None:
        """The worker with the most free room, if it holds `tokens` more."""
        best = max(self.capacity, key=self.free_tokens)
        return best if self.free_tokens(best) >= tokens else None

    def take_failures(self) -> dict[str, str]:
        failed, self.failed = self.failed, {}
        for ex in self.executors.values():
            failed.update(ex.take_failures())
        return failed

    # ------------------------------------------------------------- operations

    def open(self, session: str, worker: str) -> WorkerAttention:
        self._settle_evict(session)
        self._run(self.client(worker).open(session, self.geometry), worker)
        self.where[session], self.lengths[session] = worker, 0
        return self.executors[worker]

    def grow(self, session: str, n: int) -> None:
        self.lengths[session] += n

    def truncate(self, session: str, length: int) -> None:
        """Queued: sent (one request per worker) by ``flush``, before the next forward."""
        if length != self.lengths[session]:
            self.lengths[session] = length
            self._truncates[session] = length

    def flush(self) -> None:
        """Send queued truncations; a worker that fails them fails its sessions."""
        if not self._truncates:
            return
        per_worker: dict[str, dict[str, int]] = {}
        for s, n in self._truncates.items():
            if s in self.where:
                per_worker.setdefault(self.where[s], {})[s] = n
        self._truncates.clear()
        futures = {
            w: asyncio.run_coroutine_threadsafe(self.client(w).truncate(lengths), self.loop)
            for w, lengths in per_worker.items()
        }
        for w, future in futures.items():
            try:
                future.result(timeout=self._wait())
            except Exception as exc:
                future.cancel()
                why = str(exc) or type(exc).__name__
                for s in per_worker[w]:
                    self.failed[s] = f"KV worker {w}: truncate failed: {why}"

    def evict(self, session: str) -> None:
        """Forget a session; the worker frees it in the background (nothing waits on it)."""
        self._truncates.pop(session, None)
        self.lengths.pop(session, None)
        worker = self.where.pop(session, None)
        if worker is not None:
            coro = self.client(worker).evict(session)
            self._evicting[session] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        for s in [s for s, f in self._evicting.items() if f.done()]:
            self._evicting.pop(s).exception()  # logged by nobody: a lost evict frees nothing

    def import_kv(self, session: str, worker: str, k: np.ndarray, v: np.ndarray) -> None:
        """Move a cache [layers, tokens, kv_heads, head_dim] into `worker` (all or nothing)."""
        self._settle_evict(session)
        # Chunks go MIGRATE_IN_FLIGHT at a time: allow a timeout per few chunks.
        budget = self._wait() * (2 + k.nbytes * 2 // self.client(worker).default_chunk_bytes())
        self._run(self.client(worker).import_session(session, self.geometry, k, v), worker, budget)
        self.where[session], self.lengths[session] = worker, int(k.shape[1])

    def export_kv(self, session: str) -> tuple[np.ndarray, np.ndarray]:
        """The session's cache [layers, tokens, kv_heads, head_dim] as the worker holds it."""
        worker = self.where[session]
        budget = self._wait() * (2 + 2 * self.lengths[session] // 1024)
        k, v = self._run(self.client(worker).export_session(session), worker, budget)
        if k.shape[1] != self.lengths[session]:
            raise HostTierError(
                f"KV worker {worker} holds {k.shape[1]} tokens of session {session}, "
                f"expected {self.lengths[session]}"
            )
        return k, v

    # ---------------------------------------------------------------- helpers

    def _run(self, coro: Coroutine[Any, Any, T], worker: str, wait_s: float | None = None) -> T:
        try:
            return _call(self.loop, coro, wait_s or self._wait())
        except Exception as exc:
            if isinstance(exc, UNREACHABLE):
                self.executors[worker].unreachable_at = time.monotonic()
            raise HostTierError(f"KV worker {worker}: {str(exc) or type(exc).__name__}") from exc

    def _settle_evict(self, session: str) -> None:
        """An evict still in flight must land before the same session comes back."""
        future = self._evicting.pop(session, None)
        if future is not None:
            with contextlib.suppress(Exception):
                future.result(timeout=self._wait())


def _call(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], wait_s: float) -> T:
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout=wait_s)
    except BaseException:
        future.cancel()
        raise
