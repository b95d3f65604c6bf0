"""Host KV store: paging, contiguity, truncation, eviction, accounting, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sled_kvoffload.block_allocator import BlockAllocator
from sled_kvoffload.host_cache import CacheConfig, HostKVCache, OutOfBlocksError

CFG = CacheConfig(num_layers=2, kv_heads=2, head_dim=4, num_blocks=16, block_size=4)


def _kv(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (n, CFG.kv_heads, CFG.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32
    )


def _fill(cache: HostKVCache, session: str, sizes: list[int], rng: np.random.Generator):
    """Append rounds of the given sizes to every layer; return what was written per layer."""
    written = {layer: ([], []) for layer in range(CFG.num_layers)}
    for n in sizes:
        for layer in range(CFG.num_layers):
            k, v = _kv(rng, n)
            cache.append(session, layer, k, v)
            written[layer][0].append(k)
            written[layer][1].append(v)
    return {layer: (np.concatenate(ks), np.concatenate(vs)) for layer, (ks, vs) in written.items()}


def test_append_then_read_and_runs_return_exactly_what_was_written():
    rng = np.random.default_rng(0)
    cache = HostKVCache(CFG)
    # Interleave two sessions so their blocks compete for neighbours.
    a = _fill(cache, "a", [3, 1, 5], rng)
    b = _fill(cache, "b", [6, 2], rng)
    a2 = _fill(cache, "a", [4], rng)
    for layer in range(CFG.num_layers):
        want_k = np.concatenate([a[layer][0], a2[layer][0]])
        want_v = np.concatenate([a[layer][1], a2[layer][1]])
        k, v = cache.read("a", layer, 0, 13)
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)
        runs = cache.runs("a", layer)  # head-major [kv_heads, t, head_dim]
        np.testing.assert_array_equal(
            np.concatenate([r[0] for r in runs], 1), want_k.transpose(1, 0, 2)
        )
        np.testing.assert_array_equal(
            np.concatenate([r[1] for r in runs], 1), want_v.transpose(1, 0, 2)
        )
        np.testing.assert_array_equal(cache.read("b", layer, 2, 8)[0], b[layer][0][2:8])
    assert cache.length("a") == 13 and cache.length("b") == 8


def test_runs_are_views_into_the_store_not_copies():
    cache = HostKVCache(CFG)
    _fill(cache, "a", [10], np.random.default_rng(1))
    (k, _), *_ = cache.runs("a", 0)
    assert not k.flags.owndata and k.base is not None


def test_growing_session_stays_in_one_contiguous_run_while_neighbours_allow():
    cache = HostKVCache(
        CacheConfig(num_layers=1, kv_heads=1, head_dim=2, num_blocks=64, block_size=4)
    )
    rng = np.random.default_rng(2)
    sessions = [f"s{i}" for i in range(4)]
    for _ in range(20):  # 4 sessions growing one token at a time, interleaved
        for s in sessions:
            cache.append(s, 0, rng.standard_normal((1, 1, 2)), rng.standard_normal((1, 1, 2)))
    assert all(len(cache.runs(s, 0)) == 1 for s in sessions)


def test_layers_fill_independently_mid_forward():
    cache = HostKVCache(CFG)
    rng = np.random.default_rng(3)
    cache.append("a", 0, *_kv(rng, 5))
    assert cache.length("a", 0) == 5 and cache.length("a", 1) == 0
    assert cache.runs("a", 1) == []
    cache.append("a", 1, *_kv(rng, 5))
    assert cache.length("a", 1) == 5


def test_truncate_drops_tail_and_frees_blocks():
    cache = HostKVCache(CFG)
    data = _fill(cache, "a", [11], np.random.default_rng(4))
    assert cache.stats().used_blocks == 3
    cache.truncate("a", 5)
    assert cache.length("a") == 5 and cache.stats().used_blocks == 2
    np.testing.assert_array_equal(cache.read("a", 1, 0, 5)[1], data[1][1][:5])
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate("a", 6)
    # Appending after a truncation continues at the new end.
    k, v = _kv(np.random.default_rng(5), 2)
    cache.append("a", 0, k, v)
    np.testing.assert_array_equal(cache.read("a", 0, 5, 7)[0], k)


def test_evict_frees_everything_and_is_idempotent():
    cache = HostKVCache(CFG)
    _fill(cache, "a", [9], np.random.default_rng(6))
    assert cache.evict("a") is True
    assert cache.evict("a") is False
    assert cache.stats().used_blocks == 0 and "a" not in cache


def test_byte_accounting_matches_block_geometry():
    cache = HostKVCache(CFG)
    _fill(cache, "a", [5], np.random.default_rng(7))
    block_bytes = 2 * CFG.num_layers * CFG.block_size * CFG.kv_heads * CFG.head_dim * 4
    assert CFG.block_bytes == block_bytes
    st = cache.stats()
    assert st.used_bytes == 2 * block_bytes == cache.session_bytes("a")
    assert st.capacity_bytes == CFG.num_blocks * block_bytes
    assert cache.free_tokens() == (CFG.num_blocks - 2) * CFG.block_size


def test_out_of_blocks_is_a_clear_error_and_changes_nothing():
    cache = HostKVCache(CFG)
    rng = np.random.default_rng(8)
    cache.append("a", 0, *_kv(rng, 60))  # 15 of 16 blocks
    with pytest.raises(OutOfBlocksError, match=r"need 2, 1 free of 16"):
        cache.append("b", 0, *_kv(rng, 5))
    assert "b" not in cache and cache.stats().free_blocks == 1
    with pytest.raises(OutOfBlocksError, match="session 'a'"):
        cache.append("a", 0, *_kv(rng, 5))
    assert cache.length("a", 0) == 60


def test_bad_input_is_rejected_clearly():
    cache = HostKVCache(CFG)
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match=r"\[n, 2, 4\]"):
        cache.append("a", 0, rng.standard_normal((3, 4, 4)), rng.standard_normal((3, 4, 4)))
    with pytest.raises(ValueError, match="layer 2 out of range"):
        cache.append("a", 2, *_kv(rng, 1))
    with pytest.raises(ValueError, match="floating"):
        cache.append("a", 0, np.zeros((1, 2, 4), np.int32), np.zeros((1, 2, 4), np.int32))
    with pytest.raises(KeyError, match="unknown session 'zz'"):
        cache.runs("zz", 0)
    with pytest.raises(ValueError, match="positive"):
        CacheConfig(num_layers=0, kv_heads=1, head_dim=1, num_blocks=1)


def test_allocator_refuses_double_free_and_reuses_freed_blocks():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(2, after=a[-1])
    assert b == [a[-1] + 1, a[-1] + 2]  # grows in place
    alloc.release(a)
    with pytest.raises(ValueError, match="double free"):
        alloc.release(a)
    assert alloc.num_free == 6
    assert sorted(alloc.allocate(6)) == sorted(set(range(8)) - set(b))
