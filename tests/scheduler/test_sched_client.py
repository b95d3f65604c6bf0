"""The verifier's scheduler client: plans within a deadline, else the local fallback."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sled_shared import bus
from sled_shared.apex.cost_model import fit_cost_model
from sled_shared.apex.policies import plan as local_plan
from sled_shared.sched_client import NoPlan, SchedClient
from sled_shared.sched_protocol import VerifierLoadReport

from .conftest import accel_samples, client, cpu_samples, pressured_state, scheduler


async def test_scheduler_plans_then_the_fallback_plans_the_same_when_it_is_gone(nats_url):
    rng = np.random.default_rng(0)
    state = pressured_state()
    async with client(nats_url) as nc:
        sc = SchedClient(nc, "v1", "apex", deadline_s=5.0)
        async with scheduler(nats_url) as (_, registry):
            await sc.report_profile(tuple(accel_samples(rng)))
            await sc.report_profile(tuple(cpu_samples(rng)))
            first = await sc.plan(state)
            assert first.source == "scheduler" and first.plan_id is not None
            assert await sc.refresh_model() and sc.model_version >= 2
            sc.record_actual(first.plan_id, first.plan.predicted.accel_s * 1.1, 0.05)
            second = await sc.plan(state)
            assert second.plan == first.plan
            count = registry.get_sample_value(
                "sled_scheduler_prediction_error_ratio_count", {"resource": "accelerator"}
            )
            assert count == 1
            report = VerifierLoadReport("v1", 0, 8, accel_free_tokens=5000)
            assert (await sc.report_load(report)).accepted == 1
            admitted = await sc.admit(1000)
            assert (admitted.verifier_id, admitted.tier) == ("v1", "accel")
        start = time.perf_counter()
        local = await sc.plan(state)
        assert local.source == "fallback" and local.plan_id is None
        assert "NoResponders" in local.reason and time.perf_counter() - start < sc.deadline_s
        assert local.plan == first.plan and sc.fallbacks == 1
        with pytest.raises(bus.NoResponders):
            await sc.admit(10)


async def test_a_scheduler_slower_than_the_deadline_is_not_waited_for(nats_url):
    rng = np.random.default_rng(1)
    state = pressured_state()
    own = fit_cost_model(accel_samples(rng) + cpu_samples(rng))
    async with scheduler(nats_url) as _, client(nats_url) as nc:
        sc = SchedClient(nc, "v1", "neo", deadline_s=5.0)
        with pytest.raises(NoPlan, match="no accelerator profile samples yet"):
            await sc.plan(state)  # the scheduler cannot plan yet and nothing is cached
        await sc.report_profile(tuple(accel_samples(rng)))
        # Far below one NATS round trip plus a plan: the answer always comes too late.
        hasty = SchedClient(nc, "v1", "neo", deadline_s=1e-4, fallback_model=own)
        out = await hasty.plan(state)
        assert out.source == "fallback" and "RequestTimeout" in out.reason
        assert out.plan == local_plan(state, own, "neo") and out.wait_s < 0.5
