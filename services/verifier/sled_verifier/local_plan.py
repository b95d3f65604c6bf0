"""The verifier's own planning, for when the scheduler is slow, down, or cannot serve.

It runs the scheduler's code (``sled_shared.apex.policies``) with the best
cost model at hand: the scheduler's last one, with any component it lacks
taken from a model fitted on this verifier's own measurements. Before any
model can be fitted (the first iterations), ``bootstrap_plan`` settles
memory the same way and runs every pending round it may.
"""

from __future__ import annotations

from collections.abc import Iterable

from sled_shared.apex.cost_model import CostModel, fit_cost_model
from sled_shared.apex.plan import ACCEL, RECOMPUTE, IterationState, Mode, Plan, Policy
from sled_shared.apex.policies import plan as policy_plan
from sled_shared.apex.profiles import Component, Sample
from sled_shared.apex.tiering import decide_tiers, most_free

# What every policy needs from a cost model, and what offloading adds.
ACCEL_PARTS = (Component.LINEAR, Component.ACCEL_ATTN)
OFFLOAD_PARTS = (Component.CPU_ATTN, Component.TRANSFER)


def merged_model(scheduler: CostModel | None, local: CostModel | None) -> CostModel | None:
    """The scheduler's fits, completed by local ones for the components it lacks."""
    if scheduler is None or local is None:
        return scheduler or local
    return CostModel({**local.fits, **scheduler.fits}, {**local.errors, **scheduler.errors})


def fit_local(samples: Iterable[Sample]) -> CostModel | None:
    """A cost model of the components with enough samples (None: none yet)."""
    by_kind: dict[Component, list[Sample]] = {}
    for s in samples:
        by_kind.setdefault(s.component, []).append(s)
    usable = [s for group in by_kind.values() if len(group) >= 8 for s in group]
    return fit_cost_model(usable, holdout=0.0) if usable else None


def can_plan(model: CostModel | None, policy: Policy) -> bool:
    parts = ACCEL_PARTS if policy is Policy.GPU_ONLY else ACCEL_PARTS + OFFLOAD_PARTS
    return model is not None and all(model.has(c) for c in parts)


def local_plan(state: IterationState, model: CostModel | None, policy: Policy) -> Plan:
    """The policy's own plan when the model allows it, else the bootstrap plan."""
    if model is not None and can_plan(model, policy):
        return policy_plan(state, model, policy)
    return bootstrap_plan(state, policy)


def bootstrap_plan(state: IterationState, policy: Policy) -> Plan:
    """No cost model yet: the tiering every policy does, then every pending round
    that may run (oldest first, within the token cap); offloaded rounds overlap
    the accelerator's work, except under gpu-only where they wait for room."""
    tiers = decide_tiers(state, None if policy is Policy.GPU_ONLY else most_free)
    pending = sorted(
        (s for s in state.sessions if s.pending_tokens > 0),
        key=lambda s: -s.waited_s,
    )
    run: list[str] = []
    room = state.max_batch_tokens
    for s in pending:
        allowed = s.tier == ACCEL or (policy is not Policy.GPU_ONLY and s.tier != RECOMPUTE)
        if allowed and s.session_id not in tiers.moving and s.pending_tokens <= room:
            run.append(s.session_id)
            room -= s.pending_tokens
    tier = {s.session_id: s.tier for s in state.sessions}
    offloaded = any(tier[sid] != ACCEL for sid in run)
    return Plan(
        policy=policy,
        mode=Mode.ASYNC if offloaded else Mode.SEQUENTIAL,
        run=tuple(run),
        placement={sid: tier[sid] for sid in run},
        deferred=tuple(s.session_id for s in pending if s.session_id not in set(run)),
        migrations=tiers.migrations,
    )
