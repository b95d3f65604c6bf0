"""Wire messages of the scheduler subjects ``sled.v1.sched.<topic>``.

* ``profile``: verifiers and kvoffload workers send measured samples
  (``ProfileReport``, acknowledged with ``ReportAck``); a verifier may add the
  measured times of the last plan it ran, for the prediction-error metric.
* ``load``: verifiers report their load (``VerifierLoadReport``) for admission.
* ``plan``: ``PlanRequest`` (one iteration's state) -> ``PlanReply``. The
  verifier waits at most SLED_PLAN_DEADLINE_MS, then plans locally with
  ``sled_shared.apex`` and its cached cost model.
* ``admit``: ``AdmitRequest`` -> ``AdmitReply``, or an ``at_capacity``
  ErrorReply with ``retry_after_s``.
* ``model``: ``ModelRequest`` -> ``CostModelReply`` (the cost model to cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sled_shared.apex.cost_model import CostModel
from sled_shared.apex.plan import ACCEL, IterationState, Plan, Policy
from sled_shared.apex.profiles import Sample
from sled_shared.protocol import Message, _fields_dict, _from_fields, _set, message
from sled_shared.sched_codec import (
    model_from_wire,
    model_to_wire,
    plan_from_wire,
    plan_to_wire,
    samples_from_wire,
    samples_to_wire,
    state_from_wire,
    state_to_wire,
)
from sled_shared.wire import ProtocolError, check_float, check_int, check_optional, check_str

ROLES = frozenset({"verifier", "kvoffload"})
POLICIES = frozenset(p.value for p in Policy)
HOST = "host"  # admission tier: start on one of the verifier's kvoffload workers
TIERS = frozenset({ACCEL, HOST})


def _check_actual(msg: Message) -> None:
    """The optional measured times of the sender's last plan."""
    _set(msg, "last_plan_id", check_optional("last_plan_id", msg.last_plan_id, check_int))
    _set(msg, "last_accel_s", check_float("last_accel_s", msg.last_accel_s))
    _set(msg, "last_cpu_s", check_float("last_cpu_s", msg.last_cpu_s))


@message("sched.profile")
@dataclass(frozen=True, slots=True, eq=False)
class ProfileReport(Message):
    source: str  # verifier or worker id
    role: str  # "verifier" | "kvoffload"
    samples: tuple[Sample, ...] = ()
    last_plan_id: int | None = None  # plan the verifier ran last, with its measured times:
    last_accel_s: float = 0.0  # accelerator busy time of that forward
    last_cpu_s: float = 0.0  # CPU-side critical path (transfers + slowest worker)

    def __post_init__(self) -> None:
        check_str("source", self.source)
        check_str("role", self.role, ROLES)
        if not all(isinstance(s, Sample) for s in self.samples):
            raise ProtocolError("samples must be apex.profiles.Sample")
        _set(self, "samples", tuple(self.samples))
        _check_actual(self)

    def to_wire(self) -> dict[str, Any]:
        return {**_fields_dict(self), "samples": samples_to_wire(self.samples)}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> ProfileReport:
        if "samples" in body:
            body = {**body, "samples": samples_from_wire(body["samples"])}
        return _from_fields(cls, body)


@message("sched.ack")
@dataclass(frozen=True, slots=True, eq=False)
class ReportAck(Message):
    accepted: int  # samples or reports taken in
    model_version: int  # the scheduler's cost model version (0: none fitted yet)

    def __post_init__(self) -> None:
        _set(self, "accepted", check_int("accepted", self.accepted))
        _set(self, "model_version", check_int("model_version", self.model_version))


@message("sched.load")
@dataclass(frozen=True, slots=True, eq=False)
class VerifierLoadReport(Message):
    verifier_id: str
    sessions: int
    max_sessions: int
    accel_free_tokens: int
    host_free_tokens: int = 0  # free KV on the kvoffload workers it uses
    predicted_iteration_s: float = 0.0

    def __post_init__(self) -> None:
        check_str("verifier_id", self.verifier_id)
        for name in ("sessions", "max_sessions", "accel_free_tokens", "host_free_tokens"):
            _set(self, name, check_int(name, getattr(self, name)))
        _set(self, "predicted_iteration_s", check_float("s", self.predicted_iteration_s))


