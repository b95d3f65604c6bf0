"""One KV-offload worker's state and operations, free of NATS.

The worker adopts the geometry of the first session it is given (so one
worker serves any model) and keeps it while it holds sessions. Not
thread-safe: the service runs every call on one owner thread.

Idempotency of appends: per session and layer the worker remembers which
``(start, n)`` token ranges the latest ``forward_id`` appended. A request
whose ``start_pos`` equals the stored length appends; one that names a range
the same forward already appended (a retry) is attended over the prefix
ending with it and appends nothing; anything else is a ``bad_request`` that
changes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sled_shared.kv_migrate_protocol import KVChunk, KVExport, KVImportBegin, KVImportEnd
from sled_shared.kv_protocol import KVAppend, KVAttend, KVGeometry, KVLoad, KVTruncate
from sled_shared.wire import ProtocolError, ServiceError

from sled_kvoffload.block_allocator import OutOfBlocksError
from sled_kvoffload.cpu_attention import AttendRequest, CpuAttention
from sled_kvoffload.host_cache import CacheConfig, HostKVCache
from sled_kvoffload.migration import KVChunk as LibChunk
from sled_kvoffload.migration import SessionImport, export_chunk

# Blocks free up only as sessions finish or move; a guess that avoids hammering.
FULL_RETRY_AFTER_S = 0.5


@dataclass(frozen=True, slots=True)
class AttendResult:
    out: np.ndarray  # float32 [T, q_heads, head_dim], sessions in request order
    appended: bool  # False when every session was a retry
    compute_s: float
    context: int  # KV tokens attended over, summed over sessions (profile sample)


# layer -> (forward_id, {(start, n)} it appended there)
_Ledger = dict[int, tuple[int, set[tuple[int, int]]]]


class KVWorker:
    def __init__(self, worker_id: str, num_blocks: int, block_size: int = 16, threads: int = 0):
        if num_blocks <= 0 or block_size <= 0 or threads < 0:
            raise ValueError("num_blocks and block_size must be positive, threads >= 0")
        self.worker_id = worker_id
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.threads = threads
        self.geometry: KVGeometry | None = None
        self._cache: HostKVCache | None = None
        self._attn: CpuAttention | None = None
        self._ledger: dict[str, _Ledger] = {}
        self._imports: dict[str, SessionImport] = {}
        self._used: dict[str, float] = {}  # session -> monotonic time of its last request
        self.attend_requests = 0
        self.attend_busy_s = 0.0

    # -- sessions -----------------------------------------------------------

    def open(self, session: str, geometry: KVGeometry) -> int:
        """Create an empty session; returns its length (an existing one's, if re-opened)."""
        cache = self._adopt(geometry)
        if session in self._imports:
            raise ProtocolError(f"session {session!r} is being imported")
        self._used[session] = time.monotonic()
        if session not in cache:
            # An empty session exists from its first append on; until then the ledger marks it.
            self._ledger.setdefault(session, {})
            return 0
        return cache.length(session)

    def evict(self, session: str) -> bool:
        held = session in self._ledger or session in self._imports
        imp = self._imports.pop(session, None)
        if imp is not None:
            imp.abort()
        elif self._cache is not None:
            self._cache.evict(session)
        self._ledger.pop(session, None)
        self._used.pop(session, None)
        return held

    def expire(self, idle_s: float, now: float | None = None) -> list[str]:
        """Evict sessions untouched for ``idle_s`` (their verifier is gone); returns them."""
        now = time.monotonic() if now is None else now
        stale = [s for s, t in self._used.items() if now - t > idle_s]
        for s in stale:
            self.evict(s)
        return stale

    def truncate(self, msg: KVTruncate) -> np.ndarray:
        cache = self._require_cache()
        for s, n in zip(msg.sessions, msg.lengths.tolist(), strict=True):
            self._check_session(s)
            if s in cache and n > cache.length(s):
                raise ProtocolError(f"truncate {s!r} to {n}: it holds {cache.length(s)} tokens")
            if s not in cache and n:
                raise ProtocolError(f"truncate {s!r} to {n}: it holds no tokens")
        out = []
        for s, n in zip(msg.sessions, msg.lengths.tolist(), strict=True):
            if s in cache:
                cache.truncate(s, n)
                self._ledger[s].clear()
            out.append(n)
        return np.array(out, np.int32)

    # -- the hot path -------------------------------------------------------------

    def append(self, msg: KVAppend) -> np.ndarray:
        cache = self._require_cache()
        self._check_shape(msg, None)
        stored = self._classify(msg)
        ks, vs = msg.per_session(msg.keys, msg.kv_heads), msg.per_session(msg.values, msg.kv_heads)
        fresh = [i for i, s in enumerate(msg.sessions) if s not in stored]
        with _capacity():
            cache.check_appends([(msg.sessions[i], msg.layer, ks[i].shape[0]) for i in fresh])
        for i in fresh:
            cache.append(msg.sessions[i], msg.layer, ks[i], vs[i])
        self._record(msg, fresh)
        return np.array([cache.length(s, msg.layer) for s in msg.sessions], np.int32)

    def attend(self, msg: KVAttend) -> AttendResult:
        self._require_cache()
        attn = self._attn
        assert attn is not None
        self._check_shape(msg, msg.q_heads)
        start = time.perf_counter()
        stored = self._classify(msg)
        qs = msg.per_session(msg.q, msg.q_heads)
        ks, vs = msg.per_session(msg.keys, msg.kv_heads), msg.per_session(msg.values, msg.kv_heads)
        reqs = [AttendRequest(s, qs[i], ks[i], vs[i]) for i, s in enumerate(msg.sessions)]
        with _capacity():
            outs = attn.attend(msg.layer, reqs, stored)
        fresh = [i for i, s in enumerate(msg.sessions) if s not in stored]
        self._record(msg, fresh)
        elapsed = time.perf_counter() - start
        self.attend_requests += 1
        self.attend_busy_s += elapsed
        context = int(msg.start_pos.sum(dtype=np.int64)) + msg.tokens
        return AttendResult(np.concatenate(outs), bool(fresh), elapsed, context)

    # -- migration ----------------------------------------------------------------

    def export(self, msg: KVExport) -> KVChunk:
        cache = self._require_cache()
        self._check_session(msg.session)
        if msg.session not in cache:
            raise ProtocolError(f"session {msg.session!r} holds no tokens to export")
        try:
            chunk, count = export_chunk(cache, msg.session, msg.index, msg.chunk_bytes)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        return KVChunk(
            chunk.session, msg.index, count, chunk.layer, chunk.start, chunk.total_len,
            cache.config.kv_heads, cache.config.head_dim, chunk.k, chunk.v,
        )  # fmt: skip

    def import_begin(self, msg: KVImportBegin) -> SessionImport:
        cache = self._adopt(msg.geometry)
        imp = self._imports.get(msg.session)
        if imp is not None and imp.total_len == msg.total_len:
            return imp  # a retried begin
        if imp is not None or msg.session in self._ledger:
            raise ProtocolError(f"session {msg.session!r} already exists in this worker")
        with _capacity():
            imp = SessionImport(cache, msg.session, msg.total_len)
        self._imports[msg.session] = imp
        self._used[msg.session] = time.monotonic()
        return imp

    def import_chunk(self, msg: KVChunk) -> SessionImport:
        imp = self._import(msg.session)
        g = self.geometry
        assert g is not None
        if (msg.kv_heads, msg.head_dim) != (g.kv_heads, g.head_dim):
            raise ProtocolError(f"chunk of {msg.kv_heads} kv heads x {msg.head_dim} does not fit")
        k, v = msg.shaped()
        try:
            imp.add(LibChunk(msg.session, msg.layer, msg.start, msg.total_len, k, v))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        return imp

    def import_end(self, msg: KVImportEnd) -> tuple[int, bool]:
        """(total_len, complete); a retried end of a finished import answers complete."""
        imp = self._imports.get(msg.session)
        if imp is None:
            cache = self._cache
            if msg.session in self._ledger and cache is not None and msg.session in cache:
                return cache.length(msg.session), True
            if msg.abort:
                return 0, True
            raise ServiceError("unknown_session", f"no import of session {msg.session!r}")
        if msg.abort:
            imp.abort()
            del self._imports[msg.session]
            return imp.total_len, True
        try:
            imp.finish()
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        del self._imports[msg.session]
        self._ledger[msg.session] = {}
        return imp.total_len, True

    # -- load ---------------------------------------------------------------------------

    def load(self) -> KVLoad:
        if self._cache is None:
            return KVLoad(self.worker_id, 0, self.block_size, 0, self.num_blocks, 0, 0)
        st = self._cache.stats()
        return KVLoad(
            self.worker_id, len(self._ledger) + len(self._imports), self.block_size,
            st.used_blocks, st.free_blocks, st.used_bytes, st.capacity_bytes,
            self.attend_requests, self.attend_busy_s,
        )  # fmt: skip

    def free_tokens(self) -> int:
        return self.load().free_blocks * self.block_size

    def close(self) -> None:
        if self._attn is not None:
            self._attn.close()
            self._attn = None

    # -- internals ---------------------------------------------------------------

    def _adopt(self, geometry: KVGeometry) -> HostKVCache:
        if self.geometry == geometry and self._cache is not None:
            return self._cache
        if self._ledger or self._imports:
            raise ProtocolError(
                f"this worker holds sessions of geometry {self.geometry}; "
                f"it cannot also take {geometry} (use another worker)"
            )
        self.close()
        config = CacheConfig(
            geometry.num_layers, geometry.kv_heads, geometry.head_dim,
            self.num_blocks, self.block_size,
        )  # fmt: skip
        self._cache = HostKVCache(config)
        self._attn = CpuAttention(
            self._cache, geometry.q_heads, self.threads, geometry.scale or None
        )
        self.geometry = geometry
        return self._cache

    def _require_cache(self) -> HostKVCache:
        if self._cache is None:
            raise ServiceError("unknown_session", "this worker holds no sessions (open one first)")
        return self._cache

    def _check_session(self, session: str) -> None:
        if session in self._imports:
            raise ProtocolError(f"session {session!r} is still being imported")
        if session not in self._ledger:
            raise ServiceError("unknown_session", f"unknown session {session!r} on this worker")
        self._used[session] = time.monotonic()

    def _import(self, session: str) -> SessionImport:
        imp = self._imports.get(session)
        if imp is None:
            raise ServiceError("unknown_session", f"no import of session {session!r} (begin first)")
        self._used[session] = time.monotonic()
        return imp

    def _check_shape(self, msg: KVAppend | KVAttend, q_heads: int | None) -> None:
        g = self.geometry
        assert g is not None
        got = (msg.kv_heads, msg.head_dim, q_heads or g.q_heads)
        if got != (g.kv_heads, g.head_dim, g.q_heads):
            raise ProtocolError(
                f"request shape (kv_heads, head_dim, q_heads)={got} does not match the "
                f"sessions' geometry {(g.kv_heads, g.head_dim, g.q_heads)}"
            )
        if msg.layer >= g.num_layers:
            raise ProtocolError(f"layer {msg.layer} out of range [0, {g.num_layers})")

    def _classify(self, msg: KVAppend | KVAttend) -> dict[str, int]:
        """Sessions whose tokens are already stored (retries) -> prefix length to attend."""
        cache = self._cache
        assert cache is not None
        stored: dict[str, int] = {}
        rows = zip(msg.sessions, msg.start_pos.tolist(), msg.new_lens.tolist(), strict=True)
        for s, start, n in rows:
            self._check_session(s)
            have = cache.length(s, msg.layer) if s in cache else 0
            if have == start:
                continue
            fid, ranges = self._ledger[s].get(msg.layer, (-1, set()))
            if fid == msg.forward_id and (start, n) in ranges and have >= start + n:
                stored[s] = start + n
                continue
            raise ProtocolError(
                f"session {s!r} layer {msg.layer} holds {have} tokens, but forward "
                f"{msg.forward_id} appends at position {start}"
            )
        return stored

    def _record(self, msg: KVAppend | KVAttend, fresh: list[int]) -> None:
        for i in fresh:
            s = msg.sessions[i]
            entry = (int(msg.start_pos[i]), int(msg.new_lens[i]))
            fid, ranges = self._ledger[s].get(msg.layer, (-1, set()))
            if fid != msg.forward_id:
                self._ledger[s][msg.layer] = (msg.forward_id, {entry})
            else:
                ranges.add(entry)


@contextlib.contextmanager
def _capacity() -> Iterator[None]:
    """Out of host blocks -> ``at_capacity`` with a retry hint (nothing was changed);
    a shape or range the cache refuses -> ``bad_request``."""
    try:
        yield
    except OutOfBlocksError as exc:
        raise ServiceError("at_capacity", str(exc), FULL_RETRY_AFTER_S) from None
    except ServiceError:
        raise
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
