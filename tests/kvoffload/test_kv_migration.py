"""Whole-session export/import in bounded chunks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sled_kvoffload.host_cache import CacheConfig, HostKVCache, OutOfBlocksError
from sled_kvoffload.migration import (
    KVChunk,
    SessionImport,
    chunk_tokens,
    export_chunk,
    export_session,
)

CFG = CacheConfig(num_layers=3, kv_heads=2, head_dim=8, num_blocks=32, block_size=4)
TOKEN_BYTES = 2 * 2 * 8 * 4  # K+V of one token in one layer


def _filled(n: int, seed: int = 0) -> HostKVCache:
    cache = HostKVCache(CFG)
    rng = np.random.default_rng(seed)
    for layer in range(CFG.num_layers):
        k = rng.standard_normal((n, 2, 8)).astype(np.float32)
        cache.append("s", layer, k, -k)
    return cache


def test_chunks_respect_the_byte_limit_and_cover_every_token_once():
    src = _filled(23)
    chunks = list(export_session(src, "s", chunk_bytes=5 * TOKEN_BYTES + 7))
    assert all(c.nbytes <= 5 * TOKEN_BYTES + 7 for c in chunks)
    assert len(chunks) == CFG.num_layers * 5  # ceil(23 / 5) per layer
    for layer in range(CFG.num_layers):
        spans = sorted((c.start, c.start + c.k.shape[0]) for c in chunks if c.layer == layer)
        assert spans[0][0] == 0 and spans[-1][1] == 23
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_round_trip_out_of_order_with_duplicates_is_exact():
    src = _filled(23, seed=1)
    chunks = list(export_session(src, "s", chunk_bytes=4 * TOKEN_BYTES))
    rng = np.random.default_rng(2)
    order = rng.permutation(len(chunks))
    dst = HostKVCache(CFG)
    imp = SessionImport(dst, "s", total_len=23)
    for i in order[:-1]:
        imp.add(chunks[i])
    imp.add(chunks[order[0]])  # a retried chunk
    assert not imp.complete
    with pytest.raises(ValueError, match="incomplete"):
        imp.finish()
    with pytest.raises(ValueError, match="still being imported"):
        dst.runs("s", 0)
    imp.add(chunks[order[-1]])
    imp.finish()
    for layer in range(CFG.num_layers):
        for a, b in zip(src.read("s", layer, 0, 23), dst.read("s", layer, 0, 23), strict=True):
            np.testing.assert_array_equal(a, b)
    # The imported session keeps growing normally.
    dst.append("s", 0, np.ones((1, 2, 8), np.float32), np.ones((1, 2, 8), np.float32))
    assert dst.length("s", 0) == 24


def test_import_reserves_up_front_and_abort_gives_blocks_back():
    dst = HostKVCache(CFG)
    with pytest.raises(OutOfBlocksError):
        SessionImport(dst, "big", total_len=CFG.num_blocks * CFG.block_size + 1)
    assert dst.stats().used_blocks == 0
    imp = SessionImport(dst, "s", total_len=10)
    assert dst.stats().used_blocks == 3
    imp.abort()
    assert dst.stats().used_blocks == 0 and "s" not in dst


def test_bad_chunks_and_limits_are_rejected():
    with pytest.raises(ValueError, match="below one token"):
        chunk_tokens(2, 8, TOKEN_BYTES - 1)
    with pytest.raises(ValueError, match="exceed total_len"):
        KVChunk("s", 0, 8, 10, np.zeros((3, 2, 8)), np.zeros((3, 2, 8)))
    dst = HostKVCache(CFG)
    imp = SessionImport(dst, "s", total_len=10)
    with pytest.raises(ValueError, match="does not belong"):
        imp.add(KVChunk("other", 0, 0, 10, np.zeros((2, 2, 8)), np.zeros((2, 2, 8))))
    src = _filled(5)
    src.append("s", 0, np.zeros((1, 2, 8)), np.zeros((1, 2, 8)))
    with pytest.raises(ValueError, match="mid-forward"):
        list(export_session(src, "s"))


def test_export_chunk_gives_random_access_to_the_same_chunks():
    src = _filled(23, seed=4)
    size = 5 * TOKEN_BYTES
    chunks = list(export_session(src, "s", chunk_bytes=size))
    for i in reversed(range(len(chunks))):
        got, count = export_chunk(src, "s", i, size)
        assert count == len(chunks)
        assert (got.layer, got.start, got.total_len) == (
            chunks[i].layer, chunks[i].start, chunks[i].total_len,
        )  # fmt: skip
        np.testing.assert_array_equal(got.k, chunks[i].k)
        np.testing.assert_array_equal(got.v, chunks[i].v)
    with pytest.raises(ValueError, match="outside the 15 chunks"):
        export_chunk(src, "s", 15, size)
