import time

import numpy as np
import pytest
from sled_drafter.backends import DraftError, load_backend
from sled_drafter.backends.ngram import NgramBackend, lookup
from sled_shared.models.registry import NGRAM_ENTRY
from sled_shared.speculative import SamplingParams, verify_sampling

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7)


def reference(history: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The definition, written the slow obvious way."""
    n = len(history)
    for size in range(min(max_n, n - 1), min_n - 1, -1):
        suffix = history[n - size :]
        for start in range(n - size - 1, -1, -1):
            if history[start : start + size] == suffix:
                seq = list(history)
                pos = start + size
                while len(seq) < n + k:
                    seq.append(seq[pos])
                    pos += 1
                return seq[n:]
    return []


def test_proposes_what_followed_the_most_recent_longest_match():
    h = np.array([5, 1, 2, 3, 9, 1, 2, 3, 8, 7, 2, 3], dtype=np.int32)
    # Longest suffix match is [2, 3] (the 3-gram [7, 2, 3] never occurred);
    # its most recent earlier occurrence is at 6..7, followed by 8 7 2 3.
    assert lookup(h, 4, 4, 1).tolist() == [8, 7, 2, 3]
    assert lookup(h, 2, 4, 1).tolist() == [8, 7]


def test_longer_match_beats_more_recent_shorter_one():
    h = np.array([1, 2, 3, 4, 9, 3, 4, 7, 1, 2, 3, 4], dtype=np.int32)
    # [3, 4] occurs most recently at 5..6 (-> 7), but [1, 2, 3, 4] at 0..3 (-> 9) is longer.
    assert lookup(h, 1, 4, 1).tolist() == [9]
    assert lookup(h, 1, 2, 1).tolist() == [7]


def test_no_match_or_below_min_n_gives_empty_draft():
    assert lookup(np.array([1, 2, 3, 4], dtype=np.int32), 5, 4, 1).shape == (0,)
    h = np.array([1, 2, 9, 2], dtype=np.int32)
    assert lookup(h, 3, 4, 1).tolist() == [9, 2, 9]
    assert lookup(h, 3, 4, 2).shape == (0,)
    assert lookup(np.array([4], dtype=np.int32), 3, 4, 1).shape == (0,)


def test_continuation_repeats_when_it_runs_into_the_end():
    h = np.array([7, 1, 2, 1, 2], dtype=np.int32)
    assert lookup(h, 7, 4, 1).tolist() == [1, 2, 1, 2, 1, 2, 1]


@pytest.mark.parametrize("seed", range(40))
def test_matches_reference_on_random_histories(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 8))
    h = rng.integers(0, vocab, size=int(rng.integers(1, 60))).astype(np.int32)
    max_n = int(rng.integers(1, 6))
    min_n = int(rng.integers(1, max_n + 1))
    k = int(rng.integers(0, 9))
    assert lookup(h, k, max_n, min_n).tolist() == reference(h.tolist(), k, max_n, min_n)


def test_session_greedy_and_sampled_drafts():
    with load_backend(NGRAM_ENTRY).open_session() as session:
        history = [3, 4, 5, 6, 3, 4]
        greedy = session.propose(history, 3, GREEDY, stream=1)
        assert greedy.ids.dtype == np.int32 and greedy.ids.tolist() == [5, 6, 3]
        assert greedy.dists is None
        sampled = session.propose(history, 3, SAMPLED, stream=1)
        assert sampled.ids.tolist() == [5, 6, 3]
        assert sampled.dists is not None and len(sampled.dists) == 3
        for tok, (ids, probs) in zip(sampled.ids.tolist(), sampled.dists, strict=True):
            assert ids.dtype == np.int32 and ids.tolist() == [tok] and probs.tolist() == [1.0]
        empty = session.propose([1, 2, 3], 4, SAMPLED, stream=1)
        assert empty.ids.shape == (0,) and empty.dists == []
        assert len(session.propose(history, 0, GREEDY, stream=1)) == 0


def test_point_mass_drafts_are_accepted_with_the_targets_probability():
    # q = one-hot on the draft token, so the verifier must accept it with
    # probability p(tok) exactly; check that frequency over many seeds.
    session = NgramBackend().open_session()
    draft = session.propose([1, 2, 1], 1, SAMPLED, stream=0)
    assert draft.ids.tolist() == [2]
    p = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    trials = 4000
    accepted = sum(
        verify_sampling(draft.ids, draft.dists, p, seed=s, stream=0, start_position=3).accepted
        for s in range(trials)
    )
    assert abs(accepted / trials - 0.3) < 4 * np.sqrt(0.3 * 0.7 / trials)


def test_bad_input_is_refused_clearly():
    session = NgramBackend().open_session()
    with pytest.raises(DraftError, match="non-empty"):
        session.propose([], 2, GREEDY, 0)
    with pytest.raises(DraftError, match="k must be"):
        session.propose([1, 2], -1, GREEDY, 0)
    with pytest.raises(DraftError, match="outside"):
        session.propose([1, -2], 2, GREEDY, 0)
    with pytest.raises(DraftError, match="integer token ids"):
        session.propose([1.5, 2.0], 2, GREEDY, 0)
    with pytest.raises(DraftError, match="seed"):
        session.propose([1, 2], 2, SamplingParams(temperature=1.0), 0)
    with pytest.raises(DraftError, match="min_n"):
        NgramBackend(max_n=2, min_n=3)
    session.close()
    with pytest.raises(DraftError, match="closed"):
        session.propose([1, 2], 2, GREEDY, 0)


def test_long_history_lookup_is_fast():
    rng = np.random.default_rng(0)
    history = rng.integers(0, 50, size=4000).tolist()
    session = NgramBackend().open_session()
    session.propose(history, 8, GREEDY, 0)
    start = time.perf_counter()
    for _ in range(50):
        session.propose(history, 8, GREEDY, 0)
    per_call = (time.perf_counter() - start) / 50
    # A quadratic Python search over 4000 positions takes seconds; the numpy
    # one takes ~0.5 ms here. The bound leaves room for a busy machine.
    assert per_call < 0.01, f"{per_call * 1e3:.2f} ms per propose"
