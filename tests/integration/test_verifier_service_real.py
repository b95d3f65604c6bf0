"""The verifier service with the real SmolLM2 target over a real nats-server:
three devices decode at once, their rounds share batches, and every device's
greedy text equals transformers' own greedy decoding."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from sled_shared import bus, subjects
from sled_shared.metrics import VerifierMetrics
from sled_shared.models.registry import DEFAULT_TARGET, get_model
from sled_shared.protocol import SessionOpen, SessionOpened, VerifyRequest, VerifyResponse
from sled_shared.settings import CommonSettings, VerifierSettings
from sled_verifier.config import EngineConfig
from sled_verifier.engine import VerifierEngine
from sled_verifier.service import VerifierService
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration

MAX_NEW = 24
TIMEOUT = 120.0
PROMPTS = [
    "What is the capital of France?",
    "List five fruits that are red.",
    "Write a haiku about the sea at night.",
]


@pytest.fixture(scope="module")
def target_dir():
    return get_model(DEFAULT_TARGET).path


@pytest.fixture(scope="module")
def cases(target_dir):
    """(prompt ids, transformers' greedy continuation) per device."""
    tok = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    out = []
    for text in PROMPTS:
        chat = [{"role": "user", "content": text}]
        ids = list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0
            )
        out.append((ids, gen[0, len(ids) :].tolist()))
    return out


async def run_device(nc, name: str, prompt: list[int], ref: list[int]) -> tuple[list, list]:
    msg = SessionOpen(np.array(prompt, np.int32), MAX_NEW, "test-draft", name)
    opened = await bus.request(nc, subjects.SESSION_OPEN, msg, TIMEOUT, expect=SessionOpened)
    out, sizes = [opened.first_token], []
    for rnd in range(1, 100):
        # The reference continuation, every third draft position wrong.
        drafts = [t if (len(out) + i) % 3 != 2 else (t + 1) for i, t in enumerate(ref[len(out) :])]
        req = VerifyRequest(opened.session_id, rnd, len(prompt) + len(out), np.array(drafts[:4]))
        subject = subjects.verify(opened.verifier_id)
        resp = await bus.request(nc, subject, req, TIMEOUT, expect=VerifyResponse)
        out += [*drafts[: resp.accepted], resp.next_token]
        sizes.append(resp.batch_size)
        if resp.finished:
            return out, sizes
    raise AssertionError(f"{name} did not finish")


async def test_devices_share_batches_and_decode_losslessly(nats_url, target_dir, cases):
    engine = VerifierEngine(EngineConfig(model_dir=target_dir, device="cpu", num_blocks=256))
    settings = VerifierSettings(nats_url=nats_url, verifier_id="v-real", batch_window_ms=50)
    registry = CollectorRegistry()
    svc = VerifierService(engine, settings, "v-real", metrics=VerifierMetrics(registry))
    service_nc = await bus.connect(settings, name="v-real", connect_timeout_s=10)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(svc.serve(service_nc, stop=stop, on_started=started.set_result))
    nc = await bus.connect(CommonSettings(nats_url=nats_url), name="devices")
    try:
        await asyncio.wait_for(started, TIMEOUT)
        results = await asyncio.gather(
            *(run_device(nc, f"device-{i}", p, ref) for i, (p, ref) in enumerate(cases))
        )
    finally:
        await nc.close()
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
    for (out, _), (_, ref) in zip(results, cases, strict=True):
        assert out == ref
    assert max(size for _, sizes in results for size in sizes) > 1
    devices_max = svc.stats_data()["max_batch_devices"]
    assert devices_max > 1
    assert registry.get_sample_value("sled_verifier_batch_devices_count") >= 1
