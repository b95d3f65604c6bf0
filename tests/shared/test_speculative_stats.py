"""Statistical tests: speculative sampling emits tokens distributed exactly as the target.

Every trial uses its own stream, so trials are independent draws of the whole
pipeline (draft sampled from q with Purpose.DRAFT, then verify_sampling). The
seeds are fixed, so the tests are deterministic; the negative controls show
the same checks reject a rule that is not exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    draft_distribution,
    position_rng,
    sample,
    sparse_topk,
    target_probs,
    verify_sampling,
)

ALPHA = 1e-3  # significance of every chi-square test
SEED = 2024
START = 17  # absolute position of the first draft token
Dist = tuple[np.ndarray, np.ndarray]


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df), exactly.

    With y = x/2 and s = df/2, P = Q(s, y), the regularised upper incomplete
    gamma, which obeys Q(s + 1, y) = Q(s, y) + y^s e^-y / Gamma(s + 1) from
    Q(1/2, y) = erfc(sqrt y) and Q(1, y) = e^-y.
    """
    y = x / 2.0
    s, q = (0.5, math.erfc(math.sqrt(y))) if df % 2 else (1.0, math.exp(-y))
    while s < df / 2.0:
        q += math.exp(s * math.log(y) - y - math.lgamma(s + 1.0)) if y > 0 else 0.0
        s += 1.0
    return q


