"""The whole local stack as `sled up` runs it: drafters of three kinds (int4,
int8, n-gram) answer the real `openai` client at the same time, through one
verifier over a real nats-server.

Greedy answers must be the target's own greedy tokens (transformers'
`generate(do_sample=False)` on the same weights; a float near-tie is shown
with its logit gap, never skipped), the verifier must really have batched
rounds of several devices together, seeded sampling must give the same text
again on the same device, and the `sled generate` / `sled status` commands
must work against the stack.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from functools import partial
from typing import Any

import nats
import pytest
import scrape
import torch
from clients import TIMEOUT_S, chat, concurrently
from sled_drafter.tokenizer import Tokenizer
from sled_shared.models.registry import DEFAULT_TARGET, DRAFT_INT4, DRAFT_INT8, NGRAM, get_model
from stack import SLED, LocalStack
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration

MAX_TOKENS = 40
SAMPLED_TOKENS = 32
CLI_TOKENS = 24
NEAR_TIE = 1e-4
# `sled up`'s default devices and the draft each runs.
DRAFTS = {"pi5-int4": DRAFT_INT4, "orin-int8": DRAFT_INT8, "phone-ngram": NGRAM}
PROMPTS = {
    "pi5-int4": "What is the capital of France?",
    "orin-int8": "List five fruits that are red.",
    "phone-ngram": "Write a haiku about the sea at night.",
}
SAMPLING_PROMPT = "Tell me a short story about a robot."


@pytest.fixture(scope="module")
def hf_model() -> AutoModelForCausalLM:
    path = get_model(DEFAULT_TARGET).path
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids() -> dict[str, list[int]]:
    tok = Tokenizer.from_dir(get_model(DEFAULT_TARGET).path)
    return {
        device: tok.apply_chat_template([{"role": "user", "content": text}])
        for device, text in PROMPTS.items()
    }


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids) -> dict[str, list[int]]:
    """The target's own greedy continuation of each device's prompt."""
    out = {}
    with torch.inference_mode():
        for device, ids in prompt_ids.items():
            seq = hf_model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            out[device] = seq[0, len(ids) :].tolist()
    return out


def assert_greedy(hf_model, prompt: list[int], ours: list[int], ref: list[int], what: str) -> None:
    """``ours`` is the target's greedy text (or a prefix of it, when it asked for
    fewer tokens), except at a float near-tie of the reference's top logits."""
    ref = ref[: len(ours)] if len(ours) < len(ref) else ref
    split = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)
    if split is None:
        assert ours == ref, f"{what}: {len(ours)} tokens, the target gives {len(ref)}"
        return
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt + ref[:split]])).logits[0, -1]
    gap = abs(float(logits[ref[split]] - logits[ours[split]]))
    assert gap < NEAR_TIE, (
        f"{what} diverged at token {split}: {ours[split]} vs the target's {ref[split]}, "
        f"logit gap {gap:.3g} is no float near-tie"
    )


async def _verify_stats(nats_url: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url, connect_timeout=10)
    try:
        msg = await nc.request("$SRV.STATS.sled-verifier", b"", timeout=30)
    finally:
        await nc.close()
    (verify,) = [e for e in json.loads(msg.data)["endpoints"] if e["name"] == "verify"]
    return verify["data"]


def verify_stats(stack: LocalStack) -> dict[str, Any]:
    """The verify endpoint's $SRV.STATS data (batches and the devices in them)."""
    return asyncio.run(_verify_stats(stack.nats_url))


def multi_device_batches(stack: LocalStack) -> float:
    """Batches with rounds of more than one device, from the histogram on /metrics."""
    found = scrape.families(stack.url("verifier", "metrics"))
    single = scrape.total(found, "sled_verifier_batch_devices_bucket", le="1.0")
    return scrape.total(found, "sled_verifier_batch_devices_count") - single


@dataclass(frozen=True, slots=True)
class GreedyRun:
    answers: dict[str, dict[str, Any]]
    stats_before: dict[str, Any]
    stats_after: dict[str, Any]
    multi_before: float
    multi_after: float


@pytest.fixture(scope="module")
def greedy_run(sled_stack: LocalStack) -> GreedyRun:
    """Every device answers its own prompt greedily, all at once."""
    stats_before, multi_before = verify_stats(sled_stack), multi_device_batches(sled_stack)
    devices = sled_stack.drafters
    calls = [partial(chat, sled_stack, d, PROMPTS[d], max_tokens=MAX_TOKENS) for d in devices]
    answers = concurrently(calls)
    return GreedyRun(
        dict(zip(devices, answers, strict=True)),
        stats_before,
        verify_stats(sled_stack),
        multi_before,
        multi_device_batches(sled_stack),
    )


