"""Async client of one KV-offload worker (``sled.v1.kv.<worker_id>.*``), for the verifier.

Every request has a timeout and is retried once on a timeout: each operation
is idempotent on the worker (attend/append by ``(forward_id, layer)`` and
``start_pos``, migration chunks by position), so a retry never appends twice.

Requests never outgrow the server's payload limit (``nc.max_payload``): an
attend or append batch too big for one message is split into several, a
session's tokens across requests in order if need be, sent one after another
(a later piece of a session appends after the earlier ones).

From a thread that is not the event loop's (a torch forward), call these
with ``asyncio.run_coroutine_threadsafe(client.attend(...), loop)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nats.aio.client import Client

from sled_shared import bus, subjects
from sled_shared.kv_migrate_protocol import (
    KVChunk,
    KVExport,
    KVImportBegin,
    KVImportEnd,
    KVMigrateAck,
)
from sled_shared.kv_protocol import (
    KVAppend,
    KVAppended,
    KVAttend,
    KVAttended,
    KVEvict,
    KVEvicted,
    KVGeometry,
    KVLoad,
    KVOpen,
    KVOpened,
    KVStats,
    KVTruncate,
    KVTruncated,
)
from sled_shared.protocol import Message

# msgpack framing, field names and per-session ids around the packed arrays.
_OVERHEAD_BYTES = 4096
_PER_SESSION_BYTES = 320
MIGRATE_IN_FLIGHT = 4


@dataclass(frozen=True, slots=True)
class SessionTokens:
    """One session's new tokens in one layer."""

    session: str
    start_pos: int  # position of k[0]: the length the worker must hold before appending
    k: np.ndarray  # [n, kv_heads, head_dim]
    v: np.ndarray  # [n, kv_heads, head_dim]
    q: np.ndarray | None = None  # [n, q_heads, head_dim]; None for a plain append


@dataclass(frozen=True, slots=True)
class AttendResult:
    outputs: list[np.ndarray]  # per session, float32 [n, q_heads, head_dim]
    compute_s: float  # the worker's append + attention time, summed over requests
    queue_s: float  # time the requests waited on the worker


@dataclass(frozen=True, slots=True)
class _Piece:
    index: int  # which SessionTokens
    lo: int  # token range [lo, hi) of it
    hi: int


