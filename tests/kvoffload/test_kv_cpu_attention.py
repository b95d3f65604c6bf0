"""CPU attention kernel against a straightforward fp64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from sled_kvoffload import cpu_attention
from sled_kvoffload.cpu_attention import AttendRequest, CpuAttention, attend_runs
from sled_kvoffload.host_cache import CacheConfig, HostKVCache, OutOfBlocksError

from .conftest import reference


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 4, 16), (9, 3, 64), (8, 2, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_ragged_batch_matches_fp64_reference(hq, hkv, d, threads):
    rng = np.random.default_rng(hq * 100 + d + threads)
    layers = 2
    cfg = CacheConfig(num_layers=layers, kv_heads=hkv, head_dim=d, num_blocks=256, block_size=8)
    cache = HostKVCache(cfg)
    # Each session: its own prior context and its own number of new tokens.
    plan = {"a": (0, 5), "b": (37, 1), "c": (64, 3), "d": (3, 9), "e": (130, 2)}
    history: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for layer in range(layers):
        for s, (ctx, _) in plan.items():
            if ctx:
                k = rng.standard_normal((ctx, hkv, d)).astype(np.float32)
                v = rng.standard_normal((ctx, hkv, d)).astype(np.float32)
                cache.append(s, layer, k, v)
                history[s, layer] = (k, v)
    with CpuAttention(cache, q_heads=hq, threads=threads) as attn:
        for layer in range(layers):
            reqs = []
            for s, (_, n) in plan.items():
                reqs.append(
                    AttendRequest(
                        s,
                        rng.standard_normal((n, hq, d)).astype(np.float32) * 2,
                        rng.standard_normal((n, hkv, d)).astype(np.float32),
                        rng.standard_normal((n, hkv, d)).astype(np.float32),
                    )
                )
            outs = attn.attend(layer, reqs)
            for r, out in zip(reqs, outs, strict=True):
                old_k, old_v = history.get((r.session, layer), (r.k[:0], r.v[:0]))
                want = reference(r.q, np.concatenate([old_k, r.k]), np.concatenate([old_v, r.v]))
                assert out.shape == r.q.shape and out.dtype == np.float32
                np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-5)


def _hm(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-major [t, h, d] to the head-major run views the kernel takes."""
    return k.transpose(1, 0, 2), v.transpose(1, 0, 2)


@pytest.mark.parametrize("gemv_max_rows", [0, 1000])
def test_gemv_and_gemm_paths_agree_with_reference(monkeypatch, gemv_max_rows):
    monkeypatch.setattr(cpu_attention, "GEMV_MAX_ROWS", gemv_max_rows)
    rng = np.random.default_rng(13)
    for n in (1, 4):
        q = rng.standard_normal((n, 6, 16)).astype(np.float32)
        k = rng.standard_normal((40, 3, 16)).astype(np.float32)
        v = rng.standard_normal((40, 3, 16)).astype(np.float32)
        got = attend_runs(q, [_hm(k[:17], v[:17]), _hm(k[17:], v[17:])], 1 / 4)
        np.testing.assert_allclose(got, reference(q, k, v), rtol=2e-4, atol=2e-5)


def test_new_tokens_do_not_see_later_new_tokens():
    # Changing the last new token's k/v must leave earlier tokens' outputs unchanged.
    rng = np.random.default_rng(11)
    q = rng.standard_normal((4, 2, 8)).astype(np.float32)
    k = rng.standard_normal((10, 2, 8)).astype(np.float32)
    v = rng.standard_normal((10, 2, 8)).astype(np.float32)
    base = attend_runs(q, [_hm(k, v)], 0.3)
    k2, v2 = k.copy(), v.copy()
    k2[-1] += 5.0
    v2[-1] -= 5.0
    changed = attend_runs(q, [_hm(k2, v2)], 0.3)
    np.testing.assert_array_equal(base[:3], changed[:3])
    assert not np.allclose(base[3], changed[3])


def test_split_runs_give_the_same_result_as_one_run():
    rng = np.random.default_rng(12)
    q = rng.standard_normal((3, 6, 16)).astype(np.float32)
    k = rng.standard_normal((50, 2, 16)).astype(np.float32)
    v = rng.standard_normal((50, 2, 16)).astype(np.float32)
    whole = attend_runs(q, [_hm(k, v)], 0.25)
    split = attend_runs(q, [_hm(k[:7], v[:7]), _hm(k[7:31], v[7:31]), _hm(k[31:], v[31:])], 0.25)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)


def test_bad_batches_are_rejected():
    cache = HostKVCache(CacheConfig(num_layers=1, kv_heads=2, head_dim=4, num_blocks=8))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        CpuAttention(cache, q_heads=3)
    z = np.zeros((1, 2, 4), np.float32)
    with CpuAttention(cache, q_heads=4, threads=1) as attn:
        with pytest.raises(ValueError, match="twice"):
            attn.attend(0, [AttendRequest("a", np.zeros((1, 4, 4)), z, z)] * 2)
        with pytest.raises(ValueError, match=r"q must be \[n, 4, 4\]"):
            attn.attend(0, [AttendRequest("a", np.zeros((1, 2, 4)), z, z)])
    with pytest.raises(ValueError, match="same n"):
        AttendRequest("a", np.zeros((2, 4, 4)), z, z)


def test_batch_that_does_not_fit_changes_nothing():
    cfg = CacheConfig(num_layers=1, kv_heads=1, head_dim=4, num_blocks=4, block_size=4)
    cache = HostKVCache(cfg)
    rng = np.random.default_rng(14)
    cache.append("a", 0, rng.standard_normal((7, 1, 4)), rng.standard_normal((7, 1, 4)))
    reqs = [
        AttendRequest(s, *(rng.standard_normal((n, 1, 4)) for _ in range(3)))
        for s, n in (("a", 1), ("b", 4), ("c", 5))  # a fits its block; b + c need 3 of 2 free
    ]
    with CpuAttention(cache, q_heads=1, threads=1) as attn:
        with pytest.raises(OutOfBlocksError, match="need 3, 2 free"):
            attn.attend(0, reqs)
        assert cache.length("a") == 7 and "b" not in cache and "c" not in cache
        outs = attn.attend(0, reqs[:2])
    assert [o.shape for o in outs] == [(1, 1, 4), (4, 1, 4)] and cache.length("a") == 8


def test_stored_sessions_attend_over_their_prefix_without_appending():
    # A retried request: its tokens are in the cache already, and a later piece may follow them.
    cache = HostKVCache(CacheConfig(num_layers=1, kv_heads=2, head_dim=8, num_blocks=16))
    rng = np.random.default_rng(15)
    k, v = rng.standard_normal((2, 30, 2, 8)).astype(np.float32)
    q = rng.standard_normal((4, 4, 8)).astype(np.float32)
    cache.append("s", 0, k[:20], v[:20])
    with CpuAttention(cache, q_heads=4, threads=1) as attn:
        first = attn.attend(0, [AttendRequest("s", q, k[20:24], v[20:24])])[0]
        cache.append("s", 0, k[24:30], v[24:30])  # the next piece of the same forward
        again = attn.attend(0, [AttendRequest("s", q, k[20:24], v[20:24])], stored={"s": 24})[0]
    assert cache.length("s", 0) == 30
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, reference(q, k[:24], v[:24]), rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="upto=31 outside the 30 tokens"):
        cache.runs("s", 0, 31)
