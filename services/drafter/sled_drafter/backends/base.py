"""What every draft backend offers: sessions that propose K tokens after a history.

A session owns whatever state makes drafting cheap (a KV cache, an index) and
keeps it in step with the committed history it is handed on each call, so the
caller never tells it what was accepted or rejected: it just passes the new
history and the session works out the difference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sled_shared.speculative import SamplingParams

_U64 = 1 << 64


class DraftError(ValueError):
    """A request a draft backend cannot serve (bad history, k, params or model)."""


@dataclass(slots=True)
class Draft:
    ids: np.ndarray  # int32 [k]
    # Per token, the exact (ids int32, probs float64) it was sampled from; None when greedy.
    dists: list[tuple[np.ndarray, np.ndarray]] | None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class DraftSession(ABC):
    @abstractmethod
    def propose(self, history: Sequence[int], k: int, params: SamplingParams, stream: int) -> Draft:
        """Sync to `history` (prompt + committed tokens) and draft up to `k` tokens after it.

        Token i of the draft sits at absolute position len(history) + i; sampling
        draws with position_rng(seed, stream, position, Purpose.DRAFT).
        """

    @abstractmethod
    def close(self) -> None:
        """Release the session's state; a closed session refuses further proposals."""

    def __enter__(self) -> DraftSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DraftBackend(ABC):
    kind: ClassVar[str]

    @abstractmethod
    def open_session(self) -> DraftSession: ...

    @abstractmethod
    def close(self) -> None:
        """Release shared resources (the model); sessions must be closed first."""


def check_request(
    history: Sequence[int],
    k: int,
    params: SamplingParams,
    stream: int,
    vocab_size: int | None = None,
) -> np.ndarray:
    """Validate one propose() call; return the history as an int32 array."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise DraftError(f"k must be an integer >= 0, got {k!r}")
    if not isinstance(params, SamplingParams):
        raise DraftError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not params.greedy and params.seed is None:
        raise DraftError("sampling needs params.seed: the caller picks one and passes it on")
    if isinstance(stream, bool) or not isinstance(stream, int | np.integer):
        raise DraftError(f"stream must be an integer, got {stream!r}")
    if not 0 <= int(stream) < _U64:
        raise DraftError(f"stream must be in [0, 2**64), got {stream}")
    try:
        ids = np.asarray(history)
    except (TypeError, ValueError) as exc:
        raise DraftError(f"history must be a sequence of token ids: {exc}") from None
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise DraftError(f"history must be a non-empty 1-D sequence of ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DraftError(f"history must hold integer token ids, got dtype {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max + 1
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise DraftError(f"token id {bad} in history is outside [0, {limit})")
    return ids.astype(np.int32, copy=False)
