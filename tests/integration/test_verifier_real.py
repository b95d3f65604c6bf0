"""The verifier's own forward pass on the real SmolLM2 target matches transformers.

Three prompts of different lengths go through one ragged prefill, then three
ragged incremental steps (1, 3 and 5 new tokens per session, like decode and
verify rounds), all against the paged KV cache. Every logit row is compared
with transformers' forward over the whole sequence, in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sled_shared.models.registry import DEFAULT_TARGET, get_model
from sled_verifier.block_manager import BlockManager
from sled_verifier.config import EngineConfig
from sled_verifier.model_runner import ModelRunner, SeqRequest
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime, and explain how it works "
    "step by step for a beginner who has never programmed before.",
    "Hi",
]
# Measured max |diff| ~7e-5 on logits spanning about +-30 (fp32 sums in another order).
ATOL = 5e-4


@pytest.fixture(scope="module")
def target_dir():
    return get_model(DEFAULT_TARGET).path


@pytest.fixture(scope="module")
def hf_model(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def test_ragged_prefill_and_steps_match_transformers(target_dir, hf_model):
    tok = AutoTokenizer.from_pretrained(target_dir)
    seqs = {f"s{i}": tok(p)["input_ids"] for i, p in enumerate(PROMPTS)}
    assert len({len(s) for s in seqs.values()}) == 3
    runner = ModelRunner(EngineConfig(model_dir=target_dir, num_blocks=32, block_size=16))
    blocks = BlockManager(runner.num_blocks, runner.block_size)
    rng = np.random.default_rng(0)
    got: dict[str, list[torch.Tensor]] = {sid: [] for sid in seqs}
    feeds = dict(seqs)
    for step in range(4):
        reqs = []
        for sid, new in feeds.items():
            if sid not in blocks:
                blocks.add(sid)
            start = blocks.length(sid)
            blocks.allocate(sid, len(new))
            table = blocks.block_table(sid)
            reqs.append(SeqRequest(sid, np.array(new), start, table, range(len(new))))
        for req, logits in zip(reqs, runner.run(reqs), strict=True):
            got[req.session_id].append(logits)
        n_new = (1, 3, 5)[step % 3]
        feeds = {sid: rng.integers(0, 49152, n_new).tolist() for sid in seqs}
        if step < 3:
            for sid, new in feeds.items():
                seqs[sid] = seqs[sid] + new
    for sid, ids in seqs.items():
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        ours = torch.cat(got[sid])
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0, msg=sid)
        assert torch.equal(ours.argmax(-1), ref.argmax(-1)), sid
