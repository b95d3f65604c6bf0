"""Start-up profile of this worker's CPU attention for one model geometry.

The scheduler cannot decide to offload anything before it has CPU attention
samples, and live samples only exist once something is offloaded. So when a
worker adopts a geometry it measures a small sweep (sessions x context x new
tokens) of one layer on a scratch cache, with the same kernel and thread
count it serves with, and reports those samples like live ones.
"""

from __future__ import annotations

import time

import numpy as np
from sled_shared.apex.profiles import Component, Sample
from sled_shared.kv_protocol import KVGeometry

from sled_kvoffload.cpu_attention import AttendRequest, CpuAttention
from sled_kvoffload.host_cache import CacheConfig, HostKVCache

SESSIONS = (1, 2, 4, 8)
CONTEXTS = (128, 512, 2048)  # tokens per session, capped by the memory budget
NEW_TOKENS = (1, 5)
BLOCK_SIZE = 16


def sweep(
    geometry: KVGeometry,
    threads: int = 0,
    memory_budget: int = 64 << 20,
    repeats: int = 2,
    seed: int = 0,
) -> list[Sample]:
    """Measured ``CPU_ATTN`` samples (best of ``repeats``) of one layer of ``geometry``."""
    token_bytes = 2 * geometry.kv_heads * geometry.head_dim * 4
    most = max(SESSIONS) * (max(NEW_TOKENS) + 1)
    cap = max(BLOCK_SIZE, memory_budget // (token_bytes * max(SESSIONS)) - most)
    contexts = sorted({min(c, cap) for c in CONTEXTS})
    per_session = max(contexts) + max(NEW_TOKENS)
    blocks = max(SESSIONS) * -(-per_session // BLOCK_SIZE)
    cache = HostKVCache(CacheConfig(1, geometry.kv_heads, geometry.head_dim, blocks, BLOCK_SIZE))
    rng = np.random.default_rng(seed)
    kvd = (geometry.kv_heads, geometry.head_dim)
    out: list[Sample] = []
    with CpuAttention(cache, geometry.q_heads, threads, geometry.scale or None) as attn:
        for context in contexts:
            for s in range(max(SESSIONS)):
                name = f"cal{s}"
                cache.evict(name)
                cache.append(name, 0, *rng.standard_normal((2, context, *kvd), np.float32))
            for n_sessions in SESSIONS:
                for n in NEW_TOKENS:
                    best = np.inf
                    for _ in range(repeats):
                        reqs = [
                            AttendRequest(
                                f"cal{s}",
                                rng.standard_normal(
                                    (n, geometry.q_heads, geometry.head_dim), np.float32
                                ),
                                *rng.standard_normal((2, n, *kvd), np.float32),
                            )
                            for s in range(n_sessions)
                        ]
                        t0 = time.perf_counter()
                        attn.attend(0, reqs)
                        best = min(best, time.perf_counter() - t0)
                        for r in reqs:
                            cache.truncate(r.session, context)
                    out.append(
                        Sample(
                            Component.CPU_ATTN,
                            best,
                            tokens=n * n_sessions,
                            context=(context + n) * n_sessions,
                            sessions=n_sessions,
                        )
                    )
    return out