def test_the_stack_runs_every_draft_kind(sled_stack: LocalStack) -> None:
    assert sorted(sled_stack.drafters) == sorted(DRAFTS)
    assert set(sled_stack.services) == {*DRAFTS, "scheduler", "kvoffload", "verifier"}


def test_concurrent_greedy_answers_are_the_targets_own(
    greedy_run: GreedyRun, reference, prompt_ids, hf_model
) -> None:
    for device, answer in greedy_run.answers.items():
        ext = answer["sled"]
        assert ext["device"] == device and ext["draft_model"] == DRAFTS[device]
        assert_greedy(hf_model, prompt_ids[device], ext["token_ids"], reference[device], device)
        assert answer["usage"]["prompt_tokens"] == len(prompt_ids[device])
        assert answer["usage"]["completion_tokens"] == len(ext["token_ids"])
        assert 0 <= ext["accepted"] <= ext["drafted"]
    # One verifier served them all.
    assert len({a["sled"]["verifier_id"] for a in greedy_run.answers.values()}) == 1
    # A model draft that is never accepted would still be lossless: check it is used.
    for device in ("pi5-int4", "orin-int8"):
        ext = greedy_run.answers[device]["sled"]
        assert ext["accepted"] > 0.3 * ext["drafted"] > 0, (device, ext)


def test_the_verifier_batched_rounds_of_several_devices(greedy_run: GreedyRun) -> None:
    before, after = greedy_run.stats_before, greedy_run.stats_after
    assert after["multi_device_batches"] > before["multi_device_batches"], after
    assert after["max_batch_devices"] >= 2, after
    assert after["batches"] > before["batches"]
    # The same batches, counted by the Prometheus histogram.
    assert greedy_run.multi_after > greedy_run.multi_before
    assert greedy_run.multi_after - greedy_run.multi_before == (
        after["multi_device_batches"] - before["multi_device_batches"]
    )


def test_seeded_sampling_gives_the_same_text_again(sled_stack: LocalStack) -> None:
    devices = sled_stack.drafters

    def sampled(seed: int) -> dict[str, dict[str, Any]]:
        # All devices at once: each run sees other rounds and other batch shapes.
        calls = [
            partial(
                chat,
                sled_stack,
                d,
                SAMPLING_PROMPT,
                temperature=0.9,
                top_p=0.95,
                seed=seed,
                max_tokens=SAMPLED_TOKENS,
            )
            for d in devices
        ]
        return dict(zip(devices, concurrently(calls), strict=True))

    first, again, other = sampled(11), sampled(11), sampled(12)
    for device in devices:
        ids = first[device]["sled"]["token_ids"]
        assert first[device]["sled"]["seed"] == 11
        text = first[device]["choices"][0]["message"]["content"]
        assert again[device]["sled"]["token_ids"] == ids, device
        assert again[device]["choices"][0]["message"]["content"] == text, device
        # The seed is really used: another one samples another text.
        assert other[device]["sled"]["token_ids"] != ids, device


def test_sled_generate_json(sled_stack: LocalStack, reference, prompt_ids, hf_model) -> None:
    device = "orin-int8"
    argv = [SLED, "generate", "--prompt", PROMPTS[device], "--device", device]
    argv += ["--json", "--max-tokens", str(CLI_TOKENS), "--wait", "3"]
    done = subprocess.run(
        argv, env=sled_stack.env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["device"], out["draft_model"]) == (device, DRAFT_INT8)
    ids = out["token_ids"]
    assert_greedy(hf_model, prompt_ids[device], ids, reference[device], "sled generate")
    assert len(ids) == out["usage"]["completion_tokens"] == min(CLI_TOKENS, len(reference[device]))
    assert out["rounds"] >= 1
    assert 0 < out["accepted"] <= out["drafted"]
    assert out["acceptance"] == pytest.approx(out["accepted"] / out["drafted"])
    assert out["ttft_s"] > 0 and out["tpot_s"] > 0


def test_sled_status_lists_every_service(sled_stack: LocalStack) -> None:
    argv = [SLED, "status", "--wait", "3"]
    done = subprocess.run(argv, env=sled_stack.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "ID"]
    ids: dict[str, set[str]] = {}
    for row in rows:
        name, service_id = row.split()[:2]
        ids.setdefault(name, set()).add(service_id)
    expected = {"sled-verifier": 1, "sled-scheduler": 1, "sled-kvoffload": 1, "sled-drafter": 3}
    assert {name: len(found) for name, found in ids.items()} == expected, done.stdout
    # Each drafter says which device it is.
    done = subprocess.run(
        [*argv, "--json"], env=sled_stack.env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    devices = {
        svc["info"]["metadata"]["device"]
        for svc in json.loads(done.stdout)
        if svc["info"]["name"] == "sled-drafter"
    }
    assert devices == set(DRAFTS)
