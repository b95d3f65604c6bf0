"""``python -m sled_scheduler`` / ``sled-scheduler``: run the cluster's scheduler.

Settings come from the SLED_* environment (``SchedulerSettings``: the policy
SLED_SCHED_POLICY, the verifiers' plan deadline SLED_PLAN_DEADLINE_MS);
flags override them. /healthz answers from the start, /readyz once NATS is
connected and the endpoints are subscribed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from nats.aio.client import Client
from prometheus_client import REGISTRY, CollectorRegistry
from sled_shared import bus
from sled_shared.apex.plan import Policy
from sled_shared.health import HealthServer
from sled_shared.logging_setup import setup_from_settings
from sled_shared.metrics import SchedulerMetrics
from sled_shared.settings import SchedulerSettings

from sled_scheduler.loads import VerifierLoads
from sled_scheduler.model_store import ModelStore
from sled_scheduler.service import SchedulerService

log = logging.getLogger("sled_scheduler")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sled-scheduler", description=__doc__.splitlines()[0])
    p.add_argument("--sched-policy", choices=[x.value for x in Policy])
    p.add_argument("--plan-deadline-ms", type=float, help="the verifiers' wait for a plan")
    p.add_argument("--window", type=int, default=2000, help="samples kept per component")
    p.add_argument("--refit-every", type=int, default=32, help="new samples between refits")
    p.add_argument("--load-ttl-s", type=float, default=10.0, help="verifier load report lifetime")
    p.add_argument("--nats-url")
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=("json", "text"))
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> SchedulerSettings:
    own = ("window", "refit_every", "load_ttl_s")
    settings = SchedulerSettings.from_env(**{k: v for k, v in vars(args).items() if k not in own})
    known = [p.value for p in Policy]
    if settings.sched_policy not in known:
        raise ValueError(f"SLED_SCHED_POLICY={settings.sched_policy!r} is not one of {known}")
    if settings.plan_deadline_ms <= 0:
        raise ValueError(f"plan deadline must be > 0 ms, got {settings.plan_deadline_ms}")
    return settings


def build(args: argparse.Namespace, settings: SchedulerSettings, registry=REGISTRY):
    return SchedulerService(
        settings,
        SchedulerMetrics(registry),
        store=ModelStore(window=args.window, refit_every=args.refit_every),
        loads=VerifierLoads(ttl_s=args.load_ttl_s),
    )


async def serve(
    service: SchedulerService,
    settings: SchedulerSettings,
    *,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    nc: Client | None = None
    started = False

    def on_started(svc: bus.BusService) -> None:
        nonlocal started
        started = True
        log.info("scheduler serving, policy %s (service id %s)", service.policy.value, svc.id)

    health = HealthServer.from_settings(
        settings,
        ready=lambda: {"nats": nc is not None and nc.is_connected, "endpoints": started},
        registry=registry,
    )
    await health.start()
    try:
        nc = await bus.connect(settings, name="sled-scheduler")
        await service.serve(nc, stop=stop, on_started=on_started)
    finally:
        await health.stop()
    log.info("scheduler stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        setup_from_settings(settings, "scheduler")
        service = build(args, settings)
    except ValueError as exc:
        print(f"sled-scheduler: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(service, settings))
    except bus.BusError as exc:
        log.error("scheduler failed to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
