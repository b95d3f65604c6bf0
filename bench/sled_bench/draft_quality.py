"""Draft models against the target: decode speed and greedy agreement.

    python -m sled_bench.draft_quality [--drafts smollm2-135m-int4 smollm2-135m-int8]
                                       [--draft-dir NAME=DIR ...] [--json out.json]

Speed: one session, greedy, `--tokens` draft tokens after a chat prompt
(prefill excluded), best of `--repeats`.

Agreement: the target (transformers, fp32) decodes each prompt greedily;
along that continuation c, the fraction of positions j where the draft's
greedy next token after prompt + c[:j] equals c[j]. Also the mean number of
tokens a greedy speculative round emits at K=4 (accepted drafts + the
target's correction/bonus), simulated along the same continuations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from sled_drafter.backends import DraftBackend, load_backend
from sled_drafter.backends.ort_genai import OrtGenaiBackend
from sled_drafter.tokenizer import Tokenizer
from sled_shared.models.registry import DRAFT_INT4, DRAFT_INT8, get_model, tokenizer_dir
from sled_shared.speculative import SamplingParams

GREEDY = SamplingParams()
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Describe a healthy breakfast.",
]


@dataclass(slots=True)
class DraftReport:
    name: str
    tokens_per_s: float
    agreement: float
    positions: int
    tokens_per_round_k4: float


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def target_continuations(target_dir: Path, prompts: list[list[int]], new: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(
                torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=2
            )
            out.append(seq[0, len(ids) :].tolist())
    return out


def speed(backend: DraftBackend, prompt: list[int], tokens: int, repeats: int) -> float:
    session = backend.open_session()
    best = float("inf")
    for _ in range(repeats):
        session.propose(prompt, 1, GREEDY, 0)  # prefill; the next call starts from its logits
        start = time.perf_counter()
        draft = session.propose(prompt, tokens, GREEDY, 0)
        best = min(best, time.perf_counter() - start)
        assert len(draft) == tokens
    session.close()
    return tokens / best


def matched_prefix(draft: list[int], ahead: list[int]) -> int:
    """How many draft tokens a greedy verifier accepts (an n-gram draft may be short)."""
    for i, (a, b) in enumerate(zip(draft, ahead, strict=False)):
        if a != b:
            return i
    return min(len(draft), len(ahead))


def agreement(backend: DraftBackend, prompts: list[list[int]], conts: list[list[int]]):
    session = backend.open_session()
    hits = total = 0
    for prompt, cont in zip(prompts, conts, strict=True):
        for j, want in enumerate(cont):
            got = session.propose(prompt + cont[:j], 1, GREEDY, 0).ids.tolist()
            hits += got == [want]
            total += 1
    emitted = rounds = 0
    for prompt, cont in zip(prompts, conts, strict=True):
        pos = 0
        while pos < len(cont):
            draft = session.propose(prompt + cont[:pos], 4, GREEDY, 0).ids.tolist()
            ahead = cont[pos : pos + 4]
            accepted = matched_prefix(draft, ahead)
            step = min(accepted + 1, len(cont) - pos)
            emitted += step
            rounds += 1
            pos += step
    session.close()
    return hits / total, total, emitted / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", nargs="*", default=[DRAFT_INT4, DRAFT_INT8])
    parser.add_argument("--draft-dir", nargs="*", default=[], metavar="NAME=DIR")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=64, help="target continuation length")
    parser.add_argument("--tokens", type=int, default=200, help="draft tokens for the speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    tok_dir = tokenizer_dir()
    tok = Tokenizer.from_dir(tok_dir)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]
    ]
    conts = target_continuations(tok_dir, prompts, args.new_tokens)
    backends: dict[str, DraftBackend] = {}
    for name in args.drafts:
        entry = get_model(name)
        options = {"threads": args.threads} if entry.kind == "ort-genai" else {}
        backends[name] = load_backend(entry, **options)
    for spec in args.draft_dir:
        name, _, path = spec.partition("=")
        backends[name] = OrtGenaiBackend(path, threads=args.threads)
    reports = []
    for name, backend in backends.items():
        rate = speed(backend, prompts[0], args.tokens, args.repeats)
        agree, positions, per_round = agreement(backend, prompts, conts)
        reports.append(DraftReport(name, rate, agree, positions, per_round))
        backend.close()

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cpus, load average "
        f"{os.getloadavg()[0]:.1f} (other processes share the cpus: speeds are lower bounds); "
        f"{len(prompts)} prompts x up to {args.new_tokens} target tokens"
    )
    print("| draft | tok/s (greedy, 1 session) | greedy agreement | tokens/round K=4 |")
    print("|---|---|---|---|")
    for r in reports:
        print(
            f"| {r.name} | {r.tokens_per_s:.1f} | {r.agreement:.3f} ({r.positions} positions) "
            f"| {r.tokens_per_round_k4:.2f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")


if __name__ == "__main__":
    main()
