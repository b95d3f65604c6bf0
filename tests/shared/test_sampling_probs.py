"""target_probs / sparse_topk / draft_distribution against transformers' warpers and a
brute-force full-sort oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sled_shared.speculative import SamplingParams, draft_distribution, sparse_topk, target_probs
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def transformers_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """What transformers' generate(do_sample=True) samples from, in its warper order."""
    scores = torch.tensor(logits, dtype=torch.float64)
    warpers = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1).numpy()


def oracle_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The documented rule with full sorts; equal probabilities rank lower id first."""
    out = []
    for row in np.asarray(logits, dtype=np.float64):
        x = row / params.temperature
        if 0 < params.top_k < x.shape[0]:
            kth = np.sort(x)[-params.top_k]
            x = np.where(x >= kth, x, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        if params.top_p < 1.0:
            ids = np.arange(p.shape[0])
            ascending = np.lexsort((-ids, p))  # higher id first among ties
            removed = np.cumsum(p[ascending]) <= 1.0 - params.top_p
            removed[-1] = False
            p[ascending[removed]] = 0.0
            p /= p.sum()
        out.append(p)
    return np.array(out)


GRID = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.7, top_k=40),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=1.0, top_p=0.999),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
    SamplingParams(temperature=2.0, top_k=1000, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
]


@pytest.mark.parametrize("params", GRID, ids=repr)
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_matches_transformers_warpers(params: SamplingParams, scale: float) -> None:
    rng = np.random.default_rng(int(scale * 10))
    logits = rng.normal(size=(5, 4099)) * scale  # continuous: no ties
    ours = target_probs(logits, params)
    ref = transformers_probs(logits, params)
    assert ours.dtype == np.float64 and ours.shape == logits.shape
    np.testing.assert_array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-13)


def test_full_vocab_float32_logits_match_transformers() -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_t(3, size=(6, 49152)) * 2.5).astype(np.float32)
    for params in (SamplingParams(temperature=0.9, top_p=0.92), SamplingParams(1.2, 0.95, 64)):
        ref = transformers_probs(logits.astype(np.float64), params)
        ours = target_probs(logits, params)
        np.testing.assert_array_equal(ours > 0, ref > 0)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_top_p_exact_boundary_follows_transformers_cumsum() -> None:
    # 1 - 0.8 is 0.19999999999999996 in floats, so the 0.2 token's ascending
    # cumulative mass 0.2 is not <= it and transformers keeps all three.
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    for top_p in (0.8, 0.5, 0.7, 0.79):
        params = SamplingParams(temperature=1.0, top_p=top_p)
        np.testing.assert_array_equal(
            target_probs(logits, params) > 0, transformers_probs(logits, params) > 0
        )


def test_top_k_keeps_all_ties_at_the_edge() -> None:
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 0.5]])
    for k in (1, 2, 3, 4):
        params = SamplingParams(temperature=1.0, top_k=k)
        ours = target_probs(logits, params)
        np.testing.assert_allclose(ours, transformers_probs(logits, params), rtol=1e-14)
    np.testing.assert_array_equal(
        target_probs(logits, SamplingParams(1.0, 1.0, 3)) > 0,
        [[False, True, True, True, True, False]],
    )


def test_top_p_ties_rank_lower_id_first() -> None:
    # Uniform over 4: the nucleus for top_p=0.5 is two tokens; our rule keeps
    # the lower ids (transformers' order among ties depends on its sort).
    probs = target_probs(np.zeros((1, 4)), SamplingParams(temperature=1.0, top_p=0.5))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0, 0.0]])
    tiny = SamplingParams(temperature=1.0, top_p=1e-9)
    logits = np.array([[0.0, 2.0, 1.0, 2.0, 2.0]])
    np.testing.assert_array_equal(target_probs(logits, tiny), [[0, 1, 0, 0, 0]])


@pytest.mark.parametrize("seed", range(6))
def test_matches_full_sort_oracle_with_ties_and_adversarial_orders(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 3000))
    # Quantised logits give many ties; sorted rows defeat the strided sample.
    base = np.round(rng.normal(size=vocab) * rng.uniform(0.5, 6.0), 1)
    rows = np.stack([base, np.sort(base), np.sort(base)[::-1], np.zeros(vocab)])
    for _ in range(12):
        params = SamplingParams(
            temperature=float(rng.uniform(0.2, 2.0)),
            top_p=float(rng.choice([1.0, rng.uniform(0.01, 1.0)])),
            top_k=int(rng.choice([0, rng.integers(1, vocab + 5)])),
        )
        np.testing.assert_allclose(
            target_probs(rows, params), oracle_probs(rows, params), rtol=1e-12, atol=1e-15
        )


def test_greedy_is_one_hot_at_lowest_argmax() -> None:
    logits = np.array([[0.0, 5.0, 5.0], [9.0, -1.0, 9.0]], dtype=np.float32)
    np.testing.assert_array_equal(target_probs(logits, SamplingParams()), [[0, 1, 0], [1, 0, 0]])


def test_extreme_temperatures_stay_finite() -> None:
    logits = np.array([[1.0, 2.0, 2.0, 0.5, -np.inf]])
    cold = target_probs(logits, SamplingParams(temperature=1e-300))
    np.testing.assert_array_equal(cold, [[0.0, 0.5, 0.5, 0.0, 0.0]])
    cold_k = target_probs(logits, SamplingParams(temperature=1e-300, top_k=2, top_p=0.4))
    np.testing.assert_array_equal(cold_k, [[0.0, 1.0, 0.0, 0.0, 0.0]])
    hot = target_probs(logits, SamplingParams(temperature=1e300))
    np.testing.assert_allclose(hot, [[0.25, 0.25, 0.25, 0.25, 0.0]])


def test_masked_logits_and_bad_input() -> None:
    logits = np.array([[-np.inf, 0.0, 1.0, -np.inf]])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.9))
    assert probs[0, 0] == 0.0 and probs[0, 3] == 0.0 and probs.sum() == pytest.approx(1.0)
    hot = SamplingParams(temperature=1.0)
    for bad in ([[np.nan, 0.0]], [[np.inf, 0.0]], [[-np.inf, -np.inf]]):
        with pytest.raises(ValueError, match="finite"):
            target_probs(np.array(bad), hot)
    with pytest.raises(ValueError, match="shape"):
        target_probs(np.zeros(5), hot)


@pytest.mark.parametrize("seed", range(8))
def test_sparse_topk_matches_full_sort(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    vocab = int(rng.integers(1, 5000))
    row = np.round(rng.dirichlet(np.full(vocab, 0.2)), 4)  # ties and zeros
    if not row.any():
        row[0] = 1.0
    if seed % 2:
        row = np.sort(row)
    k = int(rng.integers(1, vocab + 3))
    ids, probs = sparse_topk(row, k)
    full = np.lexsort((np.arange(vocab), -row))  # descending, lower id first
    expected = full[:k][row[full[:k]] > 0]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(probs, row[expected] / row[expected].sum(), rtol=1e-13)


def test_sparse_topk_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="k must"):
        sparse_topk(np.ones(3) / 3, 0)
    with pytest.raises(ValueError, match="positive"):
        sparse_topk(np.zeros(3), 2)


def test_draft_distribution_is_truncated_target_distribution() -> None:
    rng = np.random.default_rng(3)
    row = rng.normal(size=2000) * 4
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=100)
    ids, probs = draft_distribution(row.astype(np.float32), params, 16)
    full = target_probs(row[None, :].astype(np.float32), params)[0]
    expected_ids, expected_probs = sparse_topk(full, 16)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(probs, expected_probs)
    assert ids.shape[0] == min(16, int((full > 0).sum()))
    greedy_ids, greedy_probs = draft_distribution(row, SamplingParams(), 16)
    assert greedy_ids.tolist() == [int(np.argmax(row))] and greedy_probs.tolist() == [1.0]
