"""Paged KV store in host RAM for the sessions offloaded to a CPU worker.

Storage is fp32: numpy has no fp16 matrix multiply, so fp16 blocks would be
converted on every read, which costs more memory traffic than it saves.
Per layer, keys and values live in ``[kv_heads, num_blocks, block_size,
head_dim]`` arrays: head-major, so a run of consecutive blocks is, for each
kv head, one contiguous ``[tokens, head_dim]`` matrix that BLAS streams
sequentially (a token-major layout puts consecutive rows of one head a whole
token apart, which measured up to 2x slower here). Every layer of a session
uses the same block table; layers fill in order during a forward pass, so
lengths are per layer.

Not thread-safe: one owner thread mutates it; the CPU attention kernel reads
the views ``runs`` returns from worker threads while the owner waits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from sled_kvoffload.block_allocator import BlockAllocator, OutOfBlocksError

__all__ = ["CacheConfig", "CacheStats", "HostKVCache", "OutOfBlocksError"]

DTYPE = np.float32


@dataclass(frozen=True, slots=True)
class CacheConfig:
    num_layers: int
    kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16  # tokens per block

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim", "num_blocks", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * np.dtype(DTYPE).itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, keys and values."""
        return self.token_bytes * self.block_size * self.num_layers


@dataclass(frozen=True, slots=True)
class CacheStats:
    sessions: int
    used_blocks: int
    free_blocks: int
    used_bytes: int
    capacity_bytes: int


@dataclass(slots=True)
class _Session:
    blocks: list[int]  # block table: token t of every layer sits in blocks[t // block_size]
    lengths: np.ndarray  # int64 [num_layers]: tokens stored per layer
    ready: bool = True  # False while a migration import is still filling the blocks
    reserved: int = 0  # tokens the blocks were reserved for by an import
    runs_cache: list[tuple[int, int]] | None = field(default=None)  # (first block, count)


