"""The attention seam: grouped attention math, and sessions delegated to another executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sled_verifier.attention import AttentionExecutor, PagedAttention, SeqSlice, grouped_attention

from .conftest import reference_logits
from .test_llama import Harness


@pytest.mark.parametrize(("n", "heads", "kv_heads"), [(1, 9, 3), (5, 9, 3), (4, 4, 4), (3, 8, 1)])
def test_grouped_attention_equals_sdpa(n, heads, kv_heads):
    torch.manual_seed(0)
    ctx, d = 37, 16
    q, k, v = torch.randn(n, heads, d), torch.randn(ctx, kv_heads, d), torch.randn(ctx, kv_heads, d)
    mask = torch.arange(ctx)[None, :] <= (ctx - n + torch.arange(n))[:, None]
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        enable_gqa=True,
    )[0].transpose(0, 1)
    out = grouped_attention(q, k, v, mask if n > 1 else None)
    torch.testing.assert_close(out, ref.reshape(n, heads * d), atol=1e-5, rtol=1e-5)


class OwnCacheExecutor(AttentionExecutor):
    """Keeps delegated sessions' K/V in its own tensors (as a CPU worker would) and
    finishes its work only when the router asks for the result."""

    def __init__(self, log: list[str]) -> None:
        self.kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.log = log

    def attend(self, layer, seq, q, k_new, v_new):
        key = (seq.session_id, layer)
        k_old, v_old = self.kv.get(key, (k_new[:0], v_new[:0]))
        k, v = torch.cat([k_old, k_new]), torch.cat([v_old, v_new])
        assert k.shape[0] == seq.context_len
        self.kv[key] = (k, v)
        return grouped_attention(q, k, v, seq.mask)

    def submit(self, layer, seq, q, k_new, v_new):
        self.log.append(f"submit {seq.session_id}")
        args = (layer, seq, q.clone(), k_new.clone(), v_new.clone())

        def wait() -> torch.Tensor:
            self.log.append(f"wait {seq.session_id}")
            return self.attend(*args)

        return wait


class LoggedPaged(PagedAttention):
    def __init__(self, cache, log: list[str]) -> None:
        super().__init__(cache)
        self.log = log

    def attend(self, layer, seq: SeqSlice, q, k_new, v_new):
        self.log.append(f"local {seq.session_id}")
        return super().attend(layer, seq, q, k_new, v_new)


def test_delegated_session_gives_the_same_logits(tiny_model_dirs, hf_models):
    rng = np.random.default_rng(5)
    seqs = {sid: rng.integers(3, 96, n).tolist() for sid, n in (("a", 6), ("b", 9), ("c", 4))}
    h = Harness(tiny_model_dirs["gqa"])
    log: list[str] = []
    router = h.runner.attention
    router.local = LoggedPaged(h.runner.kv_cache, log)
    remote = OwnCacheExecutor(log)
    router.delegate("b", remote)
    got = {sid: [x] for sid, x in h.step(seqs).items()}
    for n in (1, 3):
        feeds = {sid: rng.integers(3, 96, n).tolist() for sid in seqs}
        for sid, x in h.step(feeds).items():
            got[sid].append(x)
            seqs[sid] += feeds[sid]
    for sid, ids in seqs.items():
        ref = reference_logits(hf_models["gqa"], ids)
        torch.testing.assert_close(torch.cat(got[sid]), ref, atol=1e-4, rtol=0, msg=sid)
    layers = h.runner.spec.num_layers
    assert len(remote.kv) == layers  # session b's KV lived only in the delegate
    # Per layer: the delegate's work starts first, local sessions run, then it is collected.
    assert log[:4] == ["submit b", "local a", "local c", "wait b"]
    assert log.count("submit b") == log.count("wait b") == 3 * layers


def _delegating_harness(path, log: list[str], delegated: tuple[str, ...]) -> Harness:
    h = Harness(path)
    h.runner.attention.local = LoggedPaged(h.runner.kv_cache, log)
    for sid in delegated:
        h.runner.attention.delegate(sid, OwnCacheExecutor(log))
    return h


def test_pipelined_forward_gives_the_single_batch_logits(tiny_model_dirs):
    rng = np.random.default_rng(11)
    sizes = {"a": 7, "b": 1, "c": 12, "d": 5, "e": 3}
    prompts = {sid: rng.integers(3, 96, n).tolist() for sid, n in sizes.items()}
    # Each sub-batch holds local and delegated sessions, its sessions not contiguous.
    sub_batch = {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    single = _delegating_harness(tiny_model_dirs["gqa"], [], ("b", "d"))
    piped = _delegating_harness(tiny_model_dirs["gqa"], [], ("b", "d"))
    feeds = [prompts] + [{sid: rng.integers(3, 96, n).tolist() for sid in sizes} for n in (1, 4, 1)]
    for feed in feeds:
        want = single.step(feed)
        got = piped.step(feed, sub_batch)
        assert list(got) == list(want)  # logits come back in the order given
        for sid in feed:
            torch.testing.assert_close(got[sid], want[sid], atol=1e-5, rtol=0, msg=sid)


def test_pipelined_layers_interleave_the_sub_batches(tiny_model_dirs):
    log: list[str] = []
    h = _delegating_harness(tiny_model_dirs["gqa"], log, ("b", "d"))
    rng = np.random.default_rng(12)
    feeds = {sid: rng.integers(3, 96, 4).tolist() for sid in "abcd"}
    h.step(feeds, {"a": 0, "b": 0, "c": 1, "d": 1})
    # Per layer: A's attention is sent, then B's (after B's qkv), and only then is A
    # collected, so A's remote work overlaps B's linear layers; B's overlaps A's MLP.
    layer = ["submit b", "submit d", "local a", "wait b", "local c", "wait d"]
    assert log == layer * h.runner.spec.num_layers
