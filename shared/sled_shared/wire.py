"""Low-level wire encoding shared by every message: msgpack, packed numpy
arrays, field checks and the errors a receiver turns into an ErrorReply.

Token ids and probabilities travel as raw little-endian bytes inside msgpack
extension types (int32 / float32 / float64), so a draft of K tokens costs 4K
bytes instead of K msgpack integers, and decoding is one `np.frombuffer`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# Codes an ErrorReply may carry; receivers branch on them, so the set is closed.
ERROR_CODES = frozenset(
    {
        "bad_request",  # undecodable or invalid message: do not retry as is
        "unsupported_version",  # the peer speaks another protocol version
        "unknown_session",  # evicted or never opened: open a new session
        "at_capacity",  # retry after retry_after_s, or elsewhere
        "unavailable",  # cannot answer yet (e.g. no cost model fitted): fall back locally
        "internal",  # a bug on the server side
    }
)

_EXT_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<i4"),
    2: np.dtype("<f4"),
    3: np.dtype("<f8"),
}
_EXT_CODES = {dt.str: code for code, dt in _EXT_DTYPES.items()}
_INT32_MAX = np.iinfo(np.int32).max
# Tolerance on a sparse draft distribution's total: float32 rounding of a
# top-k of a few hundred entries stays far below it; a real bug does not.
_DIST_SUM_TOL = 1e-3


class ServiceError(Exception):
    """A failure a service reports to its caller as an ErrorReply.

    Handlers raise it (for example code "unknown_session"); the bus turns it
    into the reply. Any other exception becomes code "internal".
    """

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; known: {sorted(ERROR_CODES)}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class ProtocolError(ServiceError, ValueError):
    """A message that cannot be decoded or holds invalid fields."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(code, message)


def _ext_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        code = _EXT_CODES.get(obj.dtype.newbyteorder("<").str)
        if code is None or obj.ndim != 1:
            raise TypeError(f"cannot send array of dtype {obj.dtype} and shape {obj.shape}")
        return msgpack.ExtType(code, np.ascontiguousarray(obj, _EXT_DTYPES[code]).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> np.ndarray:
    dtype = _EXT_DTYPES.get(code)
    if dtype is None:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    if len(data) % dtype.itemsize:
        raise ProtocolError(f"packed {dtype} array of {len(data)} bytes is truncated")
    # Read-only view on the received bytes: no copy, and nobody mutates a message.
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, default=_ext_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


# Field checks used by every message's __post_init__. They normalise numpy
# scalars and lists to the wire types and raise ProtocolError("bad_request").


def check_int(name: str, value: Any, low: int | None = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProtocolError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(f"{name}={value} is outside [{low}, {high}]")
    return value


def check_float(name: str, value: Any, low: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProtocolError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        raise ProtocolError(f"{name}={value} must be finite and >= {low}")
    return value


def check_str(name: str, value: Any, allowed: frozenset[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{name} must be a non-empty string, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ProtocolError(f"{name}={value!r} is not one of {sorted(allowed)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ProtocolError(f"{name} must be a boolean, got {type(value).__name__}")
    return bool(value)


def check_ids(name: str, value: Any) -> np.ndarray:
    """Token ids: a 1-D int32 array of values >= 0."""
    if not isinstance(value, np.ndarray | Sequence) or isinstance(value, str | bytes):
        raise ProtocolError(f"{name} must be an array of token ids, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ProtocolError(f"{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.dtype != np.int32 and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise ProtocolError(f"{name} holds ids outside [0, {_INT32_MAX}]")
    arr = arr.astype(np.int32, copy=False)
    if arr.min() < 0:
        raise ProtocolError(f"{name} holds negative token ids")
    return arr


def check_probs(name: str, value: Any) -> np.ndarray:
    """Probabilities: a 1-D float32/float64 array of finite values in [0, 1]."""
    if not isinstance(value, np.ndarray | Sequence) or isinstance(value, str | bytes):
        raise ProtocolError(f"{name} must be an array of probabilities")
    arr = np.asarray(value)
    if arr.dtype not in (np.float32, np.float64):
        if arr.size and arr.dtype.kind not in "f":
            raise ProtocolError(f"{name} must be a float array, got {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ProtocolError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise ProtocolError(f"{name} must hold finite probabilities in [0, 1]")
    return arr


def check_optional(name: str, value: Any, check, *args) -> Any:
    return None if value is None else check(name, value, *args)


def check_sparse_dists(draft: np.ndarray, dists: Any) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """One (ids, probs) distribution per draft token, each holding its token.

    Checked on the concatenation, so the cost is a few numpy calls whatever K is.
    """
    if not isinstance(dists, list | tuple) or len(dists) != len(draft):
        raise ProtocolError(
            f"draft_dists must hold one (ids, probs) pair per draft token ({len(draft)})"
        )
    if not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in dists):
        raise ProtocolError("each draft_dists entry must be an (ids, probs) pair")
    if not dists:
        return ()
    lens = [len(ids) if hasattr(ids, "__len__") else -1 for ids, _ in dists]
    if min(lens) < 1 or lens != [len(p) if hasattr(p, "__len__") else -1 for _, p in dists]:
        raise ProtocolError("draft_dists: ids and probs must be non-empty and of equal length")
    ids = check_ids("draft_dists ids", np.concatenate([np.asarray(i) for i, _ in dists]))
    probs = check_probs("draft_dists probs", np.concatenate([np.asarray(p) for _, p in dists]))
    starts = np.cumsum([0, *lens[:-1]])
    sums = np.add.reduceat(probs.astype(np.float64, copy=False), starts)
    if np.abs(sums - 1.0).max() > _DIST_SUM_TOL:
        bad = int(np.argmax(np.abs(sums - 1.0)))
        raise ProtocolError(f"draft_dists[{bad}] probabilities sum to {sums[bad]}, not 1")
    # The exact rule divides by q(draft token): it must be in the support.
    held = np.logical_or.reduceat((ids == np.repeat(draft, lens)) & (probs > 0), starts)
    if not held.all():
        bad = int(np.argmin(held))
        raise ProtocolError(
            f"draft token {int(draft[bad])} at index {bad} has zero draft probability"
        )
    bounds = [(int(a), int(a) + n) for a, n in zip(starts, lens, strict=True)]
    return tuple((ids[a:b], probs[a:b]) for a, b in bounds)  # views, not copies
