"""Wire messages of the KV-offload subjects ``sled.v1.kv.<worker_id>.<op>``.

The verifier's hot path is one ``KVAttend`` per worker per layer per
forward: for every offloaded session of the batch, its new tokens' q/k/v
(RoPE applied) and the position of its first new token. The worker appends
k/v, then answers the attention outputs. ``start_pos`` doubles as the
idempotency check: it is the cache length the sender expects before the
append. A retry of the same ``(forward_id, layer)`` whose tokens are already
there is recomputed without appending again; any other mismatch is an error.

q/k/v travel as packed float32 arrays, session after session, each token's
heads contiguous (``[tokens, heads, head_dim]`` flattened). Migration moves a
whole cache in chunks of one layer's token range, so no message outgrows the
NATS payload limit (see ``sled_shared.kv_client``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sled_shared.protocol import Message, _fields_dict, _from_fields, _set, message
from sled_shared.wire import ProtocolError, check_bool, check_float, check_int, check_str

_ID_MAX = (1 << 63) - 1


def check_f32(name: str, value: Any, size: int | None = None) -> np.ndarray:
    """Any float array (of any shape) as a flat float32 array of finite values."""
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise ProtocolError(f"{name} must be a float array, got {arr.dtype}")
    arr = arr.astype(np.float32, copy=False).reshape(-1)
    if size is not None and arr.size != size:
        raise ProtocolError(f"{name} holds {arr.size} values, expected {size}")
    if not np.isfinite(arr).all():
        raise ProtocolError(f"{name} holds non-finite values")
    return arr


def _check_counts(name: str, value: Any, size: int, low: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.size != size or (arr.size and arr.dtype.kind not in "iu"):
        raise ProtocolError(f"{name} must be {size} integers, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < low or arr.max() > np.iinfo(np.int32).max):
        raise ProtocolError(f"{name} must hold values in [{low}, 2^31)")
    return arr.astype(np.int32, copy=False)


def _check_sessions(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ProtocolError("sessions must be a non-empty list of session ids")
    out = tuple(check_str("session", s) for s in value)
    if len(set(out)) != len(out):
        raise ProtocolError("sessions must not repeat within one request")
    return out


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """The attention shape of one model: what a worker's cache is built for."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float = 0.0  # softmax scale; 0: 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        for name in ("num_layers", "q_heads", "kv_heads", "head_dim"):
            _set(self, name, check_int(name, getattr(self, name), 1, 1 << 20))
        if self.q_heads % self.kv_heads:
            raise ProtocolError(f"q_heads={self.q_heads} is not a multiple of kv_heads")
        _set(self, "scale", check_float("scale", self.scale))

    @classmethod
    def from_wire(cls, body: Any) -> KVGeometry:
        if not isinstance(body, dict):
            raise ProtocolError("geometry must be a map")
        try:
            return cls(**body)
        except TypeError as exc:
            raise ProtocolError(f"geometry: {exc}") from None


class _Geometric(Message):
    """Messages with a nested ``geometry`` map."""

    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:
        body = _fields_dict(self)
        body["geometry"] = _fields_dict(body["geometry"])
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]):
        if "geometry" in body:
            body = {**body, "geometry": KVGeometry.from_wire(body["geometry"])}
        return _from_fields(cls, body)


def _check_geometry(value: Any) -> None:
    if not isinstance(value, KVGeometry):
        raise ProtocolError(f"geometry must be KVGeometry, got {type(value).__name__}")


@message("kv.open")
@dataclass(frozen=True, slots=True, eq=False)
class KVOpen(_Geometric):
    """Create an empty session (or confirm an existing one of the same geometry)."""

    session: str
    geometry: KVGeometry

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _check_geometry(self.geometry)


@message("kv.opened")
@dataclass(frozen=True, slots=True, eq=False)
class KVOpened(Message):
    session: str
    length: int  # tokens the worker holds for it (0 for a new session)
    free_tokens: int  # room left in the worker

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _set(self, "length", check_int("length", self.length))
        _set(self, "free_tokens", check_int("free_tokens", self.free_tokens))


@dataclass(frozen=True, slots=True, eq=False)
class _KVBatch(Message):
    """Per-session new tokens of one layer; session i owns tokens
    ``[offsets[i], offsets[i + 1])`` of the packed arrays."""

    forward_id: int  # the sender's forward counter; with layer it names a retry
    layer: int
    sessions: tuple[str, ...]
    start_pos: np.ndarray  # int32 [S]: position of each session's first new token
    new_lens: np.ndarray  # int32 [S]: new tokens per session, >= 1
    kv_heads: int
    head_dim: int
    # Not "k"/"v": "v" is the envelope's version key.
    keys: np.ndarray  # float32 [T * kv_heads * head_dim], T = new_lens.sum()
    values: np.ndarray  # float32, like keys

    def _check_batch(self) -> None:
        _set(self, "forward_id", check_int("forward_id", self.forward_id, 0, _ID_MAX))
        _set(self, "layer", check_int("layer", self.layer, 0, 1 << 20))
        _set(self, "sessions", _check_sessions(self.sessions))
        n = len(self.sessions)
        _set(self, "start_pos", _check_counts("start_pos", self.start_pos, n, 0))
        _set(self, "new_lens", _check_counts("new_lens", self.new_lens, n, 1))
        _set(self, "kv_heads", check_int("kv_heads", self.kv_heads, 1, 1 << 16))
        _set(self, "head_dim", check_int("head_dim", self.head_dim, 1, 1 << 16))
        size = self.tokens * self.kv_heads * self.head_dim
        _set(self, "keys", check_f32("keys", self.keys, size))
        _set(self, "values", check_f32("values", self.values, size))

    @property
    def tokens(self) -> int:
        return int(self.new_lens.sum(dtype=np.int64))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.new_lens, dtype=np.int64)))

    def per_session(self, flat: np.ndarray, heads: int) -> list[np.ndarray]:
        """Views ``[n_i, heads, head_dim]`` of a packed array, one per session."""
        rows = flat.reshape(-1, heads, self.head_dim)
        o = self.offsets.tolist()
        return [rows[o[i] : o[i + 1]] for i in range(len(self.sessions))]


