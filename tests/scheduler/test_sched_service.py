"""The scheduler service over a real nats-server: profiles, plans, model, admission."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest
from sled_shared import bus, subjects
from sled_shared.apex.plan import ACCEL, Policy
from sled_shared.apex.policies import plan as local_plan
from sled_shared.protocol import ErrorReply, decode
from sled_shared.sched_protocol import (
    AdmitReply,
    AdmitRequest,
    CostModelReply,
    ModelRequest,
    PlanReply,
    PlanRequest,
    ProfileReport,
    ReportAck,
    VerifierLoadReport,
)

from .conftest import accel_samples, client, cpu_samples, pressured_state, scheduler

TIMEOUT = 10.0


async def _ask(nc, topic: str, msg, expect):
    return await bus.request(nc, subjects.sched(topic), msg, TIMEOUT, expect=expect)


async def _profile(nc, source: str, role: str, samples) -> ReportAck:
    return await _ask(nc, "profile", ProfileReport(source, role, tuple(samples)), ReportAck)


async def test_profiles_fit_a_model_and_every_policy_plans_like_the_local_fallback(nats_url):
    rng = np.random.default_rng(0)
    state = pressured_state()
    async with scheduler(nats_url, "apex") as (svc, _), client(nats_url) as nc:
        for msg, topic in ((PlanRequest("v1", state), "plan"), (ModelRequest(), "model")):
            with pytest.raises(bus.RemoteError) as err:
                await _ask(nc, topic, msg, PlanReply)
            assert err.value.code == "unavailable" and err.value.retry_after_s == 1.0
        ack = await _profile(nc, "v1", "verifier", accel_samples(rng))
        assert ack.accepted == 180 and ack.model_version >= 1
        ack = await _profile(nc, "w1", "kvoffload", cpu_samples(rng))
        assert ack.accepted == 60 and ack.model_version >= 2
        fetched = await _ask(nc, "model", ModelRequest(), CostModelReply)
        assert fetched.version == svc.store.version and fetched.samples == 240
        for policy in Policy:
            reply = await _ask(nc, "plan", PlanRequest("v1", state, policy.value), PlanReply)
            assert reply.fallback is None and reply.plan.policy is policy
            # The verifier's fallback, run with the fetched model, plans exactly the same.
            assert reply.plan == local_plan(state, fetched.model, policy)
            offloaded = [s for s, where in reply.plan.placement.items() if where != ACCEL]
            assert reply.plan.run and (offloaded == [] if policy is Policy.GPU_ONLY else offloaded)
        default = await _ask(nc, "plan", PlanRequest("v1", state), PlanReply)
        assert default.plan.policy is Policy.APEX and default.plan_id > reply.plan_id


async def test_offloading_policies_without_cpu_profiles_fall_back_to_gpu_only(nats_url):
    rng = np.random.default_rng(1)
    async with scheduler(nats_url, "neo") as (svc, registry), client(nats_url) as nc:
        await _profile(nc, "v1", "verifier", accel_samples(rng))
        reply = await _ask(nc, "plan", PlanRequest("v1", pressured_state()), PlanReply)
        assert reply.plan.policy is Policy.GPU_ONLY and "ran gpu-only" in reply.fallback
        assert all(where == ACCEL for where in reply.plan.placement.values())
        value = registry.get_sample_value(
            "sled_scheduler_plan_fallbacks_total", {"reason": "no_cpu_profile"}
        )
        assert value == 1.0 and svc.fallbacks == 1


async def test_measured_times_of_a_plan_feed_the_prediction_error_metric(nats_url):
    rng = np.random.default_rng(2)
    async with scheduler(nats_url) as (_, registry), client(nats_url) as nc:
        await _profile(nc, "v1", "verifier", accel_samples(rng))
        await _profile(nc, "w1", "kvoffload", cpu_samples(rng))
        first = await _ask(nc, "plan", PlanRequest("v1", pressured_state()), PlanReply)
        predicted = first.plan.predicted
        assert predicted.accel_s > 0 and predicted.cpu_s > 0
        actual = {"last_accel_s": predicted.accel_s * 1.25, "last_cpu_s": predicted.cpu_s * 0.8}
        await _ask(
            nc, "plan", PlanRequest("v1", pressured_state(), None, first.plan_id, **actual),
            PlanReply,
        )  # fmt: skip
        # The same plan reported again (a retried report) counts once.
        report = ProfileReport("v1", "verifier", (), first.plan_id, **actual)
        await _ask(nc, "profile", report, ReportAck)

        def sample(name: str, resource: str) -> float | None:
            return registry.get_sample_value(name, {"resource": resource})

        assert sample("sled_scheduler_prediction_error_ratio_count", "accelerator") == 1
        assert sample("sled_scheduler_prediction_error_ratio_sum", "accelerator") == (
            pytest.approx(1.25)
        )
        assert sample("sled_scheduler_prediction_error_ratio_sum", "cpu") == pytest.approx(0.8)
        assert sample("sled_scheduler_actual_seconds", "cpu") == pytest.approx(actual["last_cpu_s"])
        assert registry.get_sample_value("sled_scheduler_offloaded_sessions") == 12


async def test_sample_window_is_bounded_and_refits_as_samples_arrive(nats_url):
    rng = np.random.default_rng(3)
    async with scheduler(nats_url, window=100, refit_every=50) as (svc, _), client(nats_url) as nc:
        versions = []
        for _ in range(4):
            versions.append(
                (await _profile(nc, "w1", "kvoffload", cpu_samples(rng, 60))).model_version
            )
        assert versions == sorted(versions) and versions[-1] >= 4
        assert svc.store.counts()["cpu_attn"] == 100 and svc.store.received == 240


async def test_admission_spreads_sessions_and_rejects_with_retry_after_when_full(nats_url):
    async with (
        scheduler(nats_url, "gpu-only", load_ttl_s=1.0) as (_, registry),
        client(nats_url) as nc,
    ):
        with pytest.raises(bus.RemoteError) as err:
            await _ask(nc, "admit", AdmitRequest(100), AdmitReply)
        assert err.value.code == "at_capacity" and "no verifier registered" in str(err.value)
        for vid, free in (("v1", 600), ("v2", 400)):
            load = VerifierLoadReport(vid, 0, 8, accel_free_tokens=free)
            assert (await _ask(nc, "load", load, ReportAck)).accepted == 1
        placed = []
        for _ in range(3):
            placed.append((await _ask(nc, "admit", AdmitRequest(200), AdmitReply)).verifier_id)
        # Each admission is booked against its verifier until that verifier reports again.
        assert sorted(placed) == ["v1", "v1", "v2"]
        with pytest.raises(bus.RemoteError) as err:
            await _ask(nc, "admit", AdmitRequest(200), AdmitReply)
        assert err.value.code == "at_capacity" and err.value.retry_after_s == 1.0
        assert "no verifier has KV room for 264 tokens" in str(err.value)
        value = registry.get_sample_value(
            "sled_scheduler_admissions_rejected_total", {"reason": "kv_full"}
        )
        assert value == 1.0
        assert (
            registry.get_sample_value("sled_scheduler_placements_total", {"tier": "accelerator"})
            == 3.0
        )
        await asyncio.sleep(1.2)  # both reports expire: their verifiers may be gone
        with pytest.raises(bus.RemoteError) as err:
            await _ask(nc, "admit", AdmitRequest(1), AdmitReply)
        assert "no verifier registered" in str(err.value)


async def test_bad_requests_are_answered_with_errors(nats_url):
    async with scheduler(nats_url) as _, client(nats_url) as nc:
        bad_state = msgpack.packb(
            {"v": 1, "t": "sched.plan", "verifier_id": "v1", "state": {"ids": ["a"]}}
        )
        bad_samples = msgpack.packb(
            {"v": 1, "t": "sched.profile", "source": "w", "role": "kvoffload",
             "samples": {"component": [9], "seconds": [1.0], "tokens": [1], "context": [1],
                         "sessions": [1], "nbytes": [0]}}
        )  # fmt: skip
        for topic, payload in (
            ("plan", b"\x00"),
            ("plan", bad_state),
            ("profile", bad_samples),
            ("admit", msgpack.packb({"v": 1, "t": "sched.admit", "prompt_tokens": 0})),
        ):
            reply = decode((await nc.request(subjects.sched(topic), payload, timeout=TIMEOUT)).data)
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request", (topic, reply)
