"""Turning APEX offloading on in the verifier service (SLED_KV_WORKERS is set).

The host tier is built on the engine thread (it blocks on NATS replies that
the event loop delivers), then every batch goes through an ``ApexLoop``
that asks the scheduler for a plan (``SLED_PLAN_DEADLINE_MS``), falling
back to the local plan under ``SLED_SCHED_POLICY``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from nats.aio.client import Client
from sled_shared.apex.plan import Policy
from sled_shared.kv_protocol import KVGeometry
from sled_shared.sched_client import SchedClient
from sled_shared.settings import VerifierSettings

from .apex_loop import ApexLoop
from .engine import VerifierEngine
from .host_tier import HostTier

log = logging.getLogger(__name__)


def worker_ids(settings: VerifierSettings) -> list[str]:
    return [w.strip() for w in settings.kv_workers.split(",") if w.strip()]


async def start_apex(
    engine: VerifierEngine,
    settings: VerifierSettings,
    verifier_id: str,
    nc: Client,
    engine_thread: Executor,
) -> ApexLoop | None:
    """The APEX loop over the configured workers; None (and a warning) if none answers."""
    policy = Policy(settings.sched_policy)
    loop = asyncio.get_running_loop()
    spec = engine.spec
    geometry = KVGeometry(spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    workers = worker_ids(settings)
    try:
        host = await loop.run_in_executor(
            engine_thread,
            HostTier.connect,
            nc,
            loop,
            geometry,
            workers,
            engine.blocks.block_size,
        )
    except ValueError:
        log.warning("no kvoffload worker of %s answered: offloading is off", workers)
        return None
    # gpu-only parks sessions on the host tier only to swap them back; it opens none there.
    await loop.run_in_executor(engine_thread, engine.kv.attach, host, policy is not Policy.GPU_ONLY)
    sched = SchedClient(nc, verifier_id, policy, settings.plan_deadline_ms / 1000.0)
    log.info(
        "APEX offloading on",
        extra={"policy": policy.value, "workers": sorted(host.capacity)},
    )
    return ApexLoop(engine, policy, sched, loop)
