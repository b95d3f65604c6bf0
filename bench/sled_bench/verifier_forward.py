"""Forward time of the verifier's own runner vs transformers, on the real target.

    PYTHONPATH=bench .venv/bin/python -m sled_bench.verifier_forward [--model DIR] [--iters N]

Shapes: decode (1 session x 1 new token) and a verify batch (4 sessions x 5
new tokens, i.e. K = 4), each session holding ~100 tokens of context. The KV is
rolled back after every step so each iteration sees the same context. Runs as
the service does: with the OpenMP wait policy that importing sled_verifier sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

# isort: off
import sled_verifier  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: on
import numpy as np
import torch
from sled_shared.models.registry import DEFAULT_TARGET, get_model
from sled_verifier.block_manager import BlockManager
from sled_verifier.config import EngineConfig
from sled_verifier.model_runner import ModelRunner, SeqRequest
from transformers import AutoModelForCausalLM, DynamicCache


def _time(fn, iters: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def runner_steps(model_dir: Path, shapes: list[tuple[int, int]], context: int):
    """One runner; per (sessions, new tokens) shape, a callable running one such forward."""
    total = sum(n * (context + new) for n, new in shapes)
    runner = ModelRunner(EngineConfig(model_dir=model_dir, num_blocks=total // 16 + 16))
    blocks = BlockManager(runner.num_blocks, runner.block_size)
    rng = np.random.default_rng(0)
    vocab = runner.spec.vocab_size
    steps = []
    for shape, (sessions, new) in enumerate(shapes):
        reqs = []
        for i in range(sessions):
            sid = f"{shape}-{i}"
            blocks.add(sid)
            blocks.allocate(sid, context)
            ids = rng.integers(0, vocab, context)
            runner.run([SeqRequest(sid, ids, 0, blocks.block_table(sid), [context - 1])])
            blocks.allocate(sid, new)
            table = blocks.block_table(sid)
            reqs.append(SeqRequest(sid, rng.integers(0, vocab, new), context, table, range(new)))
        # Each call rewrites the same slots past `context`: a fully rejected round's rollback.
        steps.append(lambda reqs=reqs: runner.run(reqs))
    return steps


def transformers_decode(model_dir: Path, context: int):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    step = torch.randint(0, model.config.vocab_size, (1, 1))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, cache=cache, use_cache=True)

    def decode() -> None:
        with torch.inference_mode():
            model(step, cache=cache, use_cache=True)
            cache.crop(-1)  # drop the step just added

    return decode


def _row(name: str, threads: int, times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {
        "shape": name,
        "threads": threads,
        "median_ms": round(med * 1e3, 2),
        "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, 2),
        "tokens": tokens,
        "ms_per_token": round(med * 1e3 / tokens, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF dir (default: cached target)")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model_dir = args.model or get_model(DEFAULT_TARGET).path
    decode, verify = runner_steps(model_dir, [(1, 1), (4, 5)], args.context)
    hf_decode = transformers_decode(model_dir, args.context)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, fn, tokens in (
            ("ours 1x1 decode", decode, 1),
            ("ours 4x5 verify", verify, 20),
            ("transformers 1x1 decode", hf_decode, 1),
        ):
            rows.append(_row(name, threads, _time(fn, args.iters), tokens))
    if args.json:
        print(json.dumps(rows))
        return
    load = os.getloadavg()[0]
    print(
        f"machine: {platform.machine()} x{os.cpu_count()} cpus, load avg {load:.1f}, "
        f"context {args.context}, {args.iters} iters"
    )
    print("| shape | threads | median ms | p90 ms | ms/token |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['threads']} | {r['median_ms']} | {r['p90_ms']} "
            f"| {r['ms_per_token']} |"
        )


if __name__ == "__main__":
    main()
