"""Our Llama-family forward pass over a ragged batch of sessions.

Linear layers run once over all T new tokens of the batch; only attention is
per session (through the AttentionRouter), and logits are computed only for
the rows the caller asks for. Two batches can also run interleaved per layer
(``forward_pipelined``), through the same per-layer start and finish steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionRouter, SeqSlice
from .weights import ModelSpec, ModelWeights


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, each session's new tokens, concatenated
    positions: torch.Tensor  # [T] int64, absolute position of each token
    seqs: list[SeqSlice]  # in row order, covering [0, T)
    logit_rows: torch.Tensor  # [R] int64, rows of T whose next-token logits are wanted

    def __post_init__(self) -> None:
        t = self.input_ids.shape[0]
        if self.input_ids.dim() != 1 or self.positions.shape != (t,):
            raise ValueError("input_ids and positions must both be [T]")
        if sum(s.num_new for s in self.seqs) != t:
            raise ValueError("session slices do not cover the batch")


class LlamaModel:
    def __init__(
        self, spec: ModelSpec, weights: ModelWeights, max_len: int, device: torch.device
    ) -> None:
        self.spec = spec
        self.w = weights
        self.device = device
        dtype = weights.embed.dtype
        # Same arithmetic as transformers (fp32 angles, cast after cos/sin) so positions match.
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = pos[:, None] * spec.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
        self.cos = (angles.cos() * spec.rope_scale).to(device=device, dtype=dtype)
        self.sin = (angles.sin() * spec.rope_scale).to(device=device, dtype=dtype)
        self.max_len = max_len
        # On CPU a [hidden, V] copy of the (tall) head makes the one-row decode matvec ~2x
        # faster than the [V, hidden] layout; GPUs handle either layout equally well.
        self._head_t = weights.lm_head.t().contiguous() if device.type == "cpu" else None

    @property
    def dtype(self) -> torch.dtype:
        return self.w.embed.dtype

    def forward(self, batch: ForwardBatch, attention: AttentionRouter) -> torch.Tensor:
        """Logits [R, V] (float32) for batch.logit_rows."""
        st = self._begin(batch)
        for i in range(len(self.w.layers)):
            self._finish_layer(i, st, self._start_layer(i, st, attention))
        return self._logits(st)

    def forward_pipelined(
        self, first: ForwardBatch, second: ForwardBatch, attention: AttentionRouter
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two sub-batches interleaved per layer (NEO's asymmetric pipelining): each
        one's delegated (host-tier) attention is in flight while the other's linear
        layers run. Logits [R, V] of each, as forward would give them."""
        a, b = self._begin(first), self._begin(second)
        for i in range(len(self.w.layers)):
            wait_a = self._start_layer(i, a, attention)
            wait_b = self._start_layer(i, b, attention)
            self._finish_layer(i, a, wait_a)
            self._finish_layer(i, b, wait_b)
        return self._logits(a), self._logits(b)

    def _begin(self, batch: ForwardBatch) -> _Rows:
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[batch.positions].unsqueeze(1)
        return _Rows(batch, F.embedding(batch.input_ids, self.w.embed), cos, sin)

    def _start_layer(
        self, i: int, st: _Rows, attention: AttentionRouter
    ) -> Callable[[], torch.Tensor]:
        """Norm, qkv, rope, and the attention started; returns its wait function."""
        spec, lw = self.spec, self.w.layers[i]
        nh, nkv = spec.num_heads, spec.num_kv_heads
        x = _rms_norm(st.h, lw.input_norm, spec.rms_norm_eps)
        qkv = F.linear(x, lw.qkv, lw.qkv_bias).view(st.h.shape[0], nh + 2 * nkv, spec.head_dim)
        qk = _rope(qkv[:, : nh + nkv], st.cos, st.sin)  # q and k heads rotated together
        return attention.start(i, st.batch.seqs, qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :])

    def _finish_layer(self, i: int, st: _Rows, wait: Callable[[], torch.Tensor]) -> None:
        """The attention's result, o-proj and MLP, added to the residual stream."""
        lw = self.w.layers[i]
        h = st.h + F.linear(wait(), lw.o, lw.o_bias)
        x = _rms_norm(h, lw.post_norm, self.spec.rms_norm_eps)
        gate, up = F.linear(x, lw.gate_up, lw.gate_up_bias).chunk(2, dim=-1)
        st.h = h + F.linear(F.silu(gate) * up, lw.down, lw.down_bias)

    def _logits(self, st: _Rows) -> torch.Tensor:
        x = _rms_norm(st.h[st.batch.logit_rows], self.w.norm, self.spec.rms_norm_eps)
        logits = x @ self._head_t if self._head_t is not None else F.linear(x, self.w.lm_head)
        return logits.float()


@dataclass(slots=True)
class _Rows:
    """One batch's state between layers: its residual stream and rotary tables."""

    batch: ForwardBatch
    h: torch.Tensor  # [T, hidden]
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, scale in the model dtype: the order transformers uses.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by the (half-split) rotary embedding of each row's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
