"""What the engine takes and gives back: rounds, results, counters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINISH_REASONS = ("stop", "length")


class CapacityError(RuntimeError):
    """The verifier cannot take this session now (KV blocks or session slots exhausted)."""


@dataclass(frozen=True, slots=True)
class OpenResult:
    session_id: str
    first_token: int
    finished: bool
    reason: str | None  # "stop" | "length" | None


@dataclass(slots=True)
class VerifyRound:
    session_id: str
    round: int  # 1 for the first round after open, then +1 per round
    committed_len: int  # prompt + generated tokens the drafter holds as committed
    draft_ids: np.ndarray  # [K] int, K >= 0
    # Per draft token, the (ids int32 [k_i], probs float64 [k_i]) it was sampled from;
    # required when the session samples, ignored when greedy.
    draft_dists: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.draft_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"draft_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        self.draft_ids = ids.astype(np.int64, copy=False)


@dataclass(frozen=True, slots=True)
class RoundResult:
    session_id: str
    round: int
    accepted: int  # draft tokens accepted, a prefix of the round's drafts
    next_token: int  # correction (after a rejection) or bonus (all accepted); -1 on error
    finished: bool
    reason: str | None  # "stop" | "length" | None
    suggested_k: int  # drafts to send next round; 0 means plain decoding
    error: str | None = None
    # The wire error code for `error`: bad_request, unknown_session or at_capacity.
    error_code: str | None = None

    @classmethod
    def failed(cls, r: VerifyRound, error: str, code: str = "bad_request") -> RoundResult:
        return cls(r.session_id, r.round, 0, -1, False, None, 0, error, code)


@dataclass(frozen=True, slots=True)
class ForwardStat:
    """One forward pass, for the service's histograms."""

    kind: str  # "prefill" | "verify"
    seconds: float
    sessions: int
    tokens: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    active_sessions: int  # sessions holding KV (not finished, not closed)
    sessions: int  # session records kept, finished ones included
    kv_blocks_used: int
    kv_blocks_total: int
    forwards_total: int
    forward_seconds_total: float
    tokens_total: int  # tokens fed through forwards
    rounds_total: int  # rounds answered (repeats not counted)
    draft_tokens_total: int
    accepted_tokens_total: int
