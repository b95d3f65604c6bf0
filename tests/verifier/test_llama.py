"""Our forward pass against transformers' on tiny random models (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sled_verifier.block_manager import BlockManager
from sled_verifier.model_runner import ModelRunner, SeqRequest

from .conftest import TINY_CONFIGS, reference_logits, tiny_config

ATOL = 1e-4


class Harness:
    """A runner plus block manager, fed like the engine feeds them."""

    def __init__(self, path) -> None:
        self.runner = ModelRunner(tiny_config(path))
        self.blocks = BlockManager(self.runner.num_blocks, self.runner.block_size)

    def step(
        self, feeds: dict[str, list[int]], sub_batch: dict[str, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Append each session's tokens to its KV; logits for every new row.

        With `sub_batch`, the sessions run as two sub-batches pipelined per layer."""
        reqs = []
        for sid, toks in feeds.items():
            if sid not in self.blocks:
                self.blocks.add(sid)
            start = self.blocks.length(sid)
            self.blocks.allocate(sid, len(toks))
            reqs.append(
                SeqRequest(
                    sid, np.array(toks), start, self.blocks.block_table(sid), range(len(toks))
                )
            )
        if sub_batch is None:
            return dict(zip(feeds, self.runner.run(reqs), strict=True))
        return dict(zip(feeds, self.runner.run_pipelined(reqs, sub_batch), strict=True))


def _prompt(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 96, size=n).tolist()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_prefill_matches_transformers(name, tiny_model_dirs, hf_models):
    ids = _prompt(np.random.default_rng(0), 23)
    out = Harness(tiny_model_dirs[name]).step({"a": ids})["a"]
    ref = reference_logits(hf_models[name], ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_incremental_decode_matches_transformers(name, tiny_model_dirs, hf_models):
    ids = _prompt(np.random.default_rng(1), 30)
    h = Harness(tiny_model_dirs[name])
    ref = reference_logits(hf_models[name], ids)
    # Prefill 9, then chunks of 1, 3, 1, 5, ... crossing block boundaries (block_size 4).
    got = [h.step({"a": ids[:9]})["a"]]
    pos = 9
    for n in (1, 3, 1, 5, 2, 1, 8):
        got.append(h.step({"a": ids[pos : pos + n]})["a"])
        pos += n
    torch.testing.assert_close(torch.cat(got), ref[:pos], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gqa", "qwen2-bias"])
def test_ragged_batch_matches_transformers(name, tiny_model_dirs, hf_models):
    rng = np.random.default_rng(2)
    seqs = {
        "a": _prompt(rng, 5),
        "b": _prompt(rng, 17),
        "c": _prompt(rng, 1),
        "d": _prompt(rng, 11),
    }
    h = Harness(tiny_model_dirs[name])
    # Round 1: all prompts in one ragged batch. Rounds 2-3: different numbers of new tokens.
    got = {sid: [x] for sid, x in h.step(seqs).items()}
    for extra in ({"a": 1, "b": 4, "c": 2, "d": 1}, {"a": 6, "b": 1, "c": 3, "d": 2}):
        feeds = {sid: _prompt(rng, n) for sid, n in extra.items()}
        for sid, x in h.step(feeds).items():
            got[sid].append(x)
            seqs[sid] = seqs[sid] + feeds[sid]
    for sid, ids in seqs.items():
        ref = reference_logits(hf_models[name], ids)
        torch.testing.assert_close(torch.cat(got[sid]), ref, atol=ATOL, rtol=0, msg=sid)


def test_logit_rows_select_only_requested(tiny_model_dirs, hf_models):
    ids = _prompt(np.random.default_rng(3), 12)
    h = Harness(tiny_model_dirs["llama"])
    h.blocks.add("a")
    h.blocks.allocate("a", len(ids))
    (out,) = h.runner.run([SeqRequest("a", np.array(ids), 0, h.blocks.block_table("a"), [11, 4])])
    ref = reference_logits(hf_models["llama"], ids)
    assert out.shape == (2, 96)
    torch.testing.assert_close(out, ref[[11, 4]], atol=ATOL, rtol=0)


def test_rollback_then_new_tokens_matches_fresh_run(tiny_model_dirs, hf_models):
    rng = np.random.default_rng(4)
    prefix, rejected, replacement = _prompt(rng, 10), _prompt(rng, 7), _prompt(rng, 6)
    h = Harness(tiny_model_dirs["gqa"])
    h.step({"a": prefix + rejected})
    blocks_before = h.blocks.num_used
    h.blocks.truncate("a", len(prefix))
    assert h.blocks.num_used < blocks_before  # 17 -> 10 tokens frees a block of 4
    out = h.step({"a": replacement})["a"]
    ref = reference_logits(hf_models["gqa"], prefix + replacement)
    torch.testing.assert_close(out, ref[len(prefix) :], atol=ATOL, rtol=0)


def test_block_table_too_short_is_rejected(tiny_model_dirs):
    h = Harness(tiny_model_dirs["llama"])
    h.blocks.add("a")
    h.blocks.allocate("a", 4)
    with pytest.raises(ValueError, match="block table too short"):
        h.runner.run([SeqRequest("a", np.arange(5), 0, h.blocks.block_table("a"), [4])])


def test_auto_kv_budget_never_exceeds_what_sessions_can_use(tiny_model_dirs):
    runner = ModelRunner(tiny_config(tiny_model_dirs["gqa"], num_blocks=0))
    # Plenty of host memory for a tiny model: capped at max_sessions full-length sessions.
    assert runner.num_blocks == 8 * (256 // 4)
    assert runner.kv_cache.data.shape == (2, 2, runner.num_blocks, 4, 2, 16)
