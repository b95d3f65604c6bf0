"""Causal attention of a ragged batch of new tokens over host-resident KV.

Decode-time attention reads the whole KV cache once per layer and does a few
flops per byte, so it is bound by memory bandwidth; the kernel is shaped to
stream each session's KV once:

* Grouped-query heads: the ``group * n`` query rows that share a kv head
  are multiplied with its keys together, stacked over kv heads by
  ``np.matmul``: no Python loop per token or head.
* Keys and values are read in place from the host store's head-major block
  runs (each head of a run is one contiguous matrix; no gather copy).
* Few rows: each row is its own matrix-vector product, broadcast by
  ``np.matmul``, so OpenBLAS runs gemv, which streams the keys once from
  memory and re-reads them from L2 for the other rows; for a few rows the
  packing gemm it would otherwise pick measured up to 2x slower here. Many
  rows (large groups times many new tokens): one gemm per kv head.
* Sessions run on a thread pool (numpy releases the GIL inside BLAS and
  ufuncs), balanced by their KV size, with BLAS single-threaded in it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sled_kvoffload import blas_threads
from sled_kvoffload.host_cache import DTYPE, HostKVCache

# Rows per kv head up to which per-row gemv beats one gemm (measured; see module doc).
GEMV_MAX_ROWS = 8


@dataclass(frozen=True, slots=True)
class AttendRequest:
    session: str
    q: np.ndarray  # [n, q_heads, head_dim]: queries of the round's new tokens (RoPE applied)
    k: np.ndarray  # [n, kv_heads, head_dim]: their keys, appended before attending
    v: np.ndarray  # [n, kv_heads, head_dim]: their values

    def __post_init__(self) -> None:
        if self.q.ndim != 3 or self.k.ndim != 3 or self.k.shape != self.v.shape:
            raise ValueError(
                f"session {self.session!r}: q must be [n, hq, d] and k, v equal [n, hkv, d]; "
                f"got {self.q.shape}, {self.k.shape}, {self.v.shape}"
            )
        if self.q.shape[0] != self.k.shape[0] or self.q.shape[0] == 0:
            raise ValueError(
                f"session {self.session!r}: q and k/v must have the same n >= 1 new tokens"
            )


@functools.lru_cache(maxsize=64)
def _causal_bias(group: int, n: int) -> np.ndarray:
    """[group * n, n] additive mask over the new tokens' own columns.

    Row ``g * n + j`` is query token j; it may see new token c only if c <= j.
    """
    bias = np.triu(np.full((n, n), -np.inf, DTYPE), k=1)
    out = np.tile(bias, (group, 1))
    out.setflags(write=False)
    return out


def attend_runs(
    q: np.ndarray, runs: Sequence[tuple[np.ndarray, np.ndarray]], scale: float
) -> np.ndarray:
    """Attention of new tokens ``q`` [n, hq, d] over one session's KV runs.

    ``runs`` are head-major ``(k, v)`` views ``[hkv, t_r, d]`` that together
    hold the whole context, the n new tokens last. Returns float32 ``[n, hq, d]``.
    """
    n, hq, d = q.shape
    hkv = runs[0][0].shape[0]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    group = hq // hkv
    rows = group * n
    total = sum(k.shape[1] for k, _ in runs)
    if total < n:
        raise ValueError(f"context holds {total} tokens, fewer than the {n} new ones")
    # rows ordered (group member, token) per kv head: query head h uses kv head h // group
    qs = (q.astype(DTYPE, copy=False) * DTYPE(scale)).reshape(n, hkv, group, d)
    # C order matters: numpy walks the stacked products in the operands' memory order,
    # and a row-major view would stream every kv head's keys once per row (measured 2x).
    qs = np.ascontiguousarray(qs.transpose(1, 2, 0, 3)).reshape(hkv, rows, d)
    gemv = rows <= GEMV_MAX_ROWS
    if gemv:
        qs = qs[:, :, None, :]  # [hkv, rows, 1, d]: a stack of row vectors
    parts = []
    for k, _ in runs:
        kt = k.transpose(0, 2, 1)  # [hkv, d, t_r]
        parts.append((qs @ kt[:, None]).reshape(hkv, rows, -1) if gemv else qs @ kt)
    s = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)  # [hkv, rows, total]
    if n > 1:
        s[..., total - n :] += _causal_bias(group, n)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    denom = s.sum(axis=-1, keepdims=True)
    out = None
    start = 0
    for _, v in runs:
        stop = start + v.shape[1]
        p = s[..., start:stop]
        part = (p[:, :, None, :] @ v[:, None]).reshape(hkv, rows, d) if gemv else p @ v
        if out is None:
            out = part
        else:
            out += part
        start = stop
    out /= denom
    return out.reshape(hkv, group, n, d).transpose(2, 0, 1, 3).reshape(n, hq, d)


class CpuAttention:
    """Append + attend for a batch of offloaded sessions, one layer at a time."""

    def __init__(
        self, cache: HostKVCache, q_heads: int, threads: int = 0, scale: float | None = None
    ) -> None:
        hkv = cache.config.kv_heads
        if q_heads <= 0 or q_heads % hkv:
            raise ValueError(f"q_heads={q_heads} must be a positive multiple of kv_heads={hkv}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: one per core), got {threads}")
        self.cache = cache
        self.q_heads = q_heads
        self.threads = threads or os.cpu_count() or 1
        self.scale = 1.0 / math.sqrt(cache.config.head_dim) if scale is None else scale
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="cpu-attn")
            if self.threads > 1
            else None
        )
        # Parallelism is over sessions, so BLAS runs single-threaded (process-wide,
        # see blas_threads) until close().
        blas_threads.hold_single()
        self._held = True

    def attend(
        self,
        layer: int,
        requests: Sequence[AttendRequest],
        stored: Mapping[str, int] | None = None,
    ) -> list[np.ndarray]:
        """Append each request's k/v to ``layer``, return its attention ``[n, hq, d]``.

        ``stored`` maps sessions whose k/v are already in the cache (a retried
        request) to the length of the prefix that ends with them: those are
        attended over that prefix and not appended again.
        """
        stored = stored or {}
        seen: set[str] = set()
        for r in requests:
            if r.session in seen:
                raise ValueError(f"session {r.session!r} appears twice in one attend batch")
            seen.add(r.session)
            if r.q.shape[1:] != (self.q_heads, self.cache.config.head_dim):
                raise ValueError(
                    f"session {r.session!r}: q must be [n, {self.q_heads}, "
                    f"{self.cache.config.head_dim}], got {r.q.shape}"
                )
        # All or nothing: a batch that does not fit changes no cache, so it can be retried.
        fresh = [r for r in requests if r.session not in stored]
        self.cache.check_appends([(r.session, layer, r.k.shape[0]) for r in fresh])
        # Appends mutate the block tables: done here, in the owner thread.
        for r in fresh:
            self.cache.append(r.session, layer, r.k, r.v)
        jobs = [(r.q, self.cache.runs(r.session, layer, stored.get(r.session))) for r in requests]
        if self._pool is None or len(jobs) < 2:
            return [attend_runs(q, runs, self.scale) for q, runs in jobs]
        return self._run_parallel(jobs)

    def _run_parallel(self, jobs: list) -> list[np.ndarray]:
        # Longest-first greedy onto the least loaded thread: one task per thread.
        costs = [sum(k.shape[1] for k, _ in runs) for _, runs in jobs]  # KV tokens streamed
        shares: list[list[int]] = [[] for _ in range(min(self.threads, len(jobs)))]
        load = [0.0] * len(shares)
        for i in sorted(range(len(jobs)), key=costs.__getitem__, reverse=True):
            t = load.index(min(load))
            shares[t].append(i)
            load[t] += costs[i]

        def work(idx: list[int]) -> list[tuple[int, np.ndarray]]:
            return [(i, attend_runs(jobs[i][0], jobs[i][1], self.scale)) for i in idx]

        results: list[np.ndarray | None] = [None] * len(jobs)
        for part in self._pool.map(work, shares):
            for i, out in part:
                results[i] = out
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._held:
            blas_threads.release_single()
            self._held = False

    def __enter__(self) -> CpuAttention:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
