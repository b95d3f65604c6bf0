"""An in-process scheduler service on a real nats-server, and synthetic profiles.

The profiles are synthetic (labelled so): a 7B-like layer on a T4-class
accelerator beside a server CPU, with known ground truth, so plans can be
checked; no figure from them is a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from prometheus_client import CollectorRegistry
from sled_scheduler.loads import VerifierLoads
from sled_scheduler.model_store import ModelStore
from sled_scheduler.service import SchedulerService
from sled_shared import bus
from sled_shared.apex.plan import ACCEL, IterationState, ModelShape, SessionState, WorkerState
from sled_shared.apex.profiles import Component, Sample
from sled_shared.metrics import SchedulerMetrics
from sled_shared.settings import CommonSettings, SchedulerSettings

SHAPE = ModelShape(num_layers=32, q_heads=32, kv_heads=32, head_dim=128, act_bytes=2)


@contextlib.asynccontextmanager
async def client(url: str):
    nc = await bus.connect(CommonSettings(nats_url=url), name="test-client", connect_timeout_s=10)
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def scheduler(url: str, policy: str = "apex", *, load_ttl_s: float = 10.0, **store_kw):
    """Yields (service, its metrics registry); drains it on exit."""
    registry = CollectorRegistry()
    service = SchedulerService(
        SchedulerSettings(nats_url=url, sched_policy=policy),
        SchedulerMetrics(registry),
        store=ModelStore(**store_kw),
        loads=VerifierLoads(ttl_s=load_ttl_s),
    )
    nc = await bus.connect(CommonSettings(nats_url=url), name="scheduler", connect_timeout_s=10)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(service.serve(nc, stop=stop, on_started=started.set_result))
    try:
        await asyncio.wait_for(started, 30)
        yield service, registry
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def accel_samples(rng: np.random.Generator, n: int = 60) -> list[Sample]:
    out = []
    for _ in range(n):
        tok = int(rng.integers(1, 512))
        out.append(Sample(Component.LINEAR, 1.3e-3 + max(0, tok - 128) * 6e-6, tokens=tok))
        ctx = int(rng.integers(16, 200_000))
        out.append(Sample(Component.ACCEL_ATTN, 1e-5 + ctx * 50e-9, context=ctx))
        nbytes = int(rng.integers(1_000, 5_000_000))
        out.append(Sample(Component.TRANSFER, 2e-5 + nbytes / 10e9, nbytes=nbytes))
    return out


def cpu_samples(rng: np.random.Generator, n: int = 60, ns_per_token: float = 20.0) -> list[Sample]:
    out = []
    for _ in range(n):
        s = int(rng.integers(1, 32))
        t, c = s * int(rng.integers(1, 9)), s * int(rng.integers(16, 4096))
        secs = 2e-5 * s + c * ns_per_token * 1e-9 + t * c / s * 2e-11
        out.append(Sample(Component.CPU_ATTN, secs, tokens=t, context=c, sessions=s))
    return out


def pressured_state(n_accel: int = 8, n_host: int = 12, ctx: int = 2000) -> IterationState:
    """Accelerator full with its own sessions; more sessions parked on two workers."""
    sessions = [SessionState(f"g{i}", ACCEL, ctx, 5, arrival=i) for i in range(n_accel)]
    sessions += [
        SessionState(f"c{i}", "w1" if i % 2 else "w2", ctx, 5, waited_s=0.01 * i, arrival=100 + i)
        for i in range(n_host)
    ]
    workers = (WorkerState("w1", 200_000, 16_000), WorkerState("w2", 200_000, 16_000))
    return IterationState(tuple(sessions), SHAPE, n_accel * (ctx + 64), workers)
