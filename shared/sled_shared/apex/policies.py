"""One iteration's plan under a chosen policy: a pure function of the state.

Every policy first settles memory (``tiering``), then fills the batch:
rounds that waited ``max_wait_s`` or longer first, then accelerator-resident
rounds oldest first, within ``max_batch_tokens``; then:

* ``gpu-only``: nothing runs on a CPU; offloaded and dropped sessions wait
  for accelerator room (swap or recompute, as vLLM), even when forced.
* ``neo`` and ``apex``: offloaded rounds are chosen by ``dispatch``. They
  differ in where a displaced session goes as well: NEO takes the worker
  with the most free memory, APEX the one whose predicted attention time
  grows least.
"""

from __future__ import annotations

from dataclasses import replace

from sled_shared.apex.cost_model import CostModel
from sled_shared.apex.dispatch import Choice, apex_select, neo_select, no_offload
from sled_shared.apex.plan import (
    ACCEL,
    RECOMPUTE,
    IterationState,
    Migration,
    Mode,
    Plan,
    Policy,
    SessionState,
)
from sled_shared.apex.profiles import Component
from sled_shared.apex.tiering import WorkerPicker, decide_tiers, most_free
from sled_shared.apex.timing import Load


def load_aware_picker(state: IterationState, model: CostModel) -> WorkerPicker:
    """Pick the worker whose predicted attention time grows least (APEX)."""
    per_worker: dict[str, list[int]] = {}
    for s in state.sessions:
        if s.tier not in (ACCEL, RECOMPUTE):
            w = per_worker.setdefault(s.tier, [0, 0, 0])
            w[0], w[1], w[2] = w[0] + 1, w[1] + s.pending_tokens, w[2] + s.attended

    def pick(s: SessionState, free: dict[str, int]) -> str | None:
        fits = [w for w, room in free.items() if room >= s.attended]
        if not fits or not model.has(Component.CPU_ATTN):
            return most_free(s, free)
        tokens = max(s.pending_tokens, 1)

        def after(w: str) -> float:
            n, t, c = per_worker.get(w, [0, 0, 0])
            return model.cpu_attn(n + 1, t + tokens, c + s.attended)

        best = min(fits, key=after)
        w = per_worker.setdefault(best, [0, 0, 0])
        w[0], w[1], w[2] = w[0] + 1, w[1] + tokens, w[2] + s.attended
        return best

    return pick


def plan(state: IterationState, model: CostModel, policy: Policy | str) -> Plan:
    policy = Policy(policy)
    picker = {
        Policy.GPU_ONLY: None,
        Policy.NEO: most_free,
        Policy.APEX: load_aware_picker(state, model),
    }[policy]
    tiers = decide_tiers(state, picker)
    pending = [
        s for s in state.sessions if s.pending_tokens > 0 and s.session_id not in tiers.moving
    ]
    pending.sort(key=lambda s: -s.waited_s)  # oldest round first
    forced = [s for s in pending if s.waited_s >= state.max_wait_s]
    offloaded = policy is not Policy.GPU_ONLY

    base, room = Load(), state.max_batch_tokens
    must_cpu: list[SessionState] = []
    for s in forced:
        if s.pending_tokens > room:
            continue
        if s.tier == ACCEL:
            base.add(s, ACCEL)
            room -= s.pending_tokens
        elif offloaded and s.tier != RECOMPUTE:
            must_cpu.append(s)
            room -= s.pending_tokens
    forced_ids = {s.session_id for s in forced}
    for s in pending:
        if s.tier == ACCEL and s.session_id not in forced_ids and s.pending_tokens <= room:
            base.add(s, ACCEL)
            room -= s.pending_tokens
    optional = [
        s
        for s in pending
        if offloaded and s.tier not in (ACCEL, RECOMPUTE) and s.session_id not in forced_ids
    ]

    if policy is Policy.GPU_ONLY:
        choice = no_offload(model, state.shape, base)
    elif policy is Policy.NEO:
        choice = neo_select(model, state.shape, base, must_cpu, optional, room)
    else:
        choice = apex_select(
            model, state.shape, base, must_cpu, optional, room, state.latency_bound_s
        )
    return _assemble(state, model, policy, choice, pending, tiers.migrations)


def _assemble(
    state: IterationState,
    model: CostModel,
    policy: Policy,
    choice: Choice,
    pending: list[SessionState],
    migrations: tuple[Migration, ...],
) -> Plan:
    tier = {s.session_id: s.tier for s in state.sessions}
    run = tuple(sid for load in choice.loads for sid in load.members)
    ran = set(run)
    sub_batch = (
        {sid: i for i, load in enumerate(choice.loads) for sid in load.members}
        if choice.mode is Mode.PIPELINED
        else {}
    )
    moving = {m.session_id for m in migrations}
    deferred = tuple(s.session_id for s in pending if s.session_id not in ran)
    deferred += tuple(
        s.session_id for s in state.sessions if s.session_id in moving and s.pending_tokens > 0
    )
    moved_bytes = sum(m.nbytes for m in migrations)
    migration_s = model.transfer(moved_bytes) if model.has(Component.TRANSFER) else 0.0
    return Plan(
        policy=policy,
        mode=choice.mode,
        run=run,
        placement={sid: tier[sid] for sid in run},
        deferred=deferred,
        migrations=migrations,
        sub_batch=sub_batch,
        predicted=replace(choice.predicted, migration_s=migration_s),
    )
