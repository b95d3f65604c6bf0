"""Turns a list of per-session requests into one ragged forward (or two pipelined
sub-batches) and returns logit rows."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionRouter, PagedAttention, SeqSlice
from .config import EngineConfig
from .kv_cache import KVCache, auto_num_blocks
from .llama import ForwardBatch, LlamaModel
from .weights import load_weights


@dataclass(frozen=True, slots=True)
class ForwardTiming:
    """Where one forward's time went (CPU clocks: on CUDA these need a sync to mean much)."""

    seconds: float  # the whole forward
    tokens: int  # new tokens in it (linear layers)
    local_attn_s: float  # attention over the local paged cache
    local_context: int  # KV tokens that attention read, summed over layers
    wait_s: float  # stalled on delegated (remote) attention
    remote_s: float  # per layer the slowest remote round trip, summed
    layers: int


@dataclass(slots=True)
class SeqRequest:
    session_id: str
    token_ids: np.ndarray  # [n] int, the session's new tokens
    start_pos: int  # position of token_ids[0] == tokens already in the session's KV
    block_table: Sequence[int] | None  # blocks covering start_pos + n; None: KV held elsewhere
    logit_rows: Sequence[int]  # indices into token_ids whose next-token logits are wanted

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        n = self.token_ids.shape[0]
        if self.token_ids.ndim != 1 or n == 0:
            raise ValueError(f"session {self.session_id}: need a non-empty 1-D token list")
        if self.start_pos < 0:
            raise ValueError(f"session {self.session_id}: negative start position")
        if any(not 0 <= r < n for r in self.logit_rows):
            raise ValueError(f"session {self.session_id}: logit rows outside 0..{n - 1}")


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.spec, weights = load_weights(config.model_dir, self.device, config.torch_dtype)
        self.block_size = config.block_size
        blocks_per_session = -(-config.max_model_len // config.block_size)
        max_useful = config.max_sessions * blocks_per_session
        self.num_blocks = config.num_blocks or auto_num_blocks(
            self.spec,
            config.block_size,
            config.torch_dtype,
            self.device,
            config.kv_memory_fraction,
            max_useful,
        )
        self.kv_cache = KVCache(
            self.spec, self.num_blocks, config.block_size, config.torch_dtype, self.device
        )
        self.attention = AttentionRouter(PagedAttention(self.kv_cache))
        self.model = LlamaModel(self.spec, weights, config.max_model_len, self.device)
        self.last_forward_s = 0.0
        self.timings: deque[ForwardTiming] = deque(maxlen=256)  # drained by the APEX loop

    def run(self, requests: Sequence[SeqRequest]) -> list[torch.Tensor]:
        """One forward for all requests; per request, logits [len(logit_rows), V] fp32 on CPU."""
        if not requests:
            return []
        batch = self._build(requests)
        (logits,) = self._timed(lambda: (self.model.forward(batch, self.attention),), batch)
        return list(torch.split(logits, [len(r.logit_rows) for r in requests]))

    def run_pipelined(
        self, requests: Sequence[SeqRequest], sub_batch: Mapping[str, int]
    ) -> list[torch.Tensor]:
        """Like run, with the requests split into two sub-batches (session -> 0 or 1;
        unlisted: 0) interleaved per layer, so one's host-tier attention overlaps the
        other's linear layers. Logits per request, in the order given."""
        parts: tuple[list[int], list[int]] = ([], [])
        for i, r in enumerate(requests):
            parts[1 if sub_batch.get(r.session_id, 0) else 0].append(i)
        if not parts[0] or not parts[1]:
            return self.run(requests)  # nothing to overlap with
        first = self._build([requests[i] for i in parts[0]])
        second = self._build([requests[i] for i in parts[1]])
        la, lb = self._timed(
            lambda: self.model.forward_pipelined(first, second, self.attention), first, second
        )
        by_index: dict[int, torch.Tensor] = {}
        for part, logits in zip(parts, (la, lb), strict=True):
            rows = torch.split(logits, [len(requests[i].logit_rows) for i in part])
            by_index.update(zip(part, rows, strict=True))
        return [by_index[i] for i in range(len(requests))]

    def _timed(
        self, forward: Callable[[], tuple[torch.Tensor, ...]], *batches: ForwardBatch
    ) -> tuple[torch.Tensor, ...]:
        """Run a forward (its logits moved to the CPU) and record where its time went."""
        att = self.attention
        att.reset_timers()
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = tuple(x.cpu() for x in forward())
        self.last_forward_s = time.perf_counter() - t0
        self.timings.append(
            ForwardTiming(
                self.last_forward_s,
                sum(int(b.input_ids.shape[0]) for b in batches),
                att.local_s,
                att.local_context,
                att.wait_s,
                att.remote_s,
                self.spec.num_layers,
            )
        )
        return logits

    def _build(self, requests: Sequence[SeqRequest]) -> ForwardBatch:
        dev = self.device
        bs = self.block_size
        seqs: list[SeqSlice] = []
        positions: list[torch.Tensor] = []
        rows: list[np.ndarray] = []
        start = 0
        for r in requests:
            n = r.token_ids.shape[0]
            ctx = r.start_pos + n
            if ctx > self.model.max_len:
                raise ValueError(f"session {r.session_id}: {ctx} tokens exceed max_model_len")
            pos = torch.arange(r.start_pos, ctx, dtype=torch.int64)
            if r.block_table is None:
                # Attention delegated: no local slots (-1 makes a local write fail loudly).
                table = torch.empty(0, dtype=torch.int64)
                slots = torch.full((n,), -1, dtype=torch.int64)
            else:
                if len(r.block_table) * bs < ctx:
                    raise ValueError(
                        f"session {r.session_id}: block table too short for {ctx} tokens"
                    )
                table = torch.tensor(r.block_table, dtype=torch.int64)
                slots = table[pos // bs] * bs + pos % bs
            mask = None
            if n > 1:
                # New token i (at position start_pos + i) sees every position up to its own.
                mask = torch.arange(ctx)[None, :] <= pos[:, None]
                mask = mask.to(dev)
            seqs.append(
                SeqSlice(
                    session_id=r.session_id,
                    start=start,
                    num_new=n,
                    context_len=ctx,
                    block_table=table.to(dev),
                    slots=slots.to(dev),
                    mask=mask,
                )
            )
            positions.append(pos)
            rows.append(np.asarray(r.logit_rows, dtype=np.int64) + start)
            start += n
        ids = np.concatenate([r.token_ids for r in requests])
        return ForwardBatch(
            input_ids=torch.from_numpy(ids).to(dev),
            positions=torch.cat(positions).to(dev),
            seqs=seqs,
            logit_rows=torch.from_numpy(np.concatenate(rows)).to(dev),
        )
