"""Async client of the scheduler (``sled.v1.sched.*``), for the verifier.

``plan`` waits for the scheduler at most ``deadline_s`` (SLED_PLAN_DEADLINE_MS);
when it is slow, down, or cannot plan yet, the same ``sled_shared.apex``
policy runs here with the last cost model fetched from the scheduler (or one
the verifier fitted on its own samples), so an iteration never waits on the
scheduler for longer than the deadline. The measured times of the last
plan the scheduler made ride along with the next request, for its
prediction-error metric.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from nats.aio.client import Client

from sled_shared import bus, subjects
from sled_shared.apex.cost_model import CostModel
from sled_shared.apex.plan import IterationState, Plan, Policy
from sled_shared.apex.policies import plan as local_plan
from sled_shared.apex.profiles import Sample
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


class NoPlan(bus.BusError):
    """Neither the scheduler nor a local cost model could plan this iteration."""


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    plan: Plan
    plan_id: int | None  # the scheduler's id; None for a local plan
    source: str  # "scheduler" | "fallback"
    reason: str | None  # why the fallback ran, or the scheduler's own fallback note
    wait_s: float  # time spent waiting for the scheduler


class SchedClient:
    def __init__(
        self,
        nc: Client,
        verifier_id: str,
        policy: Policy | str,
        deadline_s: float,
        *,
        report_timeout_s: float = 2.0,
        fallback_model: CostModel | None = None,
    ) -> None:
        if deadline_s <= 0 or report_timeout_s <= 0:
            raise ValueError("deadline_s and report_timeout_s must be > 0")
        self.nc = nc
        self.verifier_id = verifier_id
        self.policy = Policy(policy)
        self.deadline_s = deadline_s
        self.report_timeout_s = report_timeout_s
        self.fallback_model = fallback_model  # e.g. fitted by the verifier on its own samples
        self.model: CostModel | None = None  # the scheduler's, as last fetched
        self.model_version = 0
        self.fallbacks = 0
        self._actual: tuple[int, float, float] | None = None  # (plan id, accel s, cpu s)
        self._refresh: asyncio.Future | None = None

    def record_actual(self, plan_id: int | None, accel_s: float, cpu_s: float) -> None:
        """Measured times of the forward that ran ``plan_id``; sent with the next request."""
        if plan_id is not None:
            self._actual = (plan_id, accel_s, cpu_s)

    async def plan(self, state: IterationState) -> PlanOutcome:
        actual = self._actual or (None, 0.0, 0.0)
        request = PlanRequest(self.verifier_id, state, self.policy.value, *actual)
        start = time.perf_counter()
        try:
            reply = await bus.request(
                self.nc, subjects.sched("plan"), request, self.deadline_s, expect=PlanReply
            )
        except bus.BusError as exc:
            return self._fallback(state, exc, time.perf_counter() - start)
        self._actual = None
        if reply.model_version > self.model_version and (
            self._refresh is None or self._refresh.done()
        ):
            # In the background: the iteration waits for its plan, not for the model.
            self._refresh = asyncio.ensure_future(self.refresh_model())
        return PlanOutcome(
            reply.plan, reply.plan_id, "scheduler", reply.fallback, time.perf_counter() - start
        )

    def _fallback(self, state: IterationState, why: Exception, waited: float) -> PlanOutcome:
        self.fallbacks += 1
        reason = f"{type(why).__name__}: {why}"
        for model in (self.model, self.fallback_model):
            if model is None:
                continue
            try:
                return PlanOutcome(local_plan(state, model, self.policy), None, "fallback",
                                   reason, waited)  # fmt: skip
            except ValueError as exc:  # the model lacks a component this policy needs
                reason = f"{reason}; local {self.policy.value}: {exc}"
        raise NoPlan(f"no plan: {reason}")

    async def refresh_model(self) -> bool:
        """Fetch the scheduler's cost model; False when it has none or cannot be reached."""
        try:
            reply = await bus.request(
                self.nc, subjects.sched("model"), ModelRequest(), self.report_timeout_s,
                expect=CostModelReply,
            )  # fmt: skip
        except bus.BusError:
            return False
        self.model, self.model_version = reply.model, reply.version
        return True

    async def report_profile(self, samples: tuple[Sample, ...]) -> ReportAck:
        actual = self._actual or (None, 0.0, 0.0)
        report = ProfileReport(self.verifier_id, "verifier", samples, *actual)
        ack = await bus.request(
            self.nc, subjects.sched("profile"), report, self.report_timeout_s, expect=ReportAck
        )
        self._actual = None
        return ack

    async def report_load(self, report: VerifierLoadReport) -> ReportAck:
        return await bus.request(
            self.nc, subjects.sched("load"), report, self.report_timeout_s, expect=ReportAck
        )

    async def admit(self, prompt_tokens: int, headroom_tokens: int = 64) -> AdmitReply:
        """Where a new session goes; ``RemoteError`` code ``at_capacity`` has retry_after_s."""
        return await bus.request(
            self.nc, subjects.sched("admit"), AdmitRequest(prompt_tokens, headroom_tokens),
            self.report_timeout_s, expect=AdmitReply,
        )  # fmt: skip
