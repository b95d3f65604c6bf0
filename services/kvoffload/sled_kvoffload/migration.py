"""Moving a whole session's KV cache between tiers in bounded chunks.

NATS limits a message to about 1 MB by default, and one token of a 7B model
holds 1 MB of KV over all layers, so a chunk is a token range of one layer.
The sender walks layer by layer; the receiver reserves every block before
the first chunk lands (so running out of memory fails before anything
moves), accepts chunks in any order and duplicates (retries), and only
exposes the session once every token of every layer has arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sled_kvoffload.host_cache import DTYPE, HostKVCache

DEFAULT_CHUNK_BYTES = 768 * 1024  # payload budget: leaves headroom under NATS' 1 MB default


@dataclass(frozen=True, slots=True)
class KVChunk:
    session: str
    layer: int
    start: int  # position of k[0] in the session's sequence
    total_len: int  # tokens per layer in the whole cache being moved
    k: np.ndarray  # float32 [t, kv_heads, head_dim]: keys of tokens [start, start + t)
    v: np.ndarray  # float32 [t, kv_heads, head_dim]: their values

    def __post_init__(self) -> None:
        if not self.session:
            raise ValueError("KVChunk.session must not be empty")
        if self.layer < 0 or self.start < 0 or self.total_len <= 0:
            raise ValueError(
                f"bad KVChunk: layer={self.layer} start={self.start} total_len={self.total_len}"
            )
        if self.k.ndim != 3 or self.k.shape != self.v.shape or self.k.shape[0] == 0:
            raise ValueError(
                f"KVChunk k/v must be equal non-empty [t, h, d], got {self.k.shape} "
                f"and {self.v.shape}"
            )
        if self.start + self.k.shape[0] > self.total_len:
            raise ValueError(
                f"KVChunk tokens [{self.start}, {self.start + self.k.shape[0]}) "
                f"exceed total_len {self.total_len}"
            )

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def chunk_tokens(kv_heads: int, head_dim: int, chunk_bytes: int) -> int:
    """Tokens of one layer that fit in ``chunk_bytes`` of K+V payload."""
    per_token = 2 * kv_heads * head_dim * np.dtype(DTYPE).itemsize
    if chunk_bytes < per_token:
        raise ValueError(
            f"chunk_bytes={chunk_bytes} is below one token's K+V of one layer ({per_token} bytes)"
        )
    return chunk_bytes // per_token


def _exportable_length(cache: HostKVCache, session: str) -> int:
    total = cache.length(session)
    lengths = {cache.length(session, layer) for layer in range(cache.config.num_layers)}
    if lengths != {total}:
        raise ValueError(
            f"session {session!r} is mid-forward (layer lengths {sorted(lengths)}); "
            "migrate between iterations"
        )
    if total == 0:
        raise ValueError(f"session {session!r} holds no tokens to migrate")
    return total


def export_session(
    cache: HostKVCache, session: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[KVChunk]:
    """Yield the session's whole cache as chunks of at most ``chunk_bytes`` of K+V."""
    cfg = cache.config
    total = _exportable_length(cache, session)
    step = chunk_tokens(cfg.kv_heads, cfg.head_dim, chunk_bytes)
    for layer in range(cfg.num_layers):
        for start in range(0, total, step):
            end = min(start + step, total)
            k, v = cache.read(session, layer, start, end)
            yield KVChunk(session, layer, start, total, k, v)


def export_chunk(
    cache: HostKVCache, session: str, index: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[KVChunk, int]:
    """Chunk ``index`` of what ``export_session`` yields, and how many there are.

    Random access, so a remote reader can fetch chunks in any order or again.
    """
    cfg = cache.config
    total = _exportable_length(cache, session)
    step = chunk_tokens(cfg.kv_heads, cfg.head_dim, chunk_bytes)
    per_layer = -(-total // step)
    count = per_layer * cfg.num_layers
    if not 0 <= index < count:
        raise ValueError(f"chunk index {index} outside the {count} chunks of session {session!r}")
    layer, start = divmod(index, per_layer)
    start *= step
    k, v = cache.read(session, layer, start, min(start + step, total))
    return KVChunk(session, layer, start, total, k, v), count


class SessionImport:
    """Receiver side of one migration into ``cache``."""

    def __init__(self, cache: HostKVCache, session: str, total_len: int) -> None:
        cache.reserve(session, total_len)  # raises OutOfBlocksError before any data moves
        self._cache = cache
        self.session = session
        self.total_len = total_len
        self._have = np.zeros((cache.config.num_layers, total_len), dtype=bool)  # [layer, token]
        self._done = False

    @property
    def received_fraction(self) -> float:
        return float(self._have.mean())

    @property
    def complete(self) -> bool:
        return bool(self._have.all())

    def add(self, chunk: KVChunk) -> None:
        if self._done:
            raise ValueError(f"import of session {self.session!r} already finished")
        if chunk.session != self.session or chunk.total_len != self.total_len:
            raise ValueError(
                f"chunk for {chunk.session!r} (total_len {chunk.total_len}) does not belong to "
                f"the import of {self.session!r} (total_len {self.total_len})"
            )
        if chunk.layer >= self._cache.config.num_layers:
            raise ValueError(f"chunk layer {chunk.layer} out of range")
        self._cache.write(self.session, chunk.layer, chunk.start, chunk.k, chunk.v)
        self._have[chunk.layer, chunk.start : chunk.start + chunk.k.shape[0]] = True

    def finish(self) -> None:
        """Expose the session for append/attend; raises if any token is missing."""
        if not self.complete:
            missing = int((~self._have).sum())
            raise ValueError(
                f"import of session {self.session!r} incomplete: {missing} layer-tokens missing"
            )
        self._cache.mark_ready(self.session)
        self._done = True

    def abort(self) -> None:
        """Give the reserved blocks back (the sender failed or gave up)."""
        if not self._done:
            self._cache.evict(self.session)
            self._done = True
