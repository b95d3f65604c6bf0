"""APEX offload on the verifier engine with real kvoffload workers over a real nats-server.

Every run is compared token for token with the all-on-accelerator run of the
same prompts (greedy): offloading, migrations, rollbacks on the host tier and
the planner's choices must never change a token.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace

import pytest
from sled_bench.apex_stack import drive, record_open_tiers, stack
from sled_shared.apex.plan import IterationState, Mode, Plan, Policy
from sled_shared.apex.profiles import Component
from sled_shared.sched_client import SchedClient
from sled_verifier.apex_loop import ApexLoop
from sled_verifier.attention import AttentionRouter
from sled_verifier.engine import VerifierEngine
from sled_verifier.llama import ForwardBatch

from .apex_harness import prompts_of, worker_process
from .conftest import tiny_config

MODEL = "gqa"  # 4 query heads over 2 kv heads: the grouped path on both tiers
PROMPTS = prompts_of(8)
MAX_NEW = [24, 40, 12, 32, 28, 40, 16, 36]
OFFLOAD = (Component.LINEAR, Component.ACCEL_ATTN, Component.CPU_ATTN, Component.TRANSFER)


@pytest.fixture(scope="module")
def reference(tiny_model_dirs) -> dict[int, list[int]]:
    """Greedy outputs with every session's KV on the accelerator (a budget that never binds)."""
    engine = VerifierEngine(tiny_config(tiny_model_dirs[MODEL], num_blocks=512))
    run = drive(engine, engine.verify, PROMPTS, MAX_NEW)
    assert not run.errors and run.refused_opens == 0
    return run.outputs


def _engine(tiny_model_dirs, blocks: int) -> VerifierEngine:
    return VerifierEngine(tiny_config(tiny_model_dirs[MODEL], num_blocks=blocks))


def test_most_sessions_on_the_host_tier_give_identical_tokens(tiny_model_dirs, reference, nats_url):
    engine = _engine(tiny_model_dirs, blocks=16)  # 64 tokens: about two sessions
    with stack(nats_url) as st:
        w1, w2 = st.start_worker("w1"), st.start_worker("w2")
        host = st.host_tier(engine, ["w1", "w2"])
        engine.kv.attach(host, offload_new=True)
        loop = ApexLoop(engine, Policy.APEX)
        opened_on = record_open_tiers(engine)
        run = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference)
        loads = {w: st.lt.run(host.client(w).stats()) for w in ("w1", "w2")}
    assert not run.errors and run.refused_opens == 0
    assert run.outputs == reference
    on_host = [t for t in opened_on.values() if t in ("w1", "w2")]
    assert len(on_host) >= 5, opened_on  # most sessions started on the host tier
    assert {"w1", "w2"} <= set(on_host)
    # ONE attend request per worker per layer of every forward that had its sessions.
    layers = engine.spec.num_layers
    for w, svc in (("w1", w1), ("w2", w2)):
        assert loads[w].attend_requests == layers * host.executors[w].forward_id > 0
        assert svc.load.sessions == 0  # every finished session was evicted
    assert engine.blocks.num_used == 0
    assert loop.stats.plans == {"local:no_scheduler": loop.stats.iterations}


def test_sessions_migrate_both_ways_mid_generation(tiny_model_dirs, reference, nats_url):
    """Three sessions open on the accelerator; as they grow past the budget the newest
    is pushed to the host, and when the shortest finishes it comes back."""
    engine = _engine(tiny_model_dirs, blocks=16)  # 64 tokens
    idx = [2, 1, 5]  # prompts of 12, 17, 15 tokens; 12, 40 and 40 new tokens
    prompts, max_new = [PROMPTS[i] for i in idx], [MAX_NEW[i] for i in idx]
    with stack(nats_url) as st:
        st.start_worker("w1")
        engine.kv.attach(st.host_tier(engine, ["w1"]), offload_new=True)
        loop = ApexLoop(engine, Policy.NEO)
        opened_on = record_open_tiers(engine)
        run = drive(
            engine, loop.execute, prompts, max_new,
            reference={j: reference[i] for j, i in enumerate(idx)},
        )  # fmt: skip
    assert not run.errors
    assert run.outputs == {j: reference[i] for j, i in enumerate(idx)}
    assert list(opened_on.values()) == ["accel"] * 3
    moved = loop.stats.migrations
    assert moved.get("accel->host", 0) >= 1 and moved.get("host->accel", 0) >= 1, moved
    assert loop.stats.migration_failures == 0


def test_pipelined_plans_give_identical_tokens(tiny_model_dirs, reference, nats_url):
    """Every plan forced to PIPELINED, its run split alternately into two sub-batches:
    the forwards interleave them per layer and no token changes."""
    engine = _engine(tiny_model_dirs, blocks=16)
    model = engine.runner.model
    split: list[tuple[set[str], set[str]]] = []  # per pipelined forward, its host sessions
    with stack(nats_url) as st:
        st.start_worker("w1")
        host = st.host_tier(engine, ["w1"])
        engine.kv.attach(host, offload_new=True)
        loop = ApexLoop(engine, Policy.NEO)
        planned, piped = loop._plan, model.forward_pipelined

        def pipelined(state: IterationState) -> tuple[int | None, Plan]:
            plan_id, plan = planned(state)
            halves = {sid: i % 2 for i, sid in enumerate(plan.run)}
            return plan_id, replace(plan, mode=Mode.PIPELINED, sub_batch=halves)

        def spy(first: ForwardBatch, second: ForwardBatch, attention: AttentionRouter):
            split.append(
                tuple(
                    {s.session_id for s in b.seqs if s.session_id in host.where}
                    for b in (first, second)
                )
            )
            return piped(first, second, attention)

        loop._plan = pipelined
        model.forward_pipelined = spy
        run = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference)
        load = st.lt.run(host.client("w1").stats())
    assert not run.errors and run.outputs == reference
    assert len(split) >= 5, split
    assert any(a and b for a, b in split), split  # host attention in flight in both halves
    # Each sub-batch with host sessions sends one attend request per layer.
    layers = engine.spec.num_layers
    assert load.attend_requests == layers * host.executors["w1"].forward_id > 0


