"""Input checks and per-round rules, kept apart from the engine's orchestration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .messages import VerifyRound
from .session import Session


def token_ids(ids: Sequence[int], what: str, vocab_size: int) -> np.ndarray:
    """A flat int64 array of ids inside the vocabulary, or a ValueError saying what is wrong."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be a flat list of token ids")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"{what} has ids outside the vocabulary 0..{vocab_size - 1}")
    return arr


def check_open(
    prompt: np.ndarray, resume: bool, max_model_len: int, max_new_tokens: int, stream: int
) -> None:
    if prompt.size < (2 if resume else 1):
        raise ValueError(
            "a resumed history needs the prompt and at least one generated token"
            if resume
            else "prompt must not be empty"
        )
    if prompt.size >= max_model_len:
        raise ValueError(
            f"prompt of {prompt.size} tokens leaves no room in max_model_len {max_model_len}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(stream, int) or not 0 <= stream < 2**64:
        raise ValueError(f"stream must be an int in [0, 2**64), got {stream!r}")


def round_error(s: Session, r: VerifyRound, max_k: int, vocab_size: int) -> str | None:
    """Why this (non-retry) round cannot run, or None."""
    if r.round != s.last_round + 1:
        return f"round {r.round} is not the next round (last answered: {s.last_round})"
    if s.finished:
        return f"session already finished ({s.reason})"
    if r.committed_len != len(s.tokens):
        return f"committed_len {r.committed_len} != {len(s.tokens)} committed on the verifier"
    k = r.draft_ids.shape[0]
    if k > max_k:
        return f"{k} drafts exceed max_k {max_k}"
    if k and (r.draft_ids.min() < 0 or r.draft_ids.max() >= vocab_size):
        return "draft ids outside the vocabulary"
    if not s.params.greedy and k and (r.draft_dists is None or len(r.draft_dists) != k):
        return "sampling rounds need one draft distribution per draft token"
    return None


def feedable_drafts(s: Session, r: VerifyRound, max_model_len: int) -> int:
    """Drafts past the token or length budget could never be committed: skip them."""
    room = min(s.max_new_tokens - s.generated, max_model_len - len(s.tokens))
    return min(r.draft_ids.shape[0], room - 1)


def cut_at_stop(new: list[int], stop_ids: frozenset[int]) -> list[int]:
    """The committed tokens end at the first stop token; what follows it is dropped."""
    stop_at = next((j for j, t in enumerate(new) if t in stop_ids), None)
    return new if stop_at is None else new[: stop_at + 1]


def finish_reason(s: Session, max_model_len: int) -> str | None:
    if s.tokens[-1] in s.stop_ids:
        return "stop"
    if s.generated >= s.max_new_tokens or len(s.tokens) >= max_model_len:
        return "length"
    return None
