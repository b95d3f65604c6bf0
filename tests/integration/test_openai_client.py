"""The real `openai` client against devices serving the real SmolLM2 target.

Processes as deployed: nats-server, a verifier with the fp32 target, and one
drafter per draft kind (int4, int8, n-gram). Greedy answers must be the
target's own greedy tokens (transformers' `generate`, same weights; a float
near-tie is shown as such instead of skipped), whatever the draft.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import openai
import pytest
import torch
from sled_drafter.tokenizer import Tokenizer
from sled_shared.models.registry import DEFAULT_TARGET, DRAFT_INT4, DRAFT_INT8, NGRAM, get_model
from sled_shared.nats_server import NatsServer
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drafter"))
from drafter_stack import Stack

pytestmark = pytest.mark.integration

KINDS = [DRAFT_INT4, DRAFT_INT8, NGRAM]
QUESTION = "Give three tips for staying focused while studying."
MAX_TOKENS = 40
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    nats = NatsServer(workdir=tmp / "nats").start()
    st = Stack(nats.url, {**os.environ, "SLED_NATS_URL": nats.url}, tmp)
    try:
        st.verifier("v-real")
        for kind in KINDS:
            st.drafter(f"dev-{kind}", kind)
        yield st
    finally:
        st.stop()
        nats.close()


def client(stack: Stack, kind: str) -> openai.OpenAI:
    svc = next(s for s in stack.services if s.name == f"dev-{kind}")
    return openai.OpenAI(base_url=svc.base_url + "/v1", api_key="x", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def hf_model():
    path = get_model(DEFAULT_TARGET).path
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids():
    tok = Tokenizer.from_dir(get_model(DEFAULT_TARGET).path)
    return tok.apply_chat_template([{"role": "user", "content": QUESTION}])


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids):
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return out[0, len(prompt_ids) :].tolist()


def ask(stack: Stack, kind: str, **kw):
    args = dict(
        model=DEFAULT_TARGET,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return client(stack, kind).chat.completions.create(**(args | kw))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_answer_is_the_targets_own(stack, kind, reference, hf_model, prompt_ids):
    resp = ask(stack, kind)
    ext = resp.to_dict()["sled"]
    ours = ext["token_ids"]
    split = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), None)
    if split is None:
        assert ours == reference
    else:
        with torch.inference_mode():
            logits = hf_model(torch.tensor([prompt_ids + reference[:split]])).logits[0, -1]
        gap = abs(float(logits[reference[split]] - logits[ours[split]]))
        assert gap < NEAR_TIE, f"{kind} diverged at token {split}; logit gap {gap:.3g}"
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(ours)
    assert ext["draft_model"] == kind and ext["verifier_id"] == "v-real"
    if kind != NGRAM:  # a model draft that is never accepted would still be lossless
        assert ext["accepted"] > 0.3 * ext["drafted"] > 0


def test_streaming_gives_the_same_text_and_usage(stack):
    whole = ask(stack, DRAFT_INT4)
    chunks = list(ask(stack, DRAFT_INT4, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_and_seeded_sampling(stack):
    text = ask(stack, DRAFT_INT8).choices[0].message.content
    stop = text.split()[len(text.split()) // 2]
    cut = ask(stack, DRAFT_INT8, stop=stop)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [
        ask(stack, DRAFT_INT4, temperature=0.8, top_p=0.95, seed=2024).to_dict()["sled"]
        for _ in range(2)
    ]
    assert sampled[0]["token_ids"] == sampled[1]["token_ids"]
    assert sampled[0]["drafted"] > 0
