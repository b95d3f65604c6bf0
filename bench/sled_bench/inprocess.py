"""Draft + verify rounds for one or several sessions in one process, no NATS.

The harness that proves the core before the services exist, and the baseline the
bus overhead is measured against: each round, every live session drafts K
tokens with its own backend, then ONE batched verifier forward checks them all.

    .venv/bin/python -m sled_bench.inprocess --draft smollm2-135m-int4 --prompt "Hi"
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sled_drafter.backends import DraftBackend, DraftSession, load_backend
from sled_drafter.tokenizer import Tokenizer
from sled_shared.models.registry import DEFAULT_TARGET, get_model
from sled_shared.speculative import SamplingParams
from sled_verifier.config import EngineConfig
from sled_verifier.engine import VerifierEngine
from sled_verifier.messages import VerifyRound


@dataclass(slots=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated tokens only
    text: str = ""
    finish_reason: str | None = None
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    ttft_s: float = 0.0  # open (prefill + first token)
    tpot_s: float = 0.0  # mean time per token after the first
    draft_s: float = 0.0  # time this session spent drafting
    verify_s: float = 0.0  # share of batched verify time spent on this session's rounds

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens committed per round (accepted drafts + the verifier's token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclass(slots=True)
class _Live:
    gen: Generation
    draft: DraftSession
    session_id: str
    history: list[int]
    stream: int  # keys this session's randomness, as a drafter's request id would
    k: int
    started: float


def generate(
    engine: VerifierEngine,
    drafts: Sequence[DraftBackend],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    max_new_tokens: int,
    k: int = 4,
    adaptive_k: bool = True,
) -> list[Generation]:
    """Generate for every prompt at once; prompt i drafts with drafts[i % len(drafts)]."""
    if params.seed is None and not params.greedy:
        params = SamplingParams(params.temperature, params.top_p, params.top_k,
                                secrets.randbits(63))
    live: list[_Live] = []
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        opened = engine.open_session(list(prompt), params, max_new_tokens, stream=i)
        gen = Generation(list(prompt), [opened.first_token], finish_reason=opened.reason)
        gen.ttft_s = time.perf_counter() - started
        session = drafts[i % len(drafts)].open_session()
        live.append(_Live(gen, session, opened.session_id, [*prompt, opened.first_token], i,
                          k, time.perf_counter()))
        if opened.finished:
            _finish(engine, live[-1])
    while active := [s for s in live if s.gen.finish_reason is None]:
        rounds = []
        for s in active:
            t0 = time.perf_counter()
            d = s.draft.propose(s.history, s.k, params, stream=s.stream)
            s.gen.draft_s += time.perf_counter() - t0
            rounds.append(VerifyRound(s.session_id, s.gen.rounds + 1, len(s.history), d.ids,
                                      d.dists))
        t0 = time.perf_counter()
        results = engine.verify(rounds)
        share = (time.perf_counter() - t0) / len(active)
        for s, r, res in zip(active, rounds, results, strict=True):
            if res.error:
                raise RuntimeError(f"verifier refused round {res.round}: {res.error}")
            new = [*r.draft_ids[: res.accepted].tolist(), res.next_token]
            s.history.extend(new)
            s.gen.token_ids.extend(new)
            s.gen.rounds += 1
            s.gen.drafted += int(r.draft_ids.shape[0])
            s.gen.accepted += res.accepted
            s.gen.verify_s += share
            if adaptive_k:
                s.k = res.suggested_k
            if res.finished:
                s.gen.finish_reason = res.reason
                _finish(engine, s)
    return [s.gen for s in live]


def _finish(engine: VerifierEngine, s: _Live) -> None:
    n = len(s.gen.token_ids)
    if n > 1:
        s.gen.tpot_s = (time.perf_counter() - s.started) / (n - 1)
    s.draft.close()
    engine.close(s.session_id)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", action="append", required=True, help="repeat for more sessions")
    ap.add_argument("--draft", action="append", default=None, help="draft model name(s)")
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    target = get_model(args.target)
    tok = Tokenizer.from_dir(target.path)
    engine = VerifierEngine(EngineConfig(target.path))
    backends = [load_backend(get_model(name)) for name in args.draft or ["smollm2-135m-int4"]]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompt]
    params = SamplingParams(args.temperature, args.top_p, 0, args.seed)
    for gen in generate(engine, backends, prompts, params, args.max_tokens, args.k):
        gen.text = tok.decode(gen.token_ids)
        out = asdict(gen) | {"acceptance": gen.acceptance,
                             "mean_accepted_len": gen.mean_accepted_len}
        out.pop("prompt_ids")
        print(json.dumps(out, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o))


if __name__ == "__main__":
    main()
