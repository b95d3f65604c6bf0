"""One APEX iteration on the engine thread: state, plan, migrations, forward, profiles.

The batcher hands a batch of rounds to ``execute``. It describes the
iteration to the scheduler (every live session: tier, KV length, pending
round, wait, arrival) and asks for a plan within the deadline; without an
answer it plans locally (``local_plan``). It then applies the plan: KV moves
between tiers first, then one verification forward over the rounds the plan
runs, host-tier attention overlapping the accelerator's per layer. SEQUENTIAL
and ASYNC plans run as one batch; a PIPELINED plan's two sub-batches run
interleaved per layer (NEO's asymmetric pipelining): each layer starts
sub-batch 0 (its host-tier attention sent), then sub-batch 1, then finishes
0 and 1, so one sub-batch's CPU attention is in flight while the other's
linear layers run. Rounds the plan defers come back
with ``error_code == "deferred"`` for the batcher to queue again.

Profiles: every forward's linear time by tokens and local attention time by
context, and every remote layer's transfer time, go to the scheduler; the
measured times of the forward that ran a scheduler plan go with the next
plan request, so the scheduler can report its prediction error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from sled_shared.apex.cost_model import CostModel
from sled_shared.apex.plan import (
    ACCEL,
    RECOMPUTE,
    IterationState,
    Mode,
    ModelShape,
    Plan,
    Policy,
    SessionState,
)
from sled_shared.apex.profiles import Component, Sample
from sled_shared.sched_client import NoPlan, SchedClient

from .batcher import DEFERRED
from .block_manager import OutOfBlocksError
from .engine import VerifierEngine
from .host_tier import HostTierError
from .local_plan import bootstrap_plan, can_plan, fit_local, local_plan, merged_model
from .messages import RoundResult, VerifyRound
from .model_runner import ForwardTiming

log = logging.getLogger(__name__)

MAX_SAMPLES = 4096  # kept for the local cost model (oldest dropped)
REFIT_EVERY_S = 2.0
REPORT_EVERY_S = 1.0
MODEL_EVERY_S = 5.0  # while the scheduler's model is missing; later plans announce new ones
PLAN_SLACK_S = 1.0  # past the deadline: the thread hop and the fallback plan itself
_SENT = (Component.LINEAR, Component.ACCEL_ATTN, Component.TRANSFER)  # workers send CPU_ATTN


@dataclass(slots=True)
class LoopStats:
    iterations: int = 0
    plans: dict[str, int] = field(default_factory=dict)  # "scheduler" or why it planned locally
    migrations: dict[str, int] = field(default_factory=dict)  # "src->dst" kinds, done
    migration_failures: int = 0
    deferred: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class ApexLoop:
    def __init__(
        self,
        engine: VerifierEngine,
        policy: Policy,
        sched: SchedClient | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_wait_s: float = 1.0,
        report_every_s: float = REPORT_EVERY_S,
    ) -> None:
        if (sched is None) != (loop is None):
            raise ValueError("a scheduler client needs the event loop it runs on")
        self.engine = engine
        self.policy = policy
        self.sched = sched
        self.loop = loop
        self.max_wait_s = max_wait_s
        self.report_every_s = report_every_s
        spec, cfg = engine.spec, engine.config
        elem = engine.runner.kv_cache.data.element_size()
        self.shape = ModelShape(
            spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, elem
        )
        self.stats = LoopStats()
        self.samples: deque[Sample] = deque(maxlen=MAX_SAMPLES)
        self._outbox: deque[Sample] = deque(maxlen=MAX_SAMPLES)
        self._local: CostModel | None = None
        self._seen: dict[tuple[str, int], float] = {}  # (session, round) -> first queued
        self._timers = {"refit": 0.0, "report": 0.0, "model": 0.0}
        self._background_calls: dict[str, Future] = {}  # one report, one model fetch at a time
        self._max_batch_tokens = cfg.max_batch_tokens

    # ------------------------------------------------------------------ the loop

    def execute(self, rounds: list[VerifyRound], load: float) -> list[RoundResult]:
        """The batcher's engine call: plan, move, verify; one result per round."""
        self._absorb()  # prefills since the last iteration are profile samples too
        state = self._state(rounds)
        plan_id, plan = self._plan(state)
        self._migrate(plan)
        deferred = set(plan.deferred)
        now = [r for r in rounds if r.session_id not in deferred]
        pipelined = plan.sub_batch if plan.mode is Mode.PIPELINED else None
        done = iter(self.engine.verify(now, load, pipelined) if now else [])
        accel_s, cpu_s = self._absorb()
        if self.sched is not None:
            self.sched.record_actual(plan_id, accel_s, cpu_s)
        for r in now:
            self._seen.pop((r.session_id, r.round), None)
        self.stats.iterations += 1
        self.stats.deferred += len(rounds) - len(now)
        self._background()
        return [
            RoundResult.failed(r, "deferred by the plan", DEFERRED)
            if r.session_id in deferred
            else next(done)
            for r in rounds
        ]

    def _state(self, rounds: list[VerifyRound]) -> IterationState:
        now = time.monotonic()
        by_session = {r.session_id: r for r in rounds}
        kv, k_max = self.engine.kv, self.engine.config.max_k
        sessions = []
        for s in self.engine.live_sessions():
            r = by_session.get(s.session_id)
            pending, waited = 0, 0.0
            if r is not None and r.round != s.last_round:  # a retry costs nothing
                pending = min(int(r.draft_ids.size), k_max) + 1
                waited = now - self._seen.setdefault((r.session_id, r.round), now)
            rate = min(max(s.accept_rate, 0.0), 1.0)
            sessions.append(
                SessionState(
                    s.session_id,
                    kv.tier(s.session_id),
                    len(s.tokens) - 1,  # the KV holds every committed token but the newest
                    pending,
                    waited,
                    # The correction or bonus token, plus each draft reached and accepted.
                    1.0 + sum(rate**i for i in range(1, pending)) if pending else 0.0,
                    kv.opened.get(s.session_id, now),
                )
            )
        if len(self._seen) > 8 * max(1, len(sessions)):  # rounds that never came back
            self._seen.clear()
        host = kv.host
        return IterationState(
            sessions=tuple(sessions),
            shape=self.shape,
            accel_kv_tokens=self.engine.blocks.num_blocks * self.engine.blocks.block_size,
            workers=host.states() if host is not None else (),
            block_size=self.engine.blocks.block_size,
            max_batch_tokens=self._max_batch_tokens,
            max_wait_s=self.max_wait_s,
        )

    def _plan(self, state: IterationState) -> tuple[int | None, Plan]:
        local = merged_model(self.sched.model if self.sched else None, self._local)
        if self.sched is None or self.loop is None:
            self.stats.count(self.stats.plans, "local:no_scheduler")
            return None, local_plan(state, local, self.policy)
        # The scheduler's model first, then this one (the client's own fallback order).
        self.sched.fallback_model = local
        future = asyncio.run_coroutine_threadsafe(self.sched.plan(state), self.loop)
        try:
            out = future.result(timeout=self.sched.deadline_s + PLAN_SLACK_S)
        except (NoPlan, FutureTimeout) as exc:
            future.cancel()
            self.stats.count(self.stats.plans, f"local:{type(exc).__name__}")
            return None, bootstrap_plan(state, self.policy)
        if out.source == "scheduler" and out.reason and can_plan(local, self.policy):
            # It ran another policy for want of profiles this verifier has measured.
            self.stats.count(self.stats.plans, "local:scheduler_fallback")
            return None, local_plan(state, local, self.policy)
        self.stats.count(self.stats.plans, out.source)
        return out.plan_id, out.plan

    def _migrate(self, plan: Plan) -> None:
        # Moves off the accelerator first, so the blocks they free can take moves onto it.
        for m in sorted(plan.migrations, key=lambda m: m.dst == ACCEL):
            try:
                self.engine.migrate(m.session_id, m.dst)
            except (OutOfBlocksError, HostTierError) as exc:
                self.stats.migration_failures += 1
                log.warning("migration %s -> %s of %s failed: %s", m.src, m.dst, m.session_id, exc)
                continue
            self.stats.count(self.stats.migrations, f"{_kind(m.src)}->{_kind(m.dst)}")

    # ---------------------------------------------------------------- profiles

    def _absorb(self) -> tuple[float, float]:
        """Turn forwards since the last call into samples; their (accelerator, CPU-side) time."""
        accel_s = cpu_s = 0.0
        timings = self.engine.runner.timings
        while timings:
            t = timings.popleft()
            accel_s += t.seconds - t.wait_s
            cpu_s += t.remote_s
            self._keep(_forward_samples(t))
        host = self.engine.kv.host
        if host is not None:
            for ex in host.executors.values():
                self._keep(ex.samples)
                ex.samples.clear()
        return accel_s, cpu_s

    def _keep(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self.samples.append(s)
            if s.component in _SENT:
                self._outbox.append(s)

    def _background(self) -> None:
        now = time.monotonic()
        t = self._timers
        if now - t["refit"] >= REFIT_EVERY_S:
            t["refit"] = now
            self._local = fit_local(self.samples)
        if self.sched is None:
            return
        if now - t["report"] >= self.report_every_s and self._outbox:
            t["report"] = now
            batch = tuple(self._outbox)
            self._outbox.clear()
            self._spawn("report", lambda: self.sched.report_profile(batch))
        if self.sched.model is None and now - t["model"] >= MODEL_EVERY_S:
            t["model"] = now
            self._spawn("model", self.sched.refresh_model)

    def _spawn(self, name: str, make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Start a scheduler call in the background unless the last one is still running."""
        running = self._background_calls.get(name)
        if running is not None and not running.done():
            return
        future = asyncio.run_coroutine_threadsafe(_quietly(make()), self.loop)
        self._background_calls[name] = future


async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
    # A scheduler that is down is not this verifier's failure: its samples are dropped.
    try:
        await coro
    except Exception as exc:
        log.debug("scheduler call failed: %s", exc)


def _forward_samples(t: ForwardTiming) -> list[Sample]:
    out = []
    linear = (t.seconds - t.local_attn_s - t.wait_s) / t.layers
    if linear > 0:
        out.append(Sample(Component.LINEAR, linear, tokens=t.tokens))
    if t.local_context > 0 and t.local_attn_s > 0:
        out.append(
            Sample(
                Component.ACCEL_ATTN,
                t.local_attn_s / t.layers,
                context=max(1, t.local_context // t.layers),
            )
        )
    return out


def _kind(tier: str) -> str:
    return tier if tier in (ACCEL, RECOMPUTE) else "host"
