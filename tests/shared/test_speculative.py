"""Deterministic tests of the verification rules, in the style of vLLM's rejection-sampler tests."""

from __future__ import annotations

import numpy as np
import pytest
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    VerifyOutcome,
    _correction,
    position_rng,
    sample,
    sparse_topk,
    verify_greedy,
    verify_sampling,
)

VOCAB = 32


def one_hot_logits(tokens: list[int], vocab: int = VOCAB) -> np.ndarray:
    logits = np.full((len(tokens), vocab), -5.0, dtype=np.float32)
    logits[np.arange(len(tokens)), tokens] = 5.0
    return logits


def point_mass(token: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array([token], dtype=np.int32), np.array([1.0])


# ---- SamplingParams ---------------------------------------------------------


def test_params_defaults_are_greedy() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7, seed=3).greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": False}, "seed"),
    ],
)
def test_params_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_accept_edges() -> None:
    SamplingParams(temperature=0, top_p=1, top_k=0, seed=0)
    SamplingParams(temperature=2.0, top_p=1e-9, top_k=1, seed=2**64 - 1)


# ---- position_rng -----------------------------------------------------------


def test_position_rng_is_a_function_of_its_key() -> None:
    a = position_rng(7, 11, 100, Purpose.ACCEPT).random(8)
    b = position_rng(7, 11, 100, Purpose.ACCEPT).random(8)
    np.testing.assert_array_equal(a, b)
    others = [
        position_rng(8, 11, 100, Purpose.ACCEPT),
        position_rng(7, 12, 100, Purpose.ACCEPT),
        position_rng(7, 11, 101, Purpose.ACCEPT),
        position_rng(7, 11, 100, Purpose.RESAMPLE),
        position_rng(7, 11, 100, Purpose.DRAFT),
        position_rng(7, 11, 100, Purpose.FIRST),
    ]
    for other in others:
        assert not np.any(np.isin(other.random(8), a))


def test_position_rng_rejects_out_of_range_keys() -> None:
    with pytest.raises(ValueError, match="seed"):
        position_rng(-1, 0, 0, Purpose.DRAFT)
    with pytest.raises(ValueError, match="stream"):
        position_rng(0, 2**64, 0, Purpose.DRAFT)
    with pytest.raises(ValueError, match="position"):
        position_rng(0, 0, -3, Purpose.DRAFT)
    with pytest.raises(ValueError):
        position_rng(0, 0, 0, 9)  # type: ignore[arg-type]


# ---- sample / sparse_topk -------------------------------------------------


def test_sample_inverse_cdf_and_zero_mass_entries() -> None:
    probs = np.array([0.0, 0.25, 0.0, 0.75, 0.0])
    u = position_rng(1, 2, 3, Purpose.DRAFT).random()
    got = sample(None, probs, position_rng(1, 2, 3, Purpose.DRAFT))
    assert got == (1 if u < 0.25 else 3)
    ids = np.array([40, 41, 42, 43, 44])
    assert sample(ids, probs, position_rng(1, 2, 3, Purpose.DRAFT)) == 40 + got
    # Unnormalised weights are scaled, never a zero-weight entry is returned.
    for s in range(200):
        assert sample(None, probs * 3.0, position_rng(s, 0, 0, Purpose.DRAFT)) in (1, 3)
    with pytest.raises(ValueError, match="no positive mass"):
        sample(None, np.zeros(4), position_rng(0, 0, 0, Purpose.DRAFT))
    with pytest.raises(ValueError, match="ids for"):
        sample(ids[:3], probs, position_rng(0, 0, 0, Purpose.DRAFT))


class _TopUniform:
    """Stands in for a Generator whose next uniform is the largest double below 1."""

    def random(self) -> float:
        return 1.0 - 2.0**-53


def test_sample_top_uniform_never_lands_on_trailing_zero_mass() -> None:
    # The largest uniform lands on the last entry with mass, not on the zeros after it.
    assert sample(None, np.array([0.1, 0.2, 0.0, 0.0]), _TopUniform()) == 1  # type: ignore[arg-type]
    ids = np.array([7, 3, 9])
    assert sample(ids, np.array([0.3, 0.7, 0.0]), _TopUniform()) == 3  # type: ignore[arg-type]


def test_sparse_topk_orders_renormalises_and_drops_zeros() -> None:
    row = np.array([0.1, 0.4, 0.0, 0.2, 0.2, 0.1])
    ids, probs = sparse_topk(row, 3)
    assert ids.dtype == np.int32 and probs.dtype == np.float64
    np.testing.assert_array_equal(ids, [1, 3, 4])  # tie 3/4 both fit
    np.testing.assert_allclose(probs, np.array([0.4, 0.2, 0.2]) / 0.8)
    ids, _ = sparse_topk(row, 2)
    np.testing.assert_array_equal(ids, [1, 3])  # tie at the edge goes to the lower id
    ids, probs = sparse_topk(row, 100)
    np.testing.assert_array_equal(ids, [1, 3, 4, 0, 5])
    assert probs.sum() == pytest.approx(1.0)


