"""Plans of the three policies on synthetic (labelled) cost models."""

from __future__ import annotations

import math

import pytest
from sled_shared.apex.cost_model import fit_cost_model
from sled_shared.apex.plan import (
    ACCEL,
    RECOMPUTE,
    IterationState,
    Mode,
    Policy,
    SessionState,
    WorkerState,
)
from sled_shared.apex.policies import plan
from sled_shared.apex.profiles import Component, Sample

from .conftest import SHAPE, truth_accel_attn, truth_linear

WORKERS = (WorkerState("w1", 200_000, 16_000), WorkerState("w2", 200_000, 16_000))


def _state(n_accel=8, n_cpu=16, ctx=2000, budget=None, **kw) -> IterationState:
    sessions = [SessionState(f"g{i}", ACCEL, ctx, 5, arrival=i) for i in range(n_accel)]
    sessions += [
        SessionState(f"c{i}", "w1" if i % 2 else "w2", ctx, 5, arrival=100 + i)
        for i in range(n_cpu)
    ]
    budget = n_accel * (ctx + 64) if budget is None else budget
    return IterationState(tuple(sessions), SHAPE, budget, kw.pop("workers", WORKERS), **kw)


def _offloaded(p) -> int:
    return sum(1 for where in p.placement.values() if where != ACCEL)


def test_apex_offloads_fewer_sessions_when_cpu_attention_is_slow(make_model):
    st = _state()
    counts = [_offloaded(plan(st, make_model(cpu_ns=ns), "apex")) for ns in (80, 300, 800)]
    assert counts[0] == 16  # fast CPU: every offloaded round runs
    assert counts[0] > counts[1] > counts[2]
    assert counts[2] == 0  # 10x slower CPU: none is worth the stall


def test_apex_never_predicts_worse_than_neo_and_beats_gpu_only(make_model):
    st = _state()
    for ns in (80, 150, 300, 500, 800):
        model = make_model(cpu_ns=ns)
        apex, neo, gpu = (plan(st, model, p) for p in ("apex", "neo", "gpu-only"))
        assert apex.predicted.throughput >= neo.predicted.throughput * (1 - 1e-9), ns
        assert apex.predicted.throughput >= gpu.predicted.throughput * (1 - 1e-9), ns
    # With a fast CPU, overlap without splitting the batch wins outright.
    model = make_model(cpu_ns=80)
    apex, neo = plan(st, model, "apex"), plan(st, model, "neo")
    assert apex.mode is Mode.ASYNC and apex.predicted.throughput > 1.05 * neo.predicted.throughput


def test_neo_pipelines_only_what_hides(make_model):
    p = plan(_state(), make_model(cpu_ns=300), "neo")
    assert p.mode is Mode.PIPELINED
    assert p.predicted.stall_s == pytest.approx(0.0, abs=1e-12)
    assert 0 < _offloaded(p) < 16
    assert set(p.sub_batch) == set(p.run) and set(p.sub_batch.values()) == {0, 1}
    # Accelerator-resident sessions all sit in sub-batch 0.
    assert all(p.sub_batch[s] == 0 for s in p.run if p.placement[s] == ACCEL)


def test_memory_pressure_gpu_only_queues_while_neo_and_apex_offload(make_model):
    model = make_model(cpu_ns=80)
    # 12 resident sessions but room for 8: the 4 newest must leave.
    st = _state(n_accel=12, n_cpu=16, budget=8 * 2064)
    gpu = plan(st, model, "gpu-only")
    victims = {f"g{i}" for i in range(8, 12)}
    assert {m.session_id for m in gpu.migrations} == victims
    assert all(
        m.src == ACCEL and m.nbytes == 2000 * SHAPE.kv_bytes_per_token for m in gpu.migrations
    )
    assert victims <= set(gpu.deferred)
    # gpu-only never computes on a CPU: already-offloaded sessions wait too.
    assert all(where == ACCEL for where in gpu.placement.values())
    assert {f"c{i}" for i in range(16)} <= set(gpu.deferred)
    for policy in ("neo", "apex"):
        p = plan(st, model, policy)
        assert {m.session_id for m in p.migrations} == victims
        assert all(m.dst in ("w1", "w2") for m in p.migrations)
        ran_on_cpu = {s for s, where in p.placement.items() if where != ACCEL}
        assert ran_on_cpu == {f"c{i}" for i in range(16)}, policy
        assert len(p.run) == 24


