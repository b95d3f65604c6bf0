"""The drafter process: draft model, NATS link, OpenAI API, health and metrics.

Start order: health server first (so /healthz answers while the model
loads), then the draft model and tokenizer, NATS, the HTTP API and last the
nats.micro registration that makes the device discoverable. Ready when the
model is loaded, NATS is connected and the device is not draining. On
SIGTERM it refuses new requests, lets running generations finish (bounded),
then drains NATS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client
from sled_shared import bus
from sled_shared.health import HealthServer
from sled_shared.logging_setup import setup_from_settings
from sled_shared.metrics import DrafterMetrics
from sled_shared.models.registry import get_model
from sled_shared.settings import DrafterSettings

from sled_drafter.admission import Admission
from sled_drafter.backends import DraftBackend, load_backend
from sled_drafter.generation_types import DrafterConfig
from sled_drafter.openai_api import OpenAIApi
from sled_drafter.openai_schema import ModelInfo
from sled_drafter.session_runner import SessionRunner
from sled_drafter.tokenizer import Tokenizer
from sled_drafter.verifier_link import VerifierLink

log = logging.getLogger(__name__)

SERVICE_NAME = "sled-drafter"
VERSION = "0.1.0"
# How long a request may wait for a free generation slot.
QUEUE_WAIT_S = 30.0
# How long running generations get to finish after SIGTERM.
DRAIN_TIMEOUT_S = 60.0


def context_length(model_dir: Path) -> int:
    """The target's context window, from its config.json."""
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    limit = raw.get("text_config", raw).get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 2:
        raise ValueError(f"{model_dir}/config.json lacks a usable max_position_embeddings")
    return limit


def advertised_host(bind_host: str) -> str:
    """An address other machines can reach the HTTP API on."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(slots=True)
class _State:
    backend: DraftBackend | None = None
    nc: Client | None = None
    runner: SessionRunner | None = None
    draining: bool = False

    def ready(self) -> dict[str, bool]:
        return {
            "model": self.backend is not None,
            "nats": self.nc is not None and self.nc.is_connected,
            "accepting": not self.draining,
        }


async def serve(settings: DrafterSettings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    device = settings.device_name or socket.gethostname()
    state = _State()
    health = HealthServer.from_settings(settings, ready=state.ready)
    await health.start()
    http: web.AppRunner | None = None
    service: bus.BusService | None = None
    try:
        cache = Path(settings.model_cache).expanduser() if settings.model_cache else None
        target = get_model(settings.target_model, cache)
        if target.role != "target" or target.path is None:
            raise ValueError(f"{settings.target_model!r} is no target model")
        tokenizer = Tokenizer.from_dir(target.path)
        entry = get_model(settings.draft_model, cache)
        state.backend = await asyncio.to_thread(load_backend, entry)
        log.info("draft model %s (%s) loaded", entry.name, entry.kind)
        state.nc = await bus.connect(settings, name=f"{SERVICE_NAME}-{device}")
        config = DrafterConfig(
            device_name=device,
            draft_model=settings.draft_model,
            max_k=settings.max_k,
            request_timeout_s=settings.request_timeout_s,
            context_len=context_length(target.path),
        )
        link = VerifierLink(state.nc, settings.request_timeout_s, settings.request_timeout_s)
        admission = Admission(settings.max_sessions, settings.max_waiting, QUEUE_WAIT_S)
        metrics = DrafterMetrics(settings.draft_model, device)
        state.runner = SessionRunner(config, state.backend, link, admission, metrics)
        models = ModelInfo((settings.target_model, settings.draft_model), config.context_len)
        api = OpenAIApi(state.runner, tokenizer, models, state.ready)
        http = web.AppRunner(api.app(), handler_cancellation=True)
        await http.setup()
        await web.TCPSite(http, settings.http_host, settings.http_port).start()
        port = http.addresses[0][1]
        url = f"http://{advertised_host(settings.http_host)}:{port}"
        log.info("OpenAI API of device %s on %s", device, url)
        service = bus.BusService(
            state.nc,
            SERVICE_NAME,
            VERSION,
            description="SLED edge drafter: local draft model and OpenAI-compatible API",
            metadata={
                "device": device,
                "draft_model": settings.draft_model,
                "target_model": settings.target_model,
                "http_url": url,
            },
        )
        await service.start()
        await _wait_for_signal(stop)
        state.draining = True
        log.info("draining: %d generations running", admission.active)
        if not await admission.drain(DRAIN_TIMEOUT_S):
            log.warning("drain timed out with %d generations running", admission.active)
    finally:
        if http is not None:
            await http.cleanup()
        if service is not None:
            await service.stop()
        elif state.nc is not None:
            await state.nc.close()
        if state.runner is not None:
            await state.runner.shutdown()
        if state.backend is not None:
            state.backend.close()
        await health.stop()


async def _wait_for_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(settings: DrafterSettings) -> int:
    setup_from_settings(settings, "drafter")
    try:
        asyncio.run(serve(settings))
    except Exception:
        log.exception("drafter stopped on an error")
        return 1
    return 0
