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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

_U64 = 1 << 64

# Below this residual mass p and q agree to within 1e-12 in total variation;
# what is left of max(0, p - q) is rounding noise, so we sample from p, which
# changes the output distribution by less than 1e-12.
_RESIDUAL_EPS = 1e-12

# First guess for how many top tokens a top-p nucleus needs (doubled until the
# nucleus fits); typical nuclei of a 49152-token vocabulary are far smaller.
_NUCLEUS_GUESS = 64


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must satisfy 0 < top_p <= 1, got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _U64
        ):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Purpose(IntEnum):
    DRAFT = 0
    ACCEPT = 1
    RESAMPLE = 2
    FIRST = 3


def position_rng(seed: int, stream: int, position: int, purpose: Purpose) -> np.random.Generator:
    """A generator owned by one (seed, stream, position, purpose).

    Philox is counter based: the 128-bit key holds (seed, stream) and the two
    high words of the 256-bit counter hold (position, purpose). Draws advance
    only the low word, so two keys share a block only after 2**128 draws, and
    the stream is a pure function of the key on every host.
    """
    for name, value in (("seed", seed), ("stream", stream), ("position", position)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0 <= int(value) < _U64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value!r}")
    key = np.array([int(seed), int(stream)], dtype=np.uint64)
    counter = np.array([0, 0, int(position), int(Purpose(purpose))], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def _greedy_rows(logits: np.ndarray) -> np.ndarray:
    out = np.zeros(logits.shape, dtype=np.float64)
    out[np.arange(logits.shape[0]), np.argmax(logits, axis=1)] = 1.0
    return out


def _top_p_keep(probs: np.ndarray, top_p: float, candidates: np.ndarray | None) -> np.ndarray:
    """Ids of the top-p nucleus of one probability row.

    transformers' rule: sort ascending, remove every token whose cumulative
    probability (itself plus all smaller ones) is <= 1 - top_p, keep the
    largest token always. So the nucleus is the smallest set of highest
    tokens with mass >= top_p. Equal probabilities rank by lower id first
    (as argmax does), which makes a tiny top_p agree with greedy.

    `candidates` (the top-k survivors) bounds the search; without it the top
    tokens are found by argpartition, doubling the guess until the nucleus
    ends inside it, so no full-vocabulary sort is needed.
    """
    vocab = probs.shape[0]
    budget = 1.0 - top_p
    m = vocab if candidates is not None else min(vocab, _NUCLEUS_GUESS)
    while True:
        if candidates is not None:
            cand = candidates
        elif m >= vocab:
            cand = np.arange(vocab)
        else:
            # Take every token tied with the m-th largest so that everything
            # outside `cand` is strictly smaller than everything inside.
            threshold = np.partition(probs, vocab - m)[vocab - m]
            cand = np.flatnonzero(probs >= threshold)
        outside = probs.sum() - probs[cand].sum() if cand.shape[0] < vocab else 0.0
        # Ascending by probability, higher id first among ties (so it is removed first).
        order = cand[np.lexsort((-cand, probs[cand]))]
        cum = outside + np.cumsum(probs[order])
        removed = cum <= budget
        removed[-1] = False
        if removed[0] or candidates is not None or cand.shape[0] >= vocab:
            return order[~removed]
        m *= 2


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Rows of the sampling distribution: temperature -> top-k -> top-p, in float64.

    Greedy params give one-hot rows at the argmax (lowest id among ties).
    Top-k keeps every token >= the k-th largest logit (ties at the edge all
    survive, as in transformers' TopKLogitsWarper).
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [n, V] with V > 0, got {logits.shape}")
    if params.greedy:
        return _greedy_rows(logits)
    x = logits.astype(np.float64) / params.temperature
    vocab = x.shape[1]
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if top_k:
        kth = np.partition(x, vocab - top_k, axis=1)[:, vocab - top_k : vocab - top_k + 1]
        x = np.where(x >= kth, x, -np.inf)
    x = x - x.max(axis=1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=1, keepdims=True)
    if params.top_p < 1.0:
        for row in probs:
            keep = _top_p_keep(row, params.top_p, np.flatnonzero(row) if top_k else None)
            kept = row[keep]
            row[:] = 0.0
            row[keep] = kept / kept.sum()
    return probs


def sparse_topk(probs_row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens, renormalised: (ids int32, probs float64).

    Sorted by descending probability, lower id first among ties; ties at the
    k-th place go to the lower ids. Zero-probability tokens are dropped, so
    fewer than k entries may come back.
    """
    row = np.asarray(probs_row, dtype=np.float64)
    if row.ndim != 1 or row.shape[0] == 0:
        raise ValueError(f"probs_row must be a non-empty 1-D array, got shape {row.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vocab = row.shape[0]
    if k >= vocab:
        ids = np.flatnonzero(row > 0)
    else:
        threshold = np.partition(row, vocab - k)[vocab - k]
        above = np.flatnonzero(row > threshold)
        tied = np.flatnonzero(row == threshold)[: k - above.shape[0]]
        ids = np.concatenate([above, tied])
        ids = ids[row[ids] > 0]
    if ids.shape[0] == 0:
        raise ValueError("probs_row has no positive entry")
    ids = ids[np.lexsort((ids, -row[ids]))]
    probs = row[ids]
    return ids.astype(np.int32), probs / probs.sum()


def draft_distribution(
    logits_row: np.ndarray, params: SamplingParams, k_top: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact sparse distribution a drafter samples its token from (and sends)."""
    row = np.asarray(logits_row)
    if row.ndim != 1:
        raise ValueError(f"logits_row must be 1-D, got shape {row.shape}")
    return sparse_topk(target_probs(row[None, :], params)[0], k_top)


def sample(ids_or_none: np.ndarray | None, probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with exactly one rng.random().

    `probs` need not be normalised: u is scaled by the total. With
    side="right" the first index whose cumulative mass exceeds u*total is
    picked, which can never be a zero-probability entry.
    """
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    total = cdf[-1] if cdf.shape[0] else 0.0
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no positive mass")
    u = rng.random()
    idx = int(np.searchsorted(cdf, u * total, side="right"))
    if idx >= cdf.shape[0]:
        # u*total rounded up to total: take the last entry with positive mass.
        idx = int(np.searchsorted(cdf, total, side="left"))
    return int(ids_or_none[idx]) if ids_or_none is not None else idx


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


def verify_sampling(
    draft_ids: np.ndarray,
    draft_dists: list[tuple[np.ndarray, np.ndarray]],
    target_p: np.ndarray,
    seed: int,
    stream: int,
    start_position: int,
) -> VerifyOutcome:
    """Speculative sampling over one round; see the module docstring for why it is exact."""
    p_rows = np.asarray(target_p, dtype=np.float64)
    draft = _check_rows(np.asarray(draft_ids), p_rows, "target_p")
    if len(draft_dists) != draft.shape[0]:
        raise ValueError(f"need one draft distribution per draft token, got {len(draft_dists)}")
    for i, x in enumerate(draft.tolist()):
        q_ids = np.asarray(draft_dists[i][0], dtype=np.int64)
        q = np.asarray(draft_dists[i][1], dtype=np.float64)
        hit = np.flatnonzero(q_ids == x)
        if q.shape != q_ids.shape or np.unique(q_ids).shape != q_ids.shape or np.any(q < 0):
            raise ValueError(f"draft distribution {i} needs unique ids, one prob >= 0 per id")
        if hit.shape[0] != 1 or not q[hit[0]] > 0:
            raise ValueError(f"draft token {x} at index {i} is not in its distribution's support")
        q = q / q.sum()
        p = p_rows[i]
        pos = start_position + i
        # u < min(1, p/q)  <=>  u * q < p, with no division by q.
        if position_rng(seed, stream, pos, Purpose.ACCEPT).random() * q[hit[0]] < p[x]:
            continue
        residual = p.copy()
        residual[q_ids] -= q
        np.maximum(residual, 0.0, out=residual)
        source = residual if residual.sum() > _RESIDUAL_EPS else p
        resample_rng = position_rng(seed, stream, pos, Purpose.RESAMPLE)
        return VerifyOutcome(i, sample(None, source, resample_rng))
    k = draft.shape[0]
    bonus_rng = position_rng(seed, stream, start_position + k, Purpose.RESAMPLE)
    return VerifyOutcome(k, sample(None, p_rows[k], bonus_rng))
