"""The timing formulas of each execution mode, on an exactly-fitted model."""

from __future__ import annotations

import pytest
from sled_shared.apex.plan import ACCEL, Mode, SessionState
from sled_shared.apex.timing import Load, accel_layer, cpu_layer, predict

from .conftest import SHAPE


def _load(accel: list[tuple[int, int]], cpu: list[tuple[str, int, int]]) -> Load:
    load = Load()
    for i, (ctx, n) in enumerate(accel):
        load.add(SessionState(f"g{i}", ACCEL, ctx, n), ACCEL)
    for i, (w, ctx, n) in enumerate(cpu):
        load.add(SessionState(f"c{i}", w, ctx, n), w)
    return load


def test_modes_follow_their_formulas(make_model):
    model = make_model(cpu_ns=40.0)
    one = _load([(4000, 5)] * 4, [("w1", 2000, 5)] * 6)
    lin, att = accel_layer(model, one)
    cpu = cpu_layer(model, SHAPE, one)
    assert lin > 0 and att > 0 and cpu > 0
    layers = SHAPE.num_layers
    seq = predict(model, SHAPE, Mode.SEQUENTIAL, [one])
    asy = predict(model, SHAPE, Mode.ASYNC, [one])
    assert seq.iteration_s == pytest.approx((lin + att + cpu) * layers)
    assert asy.iteration_s == pytest.approx((lin + max(att, cpu)) * layers)
    assert asy.stall_s == pytest.approx(max(0.0, cpu - att) * layers)
    assert seq.tokens == asy.tokens == 50

    b0 = _load([(4000, 5)] * 4, [("w1", 2000, 5)] * 3)
    b1 = _load([], [("w1", 2000, 5)] * 3)
    (l0, a0), (l1, a1) = accel_layer(model, b0), accel_layer(model, b1)
    c0, c1 = cpu_layer(model, SHAPE, b0), cpu_layer(model, SHAPE, b1)
    pip = predict(model, SHAPE, Mode.PIPELINED, [b0, b1])
    stall = max(0.0, c0 - (a0 + l1 + a1)) + max(0.0, c1 - (a1 + l0 + a0))
    assert pip.iteration_s == pytest.approx((l0 + a0 + l1 + a1 + stall) * layers)
    assert pip.accel_s == pytest.approx((l0 + a0 + l1 + a1) * layers)


def test_workers_run_in_parallel_and_share_the_transfer_link(make_model):
    model = make_model()
    one = _load([], [("w1", 3000, 4)] * 4)
    two = _load([], [("w1", 3000, 4)] * 2 + [("w2", 3000, 4)] * 2)
    # Same transfers, half the work on the slowest worker.
    assert cpu_layer(model, SHAPE, two) < cpu_layer(model, SHAPE, one)
    xfer = model.transfer(16 * SHAPE.offload_bytes_per_token)
    assert cpu_layer(model, SHAPE, two) == pytest.approx(xfer + model.cpu_attn(2, 8, 2 * 3004))


def test_load_add_remove_round_trip():
    load = _load([(100, 2)], [("w1", 50, 3)])
    s = SessionState("x", "w1", 10, 4, expected_tokens=2.5)
    load.add(s, "w1")
    assert load.workers["w1"] == [2, 7, 53 + 14] and load.gain == pytest.approx(7.5)
    load.remove(s, "w1")
    assert load.workers["w1"] == [1, 3, 53] and load.members == ["g0", "c0"]
    with pytest.raises(ValueError, match="two sub-batches"):
        predict(None, SHAPE, Mode.PIPELINED, [load])  # type: ignore[arg-type]
