"""``python -m sled_kvoffload`` / ``sled-kvoffload``: run one KV-offload worker.

Settings come from the SLED_* environment (``KVOffloadSettings``); flags
override them. /healthz answers from the start, /readyz once NATS is
connected and the endpoints are subscribed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import sys
from collections.abc import Sequence

from nats.aio.client import Client
from prometheus_client import REGISTRY, CollectorRegistry
from sled_shared import bus
from sled_shared.health import HealthServer
from sled_shared.logging_setup import setup_from_settings
from sled_shared.metrics import KVOffloadMetrics
from sled_shared.settings import KVOffloadSettings

from sled_kvoffload.service import SERVICE_NAME, KVOffloadService
from sled_kvoffload.worker import KVWorker

log = logging.getLogger("sled_kvoffload")
_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # one NATS subject token


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sled-kvoffload", description=__doc__.splitlines()[0])
    p.add_argument("--worker-id", help="subject token of this worker (default: generated)")
    p.add_argument("--host-kv-blocks", type=int, help="host KV blocks of 16 tokens")
    p.add_argument("--threads", type=int, help="CPU attention threads (0: one per core)")
    p.add_argument("--profile-interval-s", type=float, default=5.0, help="profile report period")
    p.add_argument(
        "--session-ttl-s", type=float, default=900.0, help="evict sessions idle this long"
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip the start-up CPU attention sweep when a model geometry is first seen",
    )
    p.add_argument("--nats-url")
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=("json", "text"))
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> KVOffloadSettings:
    own = ("profile_interval_s", "no_calibrate", "session_ttl_s")
    settings = KVOffloadSettings.from_env(**{k: v for k, v in vars(args).items() if k not in own})
    if settings.worker_id and not _ID.match(settings.worker_id):
        raise ValueError(f"worker id {settings.worker_id!r}: use letters, digits, '-' and '_'")
    if settings.host_kv_blocks <= 0 or settings.threads < 0:
        raise ValueError("need --host-kv-blocks > 0 and --threads >= 0")
    return settings


async def serve(
    settings: KVOffloadSettings,
    *,
    profile_interval_s: float = 5.0,
    calibrate: bool = True,
    session_ttl_s: float = 900.0,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    worker_id = settings.worker_id or f"w-{secrets.token_hex(4)}"
    worker = KVWorker(worker_id, settings.host_kv_blocks, threads=settings.threads)
    service = KVOffloadService(
        worker,
        KVOffloadMetrics(registry),
        profile_interval_s=profile_interval_s,
        calibrate_geometry=calibrate,
        session_ttl_s=session_ttl_s,
    )
    nc: Client | None = None
    started = False

    def on_started(svc: bus.BusService) -> None:
        nonlocal started
        started = True
        log.info("kvoffload worker %s serving (service id %s)", worker_id, svc.id)

    health = HealthServer.from_settings(
        settings,
        ready=lambda: {"nats": nc is not None and nc.is_connected, "endpoints": started},
        registry=registry,
    )
    await health.start()
    try:
        nc = await bus.connect(settings, name=f"{SERVICE_NAME}-{worker_id}")
        await service.serve(nc, stop=stop, on_started=on_started)
    finally:
        await health.stop()
    log.info("kvoffload worker %s stopped", worker_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        setup_from_settings(settings, "kvoffload")
    except ValueError as exc:
        print(f"sled-kvoffload: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(
            serve(
                settings,
                profile_interval_s=args.profile_interval_s,
                calibrate=not args.no_calibrate,
                session_ttl_s=args.session_ttl_s,
            )
        )
    except bus.BusError as exc:
        log.error("kvoffload failed to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
