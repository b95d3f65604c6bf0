"""numpy's OpenBLAS thread count is held at one while a CpuAttention lives."""

from __future__ import annotations

import pytest
from sled_kvoffload import blas_threads
from sled_kvoffload.cpu_attention import CpuAttention
from sled_kvoffload.host_cache import CacheConfig, HostKVCache


def test_held_single_while_alive_and_restored_after_the_last_one_closes():
    before = blas_threads.get_threads()
    if before is None:
        pytest.skip("numpy here does not use a bundled OpenBLAS")
    blas_threads.set_threads(2)
    try:
        cache = HostKVCache(CacheConfig(num_layers=1, kv_heads=1, head_dim=4, num_blocks=4))
        a = CpuAttention(cache, q_heads=1, threads=2)
        b = CpuAttention(cache, q_heads=1, threads=1)
        assert blas_threads.get_threads() == 1
        a.close()
        assert blas_threads.get_threads() == 1  # b still holds it
        b.close()
        b.close()  # closing twice releases once
        assert blas_threads.get_threads() == 2
    finally:
        blas_threads.set_threads(before)


def test_bad_count_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        blas_threads.set_threads(0)
