"""Generations on this device: draft locally, verify remotely, round after round.

A ``Generation`` holds the committed history (prompt + generated tokens), the
only state that matters: the verifier session is a cache of it. When the
verifier is lost (no answer, no responders, unknown session) the history is
reopened with ``resume=True`` on whichever verifier the queue group picks,
and the rounds go on from the same position. Greedy tokens are a function
of the history, and sampling draws are keyed by (seed, stream, position), so
the user sees the same tokens, none lost or repeated.

Drafting runs in one worker thread per device (onnxruntime blocks, and the
device's cores are better used by one draft at a time), so the event loop
stays free for HTTP and NATS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sled_shared.metrics import DrafterMetrics
from sled_shared.protocol import SessionOpen, SessionOpened, VerifyRequest

from sled_drafter.adaptive_k import AdaptiveK, DeviceCosts
from sled_drafter.admission import Admission
from sled_drafter.backends import Draft, DraftBackend, DraftSession
from sled_drafter.errors import UpstreamError
from sled_drafter.generation_types import DrafterConfig, GenerationRequest, GenerationStats
from sled_drafter.verifier_link import Lost, VerifierLink

log = logging.getLogger(__name__)

# K before the verifier has suggested one (its first answer carries a suggestion).
INITIAL_K = 4
# Failovers one generation may make before it gives up.
MAX_FAILOVERS = 3


class SessionRunner:
    """Everything the device's generations share: backend, NATS link, limits, costs."""

    def __init__(
        self,
        config: DrafterConfig,
        backend: DraftBackend,
        link: VerifierLink,
        admission: Admission,
        metrics: DrafterMetrics,
    ) -> None:
        self.config = config
        self.backend = backend
        self.link = link
        self.admission = admission
        self.metrics = metrics
        self.costs = DeviceCosts.new()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft")
        self._closing: set[asyncio.Task] = set()
        # Drafts past the draft model's own window are not made (the verifier decodes alone).
        self.draft_limit: int | None = getattr(backend, "max_length", None)

    def generation(self, req: GenerationRequest, started: float | None = None) -> Generation:
        """``started``: the request's arrival (perf_counter), where TTFT is measured from."""
        return Generation(self, req, started)

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def submit(self, fn) -> None:
        """Run ``fn`` in the draft thread without waiting for it."""
        self._pool.submit(fn).add_done_callback(_log_failure)

    def close_later(self, verifier_id: str, session_id: str) -> None:
        """Close a verifier session in the background, surviving the caller's cancellation."""
        task = asyncio.create_task(self.link.close(verifier_id, session_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def shutdown(self) -> None:
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5.0)
        self._pool.shutdown(wait=True)


@dataclass(slots=True)
class _Verifier:
    verifier_id: str
    session_id: str
    round: int = 0  # last round answered on this session


class Generation:
    """One completion: ``async with`` opens it (admission and the first token, so
    errors surface before any output), iterating yields lists of new token ids,
    and leaving closes the verifier and draft sessions whatever happened."""

    def __init__(
        self, runner: SessionRunner, req: GenerationRequest, started: float | None = None
    ) -> None:
        self.runner = runner
        self.req = req
        self.stats = GenerationStats(started=time.perf_counter() if started is None else started)
        self.history: list[int] = list(req.prompt_ids)
        self.finish_reason: str | None = None
        self.k = AdaptiveK(
            runner.config.max_k,
            runner.costs,
            min(INITIAL_K, runner.config.max_k),
            reproducible=req.seeded and not req.params.greedy,
        )
        self._verifier: _Verifier | None = None
        self._draft: DraftSession | None = None
        self._admitted = False
        self._first: list[int] = []

    @property
    def generated(self) -> int:
        return len(self.history) - len(self.req.prompt_ids)

    async def __aenter__(self) -> Generation:
        await self.runner.admission.acquire()
        self._admitted = True
        self.runner.metrics.active_sessions.inc()
        try:
            opened = await self.runner.link.open(self._open_msg(resume=False))
            self._attach(opened)
            self._draft = await self.runner.in_thread(self.runner.backend.open_session)
        except BaseException:
            self._release()
            raise
        self._commit([opened.first_token])
        self._first = [opened.first_token]
        if opened.finished:
            self.finish_reason = opened.reason
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def __aiter__(self) -> AsyncIterator[list[int]]:
        return self._rounds()

    async def _rounds(self) -> AsyncIterator[list[int]]:
        if self._first:
            yield self._first
            self._first = []
        while self.finish_reason is None:
            new = await self._round()
            if new:  # a round lost to a failover commits nothing
                yield new

    async def _round(self) -> list[int]:
        cfg = self.runner.config
        room = self.req.max_tokens - self.generated - 1
        if self.runner.draft_limit is not None:
            room = min(room, self.runner.draft_limit - len(self.history) + 1)
        k = self.k.next_k(max(room, 0))
        draft, draft_s = await self.runner.in_thread(self._propose, list(self.history), k)
        assert self._verifier is not None
        v = self._verifier
        req = VerifyRequest(
            session_id=v.session_id,
            round=v.round + 1,
            committed_len=len(self.history),
            draft_ids=draft.ids,
            draft_dists=tuple(draft.dists) if draft.dists is not None else None,
        )
        sent = time.perf_counter()
        try:
            resp = await self.runner.link.verify(v.verifier_id, req)
        except Lost as exc:
            await self._failover(str(exc))
            return []
        rtt = time.perf_counter() - sent
        v.round = resp.round
        drafted = len(draft)
        accepted = min(resp.accepted, drafted)
        self.k.observe(drafted, accepted, resp.suggested_k)
        # The first round of a session also feeds the whole prompt to the draft model.
        if drafted and self.stats.rounds > 0:
            self.runner.costs.draft_per_token_s.add(draft_s / drafted)
        self.runner.costs.round_trip_s.add(rtt)
        self.stats.rounds += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.draft_s += draft_s
        self.runner.metrics.record_round(drafted, accepted, rtt, draft_s)
        new = [*draft.ids[:accepted].tolist(), resp.next_token]
        self._commit(new)
        if resp.finished:
            self.finish_reason = resp.reason
        elif self.generated >= self.req.max_tokens or len(self.history) >= cfg.context_len:
            # The verifier enforces the same limits; finishing here only guards against one
            # that does not, without losing what it committed.
            log.warning("verifier %s did not finish at the length limit", v.verifier_id)
            self.finish_reason = "length"
        return new

    def _propose(self, history: list[int], k: int) -> tuple[Draft, float]:
        assert self._draft is not None
        t0 = time.perf_counter()
        draft = self._draft.propose(history, k, self.req.params, self.req.stream)
        return draft, time.perf_counter() - t0

    def _commit(self, tokens: list[int]) -> None:
        now = time.perf_counter()
        if self.stats.first_token_at is None:
            self.stats.first_token_at = now
            self.runner.metrics.ttft.observe(self.stats.ttft_s)
        self.stats.last_token_at = now
        self.history.extend(tokens)
        self.stats.generated = self.generated

    def _open_msg(self, resume: bool) -> SessionOpen:
        cfg = self.runner.config
        return SessionOpen(
            prompt_ids=np.asarray(self.history if resume else self.req.prompt_ids, dtype=np.int32),
            max_new_tokens=self.req.max_tokens - (self.generated if resume else 0),
            draft_kind=cfg.draft_model,
            device_name=cfg.device_name,
            params=self.req.params,
            stream=self.req.stream,
            resume=resume,
        )

    def _attach(self, opened: SessionOpened) -> None:
        self._verifier = _Verifier(opened.verifier_id, opened.session_id)
        self.stats.verifier_id = opened.verifier_id

    async def _failover(self, why: str) -> None:
        assert self._verifier is not None
        old = self._verifier
        if self.stats.failovers >= MAX_FAILOVERS:
            raise UpstreamError(f"gave up after {MAX_FAILOVERS} failovers; last: {why}")
        self.stats.failovers += 1
        self.runner.metrics.failovers.inc()
        log.warning(
            "session %s on %s lost (%s); resuming elsewhere", old.session_id, old.verifier_id, why
        )
        # If the old verifier is only slow, this frees its copy of the session.
        self.runner.close_later(old.verifier_id, old.session_id)
        self._verifier = None
        opened = await self.runner.link.open(self._open_msg(resume=True))
        self._attach(opened)
        if opened.first_token != self.history[-1]:
            raise UpstreamError(
                f"{opened.verifier_id} resumed at token {opened.first_token}, "
                f"not the last committed {self.history[-1]}"
            )
        if opened.finished:
            self.finish_reason = opened.reason

    def _release(self) -> None:
        if self._verifier is not None:
            self.runner.close_later(self._verifier.verifier_id, self._verifier.session_id)
            self._verifier = None
        if self._draft is not None:
            # Queued behind any propose still running for this session in the draft thread.
            self.runner.submit(self._draft.close)
            self._draft = None
        if self._admitted:
            self._admitted = False
            self.runner.metrics.active_sessions.dec()
            if self.stats.generated > 1:
                self.runner.metrics.tpot.observe(self.stats.tpot_s)
            self.runner.admission.release()


def _log_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("draft thread task failed: %r", future.exception())
