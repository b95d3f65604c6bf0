"""Round trips of the scheduler's wire messages, with real plans and fitted models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sled_shared.apex.cost_model import fit_cost_model
from sled_shared.apex.plan import (
    ACCEL,
    RECOMPUTE,
    IterationState,
    ModelShape,
    Policy,
    SessionState,
    WorkerState,
)
from sled_shared.apex.policies import plan
from sled_shared.apex.profiles import Component, Sample
from sled_shared.protocol import ProtocolError, decode, encode
from sled_shared.sched_codec import model_from_wire, state_from_wire, state_to_wire
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

SHAPE = ModelShape(num_layers=30, q_heads=9, kv_heads=3, head_dim=64)


def _samples(seed: int = 0) -> list[Sample]:
    """Synthetic (labelled) samples with a known linear truth per component."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(40):
        t, c, s = int(rng.integers(1, 400)), int(rng.integers(10, 9000)), int(rng.integers(1, 9))
        out += [
            Sample(Component.LINEAR, 1e-3 + t * 1e-6, tokens=t),
            Sample(Component.ACCEL_ATTN, 1e-5 + c * 1e-8, context=c),
            Sample(Component.CPU_ATTN, 2e-5 * s + c * 4e-8, tokens=s * 5, context=c, sessions=s),
            Sample(Component.TRANSFER, 2e-5 + c * 1e-9, nbytes=c * 100),
        ]
    return out


def _state() -> IterationState:
    sessions = (
        SessionState("a", ACCEL, 900, 5, 0.02, 3.5, 1.0),
        SessionState("b", "w1", 4000, 5, 0.3, None, 2.0),
        SessionState("c", "w2", 100, 0, 0.0, None, 3.0),
        SessionState("d", RECOMPUTE, 700, 3, 1.5, 2.0, 4.0),
        SessionState("e", "w1", 2500, 8, 0.1, None, 5.0),
    )
    workers = (WorkerState("w1", 60_000, 7000), WorkerState("w2", 60_000, 200))
    return IterationState(sessions, SHAPE, 2048, workers, max_wait_s=1.0, latency_bound_s=0.5)


def test_plan_request_and_reply_round_trip_real_plans():
    state = _state()
    req = PlanRequest("v1", state, "neo", 41, 0.012, 0.004)
    back = decode(encode(req))
    assert back == req and back.state == state
    assert math.isinf(
        decode(encode(PlanRequest("v1", IterationState((), SHAPE, 64)))).state.max_wait_s
    )
    model = fit_cost_model(_samples())
    for policy in Policy:
        p = plan(state, model, policy)
        reply = PlanReply(7, p, 3, None if policy is Policy.APEX else "why")
        assert decode(encode(reply)) == reply


def test_cost_model_round_trip_predicts_identically():
    model = fit_cost_model(_samples(1))
    back = decode(encode(CostModelReply(5, 160, model))).model
    assert set(back.fits) == set(Component)
    for c, ctx in ((1, 100), (4, 8000)):
        assert back.cpu_attn(c, 5 * c, ctx) == model.cpu_attn(c, 5 * c, ctx)
    assert back.linear(77) == model.linear(77) and back.transfer(10**6) == model.transfer(10**6)
    assert back.errors.keys() == model.errors.keys()
    with pytest.raises(ProtocolError, match="shapes"):
        model_from_wire(
            [{"kind": "linear", "scale": [1.0], "knots": [], "coef": [1.0], "error": None}]
        )


def test_profile_and_small_messages_round_trip():
    samples = tuple(_samples(2)[:9])
    for msg in (
        ProfileReport("w1", "kvoffload", samples),
        ProfileReport("v1", "verifier", (), 12, 0.5, 0.25),
        ReportAck(9, 2),
        VerifierLoadReport("v1", 3, 64, 5000, 90_000, 0.04),
        AdmitRequest(120),
        AdmitReply("v1", "host", "host room (offloaded)"),
        ModelRequest(),
    ):
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "body",
    [
        {"ids": ["a"], "tiers": ["accel", "x"]},
        {"ids": ["a"], "tiers": ["nowhere"]},
        {"context": np.array([-5], np.int32)},
        {"shape": {"num_layers": 0, "q_heads": 1, "kv_heads": 1, "head_dim": 1}},
        {"worker_ids": ["accel"]},
    ],
)
def test_malformed_states_are_protocol_errors(body):
    wire = {**state_to_wire(IterationState((SessionState("a", ACCEL, 5, 1),), SHAPE, 64)), **body}
    if "worker_ids" in body:
        wire.update(worker_capacity=np.ones(1), worker_used=np.zeros(1))
    with pytest.raises(ProtocolError):
        state_from_wire(wire)


def test_invalid_fields_are_rejected_locally():
    with pytest.raises(ProtocolError, match="role"):
        ProfileReport("w1", "drafter")
    with pytest.raises(ProtocolError, match="policy"):
        PlanRequest("v1", _state(), "fifo")
    with pytest.raises(ProtocolError, match="tier"):
        AdmitReply("v1", "disk", "x")
    with pytest.raises(ProtocolError, match="prompt_tokens"):
        AdmitRequest(0)
