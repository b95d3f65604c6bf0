"""Turning APEX offloading on in the verifier service (SLED_KV_WORKERS is set).

``SLED_KV_WORKERS`` lists worker ids, or is ``auto``: the workers that answer
micro discovery (``$SRV.PING.sled-kvoffload``) at start-up, waited for up to
``DISCOVERY_PATIENCE_S`` (they may start after the verifier).

The host tier is built on the engine thread (it blocks on NATS replies that
the event loop delivers), then every batch goes through an ``ApexLoop``
that asks the scheduler for a plan (``SLED_PLAN_DEADLINE_MS``), falling
back to the local plan under ``SLED_SCHED_POLICY``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import Executor

from nats import errors as nats_errors
from nats.aio.client import Client
from sled_shared.apex.plan import Policy
from sled_shared.kv_protocol import KVGeometry
from sled_shared.sched_client import SchedClient
from sled_shared.settings import VerifierSettings

from .apex_loop import ApexLoop
from .engine import VerifierEngine
from .host_tier import HostTier

log = logging.getLogger(__name__)

AUTO = "auto"
KVOFFLOAD_SERVICE = "sled-kvoffload"  # its nats.micro name (not imported: another service)
DISCOVERY_WINDOW_S = 0.5  # how long PING answers are collected
DISCOVERY_PATIENCE_S = 30.0


def worker_ids(settings: VerifierSettings) -> list[str]:
    """The configured ids; [AUTO] for discovery; [] when offloading is off."""
    return [w.strip() for w in settings.kv_workers.split(",") if w.strip()]


async def discover_workers(nc: Client, patience_s: float = DISCOVERY_PATIENCE_S) -> list[str]:
    """Worker ids of the kvoffload services answering $SRV.PING, once any answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while True:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        found: set[str] = set()
        try:
            await nc.publish(f"$SRV.PING.{KVOFFLOAD_SERVICE}", b"", reply=inbox)
            end = loop.time() + DISCOVERY_WINDOW_S
            while (left := end - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats_errors.TimeoutError:
                    break
                meta = json.loads(msg.data).get("metadata") or {}
                if meta.get("worker_id"):
                    found.add(meta["worker_id"])
        finally:
            await sub.unsubscribe()
        if found or loop.time() >= deadline:
            return sorted(found)
        await asyncio.sleep(1.0)


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
    if workers == [AUTO]:
        workers = await discover_workers(nc)
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
