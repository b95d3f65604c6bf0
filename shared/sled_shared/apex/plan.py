"""What the scheduler sees of one verifier iteration, and what it decides.

A session's *tier* is where its KV cache lives: ``ACCEL`` (the verifier's
accelerator), a kvoffload worker id (host RAM; its attention runs on that
worker's CPU), or ``RECOMPUTE`` (its KV was dropped under memory pressure
and is rebuilt by a prefill of its committed tokens once it is let back in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

ACCEL = "accel"
RECOMPUTE = "recompute"


class Policy(StrEnum):
    GPU_ONLY = "gpu-only"  # accelerator only; what does not fit waits or is preempted (vLLM)
    NEO = "neo"  # CPU offload, asymmetric pipelining of two sub-batches (NEO, MLSys'25)
    APEX = "apex"  # prediction-driven offload and overlap choice (APEX, arXiv 2506.03296)


class Mode(StrEnum):
    SEQUENTIAL = "sequential"  # one batch; any CPU attention is waited for, not overlapped
    ASYNC = "async"  # one batch; CPU attention overlaps the accelerator's attention
    PIPELINED = "pipelined"  # two sub-batches; each one's CPU attention overlaps the other's work


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    act_bytes: int = 4  # bytes per element of q/k/v/attention output and of accelerator KV

    def __post_init__(self) -> None:
        for name in ("num_layers", "q_heads", "kv_heads", "head_dim", "act_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive")
        if self.q_heads % self.kv_heads:
            raise ValueError("ModelShape.q_heads must be a multiple of kv_heads")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers: what a migration moves."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.act_bytes

    @property
    def offload_bytes_per_token(self) -> int:
        """Per layer and new token of an offloaded session: q, k, v out, attention back."""
        return (2 * self.q_heads + 2 * self.kv_heads) * self.head_dim * self.act_bytes


@dataclass(frozen=True, slots=True)
class SessionState:
    session_id: str
    tier: str  # ACCEL, a worker id, or RECOMPUTE
    context_len: int  # tokens in its KV cache before the pending round
    pending_tokens: int = 0  # new tokens of its pending round (K + 1); 0: nothing pending
    waited_s: float = 0.0  # how long the pending round has waited
    expected_tokens: float | None = None  # tokens the round should commit; None: pending_tokens
    arrival: float = 0.0  # when the session opened: the newest is preempted first

    def __post_init__(self) -> None:
        if not self.session_id or not self.tier:
            raise ValueError("SessionState needs a session_id and a tier")
        if self.context_len < 0 or self.pending_tokens < 0 or self.waited_s < 0:
            raise ValueError(f"session {self.session_id!r}: negative length or wait")
        if self.expected_tokens is not None and self.expected_tokens < 0:
            raise ValueError(f"session {self.session_id!r}: negative expected_tokens")

    @property
    def gain(self) -> float:
        """Committed tokens expected if the pending round runs."""
        return float(self.pending_tokens if self.expected_tokens is None else self.expected_tokens)

    @property
    def attended(self) -> int:
        """KV tokens its attention reads this round (context plus the new tokens)."""
        return self.context_len + self.pending_tokens


@dataclass(frozen=True, slots=True)
class WorkerState:
    worker_id: str
    capacity_tokens: int  # host KV capacity of the worker, in tokens
    used_tokens: int = 0  # tokens held (block-rounded) before this iteration

    def __post_init__(self) -> None:
        if self.worker_id in ("", ACCEL, RECOMPUTE):
            raise ValueError(f"bad worker id {self.worker_id!r}")
        if self.capacity_tokens < 0 or self.used_tokens < 0:
            raise ValueError(f"worker {self.worker_id!r}: negative capacity or use")


@dataclass(frozen=True, slots=True)
class IterationState:
    sessions: tuple[SessionState, ...]
    shape: ModelShape
    accel_kv_tokens: int  # accelerator KV budget in tokens (blocks * block_size)
    workers: tuple[WorkerState, ...] = ()
    block_size: int = 16  # accelerator KV block size: usage rounds up to whole blocks
    max_batch_tokens: int = 512  # new tokens one forward may carry
    latency_bound_s: float = math.inf  # longest predicted iteration allowed (by choice)
    max_wait_s: float = math.inf  # a round that waited this long runs now, whatever it costs
    swap_in_watermark: float = 0.9  # swap back in only while accelerator KV use stays below this

    def __post_init__(self) -> None:
        ids = [s.session_id for s in self.sessions]
        if len(set(ids)) != len(ids):
            raise ValueError("IterationState has duplicate session ids")
        tiers = {ACCEL, RECOMPUTE} | {w.worker_id for w in self.workers}
        if len(tiers) != len(self.workers) + 2:
            raise ValueError("IterationState has duplicate worker ids")
        for s in self.sessions:
            if s.tier not in tiers:
                raise ValueError(f"session {s.session_id!r} is on unknown tier {s.tier!r}")
        if self.accel_kv_tokens < 0 or self.block_size <= 0 or self.max_batch_tokens <= 0:
            raise ValueError("accel_kv_tokens >= 0, block_size > 0, max_batch_tokens > 0 needed")
        if not 0.0 < self.swap_in_watermark <= 1.0:
            raise ValueError("swap_in_watermark must be in (0, 1]")

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class Migration:
    session_id: str
    src: str  # tier the KV leaves
    dst: str  # tier it goes to (RECOMPUTE: dropped, rebuilt by prefill later)
    nbytes: int  # KV bytes to move (0 for a drop or a recompute)


@dataclass(frozen=True, slots=True)
class Predicted:
    """Predicted times of the planned forward pass, all layers, in seconds."""

    iteration_s: float = 0.0  # wall time of the forward
    accel_s: float = 0.0  # accelerator busy time (linear layers + its attention)
    cpu_s: float = 0.0  # CPU-side critical path: transfers + the slowest worker's attention
    stall_s: float = 0.0  # time the accelerator waits for CPU results
    migration_s: float = 0.0  # KV moved by this plan's migrations (runs beside the forward)
    tokens: float = 0.0  # committed tokens expected from the rounds that run

    @property
    def throughput(self) -> float:
        return self.tokens / self.iteration_s if self.iteration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    policy: Policy
    mode: Mode
    run: tuple[str, ...]  # sessions whose pending rounds run in this forward
    placement: dict[str, str]  # run session -> where its attention runs: ACCEL or a worker id
    deferred: tuple[str, ...]  # pending rounds that wait for a later iteration
    migrations: tuple[Migration, ...] = ()  # KV moves to start now; those sessions sit out
    sub_batch: dict[str, int] = field(default_factory=dict)  # PIPELINED: run session -> 0 or 1
    predicted: Predicted = field(default_factory=Predicted)
