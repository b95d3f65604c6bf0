"""Our Llama-family forward pass over a ragged batch of sessions.

Linear layers run once over all T new tokens of the batch; only attention is
per session (through the AttentionRouter), and logits are computed only for
the rows the caller asks for.
"""

from __future__ import annotations

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
        spec = self.spec
        t = batch.input_ids.shape[0]
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        eps = spec.rms_norm_eps
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[batch.positions].unsqueeze(1)
        h = F.embedding(batch.input_ids, self.w.embed)  # [T, hidden]
        for i, lw in enumerate(self.w.layers):
            x = _rms_norm(h, lw.input_norm, eps)
            qkv = F.linear(x, lw.qkv, lw.qkv_bias).view(t, nh + 2 * nkv, hd)
            qk = _rope(qkv[:, : nh + nkv], cos, sin)  # q and k heads rotated together
            attn = attention.run(i, batch.seqs, qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :])
            h = h + F.linear(attn, lw.o, lw.o_bias)
            x = _rms_norm(h, lw.post_norm, eps)
            gate, up = F.linear(x, lw.gate_up, lw.gate_up_bias).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, lw.down, lw.down_bias)
        x = _rms_norm(h[batch.logit_rows], self.w.norm, eps)
        logits = x @ self._head_t if self._head_t is not None else F.linear(x, self.w.lm_head)
        return logits.float()


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
