"""Cost model fits on synthetic profiles with known ground truth."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sled_shared.apex.cost_model import fit_component, fit_cost_model, relative_error
from sled_shared.apex.profiles import Component, Profile, Sample

from .conftest import (
    synthetic_samples,
    truth_accel_attn,
    truth_cpu_attn,
    truth_linear,
    truth_transfer,
)


def test_noisy_fit_reports_small_held_out_error_and_predicts_unseen_points():
    rng = np.random.default_rng(1)
    model = fit_cost_model(synthetic_samples(rng, 300, noise=0.05, cpu_ns=40.0))
    for kind in Component:
        # 5% multiplicative noise: a good fit's relative error is about the noise's mean
        # absolute value (0.04), a bad one is far above it.
        assert 0.0 < model.errors[kind] < 0.08, (kind, model.errors[kind])
    # Knots sit at sample quantiles, not at the true kink (128), so allow 10% near it.
    for n in (1, 100, 128, 300, 700):  # 700: beyond the profiled range
        assert model.linear(n) == pytest.approx(truth_linear(n), rel=0.1)
    for c in (100, 50_000, 180_000):
        assert model.accel_attn(c) == pytest.approx(truth_accel_attn(c), rel=0.06)
    for s, t, c in ((1, 5, 1024), (16, 80, 16 * 1024), (24, 24, 24 * 3000)):
        assert model.cpu_attn(s, t, c) == pytest.approx(truth_cpu_attn(s, t, c, 40.0), rel=0.08)
    assert model.transfer(2_000_000) == pytest.approx(truth_transfer(2_000_000), rel=0.06)


def test_hinges_capture_the_kink_a_straight_line_misses():
    xs = np.linspace(1, 512, 60).astype(int)
    samples = [Sample(Component.LINEAR, truth_linear(x), tokens=int(x)) for x in xs]
    straight = fit_component(Component.LINEAR, samples, segments=1)
    hinged = fit_component(Component.LINEAR, samples, segments=4)
    assert relative_error(hinged, samples) < 0.02
    assert relative_error(straight, samples) > 3 * relative_error(hinged, samples)


def test_zero_work_costs_nothing_and_missing_components_are_named():
    samples = [Sample(Component.LINEAR, truth_linear(x), tokens=x) for x in range(1, 40)]
    model = fit_cost_model(samples)
    assert model.linear(0) == 0.0 and model.cpu_attn(0, 0, 0) == 0.0
    with pytest.raises(ValueError, match="no cpu_attn profile samples"):
        model.cpu_attn(1, 1, 100)
    assert model.has(Component.LINEAR) and not model.has(Component.TRANSFER)


def test_too_few_samples_for_holdout_gives_nan_error_not_a_fake_number():
    samples = [Sample(Component.TRANSFER, truth_transfer(b), nbytes=b) for b in (10, 1000, 10**6)]
    model = fit_cost_model(samples)
    assert math.isnan(model.errors[Component.TRANSFER])
    with pytest.raises(ValueError, match="at least 5 samples"):
        fit_cost_model([Sample(Component.CPU_ATTN, 1e-3, tokens=1, context=9, sessions=1)])


def test_samples_validate_and_round_trip_as_plain_dicts():
    with pytest.raises(ValueError, match="seconds"):
        Sample(Component.LINEAR, 0.0, tokens=3)
    with pytest.raises(ValueError, match="needs context, sessions"):
        Sample(Component.CPU_ATTN, 1e-3, tokens=3)
    with pytest.raises(ValueError):
        Sample("no-such-part", 1e-3, tokens=3)
    s = Sample(Component.CPU_ATTN, 1e-3, tokens=3, context=900, sessions=2)
    wire = dataclasses.asdict(Profile("worker-1", (s,)))
    back = Profile(**wire)
    assert back.samples == (s,) and isinstance(back.samples[0].component, Component)