# ---- verify_greedy ----------------------------------------------------------


def test_greedy_perfect_match_gets_bonus() -> None:
    out = verify_greedy(np.array([3, 5, 7]), one_hot_logits([3, 5, 7, 9]))
    assert out == VerifyOutcome(accepted=3, next_token=9)


def test_greedy_early_mismatch() -> None:
    out = verify_greedy(np.array([3, 5, 7]), one_hot_logits([4, 5, 7, 9]))
    assert out == VerifyOutcome(accepted=0, next_token=4)


def test_greedy_mismatch_at_last_position() -> None:
    out = verify_greedy(np.array([3, 5, 7]), one_hot_logits([3, 5, 8, 9]))
    assert out == VerifyOutcome(accepted=2, next_token=8)


def test_greedy_empty_draft() -> None:
    out = verify_greedy(np.array([], dtype=np.int32), one_hot_logits([6]))
    assert out == VerifyOutcome(accepted=0, next_token=6)


def test_greedy_ties_break_to_lowest_id() -> None:
    logits = np.zeros((2, VOCAB))
    logits[:, [4, 9]] = 1.0
    assert verify_greedy(np.array([9]), logits) == VerifyOutcome(0, 4)
    assert verify_greedy(np.array([4]), logits) == VerifyOutcome(1, 4)


def test_greedy_mixed_batch() -> None:
    cases = [
        ([1, 2, 3], [1, 2, 3, 4], VerifyOutcome(3, 4)),
        ([1, 2, 3], [0, 2, 3, 4], VerifyOutcome(0, 0)),
        ([5], [5, 6], VerifyOutcome(1, 6)),
        ([], [7], VerifyOutcome(0, 7)),
        ([8, 8, 8, 8, 8], [8, 8, 9, 8, 8, 8], VerifyOutcome(2, 9)),
    ]
    for draft, target, expected in cases:
        assert verify_greedy(np.array(draft, dtype=np.int32), one_hot_logits(target)) == expected


def test_greedy_shape_checks() -> None:
    with pytest.raises(ValueError, match="K\\+1"):
        verify_greedy(np.array([1, 2]), one_hot_logits([1, 2]))
    with pytest.raises(ValueError, match="vocabulary"):
        verify_greedy(np.array([VOCAB]), one_hot_logits([1, 2]))


# ---- verify_sampling, deterministic cases -----------------------------------


def test_sampling_perfect_match_accepts_all_and_samples_bonus() -> None:
    # p == q == point mass: p/q = 1 so every draft token is accepted.
    p = np.eye(VOCAB)[[3, 5, 7, 9]]
    dists = [point_mass(t) for t in (3, 5, 7)]
    out = verify_sampling(np.array([3, 5, 7]), dists, p, seed=1, stream=2, start_position=10)
    assert out == VerifyOutcome(3, 9)


def test_sampling_rejects_where_target_has_no_mass() -> None:
    p = np.eye(VOCAB)[[3, 6, 7, 9]]
    dists = [point_mass(t) for t in (3, 5, 7)]
    out = verify_sampling(np.array([3, 5, 7]), dists, p, seed=1, stream=2, start_position=10)
    assert out == VerifyOutcome(1, 6)


def test_sampling_mismatch_at_last_position() -> None:
    p = np.eye(VOCAB)[[3, 5, 8, 9]]
    dists = [point_mass(t) for t in (3, 5, 7)]
    out = verify_sampling(np.array([3, 5, 7]), dists, p, seed=1, stream=2, start_position=10)
    assert out == VerifyOutcome(2, 8)


def test_sampling_empty_draft_samples_from_first_row() -> None:
    p = np.full((1, VOCAB), 1.0 / VOCAB)
    out = verify_sampling(np.array([], dtype=np.int32), [], p, seed=4, stream=5, start_position=6)
    expected = sample(None, p[0], position_rng(4, 5, 6, Purpose.RESAMPLE))
    assert out == VerifyOutcome(0, expected)


def test_sampling_uses_accept_and_resample_streams_of_each_position() -> None:
    # q puts 0.8 on token 0, p puts 0.4: accept iff u_accept < 0.5. The
    # residual max(0, p - q) is all on token 1, so a reject must emit 1.
    p = np.array([[0.4, 0.6, 0.0, 0.0]] * 2)
    q = (np.array([0, 2], dtype=np.int32), np.array([0.8, 0.2]))
    for stream in range(40):
        out = verify_sampling(np.array([0]), [q], p, seed=9, stream=stream, start_position=3)
        u = position_rng(9, stream, 3, Purpose.ACCEPT).random()
        if u < 0.5:
            bonus = sample(None, p[1], position_rng(9, stream, 4, Purpose.RESAMPLE))
            assert out == VerifyOutcome(1, bonus)
        else:
            assert out == VerifyOutcome(0, 1)


