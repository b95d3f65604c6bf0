"""Wire messages of ``sled.v1.kv.<worker_id>.migrate``: moving a session's
whole KV cache between the accelerator tier and a worker, in chunks.

A chunk is a token range of one layer, sized by the requester so that it
fits the NATS payload limit. Both directions are retry-safe:

* export (worker -> verifier): ``KVExport(session, index, chunk_bytes)`` is
  answered with chunk ``index`` of ``num_chunks``; reads change nothing, so
  chunks may be fetched in any order, in parallel, and again.
* import (verifier -> worker): ``KVImportBegin`` reserves every block first
  (a full worker answers ``at_capacity`` before any data moves), then
  ``KVChunk``s arrive in any order (duplicates are harmless), and
  ``KVImportEnd`` exposes the session, or answers which tokens are missing.
  ``KVImportEnd(abort=True)`` gives the blocks back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sled_shared.kv_protocol import KVGeometry, _check_geometry, _Geometric, check_f32
from sled_shared.protocol import Message, _set, message
from sled_shared.wire import ProtocolError, check_bool, check_float, check_int, check_str

# A reply the requester cannot receive is useless; 64 MiB is far above any NATS limit.
MAX_CHUNK_BYTES = 64 << 20


@message("kv.export")
@dataclass(frozen=True, slots=True, eq=False)
class KVExport(Message):
    session: str
    index: int  # which chunk, 0-based; chunk 0's answer tells num_chunks
    chunk_bytes: int  # most K+V payload bytes per chunk (keep it under the NATS limit)

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _set(self, "index", check_int("index", self.index))
        _set(self, "chunk_bytes", check_int("chunk_bytes", self.chunk_bytes, 8, MAX_CHUNK_BYTES))


@message("kv.import.begin")
@dataclass(frozen=True, slots=True, eq=False)
class KVImportBegin(_Geometric):
    session: str
    geometry: KVGeometry
    total_len: int  # tokens per layer in the cache being moved in

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _check_geometry(self.geometry)
        _set(self, "total_len", check_int("total_len", self.total_len, 1))


@message("kv.chunk")
@dataclass(frozen=True, slots=True, eq=False)
class KVChunk(Message):
    """Keys and values of tokens ``[start, start + t)`` of one layer."""

    session: str
    index: int
    num_chunks: int
    layer: int
    start: int
    total_len: int  # tokens per layer in the whole cache
    kv_heads: int
    head_dim: int
    keys: np.ndarray  # float32 [t * kv_heads * head_dim]
    values: np.ndarray  # float32, like keys

    def __post_init__(self) -> None:
        check_str("session", self.session)
        for name in ("index", "layer", "start"):
            _set(self, name, check_int(name, getattr(self, name)))
        for name in ("num_chunks", "total_len", "kv_heads", "head_dim"):
            _set(self, name, check_int(name, getattr(self, name), 1))
        if self.index >= self.num_chunks:
            raise ProtocolError(f"chunk index {self.index} >= num_chunks {self.num_chunks}")
        _set(self, "keys", check_f32("keys", self.keys))
        row = self.kv_heads * self.head_dim
        if self.keys.size == 0 or self.keys.size % row:
            raise ProtocolError(f"keys hold {self.keys.size} values, not a multiple of {row}")
        _set(self, "values", check_f32("values", self.values, self.keys.size))
        if self.start + self.tokens > self.total_len:
            raise ProtocolError(
                f"chunk tokens [{self.start}, {self.start + self.tokens}) exceed "
                f"total_len {self.total_len}"
            )

    @property
    def tokens(self) -> int:
        return self.keys.size // (self.kv_heads * self.head_dim)

    def shaped(self) -> tuple[np.ndarray, np.ndarray]:
        """k and v as ``[t, kv_heads, head_dim]`` views."""
        shape = (self.tokens, self.kv_heads, self.head_dim)
        return self.keys.reshape(shape), self.values.reshape(shape)


@message("kv.import.end")
@dataclass(frozen=True, slots=True, eq=False)
class KVImportEnd(Message):
    session: str
    abort: bool = False  # True: drop the partial import and free its blocks

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _set(self, "abort", check_bool("abort", self.abort))


@message("kv.migrate.ack")
@dataclass(frozen=True, slots=True, eq=False)
class KVMigrateAck(Message):
    session: str
    total_len: int
    received: float  # share of layer-tokens received so far, 0..1
    complete: bool  # the session is ready for append/attend (or gone, after an abort)

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _set(self, "total_len", check_int("total_len", self.total_len))
        _set(self, "received", check_float("received", self.received))
        _set(self, "complete", check_bool("complete", self.complete))
