"""In-process KV-offload workers on a real nats-server, and an fp64 attention reference."""

from __future__ import annotations

import asyncio
import contextlib
import math

import numpy as np
from prometheus_client import CollectorRegistry
from sled_kvoffload.service import KVOffloadService
from sled_kvoffload.worker import KVWorker
from sled_shared import bus
from sled_shared.kv_protocol import KVGeometry
from sled_shared.metrics import KVOffloadMetrics
from sled_shared.settings import CommonSettings

SMOL = KVGeometry(num_layers=2, q_heads=9, kv_heads=3, head_dim=64)  # SmolLM2-135M heads


@contextlib.asynccontextmanager
async def client(url: str):
    nc = await bus.connect(CommonSettings(nats_url=url), name="test-client", connect_timeout_s=10)
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def worker(url: str, worker_id: str = "w1", blocks: int = 512, **kw):
    """A worker service in this process; yields it, drains it on exit."""
    kw.setdefault("calibrate_geometry", False)
    service = KVOffloadService(
        KVWorker(worker_id, blocks, threads=2), KVOffloadMetrics(CollectorRegistry()), **kw
    )
    nc = await bus.connect(CommonSettings(nats_url=url), name=worker_id, connect_timeout_s=10)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(service.serve(nc, stop=stop, on_started=started.set_result))
    try:
        await asyncio.wait_for(started, 30)
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def reference(q: np.ndarray, k_all: np.ndarray, v_all: np.ndarray) -> np.ndarray:
    """fp64 causal GQA attention of the last ``n`` tokens: new token j sees
    ``k_all[: total - n + j + 1]``. q [n, hq, d], k_all/v_all [total, hkv, d]."""
    n, hq, d = q.shape
    total, hkv, _ = k_all.shape
    group = hq // hkv
    out = np.zeros((n, hq, d))
    for j in range(n):
        visible = total - n + j + 1
        for h in range(hq):
            kh = k_all[:visible, h // group].astype(np.float64)
            vh = v_all[:visible, h // group].astype(np.float64)
            s = kh @ q[j, h].astype(np.float64) / math.sqrt(d)
            p = np.exp(s - s.max())
            out[j, h] = (p / p.sum()) @ vh
    return out


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)
