"""APEX on the verifier engine, wired as the service wires it, minus the batcher.

The caller's thread plays the engine thread; NATS, the kvoffload workers
(real ``KVOffloadService``s) and the scheduler live on an event loop in a
background thread. ``drive`` plays the drafters: every live session sends a
round per iteration, deferred rounds are sent again, sessions refused at
open are opened again later. Tests and the APEX policy benchmark use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from sled_kvoffload.service import KVOffloadService
from sled_kvoffload.worker import KVWorker
from sled_scheduler.service import SchedulerService
from sled_shared import bus
from sled_shared.kv_protocol import KVGeometry
from sled_shared.metrics import KVOffloadMetrics, SchedulerMetrics
from sled_shared.settings import CommonSettings, SchedulerSettings
from sled_shared.speculative import SamplingParams
from sled_verifier.engine import CapacityError, RoundResult, VerifierEngine, VerifyRound
from sled_verifier.host_tier import HostTier

TIMEOUT = 120.0  # the machine is shared and often busy
GREEDY = SamplingParams()


class LoopThread:
    """An event loop in a daemon thread: what the service's loop is to its engine thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(slots=True)
class Stack:
    lt: LoopThread
    url: str
    nc: Any = None
    stops: list[tuple[asyncio.Event, asyncio.Task]] = field(default_factory=list)
    workers: dict[str, KVOffloadService] = field(default_factory=dict)
    sched: SchedulerService | None = None
    sched_registry: CollectorRegistry | None = None

    def start_worker(
        self, worker_id: str, blocks: int = 512, block_size: int = 4, threads: int = 1
    ) -> KVOffloadService:
        svc = KVOffloadService(
            KVWorker(worker_id, blocks, block_size=block_size, threads=threads),
            KVOffloadMetrics(CollectorRegistry()),
            profile_interval_s=0.5,
            calibrate_geometry=False,
        )
        self.workers[worker_id] = svc
        self._serve(svc.serve, worker_id)
        return svc

    def start_scheduler(self, policy: str) -> SchedulerService:
        self.sched_registry = CollectorRegistry()
        settings = SchedulerSettings(nats_url=self.url, sched_policy=policy)
        self.sched = SchedulerService(settings, SchedulerMetrics(self.sched_registry))
        self._serve(self.sched.serve, "scheduler")
        return self.sched

    def host_tier(self, engine: VerifierEngine, worker_ids: list[str]) -> HostTier:
        spec = engine.spec
        geometry = KVGeometry(spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim)
        return HostTier.connect(
            self.nc, self.lt.loop, geometry, worker_ids, engine.blocks.block_size, timeout_s=10
        )

    def _serve(self, serve: Callable[..., Coroutine[Any, Any, None]], name: str) -> None:
        async def start() -> tuple[asyncio.Event, asyncio.Task]:
            nc = await bus.connect(CommonSettings(nats_url=self.url), name=name)
            stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
            task = asyncio.create_task(serve(nc, stop=stop, on_started=started.set_result))
            await asyncio.wait_for(started, TIMEOUT)
            return stop, task

        self.stops.append(self.lt.run(start()))


@contextlib.contextmanager
def stack(url: str) -> Iterator[Stack]:
    lt = LoopThread()
    st = Stack(lt, url)
    try:
        st.nc = lt.run(bus.connect(CommonSettings(nats_url=url), name="verifier-test"))
        yield st
    finally:

        async def down() -> None:
            for stop, task in st.stops:
                stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 60)
            if st.nc is not None:
                await st.nc.close()

        lt.run(down())
        lt.close()


# ------------------------------------------------------------------ the drafters

Execute = Callable[[list[VerifyRound], float], list[RoundResult]]


Propose = Callable[[list[int], int], np.ndarray]  # (history, k) -> draft ids