def test_plans_from_the_scheduler_service(tiny_model_dirs, reference, nats_url):
    engine = _engine(tiny_model_dirs, blocks=16)
    with stack(nats_url) as st:
        sched = st.start_scheduler("neo")
        st.start_worker("w1")
        engine.kv.attach(st.host_tier(engine, ["w1"]), offload_new=True)
        client = SchedClient(st.nc, "v-test", "neo", deadline_s=2.0)
        loop = ApexLoop(engine, Policy.NEO, client, st.lt.loop, report_every_s=0.05)
        # A first pass sends profiles; the scheduler fits its cost model on them.
        warm = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference)
        for _ in range(100):
            if client.model is not None and all(client.model.has(c) for c in OFFLOAD):
                break
            st.lt.run(client.refresh_model())
            time.sleep(0.1)
        first = dict(loop.stats.plans)
        run = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference, seed=1)
        registry = st.sched_registry
    assert not warm.errors and warm.outputs == reference
    assert not run.errors and run.outputs == reference
    plans = {k: v - first.get(k, 0) for k, v in loop.stats.plans.items()}
    assert plans.get("scheduler", 0) >= 1, plans
    assert sched.plans >= plans["scheduler"]
    measured = registry.get_sample_value(
        "sled_scheduler_prediction_error_ratio_count", {"resource": "accelerator"}
    )
    assert measured and measured >= 1  # the verifier sent what its plans really took


def test_scheduler_down_plans_locally_and_stays_identical(tiny_model_dirs, reference, nats_url):
    engine = _engine(tiny_model_dirs, blocks=16)
    with stack(nats_url) as st:
        st.start_worker("w1")
        engine.kv.attach(st.host_tier(engine, ["w1"]), offload_new=True)
        client = SchedClient(st.nc, "v-test", "apex", deadline_s=0.02)
        loop = ApexLoop(engine, Policy.APEX, client, st.lt.loop)
        run = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference)
    assert not run.errors and run.outputs == reference
    plans = loop.stats.plans
    assert "scheduler" not in plans and sum(plans.values()) == loop.stats.iterations
    assert client.fallbacks == loop.stats.iterations  # every plan request found no scheduler
    assert engine.kv.host is not None and engine.kv.host.executors["w1"].forward_id > 0


def test_gpu_only_refuses_what_does_not_fit_and_never_attends_on_the_cpu(
    tiny_model_dirs, reference, nats_url
):
    engine = _engine(tiny_model_dirs, blocks=16)
    with stack(nats_url) as st:
        w1 = st.start_worker("w1")
        engine.kv.attach(st.host_tier(engine, ["w1"]), offload_new=False)
        loop = ApexLoop(engine, Policy.GPU_ONLY)
        run = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference)
        load = st.lt.run(engine.kv.host.client("w1").stats())
    assert not run.errors and run.outputs == reference
    assert run.refused_opens > 0  # sessions waited for room, as vLLM's would
    assert load.attend_requests == 0 and w1.load.sessions == 0


def test_a_killed_worker_fails_only_its_sessions(tiny_model_dirs, reference, nats_url, tmp_path):
    engine = _engine(tiny_model_dirs, blocks=16)
    with stack(nats_url) as st:
        st.start_worker("w1")
        # 128 blocks of 16 tokens: as much room as w1, so new sessions alternate between them.
        proc = worker_process(tmp_path, nats_url, "w2", blocks=128)
        try:
            host = st.host_tier(engine, ["w1", "w2"])
            engine.kv.attach(host, offload_new=True)
            loop = ApexLoop(engine, Policy.APEX)
            on_w1: set[str] = set()
            on_w2: set[str] = set()

            def kill(it: int) -> None:
                if it == 3:
                    on_w1.update(s for s, w in host.where.items() if w == "w1")
                    on_w2.update(s for s, w in host.where.items() if w == "w2")
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)

            sids: dict[int, str] = {}
            original = engine.open_session

            def spy(prompt, *a, **kw):
                res = original(prompt, *a, **kw)
                sids[PROMPTS.index(list(prompt))] = res.session_id
                return res

            engine.open_session = spy
            run = drive(engine, loop.execute, PROMPTS, MAX_NEW, reference=reference,
                        on_iteration=kill)  # fmt: skip
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    lost = {i for i, sid in sids.items() if sid in on_w2}
    assert lost, "no session was on w2 when it died"
    assert on_w1, "no session was on w1 when w2 died"
    assert set(run.errors) == lost
    for i in lost:
        assert run.errors[i].startswith("unknown_session: KV worker w2"), run.errors[i]
    for i in set(range(len(PROMPTS))) - lost:
        assert run.outputs[i] == reference[i], i