class HostKVCache:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        shape = (config.kv_heads, config.num_blocks, config.block_size, config.head_dim)
        # np.zeros maps pages lazily: RAM is only touched as blocks are used.
        self._k = [np.zeros(shape, DTYPE) for _ in range(config.num_layers)]
        self._v = [np.zeros(shape, DTYPE) for _ in range(config.num_layers)]
        self._alloc = BlockAllocator(config.num_blocks)
        self._sessions: dict[str, _Session] = {}

    # -- queries -----------------------------------------------------------

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def length(self, session: str, layer: int | None = None) -> int:
        """Tokens stored for ``layer``, or the longest layer when ``layer`` is None."""
        s = self._get(session)
        return int(s.lengths.max() if layer is None else s.lengths[self._layer(layer)])

    def is_ready(self, session: str) -> bool:
        return self._get(session).ready

    def session_bytes(self, session: str) -> int:
        return len(self._get(session).blocks) * self.config.block_bytes

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def check_appends(self, appends: list[tuple[str, int, int]]) -> None:
        """Raise before any change if ``(session, layer, new tokens)`` appends cannot all fit.

        Lets a batch append all or nothing, so a failed batch can be retried whole.
        """
        grow: dict[str, int] = {}
        for session, layer, n in appends:
            s = self._sessions.get(session)
            if s is not None:
                self._check_ready(session, s)
            have = 0 if s is None else len(s.blocks)
            end = (0 if s is None else int(s.lengths[self._layer(layer)])) + n
            grow[session] = max(grow.get(session, 0), self.blocks_needed(end) - have)
        need = sum(max(0, g) for g in grow.values())
        if need > self._alloc.num_free:
            raise OutOfBlocksError(
                f"host KV store out of blocks for a batch of {len(grow)} sessions: need {need}, "
                f"{self._alloc.num_free} free of {self._alloc.num_blocks}"
            )

    def free_tokens(self) -> int:
        return self._alloc.num_free * self.config.block_size

    def stats(self) -> CacheStats:
        used = self._alloc.num_blocks - self._alloc.num_free
        return CacheStats(
            sessions=len(self._sessions),
            used_blocks=used,
            free_blocks=self._alloc.num_free,
            used_bytes=used * self.config.block_bytes,
            capacity_bytes=self._alloc.num_blocks * self.config.block_bytes,
        )

    def runs(
        self, session: str, layer: int, upto: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Views (no copies) of the session's keys and values in ``layer``.

        One ``(k, v)`` pair per contiguous run of blocks, each head-major
        ``[kv_heads, tokens, head_dim]``, together covering exactly the
        stored tokens in order (only the first ``upto`` when given).
        """
        s = self._get(session)
        self._check_ready(session, s)
        remaining = int(s.lengths[self._layer(layer)])
        if upto is not None:
            if not 0 <= upto <= remaining:
                raise ValueError(f"upto={upto} outside the {remaining} tokens of layer {layer}")
            remaining = upto
        bs, k_all, v_all = self.config.block_size, self._k[layer], self._v[layer]
        out = []
        for first, count in self._block_runs(s):
            if remaining <= 0:
                break
            tokens = min(count * bs, remaining)
            k = k_all[:, first : first + count].reshape(k_all.shape[0], count * bs, -1)
            v = v_all[:, first : first + count].reshape(v_all.shape[0], count * bs, -1)
            out.append((k[:, :tokens], v[:, :tokens]))
            remaining -= tokens
        return out

    def read(self, session: str, layer: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of keys and values ``[end - start, kv_heads, head_dim]`` of tokens
        ``[start, end)`` in ``layer``."""
        s = self._get(session)
        if not 0 <= start <= end <= s.lengths[self._layer(layer)]:
            raise ValueError(
                f"read [{start}, {end}) outside the {int(s.lengths[layer])} tokens "
                f"of session {session!r} in layer {layer}"
            )
        blk, off = self._slots(s, start, end)
        k = self._k[layer][:, blk, off].transpose(1, 0, 2)
        v = self._v[layer][:, blk, off].transpose(1, 0, 2)
        return np.ascontiguousarray(k), np.ascontiguousarray(v)

    # -- mutations ---------------------------------------------------------

    def append(self, session: str, layer: int, k_new: np.ndarray, v_new: np.ndarray) -> int:
        """Append new tokens' keys and values ``[n, kv_heads, head_dim]`` to ``layer``.

        Creates the session on its first append. Returns the layer's new length.
        """
        layer = self._layer(layer)
        k_new, v_new = self._check_kv(k_new, v_new)
        s = self._sessions.get(session)
        if s is None:
            s = _Session([], np.zeros(self.config.num_layers, np.int64))
        self._check_ready(session, s)
        start = int(s.lengths[layer])
        end = start + k_new.shape[0]
        self._grow(session, s, end)  # may raise OutOfBlocksError: nothing registered yet
        self._sessions[session] = s
        self._write_slots(s, layer, start, k_new, v_new)
        s.lengths[layer] = end
        return end

    def truncate(self, session: str, new_len: int) -> None:
        """Drop every token at position ``>= new_len`` (rejected draft tokens)."""
        s = self._get(session)
        self._check_ready(session, s)
        if not 0 <= new_len <= s.lengths.max():
            raise ValueError(
                f"truncate session {session!r} to {new_len}: must be in [0, {int(s.lengths.max())}]"
            )
        np.minimum(s.lengths, new_len, out=s.lengths)
        keep = self.blocks_needed(new_len)
        self._alloc.release(s.blocks[keep:])
        del s.blocks[keep:]
        s.runs_cache = None

    def evict(self, session: str) -> bool:
        """Free the session's blocks; False when it was not here (a retried evict)."""
        s = self._sessions.pop(session, None)
        if s is None:
            return False
        self._alloc.release(s.blocks)
        return True

    # -- migration support (see sled_kvoffload.migration) -----------------

    def reserve(self, session: str, total_len: int) -> None:
        """Create a not-yet-ready session with blocks for ``total_len`` tokens per layer."""
        if session in self._sessions:
            raise ValueError(f"session {session!r} already exists in this worker")
        if total_len <= 0:
            raise ValueError(f"an imported session needs at least one token, got {total_len}")
        blocks = self._alloc.allocate(self.blocks_needed(total_len), who=session)
        lengths = np.zeros(self.config.num_layers, np.int64)
        self._sessions[session] = _Session(blocks, lengths, ready=False, reserved=total_len)

    def write(self, session: str, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Fill tokens ``[start, start + n)`` of a session being imported."""
        s = self._get(session)
        if s.ready:
            raise ValueError(f"session {session!r} is not being imported")
        layer = self._layer(layer)
        k, v = self._check_kv(k, v)
        if start < 0 or start + k.shape[0] > s.reserved:
            raise ValueError(
                f"chunk [{start}, {start + k.shape[0]}) outside the {s.reserved} reserved tokens"
            )
        self._write_slots(s, layer, start, k, v)

    def mark_ready(self, session: str) -> None:
        s = self._get(session)
        s.lengths[:] = s.reserved
        s.ready = True

    # -- internals ---------------------------------------------------------

    def _get(self, session: str) -> _Session:
        try:
            return self._sessions[session]
        except KeyError:
            raise KeyError(f"unknown session {session!r} in this kvoffload worker") from None

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.config.num_layers})")
        return layer

    @staticmethod
    def _check_ready(session: str, s: _Session) -> None:
        if not s.ready:
            raise ValueError(f"session {session!r} is still being imported")

    def _check_kv(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        k, v = np.asarray(k), np.asarray(v)
        want = (c.kv_heads, c.head_dim)
        if k.ndim != 3 or k.shape[1:] != want or v.shape != k.shape:
            raise ValueError(
                f"k and v must both be [n, {c.kv_heads}, {c.head_dim}], got {k.shape} and {v.shape}"
            )
        if not (np.issubdtype(k.dtype, np.floating) and np.issubdtype(v.dtype, np.floating)):
            raise ValueError(f"k and v must be floating point, got {k.dtype} and {v.dtype}")
        return k, v

    def _grow(self, session: str, s: _Session, tokens: int) -> None:
        need = self.blocks_needed(tokens) - len(s.blocks)
        if need > 0:
            after = s.blocks[-1] if s.blocks else None
            s.blocks.extend(self._alloc.allocate(need, after=after, who=session))
            s.runs_cache = None

    def _slots(self, s: _Session, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(start, end)
        table = np.asarray(s.blocks, dtype=np.int64)
        return table[pos // self.config.block_size], pos % self.config.block_size

    def _write_slots(
        self, s: _Session, layer: int, start: int, k: np.ndarray, v: np.ndarray
    ) -> None:
        blk, off = self._slots(s, start, start + k.shape[0])
        self._k[layer][:, blk, off] = k.transpose(1, 0, 2)
        self._v[layer][:, blk, off] = v.transpose(1, 0, 2)

    @staticmethod
    def _block_runs(s: _Session) -> list[tuple[int, int]]:
        if s.runs_cache is None:
            table = np.asarray(s.blocks, dtype=np.int64)
            if table.size == 0:
                return []
            breaks = np.flatnonzero(np.diff(table) != 1) + 1
            bounds = np.concatenate(([0], breaks, [table.size]))
            s.runs_cache = [(int(table[a]), int(b - a)) for a, b in itertools.pairwise(bounds)]
        return s.runs_cache
