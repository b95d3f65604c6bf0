"""Continuous batching of verification rounds from many devices.

Rounds arrive one request at a time, from devices running at different
speeds. They wait in a bounded queue; the batcher loop takes the oldest, adds
whatever else arrives within the batching window (or is already waiting) up
to the token and session caps, and runs ONE engine call for all of them on
the engine thread. Each request is answered as soon as its batch finishes.

Rounds are idempotent: a retried (session, round) that is still queued or
running shares the original's future, and one already answered gets the
stored answer, so a round never advances its session twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

from sled_shared.protocol import ServiceError, VerifyRequest, VerifyResponse

from .messages import RoundResult, VerifyRound

log = logging.getLogger(__name__)

# Runs on the engine thread: (rounds, load in [0, 1]) -> one result per round.
Execute = Callable[[list[VerifyRound], float], list[RoundResult]]
# A result with this error code was not run: an APEX plan put it off to a later batch.
DEFERRED = "deferred"
# When a plan put off every round of a batch, the next plan waits this long for a change.
DEFERRED_PAUSE_S = 0.02


@dataclass(frozen=True, slots=True)
class BatchLimits:
    window_s: float  # how long the oldest round may wait for company
    max_tokens: int  # K + 1 per round, summed over the batch
    max_sessions: int  # rounds per batch
    max_queue: int  # rounds waiting; beyond it requests get at_capacity

    def __post_init__(self) -> None:
        if self.window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {self.window_s}")
        for name in ("max_tokens", "max_sessions", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one batch looked like, for metrics and $SRV.STATS."""

    size: int
    tokens: int
    devices: int  # distinct devices whose rounds shared the batch
    load: float
    compute_s: float
    queue_depth: int  # rounds still waiting when the batch started
    suggested_ks: tuple[int, ...]  # of the rounds answered without error


@dataclass(slots=True)
class _Item:
    request: VerifyRequest
    device: str
    future: asyncio.Future[VerifyResponse]
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return int(self.request.draft_ids.shape[0]) + 1

    @property
    def key(self) -> tuple[str, int]:
        return self.request.session_id, self.request.round