def test_no_worker_room_drops_kv_for_recompute(make_model):
    full = (WorkerState("w1", 1000, 1000),)
    st = IterationState(
        tuple(SessionState(f"g{i}", ACCEL, 2000, 5, arrival=i) for i in range(3)),
        SHAPE,
        accel_kv_tokens=2 * 2064,
        workers=full,
    )
    p = plan(st, make_model(), "apex")
    assert [(m.session_id, m.dst, m.nbytes) for m in p.migrations] == [("g2", RECOMPUTE, 0)]


def test_parked_sessions_swap_back_in_below_the_watermark_only(make_model):
    model = make_model()
    sessions = [SessionState("g0", ACCEL, 1000, 5), SessionState("c0", "w1", 1000, 5, arrival=1)]
    roomy = IterationState(tuple(sessions), SHAPE, 4000, WORKERS, swap_in_watermark=0.9)
    p = plan(roomy, model, "gpu-only")
    assert [(m.session_id, m.src, m.dst) for m in p.migrations] == [("c0", "w1", ACCEL)]
    assert p.run == ("g0",) and p.deferred == ("c0",)
    tight = IterationState(tuple(sessions), SHAPE, 2200, WORKERS, swap_in_watermark=0.9)
    assert plan(tight, model, "gpu-only").migrations == ()


def test_latency_bound_limits_offload_and_is_met(make_model):
    model = make_model(cpu_ns=80)
    free = plan(_state(), model, "apex")
    bound = 0.8 * free.predicted.iteration_s
    bounded = plan(_state(latency_bound_s=bound), model, "apex")
    assert bounded.predicted.iteration_s <= bound
    assert _offloaded(bounded) < _offloaded(free)


def test_round_waiting_past_max_wait_runs_even_when_costly(make_model):
    model = make_model(cpu_ns=800)  # offloading is never worth it on its own
    st = _state(max_wait_s=0.5)
    sessions = list(st.sessions)
    sessions[-1] = SessionState("c15", "w1", 2000, 5, waited_s=0.7, arrival=115)
    st = IterationState(tuple(sessions), SHAPE, st.accel_kv_tokens, WORKERS, max_wait_s=0.5)
    patient = IterationState(st.sessions, SHAPE, st.accel_kv_tokens, WORKERS, max_wait_s=1.0)
    for policy in ("neo", "apex"):
        assert plan(st, model, policy).placement.get("c15") == "w1", policy
        assert "c15" in plan(patient, model, policy).deferred, policy


def test_batch_token_limit_is_respected(make_model):
    st = _state(max_batch_tokens=60)  # room for 12 rounds of 5 tokens
    tokens = {s.session_id: s.pending_tokens for s in st.sessions}
    for policy in Policy:
        p = plan(st, make_model(cpu_ns=80), policy)
        assert sum(tokens[s] for s in p.run) <= 60
        assert len(p.run) + len(p.deferred) == 24
        assert all(p.placement[s] == ACCEL for s in p.run[:8])  # resident rounds first


def test_expected_tokens_drive_throughput():
    s = SessionState("a", ACCEL, 10, 5, expected_tokens=2.5)
    assert s.gain == 2.5 and SessionState("b", ACCEL, 10, 5).gain == 5


def test_bad_states_are_rejected():
    with pytest.raises(ValueError, match="unknown tier"):
        IterationState((SessionState("a", "w9", 10, 1),), SHAPE, 100)
    with pytest.raises(ValueError, match="duplicate session"):
        IterationState((SessionState("a", ACCEL, 1), SessionState("a", ACCEL, 1)), SHAPE, 100)
    with pytest.raises(ValueError, match="bad worker id"):
        WorkerState(ACCEL, 10)
    with pytest.raises(ValueError):
        plan(_state(), None, "fastest")  # type: ignore[arg-type]
    assert math.isinf(_state().latency_bound_s)


def test_offloading_without_cpu_profiles_is_a_clear_error():
    samples = [Sample(Component.LINEAR, truth_linear(n), tokens=n) for n in range(1, 300, 7)]
    samples += [
        Sample(Component.ACCEL_ATTN, truth_accel_attn(c), context=c) for c in range(100, 9000, 200)
    ]
    model = fit_cost_model(samples)
    assert plan(_state(), model, "gpu-only").run  # gpu-only needs no CPU profile
    with pytest.raises(ValueError, match="no cpu_attn profile samples"):
        plan(_state(), model, "apex")
