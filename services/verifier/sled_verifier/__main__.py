"""``python -m sled_verifier`` / ``sled-verifier``: run the verifier service.

Settings come from the SLED_* environment (``VerifierSettings``); flags
override them. The health server answers /healthz from the start and /readyz
once the target model is loaded and NATS is connected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from nats.aio.client import Client
from sled_shared import bus
from sled_shared.health import HealthServer
from sled_shared.logging_setup import setup_from_settings
from sled_shared.models.registry import ModelRegistryError, get_model
from sled_shared.settings import VerifierSettings

from .config import EngineConfig
from .engine import VerifierEngine
from .service import SERVICE_NAME, VerifierService

log = logging.getLogger("sled_verifier")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sled-verifier",
        description="SLED verifier: batched, lossless verification of edge drafts over NATS.",
    )
    p.add_argument("--verifier-id", help="subject token for this verifier (default: generated)")
    p.add_argument("--target-model", help="registry name of the target model")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu-kv-blocks", type=int, help="KV blocks on the device (0: from memory)")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--max-sessions", type=int, help="live sessions, and rounds per batch")
    p.add_argument("--max-batch-tokens", type=int, help="tokens per batched forward")
    p.add_argument("--batch-window-ms", type=float, help="how long a round waits for company")
    p.add_argument("--session-ttl-s", type=float, help="idle time before a session is evicted")
    p.add_argument("--max-queue", type=int, default=0, help="waiting rounds (0: 2 x sessions)")
    p.add_argument("--sched-policy", choices=("gpu-only", "neo", "apex"), help="APEX policy")
    p.add_argument("--kv-workers", help="host KV tier: worker ids (comma-separated) or auto")
    p.add_argument("--plan-deadline-ms", type=float, help="wait for the scheduler's plan")
    p.add_argument("--nats-url")
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--log-level")
    p.add_argument("--log-format", choices=("json", "text"))
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> VerifierSettings:
    flags = {k: v for k, v in vars(args).items() if k != "max_queue"}
    return VerifierSettings.from_env(**flags)


def load_engine(settings: VerifierSettings) -> VerifierEngine:
    cache = Path(settings.model_cache).expanduser() if settings.model_cache else None
    entry = get_model(settings.target_model, cache)
    if entry.role != "target" or entry.kind != "hf" or entry.path is None:
        raise ModelRegistryError(
            f"model {entry.name!r} is a {entry.kind} {entry.role}, not a HF target model"
        )
    config = EngineConfig(
        model_dir=entry.path,
        device=settings.device,
        block_size=settings.block_size,
        num_blocks=settings.gpu_kv_blocks,
        max_batch_tokens=settings.max_batch_tokens,
        max_sessions=settings.max_sessions,
    )
    return VerifierEngine(config)


async def serve(settings: VerifierSettings, max_queue: int = 0) -> None:
    verifier_id = settings.verifier_id or f"v-{secrets.token_hex(4)}"
    engine: VerifierEngine | None = None
    nc: Client | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Until run_service takes the signals over: a SIGTERM while the model loads
    # ends the process cleanly instead of killing it mid-way.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health = HealthServer.from_settings(
        settings,
        ready=lambda: {"model": engine is not None, "nats": nc is not None and nc.is_connected},
    )
    await health.start()
    try:
        nc = await bus.connect(settings, name=f"{SERVICE_NAME}-{verifier_id}")
        log.info("loading target model %s", settings.target_model)
        try:
            engine = await asyncio.to_thread(load_engine, settings)
        except BaseException:
            await nc.close()
            raise
        log.info(
            "target loaded",
            extra={
                "verifier_id": verifier_id,
                "device": engine.config.device,
                "kv_blocks": engine.blocks.num_blocks,
            },
        )
        if stop.is_set():
            await nc.close()
            return
        service = VerifierService(
            engine, settings, verifier_id, max_queue=max_queue, target_model=settings.target_model
        )
        await service.serve(
            nc,
            stop=stop,
            on_started=lambda svc: log.info(
                "verifier %s serving (service id %s)", verifier_id, svc.id
            ),
        )
    finally:
        await health.stop()
    log.info("verifier %s stopped", verifier_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        setup_from_settings(settings, "verifier")
    except ValueError as exc:
        print(f"sled-verifier: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, args.max_queue))
    except (bus.BusError, ModelRegistryError, ValueError) as exc:
        log.error("verifier failed to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