class Batcher:
    def __init__(
        self,
        limits: BatchLimits,
        execute: Execute,
        executor: Executor,
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        answer_timeout_s: float = 600.0,
    ) -> None:
        self.limits = limits
        self._execute = execute
        self._executor = executor
        self._on_batch = on_batch or (lambda _r: None)
        self._on_queue = on_queue or (lambda _n: None)
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._inflight: dict[tuple[str, int], asyncio.Future[VerifyResponse]] = {}
        # Last answer per session, for retries; bounded since finished sessions
        # a device never closes only leave when evicted.
        self._answered: OrderedDict[str, VerifyResponse] = OrderedDict()
        self._answered_cap = 4 * limits.max_queue
        self._batch_s = 0.0  # EWMA of a batch's wall time, for retry_after_s
        self._answer_timeout_s = answer_timeout_s

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def submit(self, request: VerifyRequest, device: str) -> VerifyResponse:
        key = (request.session_id, request.round)
        stored = self._answered.get(request.session_id)
        if stored is not None and stored.round == request.round:
            return replace(stored, queue_s=0.0, compute_s=0.0, batch_size=0)
        running = self._inflight.get(key)
        if running is None:
            if len(self._pending) >= self.limits.max_queue:
                raise ServiceError(
                    "at_capacity",
                    f"{len(self._pending)} rounds already wait for the verifier",
                    retry_after_s=self.retry_after_s(),
                )
            running = asyncio.get_running_loop().create_future()
            self._inflight[key] = running
            self._pending.append(_Item(request, device, running))
            self._on_queue(len(self._pending))
            self._wakeup.set()
        # A cancelled waiter (its requester gone) must not cancel the shared round.
        try:
            return await asyncio.wait_for(asyncio.shield(running), self._answer_timeout_s)
        except TimeoutError:
            # The round stays queued; a retry gets its answer once it has one.
            raise ServiceError(
                "at_capacity",
                f"round not answered within {self._answer_timeout_s:.0f}s",
                self.retry_after_s(),
            ) from None

    def forget(self, session_id: str) -> None:
        self._answered.pop(session_id, None)

    def retry_after_s(self) -> float:
        batches_ahead = 1 + len(self._pending) / self.limits.max_sessions
        return round(max(0.01, self._batch_s * batches_ahead), 3)

    async def run(self) -> None:
        """The batcher loop; runs until cancelled, then fails what is left unanswered."""
        try:
            while True:
                batch = await self._collect()
                await self._run_batch(batch)
        finally:
            stopping = ServiceError("at_capacity", "the verifier is stopping", retry_after_s=1.0)
            for future in self._inflight.values():
                if not future.done():
                    future.set_exception(stopping)
                    future.exception()
            self._inflight.clear()
            self._pending.clear()

    async def _collect(self) -> list[_Item]:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        # The window opens when the engine is free, not when the oldest round
        # arrived: devices answered by the previous batch send their next round
        # a bus round trip later, and waiting for them keeps devices from
        # taking turns in batches of one.
        deadline = time.perf_counter() + self.limits.window_s
        while True:
            count, full = self._fitting()
            left = deadline - time.perf_counter()
            if full or left <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)
        batch = [self._pending.popleft() for _ in range(count)]
        self._on_queue(len(self._pending))
        return batch

    def _fitting(self) -> tuple[int, bool]:
        """How many waiting rounds the next batch takes, and whether it is full."""
        count, tokens = 0, 0
        for item in self._pending:
            if count == self.limits.max_sessions:
                return count, True
            if count and tokens + item.tokens > self.limits.max_tokens:
                return count, True
            count += 1
            tokens += item.tokens
        return count, count == self.limits.max_sessions

    async def _run_batch(self, batch: list[_Item]) -> None:
        rounds = [_engine_round(item.request) for item in batch]
        tokens = sum(item.tokens for item in batch)
        waiting = len(self._pending)
        # Load: how full this batch and the queue behind it are; at 1 the
        # engine suggests K = 0 so devices fall back to plain decoding.
        load = min(
            1.0,
            max(tokens / self.limits.max_tokens, (len(batch) + waiting) / self.limits.max_sessions),
        )
        loop = asyncio.get_running_loop()
        wall = time.perf_counter()
        try:
            started, compute_s, results = await loop.run_in_executor(
                self._executor, _timed, self._execute, rounds, load
            )
        except Exception as exc:
            log.exception("verification batch of %d rounds failed", len(batch))
            for item in batch:
                self._settle(item, exc)
            return
        finally:
            self._batch_s += 0.3 * (time.perf_counter() - wall - self._batch_s)
        answered: list[int] = []
        deferred: list[_Item] = []
        for item, result in zip(batch, results, strict=True):
            if result.error_code == DEFERRED:
                deferred.append(item)
                continue
            if result.error is not None:
                code = result.error_code or "bad_request"
                retry = self.retry_after_s() if code == "at_capacity" else None
                self._settle(item, ServiceError(code, result.error, retry))
                continue
            answered.append(result.suggested_k)
            self._settle(item, _response(result, started - item.arrived, compute_s, len(batch)))
        self._on_batch(
            BatchReport(
                size=len(batch),
                tokens=tokens,
                devices=len({item.device for item in batch}),
                load=load,
                compute_s=compute_s,
                queue_depth=waiting,
                suggested_ks=tuple(answered),
            )
        )
        if deferred:
            # Back to the head of the queue, in order, for the next plan.
            self._pending.extendleft(reversed(deferred))
            self._on_queue(len(self._pending))
            if len(deferred) == len(batch):  # nothing ran: give the state time to change
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), DEFERRED_PAUSE_S)

    def _settle(self, item: _Item, outcome: VerifyResponse | BaseException) -> None:
        self._inflight.pop(item.key, None)
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
            # Nobody may be awaiting (the requester gave up); do not warn about it.
            item.future.exception()
            return
        sid = item.request.session_id
        self._answered[sid] = outcome
        self._answered.move_to_end(sid)
        while len(self._answered) > self._answered_cap:
            self._answered.popitem(last=False)
        item.future.set_result(outcome)


def _timed(
    execute: Execute, rounds: list[VerifyRound], load: float
) -> tuple[float, float, list[RoundResult]]:
    start = time.perf_counter()
    results = execute(rounds, load)
    return start, time.perf_counter() - start, results


def _engine_round(req: VerifyRequest) -> VerifyRound:
    dists: Sequence | None = req.draft_dists
    return VerifyRound(
        req.session_id,
        req.round,
        req.committed_len,
        req.draft_ids,
        list(dists) if dists is not None else None,
    )


def _response(r: RoundResult, queue_s: float, compute_s: float, size: int) -> VerifyResponse:
    return VerifyResponse(
        session_id=r.session_id,
        round=r.round,
        accepted=r.accepted,
        next_token=r.next_token,
        finished=r.finished,
        reason=r.reason,
        suggested_k=r.suggested_k,
        queue_s=max(0.0, queue_s),
        compute_s=compute_s,
        batch_size=size,
    )