@message("sched.plan")
@dataclass(frozen=True, slots=True, eq=False)
class PlanRequest(Message):
    verifier_id: str
    state: IterationState
    policy: str | None = None  # None: the scheduler's SLED_SCHED_POLICY
    last_plan_id: int | None = None
    last_accel_s: float = 0.0
    last_cpu_s: float = 0.0

    def __post_init__(self) -> None:
        check_str("verifier_id", self.verifier_id)
        if not isinstance(self.state, IterationState):
            raise ProtocolError(f"state must be IterationState, got {type(self.state).__name__}")
        _set(self, "policy", check_optional("policy", self.policy, check_str, POLICIES))
        _check_actual(self)

    def to_wire(self) -> dict[str, Any]:
        return {**_fields_dict(self), "state": state_to_wire(self.state)}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> PlanRequest:
        if "state" in body:
            body = {**body, "state": state_from_wire(body["state"])}
        return _from_fields(cls, body)


@message("sched.planned")
@dataclass(frozen=True, slots=True, eq=False)
class PlanReply(Message):
    plan_id: int  # quote it back with the measured times (last_plan_id)
    plan: Plan
    model_version: int
    fallback: str | None = None  # why the plan is not the requested policy's, if it is not

    def __post_init__(self) -> None:
        _set(self, "plan_id", check_int("plan_id", self.plan_id))
        if not isinstance(self.plan, Plan):
            raise ProtocolError(f"plan must be Plan, got {type(self.plan).__name__}")
        _set(self, "model_version", check_int("model_version", self.model_version))
        _set(self, "fallback", check_optional("fallback", self.fallback, check_str))

    def to_wire(self) -> dict[str, Any]:
        return {**_fields_dict(self), "plan": plan_to_wire(self.plan)}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> PlanReply:
        if "plan" in body:
            body = {**body, "plan": plan_from_wire(body["plan"])}
        return _from_fields(cls, body)


@message("sched.admit")
@dataclass(frozen=True, slots=True, eq=False)
class AdmitRequest(Message):
    prompt_tokens: int
    headroom_tokens: int = 64  # room to decode into beyond the prompt

    def __post_init__(self) -> None:
        _set(self, "prompt_tokens", check_int("prompt_tokens", self.prompt_tokens, 1))
        _set(self, "headroom_tokens", check_int("headroom_tokens", self.headroom_tokens))


@message("sched.admitted")
@dataclass(frozen=True, slots=True, eq=False)
class AdmitReply(Message):
    verifier_id: str
    tier: str  # "accel" or "host": where the prefilled KV goes
    reason: str

    def __post_init__(self) -> None:
        check_str("verifier_id", self.verifier_id)
        check_str("tier", self.tier, TIERS)
        check_str("reason", self.reason)


@message("sched.model.get")
@dataclass(frozen=True, slots=True, eq=False)
class ModelRequest(Message):
    pass


@message("sched.model")
@dataclass(frozen=True, slots=True, eq=False)
class CostModelReply(Message):
    version: int  # grows with every refit
    samples: int  # samples the fit used
    model: CostModel = field(default_factory=lambda: CostModel({}))

    def __post_init__(self) -> None:
        _set(self, "version", check_int("version", self.version, 1))
        _set(self, "samples", check_int("samples", self.samples))
        if not isinstance(self.model, CostModel):
            raise ProtocolError(f"model must be CostModel, got {type(self.model).__name__}")

    def to_wire(self) -> dict[str, Any]:
        return {**_fields_dict(self), "model": model_to_wire(self.model)}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> CostModelReply:
        if "model" in body:
            body = {**body, "model": model_from_wire(body["model"])}
        return _from_fields(cls, body)
