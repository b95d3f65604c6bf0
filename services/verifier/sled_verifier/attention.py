"""Per-session attention over the paged KV cache, behind a seam that lets a
session's attention run elsewhere (a CPU worker holding its KV) while the
accelerator attends the others.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import KVCache


@dataclass(slots=True)
class SeqSlice:
    """One session's rows in a ragged batch."""

    session_id: str
    start: int  # first row of this session in the batch's [T] rows
    num_new: int  # rows (new tokens) this session brings
    context_len: int  # tokens the session holds once the new ones are written
    block_table: torch.Tensor  # [n_blocks] int64
    slots: torch.Tensor  # [num_new] int64, KV slot of each new token
    mask: torch.Tensor | None  # [num_new, context_len] bool causal mask; None when num_new == 1

    def __post_init__(self) -> None:
        if self.num_new <= 0 or self.context_len < self.num_new:
            raise ValueError(f"bad slice: {self.num_new} new of {self.context_len} tokens")
        if self.slots.shape != (self.num_new,):
            raise ValueError(f"slots shape {tuple(self.slots.shape)} != ({self.num_new},)")


@dataclass(slots=True)
class Delegated:
    """One session's slice of a layer's q/k/v, handed to its executor."""

    seq: SeqSlice
    q: torch.Tensor  # [n, H, D]
    k_new: torch.Tensor  # [n, KV, D]
    v_new: torch.Tensor  # [n, KV, D]


class AttentionExecutor(ABC):
    """Attention of one session at one layer: store its new k/v, attend its queries."""

    last_rtt: float = 0.0  # a remote executor: seconds from sending its latest layer to the answer

    @abstractmethod
    def attend(
        self, layer: int, seq: SeqSlice, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        """q [n, H, D], k_new/v_new [n, KV, D] (rope applied) -> out [n, H * D]."""

    def submit(
        self, layer: int, seq: SeqSlice, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """Start the work, return a function that waits for its result.

        A remote executor overrides this to return before the result exists, so
        the router can run the local sessions in the meantime.
        """
        out = self.attend(layer, seq, q, k_new, v_new)
        return lambda: out

    def submit_many(self, layer: int, work: list[Delegated]) -> list[Callable[[], torch.Tensor]]:
        """Start several sessions' work at once (a remote executor sends them in one
        request); one wait function per item, in order."""
        return [self.submit(layer, w.seq, w.q, w.k_new, w.v_new) for w in work]


class PagedAttention(AttentionExecutor):
    """The default: the session's KV lives in the local paged cache."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def attend(
        self, layer: int, seq: SeqSlice, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        self.cache.write(layer, seq.slots, k_new, v_new)
        k, v = self.cache.gather(layer, seq.block_table, seq.context_len)
        return grouped_attention(q, k, v, seq.mask)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Causal GQA of q [n, H, D] over k, v [ctx, KV, D]; mask [n, ctx] bool or None -> [n, H * D].

    The G = H / KV query heads sharing a kv head are stacked into one matrix, so
    each kv head is read once by a single batched matmul and never repeated.
    (On CPU this beats SDPA's flash kernel, whose thread fan-out costs more than
    the math at these sizes.)
    """
    n, h, d = q.shape
    ctx, kv, _ = k.shape
    g = h // kv
    qg = q.view(n, kv, g, d).permute(1, 2, 0, 3).reshape(kv, g * n, d)  # [KV, G * n, D]
    scores = torch.bmm(qg, k.permute(1, 2, 0)) * d**-0.5  # [KV, G * n, ctx]
    if mask is not None:
        scores = scores.view(kv, g, n, ctx).masked_fill(~mask, float("-inf"))
        scores = scores.view(kv, g * n, ctx)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.bmm(probs, v.transpose(0, 1))  # [KV, G * n, D]
    return out.view(kv, g, n, d).permute(2, 0, 1, 3).reshape(n, h * d)


class AttentionRouter:
    """Sends each session's attention to its executor; local unless delegated.

    Keeps running totals of the time spent in local attention and waiting for
    delegated results (profiles and the measured side of plans read them).
    """

    def __init__(self, local: AttentionExecutor) -> None:
        self.local = local
        self._delegates: dict[str, AttentionExecutor] = {}
        self.local_s = 0.0  # seconds in local attention
        self.local_context = 0  # KV tokens the local attention read
        self.wait_s = 0.0  # seconds the forward stalled on delegated results
        self.remote_s = 0.0  # per layer, the slowest delegate's round trip, summed

    def delegate(self, session_id: str, executor: AttentionExecutor | None) -> None:
        """Route a session to `executor` from the next layer on; None routes it back home."""
        if executor is None:
            self._delegates.pop(session_id, None)
        else:
            self._delegates[session_id] = executor

    def forget(self, session_id: str) -> None:
        self._delegates.pop(session_id, None)

    def delegate_of(self, session_id: str) -> AttentionExecutor | None:
        return self._delegates.get(session_id)

    def reset_timers(self) -> None:
        self.local_s, self.local_context, self.wait_s, self.remote_s = 0.0, 0, 0.0, 0.0

    def start(
        self,
        layer: int,
        seqs: list[SeqSlice],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> Callable[[], torch.Tensor]:
        """Start one layer's attention of a batch: q [T, H, D], k/v [T, KV, D].

        Delegated sessions are submitted now; the returned function runs the
        local sessions, then collects the delegated results -> out [T, H * D].
        Whatever the caller does between the two (another sub-batch's linear
        layers) overlaps the delegated work.
        """
        if len(seqs) == 1 and seqs[0].session_id not in self._delegates:
            return lambda: self._attend_one(layer, seqs[0], q, k, v)
        groups: dict[int, tuple[AttentionExecutor, list[Delegated]]] = {}
        local: list[SeqSlice] = []
        for seq in seqs:
            executor = self._delegates.get(seq.session_id)
            if executor is None:
                local.append(seq)
            else:
                rows = slice(seq.start, seq.start + seq.num_new)
                work = Delegated(seq, q[rows], k[rows], v[rows])
                groups.setdefault(id(executor), (executor, []))[1].append(work)
        # Delegated work is started first, one batch per executor, so it overlaps
        # the local sessions and whatever runs before the finish.
        pending = [
            (work.seq, wait)
            for executor, batch in groups.values()
            for work, wait in zip(batch, executor.submit_many(layer, batch), strict=True)
        ]

        def finish() -> torch.Tensor:
            out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
            t0 = time.perf_counter()
            for seq in local:
                rows = slice(seq.start, seq.start + seq.num_new)
                out[rows] = self.local.attend(layer, seq, q[rows], k[rows], v[rows])
                self.local_context += seq.context_len
            t1 = time.perf_counter()
            for seq, wait in pending:
                out[seq.start : seq.start + seq.num_new] = wait()
            self.local_s += t1 - t0
            self.wait_s += time.perf_counter() - t1
            if groups:
                self.remote_s += max(executor.last_rtt for executor, _ in groups.values())
            return out

        return finish

    def _attend_one(
        self, layer: int, seq: SeqSlice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # A lone local session needs no output buffer: its rows are the whole batch.
        t0 = time.perf_counter()
        out = self.local.attend(layer, seq, q, k, v)
        self.local_s += time.perf_counter() - t0
        self.local_context += seq.context_len
        return out
