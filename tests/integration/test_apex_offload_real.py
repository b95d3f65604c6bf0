"""APEX offload on the real SmolLM2 target: a KV budget of one session, the rest on
a real kvoffload worker (host RAM, CPU attention over NATS); greedy tokens must
equal the run with every session's KV on the accelerator tier.

On this CPU-only machine the "accelerator" tier is the verifier's own torch KV
cache with a block budget; the host tier is a kvoffload worker process-alike
(the real service, in this process) reached over a real nats-server.
"""

from __future__ import annotations

import pytest
from sled_bench.apex_stack import drive, record_open_tiers, stack
from sled_shared.apex.plan import Policy
from sled_shared.models.registry import DEFAULT_TARGET, get_model
from sled_verifier.apex_loop import ApexLoop
from sled_verifier.config import EngineConfig
from sled_verifier.engine import VerifierEngine
from transformers import AutoTokenizer

pytestmark = pytest.mark.integration

PROMPTS = [
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about the sea at night.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for staying focused while studying.",
]
MAX_NEW = [40, 32, 40, 36]


def _engine(path, blocks: int) -> VerifierEngine:
    return VerifierEngine(
        EngineConfig(model_dir=path, num_blocks=blocks, block_size=16, max_model_len=512)
    )


def test_real_model_with_a_one_session_budget_matches_no_offload(nats_url):
    path = get_model(DEFAULT_TARGET).path
    tok = AutoTokenizer.from_pretrained(path)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompts = [
        tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in chats
    ]  # about 40 tokens each
    full = _engine(path, blocks=64)
    reference = drive(full, full.verify, prompts, MAX_NEW).outputs
    del full
    # 64 tokens: one session at open; not even that one at its full length.
    engine = _engine(path, blocks=4)
    with stack(nats_url) as st:
        st.start_worker("w1", blocks=1024)
        engine.kv.attach(st.host_tier(engine, ["w1"]), offload_new=True)
        host = engine.kv.host
        loop = ApexLoop(engine, Policy.APEX)
        opened_on = record_open_tiers(engine)
        run = drive(engine, loop.execute, prompts, MAX_NEW, reference=reference)
    assert not run.errors
    assert list(opened_on.values()).count("w1") >= 3, opened_on
    assert host is not None and host.executors["w1"].forward_id > 0
    for i, text in enumerate(PROMPTS):
        assert len(reference[i]) > 16, tok.decode(reference[i])  # a real answer, not just EOS
        assert run.outputs[i] == reference[i], (text, tok.decode(run.outputs[i]))
