"""Drawing tokens: sampling parameters, per-position random streams, the
temperature -> top-k -> top-p distribution, sparse top-k and inverse-CDF draws
(numpy only).

The drafter and the verifier both use these, so they apply identical
semantics and draw from identical streams; `sled_shared.speculative` builds
the verification rule on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

_U64 = 1 << 64

# The top-p search sorts its undecided tokens once this few are left.
_SORT_BELOW = 64


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


def _top_k_ids(row: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(ascending ids of every entry >= the k-th largest value, that value), 1 <= k <= V.

    A full-row partition costs far more than the answer needs, so first take
    the k-th largest s of a strided sample of ~sqrt(kV) entries: the sample's
    top k are k row entries >= s, so the row's k-th largest is >= s as well.
    If fewer than k entries exceed s it is exactly s; otherwise it is the
    k-th largest of those ~k*stride entries. Leaving the entries equal to s
    out of the partition matters: numpy's partition is an order of magnitude
    slower on heavily repeated values, such as the zeros of a truncated row.
    """
    stride = max(1, math.isqrt(row.shape[0] // k))
    sampled = row[::stride]
    floor = np.partition(sampled, sampled.shape[0] - k)[sampled.shape[0] - k]
    cand = np.flatnonzero(row >= floor)
    cand_v = row[cand]
    above_v = cand_v[cand_v > floor]
    n_above = above_v.shape[0]
    kth = np.partition(above_v, n_above - k)[n_above - k] if n_above >= k else floor
    return cand[cand_v >= kth], float(kth)


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the top-p nucleus of one probability row.

    transformers' rule: sort ascending, remove every token whose cumulative
    probability (itself plus all smaller ones) is <= b = 1 - top_p, always
    keep the largest. So the nucleus is the smallest set of highest tokens
    with mass >= top_p. Equal probabilities rank lower id first (as argmax
    does), so a tiny top_p agrees with greedy.

    Found by a weighted quickselect instead of a full sort (O(V) expected):
    - tokens with p <= b/V are the smallest and hold <= b together, so each
      one's cumulative mass is <= b: removed;
    - split the undecided pool at a pivot t. If removed + mass(p < t) <= b,
      every p < t is removed; otherwise every p >= t has cumulative mass
      > b and is kept. The first pivot is the 64th largest, as the nucleus
      of a peaked row is often that small; later ones are medians, so each
      step decides half the pool.
    Only the last few undecided tokens (or a block of ties) get sorted.
    """
    vocab = probs.shape[0]
    budget = 1.0 - top_p
    pool = np.flatnonzero(probs > budget / vocab)
    pool_p = probs[pool]
    removed_mass = probs.sum() - pool_p.sum()
    kept = [np.empty(0, dtype=np.int64)]
    rank = pool.shape[0] - _SORT_BELOW
    while pool.shape[0] > _SORT_BELOW:
        t = np.partition(pool_p, rank)[rank]
        low = pool_p < t
        if not low.any():
            break  # the pivot is the pool's minimum, a block of ties: sorted out below
        low_mass = pool_p[low].sum()
        if removed_mass + low_mass <= budget:
            removed_mass += low_mass
            pool, pool_p = pool[~low], pool_p[~low]
        else:
            kept.append(pool[~low])
            pool, pool_p = pool[low], pool_p[low]
        rank = pool.shape[0] // 2
    # Ascending by probability; among ties the higher id first, so it goes first.
    order = np.lexsort((-pool, pool_p))
    dropped = removed_mass + np.cumsum(pool_p[order]) <= budget
    dropped[-1] = False
    kept.append(pool[order[~dropped]])
    return np.concatenate(kept)


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Rows of the sampling distribution: temperature -> top-k -> top-p, in float64.

    Greedy params give one-hot rows at the argmax (lowest id among ties).
    Top-k keeps every token >= the k-th largest logit (ties at the edge all
    survive, as in transformers' TopKLogitsWarper); its softmax is taken over
    the survivors only, which equals softmax with -inf everywhere else.
    """
    x = np.array(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"logits must have shape [n, V] with V > 0, got {x.shape}")
    row_max = x.max(axis=1, keepdims=True)
    # max() propagates NaN, so this also rejects NaN anywhere in a row.
    if not np.all(np.isfinite(row_max)):
        raise ValueError("logits rows need a finite maximum and no NaN")
    n, vocab = x.shape
    if params.greedy:
        probs = np.zeros_like(x)
        probs[np.arange(n), np.argmax(x, axis=1)] = 1.0
        return probs
    # Shift before scaling: (x - max)/T stays finite however small T is
    # (x/T alone overflows to inf, and inf - inf is NaN); softmax is unchanged.
    x -= row_max
    x /= params.temperature
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if top_k:
        probs = np.zeros_like(x)
        for r in range(n):
            ids, _ = _top_k_ids(x[r], top_k)
            e = np.exp(x[r, ids])
            probs[r, ids] = e / e.sum()
    else:
        probs = np.exp(x, out=x)
        probs /= probs.sum(axis=1, keepdims=True)
    if params.top_p < 1.0:
        for row in probs:
            keep = _nucleus(row, params.top_p)
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
        cand, kth = _top_k_ids(row, k)
        above = cand[row[cand] > kth]
        tied = cand[row[cand] == kth][: k - above.shape[0]]
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
    picked, which can never be a zero-probability entry. Since u < 1, the
    rounded u*total stays below total (round-to-nearest leaves t(1 - 2^-53)
    under t), so some index always qualifies.
    """
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    if ids_or_none is not None and len(ids_or_none) != cdf.shape[0]:
        raise ValueError(f"{len(ids_or_none)} ids for {cdf.shape[0]} probabilities")
    total = cdf[-1] if cdf.shape[0] else 0.0
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no positive mass")
    u = rng.random()
    idx = int(np.searchsorted(cdf, u * total, side="right"))
    return int(ids_or_none[idx]) if ids_or_none is not None else idx
