"""Run the verifier service in-process on a real nats-server, and talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nats.aio.client import Client
from prometheus_client import CollectorRegistry
from sled_shared import bus, subjects
from sled_shared.metrics import VerifierMetrics
from sled_shared.protocol import (
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
)
from sled_shared.settings import CommonSettings, VerifierSettings
from sled_shared.speculative import SamplingParams
from sled_verifier.engine import VerifierEngine
from sled_verifier.service import VerifierService

from .conftest import tiny_config

TIMEOUT = 30.0  # per request: the machine is shared and often busy


@dataclass(slots=True)
class Running:
    service: VerifierService
    registry: CollectorRegistry

    @property
    def id(self) -> str:
        return self.service.verifier_id

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value


@contextlib.asynccontextmanager
async def running_service(
    nats_url: str,
    model_dir: Path,
    *,
    verifier_id: str = "v-test",
    max_queue: int = 0,
    max_sessions: int = 8,
    batch_window_ms: float = 2.0,
    session_ttl_s: float = 300.0,
    **engine_kw: Any,
) -> AsyncIterator[Running]:
    engine = VerifierEngine(tiny_config(model_dir, max_sessions=max_sessions, **engine_kw))
    settings = VerifierSettings(
        nats_url=nats_url,
        verifier_id=verifier_id,
        max_sessions=max_sessions,
        batch_window_ms=batch_window_ms,
        session_ttl_s=session_ttl_s,
    )
    registry = CollectorRegistry()
    svc = VerifierService(
        engine, settings, verifier_id, metrics=VerifierMetrics(registry), max_queue=max_queue
    )
    nc = await bus.connect(settings, name=verifier_id, connect_timeout_s=10)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(svc.serve(nc, stop=stop, on_started=started.set_result))
    try:
        await asyncio.wait_for(started, TIMEOUT)
        yield Running(svc, registry)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)


@contextlib.asynccontextmanager
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await bus.connect(CommonSettings(nats_url=nats_url), name="test", connect_timeout_s=10)
    try:
        yield nc
    finally:
        await nc.close()


async def open_session(
    nc: Client,
    prompt: list[int],
    *,
    device: str = "dev",
    max_new_tokens: int = 30,
    params: SamplingParams | None = None,
    stream: int = 0,
    resume: bool = False,
) -> SessionOpened:
    msg = SessionOpen(
        np.array(prompt, np.int32),
        max_new_tokens,
        "test-draft",
        device,
        params or SamplingParams(),
        stream,
        resume=resume,
    )
    return await bus.request(nc, subjects.SESSION_OPEN, msg, TIMEOUT, expect=SessionOpened)


async def verify(
    nc: Client,
    verifier_id: str,
    session_id: str,
    rnd: int,
    committed_len: int,
    drafts,
    dists=None,
) -> VerifyResponse:
    msg = VerifyRequest(
        session_id,
        rnd,
        committed_len,
        np.asarray(drafts, np.int32),
        None if dists is None else tuple(dists),
    )
    return await bus.request(nc, subjects.verify(verifier_id), msg, TIMEOUT, expect=VerifyResponse)


async def close(nc: Client, verifier_id: str, session_id: str) -> SessionClosed:
    return await bus.request(
        nc, subjects.session_close(verifier_id), SessionClose(session_id), TIMEOUT,
        expect=SessionClosed,
    )  # fmt: skip


async def srv(nc: Client, subject: str) -> dict[str, Any]:
    return json.loads((await nc.request(subject, b"", timeout=TIMEOUT)).data)


async def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
