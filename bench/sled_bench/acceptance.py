"""Acceptance per draft kind, measured with real weights through the in-process loop.

    .venv/bin/python -m sled_bench.acceptance [--max-tokens 64] [--k 4] [--fixed-k]

For each draft kind, the ten prompts of the greedy losslessness test run as ten
concurrent sessions through one verifier; prints a markdown table: acceptance
rate (accepted / drafted), mean tokens committed per round, draft time per
drafted token, verifier time per round, end-to-end tokens/s.
"""

from __future__ import annotations

import argparse
import platform
import time

from sled_drafter.backends import load_backend
from sled_drafter.tokenizer import Tokenizer
from sled_shared.models.registry import DEFAULT_TARGET, DRAFT_INT4, DRAFT_INT8, NGRAM, get_model
from sled_shared.speculative import SamplingParams
from sled_verifier.config import EngineConfig
from sled_verifier.engine import VerifierEngine

from sled_bench.inprocess import generate
from sled_bench.prompts import CHAT_PROMPTS as PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--fixed-k", action="store_true", help="keep K fixed instead of adaptive")
    ap.add_argument("--kinds", nargs="+", default=[DRAFT_INT4, DRAFT_INT8, NGRAM])
    args = ap.parse_args()
    target = get_model(DEFAULT_TARGET).path
    tok = Tokenizer.from_dir(target)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    engine = VerifierEngine(EngineConfig(target))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{len(PROMPTS)} concurrent sessions, {args.max_tokens} new tokens, K={args.k}"
          f"{' fixed' if args.fixed_k else ' adaptive'}, greedy; measured")
    print("| draft | acceptance | tokens/round | draft ms/token "
          "| verify ms/round (share of batch) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        backend = load_backend(get_model(kind))
        t0 = time.perf_counter()
        gens = generate(engine, [backend], prompts, SamplingParams(), args.max_tokens, args.k,
                        adaptive_k=not args.fixed_k)
        wall = time.perf_counter() - t0
        drafted = sum(g.drafted for g in gens)
        accepted = sum(g.accepted for g in gens)
        rounds = sum(g.rounds for g in gens)
        tokens = sum(len(g.token_ids) for g in gens)
        draft_s = sum(g.draft_s for g in gens)
        verify_s = sum(g.verify_s for g in gens)
        print(f"| {kind} | {accepted / max(drafted, 1):.3f} | {(accepted + rounds) / rounds:.2f} "
              f"| {1e3 * draft_s / max(drafted, 1):.1f} | {1e3 * verify_s / rounds:.1f} "
              f"| {tokens / wall:.1f} |")
        backend.close()


if __name__ == "__main__":
    main()
