"""How close the CPU attention kernel reads KV to the host's memory bandwidth.

Measured, not simulated: the host bandwidth is a big numpy copy on this
machine (read + write bytes per second, one thread and one thread per core),
measured right before and after each case so that both sides of the ratio
see the same background load (other work shares this machine); the kernel is
``CpuAttention.attend`` on a real ``HostKVCache`` holding ``sessions x
context`` random tokens per layer. Each timed step attends every layer once,
then the new tokens are truncated off (untimed) so the context stays fixed.
Enough layers are used that one step streams well over the last-level
cache, so the KV comes from DRAM. Both sides report their best repeat.

``--profile N`` also times N random ragged batches (SmolLM2 shape), fits the
scheduler's CPU attention cost model on them and prints its held-out error.

    PYTHONPATH=bench .venv/bin/python -m sled_bench.cpu_attention_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from sled_kvoffload.cpu_attention import AttendRequest, CpuAttention
from sled_kvoffload.host_cache import CacheConfig, HostKVCache
from sled_shared.apex.cost_model import fit_cost_model
from sled_shared.apex.profiles import Component, Sample

SHAPES = {  # name: (q heads, kv heads, head dim) of one layer
    "llama2-7b": (32, 32, 128),
    "smollm2-135m": (9, 3, 64),
}
MIN_STEP_BYTES = 512 * 2**20  # KV streamed per timed step: far above any L3 here


@dataclass(frozen=True, slots=True)
class Row:
    shape: str
    new_tokens: int
    threads: int
    layers: int
    ms_per_layer: float  # best wall time of one layer's attend for the whole batch
    kv_gbps: float  # KV bytes read per second
    host_gbps: float  # best copy bandwidth (read + write) measured around this case
    ratio: float  # kv_gbps / host_gbps


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 3, threads: int = 1) -> float:
    """Best (read + write) bytes/s of ``np.copyto`` over ``nbytes`` split across threads."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(src, threads), np.array_split(dst, threads), strict=True))
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the pages in
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def run_case(
    shape: str, sessions: int, context: int, new_tokens: int, threads: int, repeats: int
) -> tuple[float, int, int]:
    """Best seconds per layer, KV bytes read per layer, layers used."""
    hq, hkv, d = SHAPES[shape]
    per_layer = sessions * (context + new_tokens) * 2 * hkv * d * 4
    layers = max(1, -(-MIN_STEP_BYTES // per_layer))
    block = 16
    blocks = sessions * -(-(context + new_tokens) // block)
    cache = HostKVCache(CacheConfig(layers, hkv, d, blocks, block))
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(sessions)]
    for layer in range(layers):
        for s in ids:
            kv = rng.standard_normal((context, hkv, d), dtype=np.float32)
            cache.append(s, layer, kv, kv)
    reqs = [
        AttendRequest(
            s,
            rng.standard_normal((new_tokens, hq, d), dtype=np.float32),
            rng.standard_normal((new_tokens, hkv, d), dtype=np.float32),
            rng.standard_normal((new_tokens, hkv, d), dtype=np.float32),
        )
        for s in ids
    ]
    times = []
    with CpuAttention(cache, q_heads=hq, threads=threads) as attn:
        for step in range(repeats + 1):  # step 0 warms up
            t0 = time.perf_counter()
            for layer in range(layers):
                attn.attend(layer, reqs)
            if step:
                times.append((time.perf_counter() - t0) / layers)
            for s in ids:
                cache.truncate(s, context)
    return min(times), sessions * (context + new_tokens) * 2 * hkv * d * 4, layers


def profile_cpu_attention(samples: int, threads: int, seed: int = 0) -> list[Sample]:
    """Measured CPU_ATTN samples: random sessions, new tokens and ragged contexts."""
    hq, hkv, d = SHAPES["smollm2-135m"]
    rng = np.random.default_rng(seed)
    cache = HostKVCache(CacheConfig(1, hkv, d, num_blocks=16 * 2 * 4096 // 16, block_size=16))
    out = []
    with CpuAttention(cache, q_heads=hq, threads=threads) as attn:
        for i in range(samples):
            sessions = int(rng.integers(1, 17))
            n = int(rng.integers(1, 10))
            ctx = rng.integers(16, 4096, size=sessions)
            ids = [f"p{i}-{j}" for j in range(sessions)]
            for sid, c in zip(ids, ctx, strict=True):
                kv = rng.standard_normal((int(c), hkv, d), dtype=np.float32)
                cache.append(sid, 0, kv, kv)
            reqs = [
                AttendRequest(
                    sid,
                    rng.standard_normal((n, hq, d), dtype=np.float32),
                    rng.standard_normal((n, hkv, d), dtype=np.float32),
                    rng.standard_normal((n, hkv, d), dtype=np.float32),
                )
                for sid in ids
            ]
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                attn.attend(0, reqs)
                times.append(time.perf_counter() - t0)
                for sid, c in zip(ids, ctx, strict=True):
                    cache.truncate(sid, int(c))
            tokens, context = sessions * n, int(ctx.sum()) + sessions * n
            out.append(
                Sample(Component.CPU_ATTN, float(np.median(times)), tokens, context, sessions)
            )
            for sid in ids:
                cache.evict(sid)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", default="1,5")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, help="random batches to fit a model on")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1

    def host_bw() -> float:
        return max(copy_bandwidth(threads=1), copy_bandwidth(threads=cores))

    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores")
    print(f"{args.sessions} sessions x {args.context} context, measured\n")
    print("| shape | new tokens | threads | layers | ms/layer | KV GB/s | host copy GB/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in SHAPES:
        for n in (int(x) for x in args.new_tokens.split(",")):
            for th in sorted({int(x) for x in args.threads.split(",")}):
                before = host_bw()
                sec, nbytes, layers = run_case(
                    shape, args.sessions, args.context, n, th, args.repeats
                )
                bw = max(before, host_bw())
                row = Row(
                    shape, n, th, layers, sec * 1e3, nbytes / sec / 1e9, bw / 1e9, nbytes / sec / bw
                )
                rows.append(row)
                print(
                    f"| {shape} | {n} | {th} | {layers} | {row.ms_per_layer:.2f} | "
                    f"{row.kv_gbps:.1f} | {row.host_gbps:.1f} | {row.ratio:.0%} |"
                )
    fit_error = None
    if args.profile:
        samples = profile_cpu_attention(args.profile, threads=cores)
        fit_error = fit_cost_model(samples).errors[Component.CPU_ATTN]
        print(
            f"\ncpu_attn cost model on {len(samples)} measured ragged batches "
            f"(smollm2 shape, {cores} threads): held-out mean abs relative error "
            f"{fit_error:.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "cores": cores,
                    "rows": [asdict(r) for r in rows],
                    "cpu_attn_fit_error": fit_error,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
