"""Which sessions' KV moves between tiers before an iteration.

Accelerator memory is the binding limit: when the resident sessions plus
their pending tokens exceed the budget, the newest sessions leave first (as
in vLLM and NEO: the oldest keep their latency). Where they go is the
caller's choice of worker (``pick``); with no worker room, their KV is
dropped and rebuilt by prefill later (vLLM's recompute). Without pressure,
parked sessions come back oldest first while accelerator use stays under a
watermark, so one growing session does not bounce a session in and out.
A kvoffload worker that would overflow sheds its newest sessions the same
way. Moving sessions sit the iteration out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sled_shared.apex.plan import ACCEL, RECOMPUTE, IterationState, Migration, SessionState

# (session, free tokens per worker) -> worker id with room, or None
WorkerPicker = Callable[[SessionState, dict[str, int]], str | None]


@dataclass(frozen=True, slots=True)
class TierDecision:
    migrations: tuple[Migration, ...]
    moving: frozenset[str]  # sessions that sit this iteration out
    free_tokens: dict[str, int]  # worker id -> free host KV tokens after the moves


def most_free(s: SessionState, free: dict[str, int]) -> str | None:
    """The worker with the most free tokens, if it can hold the session."""
    best = max(free, key=free.__getitem__, default=None)
    return best if best is not None and free[best] >= s.attended else None


def decide_tiers(state: IterationState, pick: WorkerPicker | None) -> TierDecision:
    """``pick`` None: never offload to a worker (gpu-only parks there only to swap)."""
    budget = state.accel_kv_tokens // state.block_size  # whole blocks
    free = {w.worker_id: w.capacity_tokens - w.used_tokens for w in state.workers}
    moves: list[Migration] = []
    per_token = state.shape.kv_bytes_per_token

    def move(s: SessionState, dst: str) -> None:
        nbytes = 0 if RECOMPUTE in (s.tier, dst) else s.context_len * per_token
        moves.append(Migration(s.session_id, s.tier, dst, nbytes))
        if s.tier in free:
            free[s.tier] += s.context_len
        if dst in free:
            free[dst] -= s.attended

    # A worker whose sessions' new tokens would not fit sheds its newest ones.
    for w in state.workers:
        residents = sorted(
            (s for s in state.sessions if s.tier == w.worker_id), key=lambda s: -s.arrival
        )
        need = sum(s.pending_tokens for s in residents)
        for s in residents:
            if need <= free[w.worker_id]:
                break
            need -= s.pending_tokens
            others = {k: v for k, v in free.items() if k != w.worker_id}
            move(s, (pick(s, others) if pick else most_free(s, others)) or RECOMPUTE)

    resident = [s for s in state.sessions if s.tier == ACCEL]
    used = sum(state.blocks(s.attended) for s in resident)
    if used > budget:
        for s in sorted(resident, key=lambda s: -s.arrival):
            if used <= budget:
                break
            used -= state.blocks(s.attended)
            # gpu-only parks the KV in host RAM only to swap it back, never to compute.
            move(s, (pick(s, free) if pick else most_free(s, free)) or RECOMPUTE)
    else:
        moved = {m.session_id for m in moves}
        limit = int(budget * state.swap_in_watermark)
        parked = sorted(
            (s for s in state.sessions if s.tier != ACCEL and s.session_id not in moved),
            key=lambda s: s.arrival,
        )
        for s in parked:
            need = state.blocks(s.attended)
            if used + need > limit:
                break
            used += need
            move(s, ACCEL)
    return TierDecision(tuple(moves), frozenset(m.session_id for m in moves), free)