def test_sampling_reproducible_and_stream_dependent() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(VOCAB), size=5)
    dists = [sparse_topk(rng.dirichlet(np.ones(VOCAB)), 6) for _ in range(4)]
    draft = np.array([d[0][0] for d in dists])
    outs = {
        s: verify_sampling(draft, dists, p, seed=3, stream=s, start_position=20) for s in range(50)
    }
    for s, out in outs.items():
        assert verify_sampling(draft, dists, p, seed=3, stream=s, start_position=20) == out
    assert len(set(outs.values())) > 5


def test_sampling_mixed_batch_is_independent_of_batch_order() -> None:
    rng = np.random.default_rng(1)
    sessions = []
    for s in range(6):
        k = s % 4
        p = rng.dirichlet(np.full(VOCAB, 0.3), size=k + 1)
        dists = [sparse_topk(rng.dirichlet(np.full(VOCAB, 0.3)), 5) for _ in range(k)]
        draft = np.array([d[0][-1] for d in dists], dtype=np.int32)
        sessions.append((draft, dists, p, 100 + s, 7 * s))
    forward = [
        verify_sampling(d, q, p, seed=11, stream=st, start_position=pos)
        for d, q, p, st, pos in sessions
    ]
    backward = [
        verify_sampling(d, q, p, seed=11, stream=st, start_position=pos)
        for d, q, p, st, pos in reversed(sessions)
    ]
    assert forward == backward[::-1]
    for (draft, _, _, _, _), out in zip(sessions, forward, strict=True):
        assert 0 <= out.accepted <= draft.shape[0]


def test_sampling_with_one_hot_target_equals_greedy() -> None:
    rng = np.random.default_rng(2)
    for trial in range(200):
        k = int(rng.integers(0, 5))
        logits = rng.normal(size=(k + 1, VOCAB))
        best = np.argmax(logits, axis=1)
        # Drafts agree with the argmax for a random prefix, then diverge.
        draft = best[:k].copy()
        cut = int(rng.integers(0, k + 1))
        if cut < k:
            draft[cut] = (draft[cut] + 1 + rng.integers(VOCAB - 1)) % VOCAB
        dists = [sparse_topk(rng.dirichlet(np.ones(VOCAB)), VOCAB) for _ in range(k)]
        p = np.eye(VOCAB)[best]
        got = verify_sampling(draft, dists, p, seed=5, stream=trial, start_position=0)
        assert got == verify_greedy(draft, logits)


def test_correction_falls_back_to_p_when_residual_is_rounding_noise() -> None:
    # p == q: max(0, p - q) has no mass (a reject here only comes from rounding);
    # the draw must come from p rather than fail.
    p = np.array([0.0, 0.25, 0.75, 0.0])
    q_ids, q = np.array([1, 2]), np.array([0.25, 0.75])
    for stream in range(50):
        got = _correction(p, q_ids, q, position_rng(0, stream, 0, Purpose.RESAMPLE))
        assert got == sample(None, p, position_rng(0, stream, 0, Purpose.RESAMPLE))
    # A real residual is used as is: q over-weights 2, so only 1 can come out.
    q_over = np.array([0.05, 0.95])
    assert {
        _correction(p, q_ids, q_over, position_rng(0, s, 0, Purpose.RESAMPLE)) for s in range(50)
    } == {1}


def test_sampling_rejects_malformed_draft_dists() -> None:
    p = np.full((2, VOCAB), 1.0 / VOCAB)
    with pytest.raises(ValueError, match="support"):
        verify_sampling(np.array([4]), [point_mass(5)], p, seed=0, stream=0, start_position=0)
    dup = (np.array([4, 4]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="unique"):
        verify_sampling(np.array([4]), [dup], p, seed=0, stream=0, start_position=0)
    outside = (np.array([4, VOCAB]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="inside the vocabulary"):
        verify_sampling(np.array([4]), [outside], p, seed=0, stream=0, start_position=0)
    negative = (np.array([4, -1]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="inside the vocabulary"):
        verify_sampling(np.array([4]), [negative], p, seed=0, stream=0, start_position=0)
    empty = (np.array([], dtype=np.int32), np.array([]))
    with pytest.raises(ValueError, match="non-empty"):
        verify_sampling(np.array([4]), [empty], p, seed=0, stream=0, start_position=0)
    with pytest.raises(ValueError, match="one draft distribution"):
        verify_sampling(np.array([4]), [], p, seed=0, stream=0, start_position=0)
