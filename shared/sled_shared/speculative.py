"""Sampling and speculative-verification maths: the losslessness core (numpy only).

Everything here is shared by the drafter (which samples draft tokens) and the
verifier (which accepts or corrects them), so both sides apply the same
temperature / top-k / top-p semantics and draw from the same random streams.

The verification rule (Leviathan et al. 2023; Chen et al. 2023): a draft token
x drawn from q is accepted with probability min(1, p(x)/q(x)); on rejection a
token is drawn from r = norm(max(0, p - q)). Then

    P(emit y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(p(x), q(x))) r(y)
              = min(p(y), q(y)) + max(0, p(y) - q(y)) = p(y),

so the emitted token is distributed exactly as the target's p, whatever q is.
The identity needs the accept uniform to be independent of the draft draw and
of the resample draw, hence a separate random stream per `Purpose`.

Uniforms are keyed by absolute position, so a later round reuses keys: after
a rejection at position j the next round drafts j+1 again with the same DRAFT
key. That is still exact, because the discarded draft at j+1 was never judged
(its ACCEPT uniform was not drawn) and so influenced nothing emitted; every
(position, purpose) uniform decides at most one emitted token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sled_shared.sampling import (
    Purpose,
    SamplingParams,
    draft_distribution,
    position_rng,
    sample,
    sparse_topk,
    target_probs,
)

__all__ = [
    "Purpose",
    "SamplingParams",
    "VerifyOutcome",
    "draft_distribution",
    "position_rng",
    "sample",
    "sparse_topk",
    "target_probs",
    "verify_greedy",
    "verify_sampling",
]

# Below this residual mass p and q agree to within 1e-12 in total variation;
# what is left of max(0, p - q) is rounding noise, so we sample from p, which
# changes the output distribution by less than 1e-12.
_RESIDUAL_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    accepted: int
    next_token: int

    def __post_init__(self) -> None:
        if self.accepted < 0:
            raise ValueError(f"accepted must be >= 0, got {self.accepted}")
        if self.next_token < 0:
            raise ValueError(f"next_token must be >= 0, got {self.next_token}")


def _check_rows(draft_ids: np.ndarray, rows: np.ndarray, what: str) -> np.ndarray:
    if draft_ids.ndim != 1:
        raise ValueError(f"draft_ids must be 1-D, got shape {draft_ids.shape}")
    k = draft_ids.shape[0]
    if rows.ndim != 2 or rows.shape[0] != k + 1:
        raise ValueError(f"{what} must have shape [K+1, V] = [{k + 1}, V], got {rows.shape}")
    if k and (draft_ids.min() < 0 or draft_ids.max() >= rows.shape[1]):
        raise ValueError("draft_ids out of the vocabulary range")
    return draft_ids


def verify_greedy(draft_ids: np.ndarray, target_logits: np.ndarray) -> VerifyOutcome:
    """Accept the longest prefix of the draft equal to the target's argmax."""
    logits = np.asarray(target_logits)
    draft = _check_rows(np.asarray(draft_ids), logits, "target_logits")
    best = np.argmax(logits, axis=1)
    mismatch = np.flatnonzero(best[:-1] != draft)
    accepted = int(mismatch[0]) if mismatch.shape[0] else draft.shape[0]
    return VerifyOutcome(accepted=accepted, next_token=int(best[accepted]))


def _draft_q(
    dist: tuple[np.ndarray, np.ndarray], x: int, vocab: int, i: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Checked, normalised sparse q of draft token i and q(x)."""
    q_ids = np.asarray(dist[0], dtype=np.int64)
    q = np.asarray(dist[1], dtype=np.float64)
    if q_ids.ndim != 1 or q_ids.shape[0] == 0 or q.shape != q_ids.shape:
        raise ValueError(f"draft distribution {i}: ids and probs must be 1-D, non-empty, equal")
    ordered = np.sort(q_ids)
    if ordered[0] < 0 or ordered[-1] >= vocab or np.any(ordered[1:] == ordered[:-1]):
        raise ValueError(f"draft distribution {i}: ids must be unique and inside the vocabulary")
    if np.any(q < 0):
        raise ValueError(f"draft distribution {i}: probabilities must be >= 0")
    hit = np.flatnonzero(q_ids == x)
    if hit.shape[0] != 1 or not q[hit[0]] > 0:
        raise ValueError(f"draft token {x} at index {i} is not in its distribution's support")
    q = q / q.sum()
    return q_ids, q, float(q[hit[0]])


def _correction(p: np.ndarray, q_ids: np.ndarray, q: np.ndarray, rng: np.random.Generator) -> int:
    """Draw from norm(max(0, p - q)), q being zero outside q_ids."""
    residual = p.copy()
    residual[q_ids] -= q
    np.maximum(residual, 0.0, out=residual)
    return sample(None, residual if residual.sum() > _RESIDUAL_EPS else p, rng)


def verify_sampling(
    draft_ids: np.ndarray,
    draft_dists: list[tuple[np.ndarray, np.ndarray]],
    target_p: np.ndarray,
    seed: int,
    stream: int,
    start_position: int,
) -> VerifyOutcome:
    """Speculative sampling over one round; see the module docstring for why it is exact.

    `target_p` rows are target_probs output (each sums to 1); row i is p for
    position start_position + i, row K the bonus position.
    """
    p_rows = np.asarray(target_p, dtype=np.float64)
    draft = _check_rows(np.asarray(draft_ids), p_rows, "target_p")
    if len(draft_dists) != draft.shape[0]:
        raise ValueError(f"need one draft distribution per draft token, got {len(draft_dists)}")
    for i, x in enumerate(draft.tolist()):
        q_ids, q, qx = _draft_q(draft_dists[i], x, p_rows.shape[1], i)
        p = p_rows[i]
        pos = start_position + i
        # u < min(1, p/q)  <=>  u * q < p, with no division by q.
        if position_rng(seed, stream, pos, Purpose.ACCEPT).random() * qx < p[x]:
            continue
        resample_rng = position_rng(seed, stream, pos, Purpose.RESAMPLE)
        return VerifyOutcome(i, _correction(p, q_ids, q, resample_rng))
    k = draft.shape[0]
    bonus_rng = position_rng(seed, stream, start_position + k, Purpose.RESAMPLE)
    return VerifyOutcome(k, sample(None, p_rows[k], bonus_rng))