def chi2_upper(df: int, alpha: float) -> float:
    """x with P(chi-square(df) > x) = alpha, by bisection (the survival is decreasing)."""
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if chi2_sf(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def chi_square_passes(counts: np.ndarray, expected_p: np.ndarray) -> tuple[bool, float, float]:
    """Goodness of fit; a token the target gives zero mass must never be emitted."""
    n = counts.sum()
    zero = expected_p == 0
    assert counts[zero].sum() == 0, "emitted a token the target gives zero probability"
    e = n * expected_p[~zero]
    stat = float(((counts[~zero] - e) ** 2 / e).sum())
    limit = chi2_upper(int((~zero).sum()) - 1, ALPHA)
    return stat <= limit, stat, limit


def draft_token(q: Dist, stream: int, position: int, purpose: Purpose = Purpose.DRAFT) -> int:
    return sample(q[0], q[1], position_rng(SEED, stream, position, purpose))


def first_tokens(
    p: np.ndarray,
    q: Dist,
    k: int,
    trials: int,
    claimed_q: Dist | None = None,
    draft_purpose: Purpose = Purpose.DRAFT,
) -> np.ndarray:
    """First emitted token of `trials` rounds drafting k tokens from q (told `claimed_q`)."""
    rows = np.tile(p, (k + 1, 1))
    told = claimed_q or q
    out = np.empty(trials, dtype=np.int64)
    for stream in range(trials):
        draft = [draft_token(q, stream, START + i, draft_purpose) for i in range(k)]
        res = verify_sampling(
            np.array(draft, dtype=np.int32), [told] * k, rows, SEED, stream, START
        )
        out[stream] = draft[0] if res.accepted else res.next_token
    return out


def test_chi_square_threshold_matches_tables() -> None:
    # Upper 0.1% and 5% points of chi-square from standard tables.
    for df, table in ((1, 10.828), (5, 20.515), (10, 29.588), (11, 31.264), (35, 66.619)):
        assert chi2_upper(df, 1e-3) == pytest.approx(table, abs=1e-3)
    assert chi2_upper(2, 0.05) == pytest.approx(5.991, abs=1e-3)
    assert chi2_upper(7, 0.05) == pytest.approx(14.067, abs=1e-3)


V = 12
_rng = np.random.default_rng(5)
P_DENSE = _rng.dirichlet(np.full(V, 0.8))
# Target mass only on tokens 4..11; the draft's support overlaps it partly.
P_PARTIAL = np.concatenate([np.zeros(4), _rng.dirichlet(np.ones(V - 4))])
_PIPELINE = SamplingParams(temperature=1.0, top_p=0.95, top_k=8)
_TARGET_LOGITS = _rng.normal(size=V)
Q_CASES: dict[str, tuple[np.ndarray, Dist]] = {
    "dense_q": (P_DENSE, sparse_topk(_rng.dirichlet(np.full(V, 0.8)), V)),
    "truncated_q": (P_DENSE, sparse_topk(_rng.dirichlet(np.full(V, 0.5)), 4)),
    "disjoint_support": (
        P_PARTIAL,
        (np.array([0, 1, 2, 5, 6], dtype=np.int32), np.array([0.3, 0.1, 0.2, 0.25, 0.15])),
    ),
    "point_mass_likely": (P_DENSE, (np.array([int(np.argmax(P_DENSE))]), np.array([1.0]))),
    "point_mass_impossible": (P_PARTIAL, (np.array([2], dtype=np.int32), np.array([1.0]))),
    # What the services do: the verifier's p from target logits, the drafter's q
    # from its own correlated logits, both under temperature / top-p / top-k.
    "logits_pipeline": (
        target_probs(_TARGET_LOGITS[None], _PIPELINE)[0],
        draft_distribution(_TARGET_LOGITS + 0.7 * _rng.normal(size=V), _PIPELINE, 5),
    ),
}


@pytest.mark.parametrize("case", sorted(Q_CASES))
def test_first_token_has_target_distribution(case: str) -> None:
    p, q = Q_CASES[case]
    tokens = first_tokens(p, q, k=1, trials=3000)
    ok, stat, limit = chi_square_passes(np.bincount(tokens, minlength=V), p)
    assert ok, f"chi-square {stat:.1f} > {limit:.1f}"


def test_empty_draft_and_longer_draft_first_token() -> None:
    p, q = Q_CASES["truncated_q"]
    for k in (0, 3):
        tokens = first_tokens(p, q, k=k, trials=2000)
        ok, stat, limit = chi_square_passes(np.bincount(tokens, minlength=V), p)
        assert ok, f"K={k}: chi-square {stat:.1f} > {limit:.1f}"


def test_total_variation_shrinks_with_samples() -> None:
    p, q = Q_CASES["dense_q"]
    tokens = first_tokens(p, q, k=1, trials=6000)

    def tv(n: int) -> float:
        return 0.5 * float(np.abs(np.bincount(tokens[:n], minlength=V) / n - p).sum())

    # E|freq - p| ~ sqrt(2 p (1 - p) / (pi n)) per token for an exact sampler.
    def typical(n: int) -> float:
        return 0.5 * float(np.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())

    small, large = tv(375), tv(6000)
    assert large < small
    assert large < 2.0 * typical(6000), (large, typical(6000))


# Context-dependent target and draft over a 6-token vocabulary: row `prev`
# gives the distribution of the token after `prev`. The draft disagrees with
# the target, is a point mass after some tokens (as an n-gram drafter is) and
# has support disjoint from the target after others.
JV = 6
_jrng = np.random.default_rng(11)
P_NEXT = _jrng.dirichlet(np.full(JV, 2.0), size=JV)
P_NEXT[3] = np.array([0.0, 0.4, 0.0, 0.3, 0.3, 0.0])
Q_NEXT: list[Dist] = [sparse_topk(_jrng.dirichlet(np.full(JV, 1.0)), 3) for _ in range(JV)]
Q_NEXT[1] = (np.array([2], dtype=np.int32), np.array([1.0]))
Q_NEXT[3] = (np.array([0, 2, 5], dtype=np.int32), np.array([0.5, 0.3, 0.2]))
PROMPT_TOKEN = 0


def generate_two(stream: int, k: int, draft_purpose: Purpose) -> tuple[int, int]:
    """Run whole rounds (drafting from Q_NEXT, verifying against P_NEXT) until two tokens."""
    committed = [PROMPT_TOKEN]
    position = START
    while len(committed) < 3:
        draft: list[int] = []
        dists: list[Dist] = []
        for i in range(k):
            dist = Q_NEXT[(committed + draft)[-1]]
            draft.append(draft_token(dist, stream, position + i, draft_purpose))
            dists.append(dist)
        rows = P_NEXT[[committed[-1], *draft]]
        res = verify_sampling(np.array(draft, dtype=np.int32), dists, rows, SEED, stream, position)
        new = [*draft[: res.accepted], res.next_token]
        committed += new
        position += len(new)
    return committed[1], committed[2]


def joint_counts(trials: int, k: int, draft_purpose: Purpose = Purpose.DRAFT) -> np.ndarray:
    counts = np.zeros((JV, JV), dtype=np.int64)
    for stream in range(trials):
        a, b = generate_two(stream, k, draft_purpose)
        counts[a, b] += 1
    return counts


JOINT = P_NEXT[PROMPT_TOKEN][:, None] * P_NEXT  # P(a, b) = p(a | prompt) p(b | a)


def test_first_two_tokens_have_target_joint_distribution() -> None:
    counts = joint_counts(trials=3000, k=2)
    ok, stat, limit = chi_square_passes(counts.ravel(), JOINT.ravel())
    assert ok, f"chi-square {stat:.1f} > {limit:.1f}"


def test_joint_with_position_independent_target_is_product() -> None:
    p = P_DENSE[:JV] / P_DENSE[:JV].sum()
    q: Dist = sparse_topk(np.roll(p, 2), 3)
    rows = np.tile(p, (3, 1))
    counts = np.zeros((JV, JV), dtype=np.int64)
    for stream in range(2500):
        emitted: list[int] = []
        position = START
        while len(emitted) < 2:
            draft = [draft_token(q, stream, position + i) for i in range(2)]
            res = verify_sampling(np.array(draft), [q, q], rows, SEED, stream, position)
            new = [*draft[: res.accepted], res.next_token]
            emitted += new
            position += len(new)
        counts[emitted[0], emitted[1]] += 1
    ok, stat, limit = chi_square_passes(counts.ravel(), np.outer(p, p).ravel())
    assert ok, f"chi-square {stat:.1f} > {limit:.1f}"


NegativeControl = Callable[[], tuple[np.ndarray, np.ndarray]]


def _misreported_q() -> tuple[np.ndarray, np.ndarray]:
    # Drafted from q but the verifier is told a flattened q': the ratio is wrong.
    p, q = Q_CASES["dense_q"]
    told: Dist = (q[0], np.sqrt(q[1]) / np.sqrt(q[1]).sum())
    return np.bincount(first_tokens(p, q, k=1, trials=2000, claimed_q=told), minlength=V), p


def _draft_reuses_accept_uniform() -> tuple[np.ndarray, np.ndarray]:
    # Drafting with the ACCEPT stream correlates the draft with its acceptance.
    p, q = Q_CASES["dense_q"]
    tokens = first_tokens(p, q, k=1, trials=2000, draft_purpose=Purpose.ACCEPT)
    return np.bincount(tokens, minlength=V), p


def _joint_with_shared_uniform() -> tuple[np.ndarray, np.ndarray]:
    return joint_counts(trials=2000, k=2, draft_purpose=Purpose.ACCEPT).ravel(), JOINT.ravel()


@pytest.mark.parametrize(
    "control", [_misreported_q, _draft_reuses_accept_uniform, _joint_with_shared_uniform]
)
def test_checks_reject_inexact_rules(control: NegativeControl) -> None:
    counts, expected = control()
    n = counts.sum()
    stat = float(((counts - n * expected) ** 2 / np.where(expected > 0, n * expected, 1)).sum())
    limit = chi2_upper(int((expected > 0).sum()) - 1, ALPHA)
    assert stat > limit, f"an inexact rule passed: chi-square {stat:.1f} <= {limit:.1f}"
