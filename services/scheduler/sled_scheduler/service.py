"""The scheduler as a NATS micro service ("sled-scheduler").

Endpoints on ``sled.v1.sched.<topic>`` (messages in ``sled_shared.sched_protocol``):

- ``profile``: samples from verifiers and workers refit the cost model; a
  verifier's measured times of its last plan feed the prediction-error metric;
- ``load``: verifier load reports, for admission;
- ``plan``: one iteration's plan under the configured (or requested) policy;
- ``admit``: which verifier takes a new session, or ``at_capacity``;
- ``model``: the current cost model, for the verifiers' local fallback.

Planning is pure numpy and takes milliseconds, so it runs on the event loop:
one scheduler serialises plans anyway, and a thread hop would only add latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from sled_shared import bus, subjects
from sled_shared.apex.plan import ACCEL, RECOMPUTE, Plan, Policy
from sled_shared.apex.policies import plan as make_plan
from sled_shared.apex.profiles import Component
from sled_shared.metrics import SchedulerMetrics
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
from sled_shared.settings import SchedulerSettings
from sled_shared.wire import ServiceError

from sled_scheduler.admission import admit
from sled_scheduler.loads import VerifierLoads
from sled_scheduler.model_store import ModelStore, PlanBook

log = logging.getLogger(__name__)

SERVICE_NAME = "sled-scheduler"
SERVICE_VERSION = "0.1.0"
ACCEL_PARTS = (Component.LINEAR, Component.ACCEL_ATTN)
OFFLOAD_PARTS = (Component.CPU_ATTN, Component.TRANSFER)


class SchedulerService:
    def __init__(
        self,
        settings: SchedulerSettings,
        metrics: SchedulerMetrics,
        *,
        store: ModelStore | None = None,
        loads: VerifierLoads | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self.policy = Policy(settings.sched_policy)
        self.plan_deadline_s = settings.plan_deadline_ms / 1000.0
        self.metrics = metrics
        self.store = store or ModelStore()
        self.loads = loads or VerifierLoads()
        self.book = PlanBook()
        self.retry_after_s = retry_after_s
        self.plans = 0
        self.late_plans = 0  # computed slower than the verifiers' plan deadline
        self.fallbacks = 0
        self._offloaded: dict[str, int] = {}  # verifier -> its sessions on the host tier

    # -- handlers ---------------------------------------------------------------

    async def profile(self, msg: ProfileReport) -> ReportAck:
        taken = self.store.add(msg.samples)
        self._record_actual(msg.last_plan_id, msg.last_accel_s, msg.last_cpu_s)
        return ReportAck(taken, self.store.version)

    async def load(self, msg: VerifierLoadReport) -> ReportAck:
        try:
            self.loads.update(msg)
        except ValueError as exc:
            raise ServiceError("at_capacity", str(exc), self.retry_after_s) from None
        return ReportAck(1, self.store.version)

    async def plan(self, msg: PlanRequest) -> PlanReply:
        self._record_actual(msg.last_plan_id, msg.last_accel_s, msg.last_cpu_s)
        state = msg.state
        self._offloaded[msg.verifier_id] = sum(
            1 for s in state.sessions if s.tier not in (ACCEL, RECOMPUTE)
        )
        self.metrics.offloaded_sessions.set(sum(self._offloaded.values()))
        model = self.store.model
        if model is None or not all(model.has(c) for c in ACCEL_PARTS):
            self.metrics.record_fallback("no_model")
            raise ServiceError(
                "unavailable", "no accelerator profile samples yet: plan locally", 1.0
            )
        policy = Policy(msg.policy) if msg.policy else self.policy
        fallback = None
        if policy is not Policy.GPU_ONLY and not all(model.has(c) for c in OFFLOAD_PARTS):
            fallback = f"{policy.value} needs CPU attention and transfer profiles; ran gpu-only"
            policy = Policy.GPU_ONLY
            self.fallbacks += 1
            self.metrics.record_fallback("no_cpu_profile")
        start = time.perf_counter()
        try:
            plan: Plan = make_plan(state, model, policy)
        except ValueError as exc:  # a state the policies cannot serve
            raise ServiceError("bad_request", f"cannot plan this state: {exc}") from None
        took = time.perf_counter() - start
        self.metrics.plan_time.observe(took)
        self.plans += 1
        if took > self.plan_deadline_s:
            self.late_plans += 1
        return PlanReply(self.book.add(plan.predicted), plan, self.store.version, fallback)

    async def admit(self, msg: AdmitRequest) -> AdmitReply:
        a = admit(
            msg.prompt_tokens, self.loads.fresh(), self.policy, msg.headroom_tokens,
            self.retry_after_s,
        )  # fmt: skip
        if a.verifier_id is None or a.tier is None:
            self.metrics.record_rejection(a.code)
            raise ServiceError("at_capacity", a.reason, a.retry_after_s)
        self.loads.book(a.verifier_id, a.tier, msg.prompt_tokens + msg.headroom_tokens)
        self.metrics.record_placement("accelerator" if a.tier == ACCEL else "host")
        return AdmitReply(a.verifier_id, a.tier, a.reason)

    async def model(self, _msg: ModelRequest) -> CostModelReply:
        if self.store.model is None:
            raise ServiceError("unavailable", "no cost model fitted yet", 1.0)
        return CostModelReply(self.store.version, self.store.fitted_samples, self.store.model)

    def _record_actual(self, plan_id: int | None, accel_s: float, cpu_s: float) -> None:
        predicted = None if plan_id is None else self.book.pop(plan_id)
        if predicted is None:
            return
        for resource, want, got in (
            ("accelerator", predicted.accel_s, accel_s),
            ("cpu", predicted.cpu_s, cpu_s),
        ):
            if want > 0 and got > 0:
                self.metrics.record_iteration(resource, want, got)

    # -- service ----------------------------------------------------------------------

    def endpoints(self) -> list[bus.Endpoint]:
        def ep(topic: str, handler, types, **kw) -> bus.Endpoint:
            return bus.Endpoint(topic, subjects.sched(topic), handler, types, **kw)

        return [
            ep("profile", self.profile, ProfileReport, max_concurrency=16),
            ep("load", self.load, VerifierLoadReport, max_concurrency=16),
            ep("plan", self.plan, PlanRequest, max_concurrency=16, stats_data=self.stats_data),
            ep("admit", self.admit, AdmitRequest, max_concurrency=16),
            ep("model", self.model, ModelRequest, max_concurrency=16),
        ]

    def stats_data(self) -> dict[str, Any]:
        return {
            "policy": self.policy.value,
            "model_version": self.store.version,
            "samples": self.store.counts(),
            "plans": self.plans,
            "late_plans": self.late_plans,
            "fallbacks": self.fallbacks,
            "verifiers": len(self.loads.fresh()),
        }

    async def serve(
        self,
        nc: Client,
        *,
        stop: asyncio.Event | None = None,
        on_started: Callable[[bus.BusService], None] | None = None,
    ) -> None:
        await bus.run_service(
            nc,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            endpoints=self.endpoints(),
            description="APEX scheduler: cost models, plans, admission",
            metadata={"policy": self.policy.value},
            stop=stop,
            on_started=on_started,
        )
