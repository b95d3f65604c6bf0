"""The batcher on a real engine: token caps split batches, and a round that waits
too long is answered at_capacity yet stays queued for its retry."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sled_shared.protocol import ServiceError, VerifyRequest
from sled_shared.speculative import SamplingParams
from sled_verifier.batcher import Batcher, BatchLimits, BatchReport
from sled_verifier.engine import VerifierEngine

from .conftest import tiny_config


@pytest.fixture
def engine(tiny_model_dirs):
    return VerifierEngine(tiny_config(tiny_model_dirs["gqa"]))


def open_rounds(engine, n: int, k: int) -> list[VerifyRequest]:
    out = []
    for i in range(n):
        o = engine.open_session([10 + i, 20, 30], SamplingParams(), 20, stream=0)
        out.append(VerifyRequest(o.session_id, 1, 4, np.full(k, 5 + i, np.int32)))
    return out


async def wait_for(predicate, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_token_cap_splits_waiting_rounds_into_batches(engine):
    reports: list[BatchReport] = []
    depths: list[int] = []  # queue depth after each change
    with ThreadPoolExecutor(1) as pool:
        limits = BatchLimits(window_s=0.0, max_tokens=10, max_sessions=8, max_queue=8)
        batcher = Batcher(
            limits, engine.verify, pool, on_batch=reports.append, on_queue=depths.append
        )
        loop_task = asyncio.create_task(batcher.run())
        hold = threading.Event()
        pool.submit(hold.wait, 30)
        try:
            a, b, c, d = open_rounds(engine, 4, k=4)  # 5 tokens each
            first = asyncio.create_task(batcher.submit(a, "dev-a"))
            await wait_for(lambda: depths == [1, 0])  # queued, then taken into a batch
            rest = [asyncio.create_task(batcher.submit(r, f"dev-{r.round}")) for r in (b, c, d)]
            await wait_for(lambda: batcher.queue_depth == 3)
        finally:
            hold.set()
        answers = await asyncio.gather(first, *rest)
        loop_task.cancel()
    assert [r.batch_size for r in answers] == [1, 2, 2, 1]
    assert [(r.size, r.tokens) for r in reports] == [(1, 5), (2, 10), (1, 5)]
    assert all(r.next_token >= 0 for r in answers)


async def test_late_round_is_at_capacity_and_its_retry_gets_the_answer(engine):
    with ThreadPoolExecutor(1) as pool:
        limits = BatchLimits(window_s=0.0, max_tokens=64, max_sessions=8, max_queue=8)
        batcher = Batcher(limits, engine.verify, pool, answer_timeout_s=0.3)
        loop_task = asyncio.create_task(batcher.run())
        hold = threading.Event()
        pool.submit(hold.wait, 30)
        try:
            (req,) = open_rounds(engine, 1, k=2)
            with pytest.raises(ServiceError) as err:
                await batcher.submit(req, "dev")
            assert err.value.code == "at_capacity" and err.value.retry_after_s > 0
        finally:
            hold.set()
        retry = await batcher.submit(req, "dev")  # shares the queued original, or its answer
        again = await batcher.submit(req, "dev")
        loop_task.cancel()
    assert retry.round == 1 and retry.batch_size in (0, 1)
    assert (again.accepted, again.next_token) == (retry.accepted, retry.next_token)
    assert engine.stats().rounds_total == 1  # ran once, answered three times