class KVClient:
    def __init__(
        self, nc: Client, worker_id: str, timeout_s: float = 5.0, retries: int = 1
    ) -> None:
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        self.nc = nc
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.retries = retries

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def _call(self, op: str, msg: Message, expect: type) -> Message:
        subject = subjects.kv(self.worker_id, op)
        for attempt in range(self.retries + 1):
            try:
                return await bus.request(self.nc, subject, msg, self.timeout_s, expect=expect)
            except bus.RequestTimeout:
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")

    # -- sessions ---------------------------------------------------------------

    async def open(self, session: str, geometry: KVGeometry) -> KVOpened:
        return await self._call("open", KVOpen(session, geometry), KVOpened)

    async def truncate(self, lengths: dict[str, int]) -> KVTruncated:
        msg = KVTruncate(tuple(lengths), np.array(list(lengths.values()), np.int32))
        return await self._call("truncate", msg, KVTruncated)

    async def evict(self, session: str) -> KVEvicted:
        return await self._call("evict", KVEvict(session), KVEvicted)

    async def stats(self) -> KVLoad:
        return await self._call("stats", KVStats(), KVLoad)

    # -- the hot path --------------------------------------------------------------

    async def attend(
        self, forward_id: int, layer: int, batch: Sequence[SessionTokens]
    ) -> AttendResult:
        """Append each session's k/v to ``layer`` and return its attention outputs."""
        if any(t.q is None for t in batch):
            raise ValueError("attend needs q for every session")
        outs: list[list[np.ndarray]] = [[] for _ in batch]
        compute = queue = 0.0
        for pieces in self._split(batch, with_q=True):
            msg = self._batch_msg(KVAttend, forward_id, layer, batch, pieces)
            reply = await self._call("attend", msg, KVAttended)
            compute, queue = compute + reply.compute_s, queue + reply.queue_s
            hq, d = msg.q_heads, msg.head_dim
            rows = reply.out.reshape(-1, hq, d)
            if rows.shape[0] != msg.tokens:
                raise bus.BusError(f"attend answered {rows.shape[0]} rows for {msg.tokens} tokens")
            at = 0
            for p in pieces:
                outs[p.index].append(rows[at : at + p.hi - p.lo])
                at += p.hi - p.lo
        joined = [o[0] if len(o) == 1 else np.concatenate(o) for o in outs]
        return AttendResult(joined, compute, queue)

    async def append(
        self, forward_id: int, layer: int, batch: Sequence[SessionTokens]
    ) -> dict[str, int]:
        """Store k/v without attending; returns each session's length in ``layer``."""
        lengths: dict[str, int] = {}
        for pieces in self._split(batch, with_q=False):
            msg = self._batch_msg(KVAppend, forward_id, layer, batch, pieces)
            reply = await self._call("append", msg, KVAppended)
            lengths.update(zip(msg.sessions, reply.lengths.tolist(), strict=True))
        return lengths

    def _split(self, batch: Sequence[SessionTokens], with_q: bool) -> list[list[_Piece]]:
        if not batch:
            raise ValueError("an empty batch")
        first = batch[0]
        row = first.k.shape[1] * first.k.shape[2] * 2 + (first.q[0].size if with_q else 0)
        budget = self.max_payload - _OVERHEAD_BYTES
        per_token = 4 * row
        requests: list[list[_Piece]] = [[]]
        room = budget
        for i, t in enumerate(batch):
            lo, n = 0, t.k.shape[0]
            while lo < n:
                room -= _PER_SESSION_BYTES
                take = min(n - lo, room // per_token)
                if take <= 0:
                    if not requests[-1]:
                        raise ValueError(f"one token ({per_token} bytes) exceeds the payload limit")
                    requests.append([])
                    room = budget
                    continue
                requests[-1].append(_Piece(i, lo, lo + take))
                room -= take * per_token
                lo += take
        return requests

    @staticmethod
    def _batch_msg(cls, forward_id, layer, batch, pieces: list[_Piece]):
        parts = [(batch[p.index], p) for p in pieces]
        first = batch[0]
        fields = dict(
            forward_id=forward_id,
            layer=layer,
            sessions=tuple(t.session for t, _ in parts),
            start_pos=np.array([t.start_pos + p.lo for t, p in parts], np.int32),
            new_lens=np.array([p.hi - p.lo for _, p in parts], np.int32),
            kv_heads=first.k.shape[1],
            head_dim=first.k.shape[2],
            keys=np.concatenate([t.k[p.lo : p.hi].reshape(-1) for t, p in parts]),
            values=np.concatenate([t.v[p.lo : p.hi].reshape(-1) for t, p in parts]),
        )
        if cls is KVAttend:
            fields["q_heads"] = first.q.shape[1]
            fields["q"] = np.concatenate([t.q[p.lo : p.hi].reshape(-1) for t, p in parts])
        return cls(**fields)

    # -- migration -------------------------------------------------------------------

    def default_chunk_bytes(self) -> int:
        return self.max_payload * 3 // 4

    async def export_session(
        self, session: str, chunk_bytes: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The session's whole cache as k, v ``[num_layers, tokens, kv_heads, head_dim]``."""
        size = chunk_bytes or self.default_chunk_bytes()
        first = await self._call("migrate", KVExport(session, 0, size), KVChunk)
        chunks = [first]
        slots = asyncio.Semaphore(MIGRATE_IN_FLIGHT)

        async def fetch(i: int) -> KVChunk:
            async with slots:
                return await self._call("migrate", KVExport(session, i, size), KVChunk)

        chunks += await asyncio.gather(*(fetch(i) for i in range(1, first.num_chunks)))
        layers = 1 + max(c.layer for c in chunks)
        shape = (layers, first.total_len, first.kv_heads, first.head_dim)
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        have = np.zeros((layers, first.total_len), bool)
        for c in chunks:
            if c.total_len != first.total_len or c.num_chunks != first.num_chunks:
                raise bus.BusError(f"session {session!r} changed while it was exported")
            ck, cv = c.shaped()
            k[c.layer, c.start : c.start + c.tokens] = ck
            v[c.layer, c.start : c.start + c.tokens] = cv
            have[c.layer, c.start : c.start + c.tokens] = True
        if not have.all():
            raise bus.BusError(f"export of session {session!r} left tokens uncovered")
        return k, v

    async def import_session(
        self,
        session: str,
        geometry: KVGeometry,
        k: np.ndarray,
        v: np.ndarray,
        chunk_bytes: int | None = None,
    ) -> KVMigrateAck:
        """Move a cache ``[num_layers, tokens, kv_heads, head_dim]`` into the worker.

        All or nothing: on any failure the partial import is aborted (blocks freed).
        """
        layers, total, hkv, d = k.shape
        if v.shape != k.shape or layers != geometry.num_layers:
            raise ValueError(f"k, v must both be [{geometry.num_layers}, t, h, d], got {k.shape}")
        size = chunk_bytes or self.default_chunk_bytes()
        step = max(1, size // (2 * hkv * d * 4))
        ranges = [(li, s) for li in range(layers) for s in range(0, total, step)]
        await self._call("migrate", KVImportBegin(session, geometry, total), KVMigrateAck)
        slots = asyncio.Semaphore(MIGRATE_IN_FLIGHT)

        async def send(i: int, layer: int, start: int) -> None:
            end = min(start + step, total)
            msg = KVChunk(
                session, i, len(ranges), layer, start, total, hkv, d,
                k[layer, start:end], v[layer, start:end],
            )  # fmt: skip
            async with slots:
                await self._call("migrate", msg, KVMigrateAck)

        try:
            await asyncio.gather(*(send(i, li, s) for i, (li, s) in enumerate(ranges)))
            return await self._call("migrate", KVImportEnd(session), KVMigrateAck)
        except BaseException:
            await asyncio.shield(self._abort(session))
            raise

    async def _abort(self, session: str) -> None:
        # A worker that is gone or unreachable leaves nothing more to undo from here.
        with contextlib.suppress(bus.BusError):
            await self._call("migrate", KVImportEnd(session, abort=True), KVMigrateAck)