@dataclass(slots=True)
class Run:
    outputs: dict[int, list[int]]  # prompt index -> generated tokens
    errors: dict[int, str]  # prompt index -> the error that ended it
    refused_opens: int = 0
    retried_rounds: int = 0  # at_capacity answers, sent again
    started: float = field(default_factory=time.perf_counter)
    first_at: dict[int, float] = field(default_factory=dict)  # prompt index -> first token
    done_at: dict[int, float] = field(default_factory=dict)  # prompt index -> last token


def drafts_for(
    ref: list[int] | None, done: int, k: int, rng: np.random.Generator, spoil: float = 0.5
) -> np.ndarray:
    """The reference continuation with one token spoiled in a `spoil` share of rounds:
    some rounds are accepted whole, others cut short, so the KV is rolled back on
    every tier. Without a reference: random ids (nearly all rejected)."""
    if ref is None:
        return rng.integers(3, 96, k).astype(np.int32)
    out = np.array(ref[done : done + k], np.int32)
    if out.size and rng.random() < spoil:
        j = rng.integers(out.size)
        out[j] = (out[j] + 7) % 90 + 3  # never the token it replaces
    return out


def drive(
    engine: VerifierEngine,
    execute: Execute,
    prompts: list[list[int]],
    max_new: list[int],
    *,
    reference: dict[int, list[int]] | None = None,
    propose: Propose | None = None,
    k: int = 3,
    spoil: float = 0.5,
    seed: int = 0,
    on_iteration: Callable[[int], None] | None = None,
    max_iterations: int = 2000,
) -> Run:
    """Every session to its end; drafts from `propose`, else `drafts_for(reference)`."""
    rng = np.random.default_rng(seed)
    run = Run({}, {})
    waiting = list(range(len(prompts)))  # not opened yet (or refused: opened again later)
    live: dict[int, tuple[str, list[int], int]] = {}  # index -> (session, history, round)
    for it in range(max_iterations):
        if not waiting and not live:
            return run
        if on_iteration is not None:
            on_iteration(it)
        for i in list(waiting):
            try:
                res = engine.open_session(prompts[i], GREEDY, max_new[i], stream=i)
            except CapacityError:
                run.refused_opens += 1
                continue
            waiting.remove(i)
            run.outputs[i] = [res.first_token]
            run.first_at[i] = time.perf_counter()
            if res.finished:
                run.done_at[i] = run.first_at[i]
                engine.close(res.session_id)
            else:
                live[i] = (res.session_id, [*prompts[i], res.first_token], 0)
        rounds, index = [], {}
        for i, (sid, history, rnd) in live.items():
            if propose is not None:
                drafts = propose(history, k)
            else:
                ref = reference.get(i) if reference else None
                drafts = drafts_for(ref, len(run.outputs[i]), k, rng, spoil)
            rounds.append(VerifyRound(sid, rnd + 1, len(history), drafts))
            index[sid] = i
        for r, res in zip(rounds, execute(rounds, 0.0) if rounds else [], strict=True):
            i = index[r.session_id]
            if res.error_code == "deferred":
                continue
            if res.error_code == "at_capacity":  # as a drafter does: send it again
                run.retried_rounds += 1
                continue
            if res.error is not None:
                run.errors[i] = f"{res.error_code}: {res.error}"
                del live[i]
                continue
            new = [*r.draft_ids[: res.accepted].tolist(), res.next_token]
            run.outputs[i] += new
            sid, history, _ = live[i]
            live[i] = (sid, history + new, res.round)
            if res.finished:
                run.done_at[i] = time.perf_counter()
                engine.close(sid)
                del live[i]
    raise AssertionError(f"not done after {max_iterations} iterations: {len(live)} live")


def record_open_tiers(engine: VerifierEngine) -> dict[str, str]:
    """session -> the tier it was opened on, filled in as sessions open."""
    opened: dict[str, str] = {}
    add = engine.kv.add

    def spy(session: str, tier: str = "accel") -> None:
        opened[session] = tier
        add(session, tier)

    engine.kv.add = spy  # type: ignore[method-assign]
    return opened
