"""The verifier service with APEX on (SLED_KV_WORKERS): devices over NATS, a real
kvoffload worker and scheduler in this process, a KV budget of two sessions."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from prometheus_client import CollectorRegistry
from sled_bench.apex_stack import drafts_for, drive
from sled_kvoffload.service import KVOffloadService
from sled_kvoffload.worker import KVWorker
from sled_scheduler.service import SchedulerService
from sled_shared import bus
from sled_shared.metrics import KVOffloadMetrics, SchedulerMetrics, VerifierMetrics
from sled_shared.settings import CommonSettings, SchedulerSettings, VerifierSettings
from sled_verifier.engine import VerifierEngine
from sled_verifier.service import VerifierService

from .apex_harness import prompts_of
from .conftest import tiny_config
from .service_harness import TIMEOUT, client, open_session, verify

PROMPTS = prompts_of(6, seed=11)
MAX_NEW = [30, 20, 36, 24, 32, 28]


@contextlib.asynccontextmanager
async def serving(url: str, name: str, serve):
    nc = await bus.connect(CommonSettings(nats_url=url), name=name, connect_timeout_s=10)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(nc, stop=stop, on_started=started.set_result))
    try:
        await asyncio.wait_for(started, TIMEOUT)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


async def _device(nc, verifier_id: str, i: int, ref: list[int]) -> list[int]:
    """One drafter: open (again while the verifier is full), then rounds until finished."""
    for _ in range(200):
        try:
            opened = await open_session(nc, PROMPTS[i], max_new_tokens=MAX_NEW[i], stream=i)
            break
        except bus.RemoteError as exc:
            assert exc.code == "at_capacity", exc
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("never admitted")
    out, history, rnd = [opened.first_token], [*PROMPTS[i], opened.first_token], 0
    rng = np.random.default_rng(i)
    finished = opened.finished
    while not finished:
        drafts = drafts_for(ref, len(out), 3, rng)
        resp = await verify(nc, verifier_id, opened.session_id, rnd + 1, len(history), drafts)
        new = [*drafts[: resp.accepted].tolist(), resp.next_token]
        out += new
        history += new
        rnd, finished = resp.round, resp.finished
    return out


async def test_service_offloads_plans_and_stays_identical(tiny_model_dirs, nats_url):
    path = tiny_model_dirs["gqa"]
    big = VerifierEngine(tiny_config(path, num_blocks=512))
    reference = drive(big, big.verify, PROMPTS, MAX_NEW).outputs
    engine = VerifierEngine(tiny_config(path, num_blocks=16))  # 64 tokens: about two sessions
    settings = VerifierSettings(
        nats_url=nats_url, verifier_id="v-apex", max_sessions=8, kv_workers="auto",
        sched_policy="apex", plan_deadline_ms=500.0,
    )  # fmt: skip
    svc = VerifierService(engine, settings, "v-apex", metrics=VerifierMetrics(CollectorRegistry()))
    worker = KVOffloadService(
        KVWorker("w1", 512, block_size=4, threads=1),
        KVOffloadMetrics(CollectorRegistry()),
        profile_interval_s=0.5,
        calibrate_geometry=False,
    )
    scheduler = SchedulerService(
        SchedulerSettings(nats_url=nats_url, sched_policy="apex"),
        SchedulerMetrics(CollectorRegistry()),
    )
    async with (
        serving(nats_url, "w1", worker.serve),
        serving(nats_url, "sched", scheduler.serve),
        serving(nats_url, "v-apex", svc.serve),
        client(nats_url) as nc,
    ):
        assert svc.apex is not None and engine.kv.host is not None
        assert list(engine.kv.host.capacity) == ["w1"]  # found by micro discovery
        outs = await asyncio.gather(
            *(_device(nc, "v-apex", i, reference[i]) for i in range(len(PROMPTS)))
        )
        load = worker.load
    assert dict(enumerate(outs)) == reference
    stats = svc.apex.stats
    assert stats.iterations > 0 and sum(stats.plans.values()) == stats.iterations
    assert engine.kv.host.executors["w1"].forward_id > 0  # host-tier attention ran
    assert load.attend_requests > 0 and load.sessions == 0
    assert engine.blocks.num_used == 0
