"""Per-session attention over the paged KV cache, behind a seam that lets a
session's attention run elsewhere (a CPU worker holding its KV) while the
accelerator attends the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


class AttentionExecutor(ABC):
    """Attention of one session at one layer: store its new k/v, attend its queries."""

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


class PagedAttention(AttentionExecutor):
    """The default: the session's KV lives in the local paged cache."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def attend(
        self, layer: int, seq: SeqSlice, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        self.cache.write(layer, seq.slots, k_new, v_new)
        k, v = self.cache.gather(layer, seq.block_table, seq.context_len)
        # SDPA wants [batch, heads, tokens, head_dim]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=seq.mask,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1).reshape(seq.num_new, -1)


class AttentionRouter:
    """Sends each session's attention to its executor; local unless delegated."""

    def __init__(self, local: AttentionExecutor) -> None:
        self.local = local
        self._delegates: dict[str, AttentionExecutor] = {}

    def delegate(self, session_id: str, executor: AttentionExecutor | None) -> None:
        """Route a session to `executor` from the next layer on; None routes it back home."""
        if executor is None:
            self._delegates.pop(session_id, None)
        else:
            self._delegates[session_id] = executor

    def forget(self, session_id: str) -> None:
        self._delegates.pop(session_id, None)

    def run(
        self,
        layer: int,
        seqs: list[SeqSlice],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KV, D] of the whole batch -> out [T, H * D]."""
        if len(seqs) == 1 and seqs[0].session_id not in self._delegates:
            return self.local.attend(layer, seqs[0], q, k, v)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        pending = []
        # Delegated work is started first so it overlaps the local sessions below.
        for seq in seqs:
            executor = self._delegates.get(seq.session_id)
            if executor is not None:
                rows = slice(seq.start, seq.start + seq.num_new)
                pending.append((rows, executor.submit(layer, seq, q[rows], k[rows], v[rows])))
        for seq in seqs:
            if seq.session_id not in self._delegates:
                rows = slice(seq.start, seq.start + seq.num_new)
                out[rows] = self.local.attend(layer, seq, q[rows], k[rows], v[rows])
        for rows, wait in pending:
            out[rows] = wait()
        return out
