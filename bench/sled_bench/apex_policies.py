"""APEX policies side by side: gpu-only, neo and apex on one workload, in one run.

    .venv/bin/python -m sled_bench.apex_policies [--sessions 12] [--max-tokens 128]
        [--gpu-kv-blocks 24] [--k 4] [--policies gpu-only neo apex]

Workload: N chat prompts on the real SmolLM2-135M target (fp32), all arriving
at once, greedy, n-gram (prompt lookup) drafts of up to K tokens. Drafters
run in-process in lockstep: each iteration every live session sends one
round and the verifier answers all of them (minus what the plan defers).
Measured, all in this process on this machine: the verifier engine, a real
kvoffload worker service (CPU attention in numpy) and a real scheduler
service, over a real nats-server. On a CPU-only machine the "accelerator"
tier is the verifier's own torch KV cache limited to --gpu-kv-blocks blocks
of 16 tokens (an emulated accelerator budget); both tiers share the same
CPU cores. Prints a markdown table: throughput, TPOT, TTFT and what each
policy did, and whether every policy produced the same tokens.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sled_drafter.backends.ngram import lookup
from sled_shared.apex.plan import Policy
from sled_shared.models.registry import DEFAULT_TARGET, get_model
from sled_shared.nats_server import NatsServer
from sled_shared.sched_client import SchedClient
from sled_shared.settings import VerifierSettings
from sled_verifier.apex_loop import ApexLoop
from sled_verifier.config import EngineConfig
from sled_verifier.engine import VerifierEngine
from transformers import AutoTokenizer

from sled_bench.apex_stack import Run, drive, record_open_tiers, stack

PROMPTS = [
    "Explain photosynthesis to a ten-year-old.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a haiku about the sea at night.",
    "Give three tips for staying focused while studying.",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "Write a short SQL query that counts rows in a table named users, and explain it.",
    "Describe how a bicycle works.",
    "What are the benefits of regular exercise?",
    "Write a short story about a robot learning to paint.",
    "Explain the difference between a list and a tuple in Python.",
    "How do airplanes stay in the air?",
    "Write a polite email asking a colleague for a meeting next week.",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ngram(history: list[int], k: int) -> np.ndarray:
    return lookup(np.asarray(history, np.int64), k, 4, 1)


def run_policy(
    engine: VerifierEngine, url: str, policy: Policy, prompts, max_new, k: int, deadline_s: float
) -> tuple[Run, dict]:
    with stack(url) as st:
        st.start_scheduler(policy.value)
        worker = f"w-{policy.value}"
        st.start_worker(worker, blocks=4096, block_size=16, threads=1)
        host = st.host_tier(engine, [worker])
        engine.kv.attach(host, offload_new=policy is not Policy.GPU_ONLY)
        sched = SchedClient(st.nc, f"v-{policy.value}", policy, deadline_s)
        loop = ApexLoop(engine, policy, sched, st.lt.loop)
        opened = record_open_tiers(engine)
        run = drive(engine, loop.execute, prompts, max_new, propose=ngram, k=k)
        forwards = host.executors[worker].forward_id
    del engine.kv.add  # the spy; back to the class's method
    engine.kv.host = None
    info = {
        "iterations": loop.stats.iterations,
        "opened_on_host": sum(t != "accel" for t in opened.values()),
        "host_forwards": forwards,
        "migrations": dict(loop.stats.migrations),
        "deferred": loop.stats.deferred,
        "plans": dict(loop.stats.plans),
    }
    return run, info


def figures(run: Run) -> dict[str, float]:
    tokens = sum(len(o) for o in run.outputs.values())
    wall = max(run.done_at.values()) - run.started
    tpot = [
        (run.done_at[i] - run.first_at[i]) / (len(o) - 1)
        for i, o in run.outputs.items()
        if len(o) > 1
    ]
    ttft = [run.first_at[i] - run.started for i in run.outputs]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "tpot_ms": 1000 * statistics.mean(tpot),
        "tpot_p90_ms": 1000 * float(np.percentile(tpot, 90)),
        "ttft_ms": 1000 * statistics.mean(ttft),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gpu-kv-blocks", type=int, default=24, help="accelerator KV budget")
    ap.add_argument("--k", type=int, default=4, help="most draft tokens per round")
    ap.add_argument("--policies", nargs="+", default=[p.value for p in Policy])
    args = ap.parse_args()
    logging.getLogger("sled_shared.bus").setLevel(logging.ERROR)  # each stack's clean close
    target = get_model(DEFAULT_TARGET).path
    tok = AutoTokenizer.from_pretrained(target)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.sessions)]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                tokenize=True, return_dict=False)
        for t in texts
    ]  # fmt: skip
    max_new = [args.max_tokens] * args.sessions
    deadline_s = VerifierSettings.from_env().plan_deadline_ms / 1000.0
    config = EngineConfig(
        target, num_blocks=args.gpu_kv_blocks, block_size=16, max_k=args.k, max_model_len=1024
    )
    engine = VerifierEngine(config)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(workdir=Path(tmp) / "nats").start()
        try:
            # Warm-up (not measured): weights into cache, kernels chosen, the worker's
            # first geometry set up.
            run_policy(engine, server.url, Policy.APEX, prompts[:2], [16, 16], args.k, deadline_s)
            for name in args.policies:
                policy = Policy(name)
                run, info = run_policy(
                    engine, server.url, policy, prompts, max_new, args.k, deadline_s
                )
                if run.errors:
                    raise SystemExit(f"{name}: sessions failed: {run.errors}")
                results[name] = (run, info, figures(run))
        finally:
            server.close()
    report(args, results, load_before, os.getloadavg(), deadline_s)


def report(args, results, load_before, load_after, deadline_s: float) -> None:
    outs = [r.outputs for r, _, _ in results.values()]
    same = all(o == outs[0] for o in outs[1:])
    print(f"## APEX policies: {args.sessions} sessions x {args.max_tokens} new tokens, greedy\n")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, no GPU (load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; other jobs share the CPU). "
        f"Target SmolLM2-135M fp32, n-gram drafts K<={args.k}. Accelerator tier: the "
        f"verifier's torch KV cache limited to {args.gpu_kv_blocks} blocks x 16 tokens "
        f"(emulated budget); host tier: one kvoffload worker, 1 attention thread; "
        f"scheduler plan deadline {deadline_s * 1000:.0f} ms. All measured in this run.\n"
    )
    print("| policy | tokens/s | TPOT mean (ms) | TPOT p90 (ms) | TTFT mean (ms) | wall (s) "
          "| iterations | opened on host | host-attention forwards | migrations | deferred "
          "| plans |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, info, f) in results.items():
        moves = ", ".join(f"{k} {v}" for k, v in info["migrations"].items()) or "-"
        plans = ", ".join(f"{k} {v}" for k, v in info["plans"].items())
        print(
            f"| {name} | {f['tok_s']:.1f} | {f['tpot_ms']:.0f} | {f['tpot_p90_ms']:.0f} "
            f"| {f['ttft_ms']:.0f} | {f['wall_s']:.1f} | {info['iterations']} "
            f"| {info['opened_on_host']} | {info['host_forwards']} | {moves} "
            f"| {info['deferred']} | {plans} |"
        )
    print(f"\nGreedy outputs identical across policies: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
