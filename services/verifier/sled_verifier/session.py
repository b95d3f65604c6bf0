"""Per-session state on the verifier and the draft-length policy."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from sled_shared.speculative import SamplingParams

from .messages import RoundResult

# Acceptance-rate EWMA: prior before any round, and the weight of the newest round.
ACCEPT_PRIOR = 0.6
ACCEPT_WEIGHT = 0.3
# Draft i (1-based) is sent while the chance it is reached and accepted, rate**i, stays above this.
WORTH_DRAFTING = 0.35
# Server load (0..1) from which K starts shrinking; at load 1 it is 0 (plain decoding).
LOAD_KNEE = 0.5


@dataclass(slots=True)
class Session:
    session_id: str
    tokens: list[int]  # prompt + committed generated tokens; KV holds all but the last
    prompt_len: int
    params: SamplingParams
    seed: int  # params.seed, or one picked at open when that is None
    stream: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    finished: bool = False
    reason: str | None = None
    last_round: int = 0
    last_result: RoundResult | None = None
    accept_rate: float = ACCEPT_PRIOR
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if not 0 < self.prompt_len <= len(self.tokens):
            raise ValueError("session needs a non-empty prompt inside its tokens")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted > 0:
            rate = accepted / drafted
            self.accept_rate += ACCEPT_WEIGHT * (rate - self.accept_rate)


def suggest_k(accept_rate: float, max_k: int, load: float) -> int:
    """Drafts worth sending next round, shrunk toward 0 as the server's load nears 1."""
    if not 0.0 <= load <= 1.0:
        raise ValueError(f"load must be in [0, 1], got {load}")
    rate = min(max(accept_rate, 0.0), 1.0)
    if rate >= WORTH_DRAFTING ** (1 / max_k):
        k = max_k
    elif rate <= WORTH_DRAFTING:
        k = 1
    else:
        k = int(math.log(WORTH_DRAFTING) / math.log(rate))
    scale = min(1.0, (1.0 - load) / (1.0 - LOAD_KNEE))
    return max(0, min(max_k, math.floor(k * scale + 1e-9)))