@message("kv.append")
@dataclass(frozen=True, slots=True, eq=False)
class KVAppend(_KVBatch):
    """Store k/v without attending (a prefill whose attention ran elsewhere)."""

    def __post_init__(self) -> None:
        self._check_batch()


@message("kv.appended")
@dataclass(frozen=True, slots=True, eq=False)
class KVAppended(Message):
    forward_id: int
    layer: int
    lengths: np.ndarray  # int32 [S]: each session's length in that layer afterwards

    def __post_init__(self) -> None:
        _set(self, "forward_id", check_int("forward_id", self.forward_id, 0, _ID_MAX))
        _set(self, "layer", check_int("layer", self.layer))
        _set(self, "lengths", _check_counts("lengths", self.lengths, len(self.lengths), 0))


@message("kv.attend")
@dataclass(frozen=True, slots=True, eq=False)
class KVAttend(_KVBatch):
    """Append k/v, then attend each session's queries over its whole cache (causal)."""

    q_heads: int = 0
    q: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [T * q_heads * d]

    def __post_init__(self) -> None:
        self._check_batch()
        _set(self, "q_heads", check_int("q_heads", self.q_heads, 1, 1 << 16))
        if self.q_heads % self.kv_heads:
            raise ProtocolError(f"q_heads={self.q_heads} is not a multiple of kv_heads")
        _set(self, "q", check_f32("q", self.q, self.tokens * self.q_heads * self.head_dim))


@message("kv.attended")
@dataclass(frozen=True, slots=True, eq=False)
class KVAttended(Message):
    forward_id: int
    layer: int
    out: np.ndarray  # float32 [T * q_heads * head_dim], packed like the request's q
    compute_s: float = 0.0  # the worker's append + attention time
    queue_s: float = 0.0  # time the request waited for the worker's cache thread
    appended: bool = True  # False: a retry answered from tokens already stored

    def __post_init__(self) -> None:
        _set(self, "forward_id", check_int("forward_id", self.forward_id, 0, _ID_MAX))
        _set(self, "layer", check_int("layer", self.layer))
        _set(self, "out", check_f32("out", self.out))
        _set(self, "compute_s", check_float("compute_s", self.compute_s))
        _set(self, "queue_s", check_float("queue_s", self.queue_s))
        _set(self, "appended", check_bool("appended", self.appended))


@message("kv.truncate")
@dataclass(frozen=True, slots=True, eq=False)
class KVTruncate(Message):
    """Drop every token at position >= lengths[i] of sessions[i] (rejected drafts)."""

    sessions: tuple[str, ...]
    lengths: np.ndarray  # int32 [S]

    def __post_init__(self) -> None:
        _set(self, "sessions", _check_sessions(self.sessions))
        _set(self, "lengths", _check_counts("lengths", self.lengths, len(self.sessions), 0))


@message("kv.truncated")
@dataclass(frozen=True, slots=True, eq=False)
class KVTruncated(Message):
    sessions: tuple[str, ...]
    lengths: np.ndarray  # int32 [S]: lengths after truncation

    def __post_init__(self) -> None:
        _set(self, "sessions", _check_sessions(self.sessions))
        _set(self, "lengths", _check_counts("lengths", self.lengths, len(self.sessions), 0))


@message("kv.evict")
@dataclass(frozen=True, slots=True, eq=False)
class KVEvict(Message):
    session: str

    def __post_init__(self) -> None:
        check_str("session", self.session)


@message("kv.evicted")
@dataclass(frozen=True, slots=True, eq=False)
class KVEvicted(Message):
    session: str
    held: bool  # False: it was not here (a retried evict)
    free_tokens: int = 0

    def __post_init__(self) -> None:
        check_str("session", self.session)
        _set(self, "held", check_bool("held", self.held))
        _set(self, "free_tokens", check_int("free_tokens", self.free_tokens))


@message("kv.stats")
@dataclass(frozen=True, slots=True, eq=False)
class KVStats(Message):
    """Ask a worker for its load."""


@message("kv.load")
@dataclass(frozen=True, slots=True, eq=False)
class KVLoad(Message):
    worker_id: str
    sessions: int
    block_size: int  # tokens per block
    used_blocks: int
    free_blocks: int
    used_bytes: int
    capacity_bytes: int  # 0 until a geometry is adopted (bytes per block depend on it)
    attend_requests: int = 0  # attend requests served since start
    attend_busy_s: float = 0.0  # their summed compute time

    def __post_init__(self) -> None:
        check_str("worker_id", self.worker_id)
        for name in ("sessions", "used_blocks", "free_blocks", "used_bytes", "capacity_bytes"):
            _set(self, name, check_int(name, getattr(self, name)))
        _set(self, "block_size", check_int("block_size", self.block_size, 1))
        _set(self, "attend_requests", check_int("attend_requests", self.attend_requests))
        _set(self, "attend_busy_s", check_float("attend_busy_s", self.attend_busy_s))

    @property
    def capacity_tokens(self) -> int:
        return (self.used_blocks + self.free_blocks) * self.block_size

    @property
    def used_tokens(self) -> int:
        return self.used_blocks * self.block_size
