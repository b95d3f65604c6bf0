"""Model-free prompt-lookup drafting for devices too weak to run a draft model.

The longest suffix of the history (up to `max_n` tokens) that also occurs
earlier is looked up, and the tokens that followed its most recent earlier
occurrence are proposed. Chat and code repeat themselves (names, quoted
text, boilerplate), which is where this wins.

Sampling: each proposed token is a point mass (ids=[tok], probs=[1.0]). The
speculative rule is exact for any q, including a one-hot one: the verifier
accepts tok with probability p(tok) and otherwise resamples from p with tok
removed, so the output is still distributed as p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sled_shared.models.registry import ModelEntry
from sled_shared.speculative import SamplingParams

from sled_drafter.backends.base import Draft, DraftBackend, DraftError, DraftSession, check_request

DEFAULT_MAX_N = 4
DEFAULT_MIN_N = 1


def lookup(history: np.ndarray, k: int, max_n: int, min_n: int) -> np.ndarray:
    """Up to k tokens that followed the most recent earlier match of the longest suffix n-gram.

    Vectorised over candidate positions: every earlier occurrence of the last
    token is a candidate match end, and each of max_n - 1 numpy passes keeps
    the candidates whose match extends one token further back.
    """
    n = history.shape[0]
    if k == 0 or n < 2:
        return np.empty(0, dtype=np.int32)
    # A match ending at e (< n - 1) is followed by history[e + 1].
    ends = np.flatnonzero(history[: n - 1] == history[n - 1])
    if ends.shape[0] == 0:
        return np.empty(0, dtype=np.int32)
    lengths = np.ones(ends.shape[0], dtype=np.int64)
    alive = np.ones(ends.shape[0], dtype=bool)
    for back in range(1, min(max_n, n - 1)):
        earlier = ends - back
        ok = earlier >= 0
        ok[ok] = history[earlier[ok]] == history[n - 1 - back]
        alive &= ok
        if not alive.any():
            break
        lengths += alive
    best = int(lengths.max())
    if best < min_n:
        return np.empty(0, dtype=np.int32)
    start = int(ends[np.flatnonzero(lengths == best)[-1]]) + 1
    # Past the end of the history the continuation copies the draft itself, so
    # the proposal repeats with period n - start (e.g. "a b a b" -> "a b a b ...").
    period = n - start
    return history[start + np.arange(k) % period].astype(np.int32, copy=False)


class NgramSession(DraftSession):
    def __init__(self, max_n: int, min_n: int) -> None:
        self._max_n = max_n
        self._min_n = min_n
        self._closed = False

    def propose(self, history: Sequence[int], k: int, params: SamplingParams, stream: int) -> Draft:
        if self._closed:
            raise DraftError("n-gram session is closed")
        ids = check_request(history, k, params, stream)
        tokens = lookup(ids, int(k), self._max_n, self._min_n)
        if params.greedy:
            return Draft(tokens, None)
        one = np.ones(1, dtype=np.float64)
        return Draft(tokens, [(tokens[i : i + 1].copy(), one.copy()) for i in range(len(tokens))])

    def close(self) -> None:
        self._closed = True


@dataclass(slots=True)
class NgramBackend(DraftBackend):
    max_n: int = DEFAULT_MAX_N
    min_n: int = DEFAULT_MIN_N
    kind = "ngram"

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise DraftError(f"need 1 <= min_n <= max_n, got min_n={self.min_n} max_n={self.max_n}")

    @classmethod
    def from_entry(cls, entry: ModelEntry, **options: int) -> NgramBackend:
        return cls(**options)

    def open_session(self) -> NgramSession:
        return NgramSession(self.max_n, self.min_n)

    def close(self) -> None:
        """Nothing to release: the n-gram drafter holds no model."""
