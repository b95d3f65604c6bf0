"""Synthetic profiles (labelled as such) with known ground truth, for fitting and planning.

Per layer of a 7B model (fp16) on a T4-class accelerator (~300 GB/s: weights
1.3 ms, KV ~50 ns per context token) beside a server CPU (~80 ns per token at
~200 GB/s; "slow" CPUs are 10x that). Tests only rely on their ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sled_shared.apex.cost_model import CostModel, fit_cost_model
from sled_shared.apex.plan import ModelShape
from sled_shared.apex.profiles import Component, Sample

SHAPE = ModelShape(num_layers=32, q_heads=32, kv_heads=32, head_dim=128, act_bytes=2)


def truth_linear(n: float) -> float:  # memory-bound floor, then compute-bound slope
    return 1.3e-3 + max(0.0, n - 128) * 6e-6


def truth_accel_attn(c: float, ns_per_token: float = 50.0) -> float:
    return 1e-5 + c * ns_per_token * 1e-9


def truth_cpu_attn(sessions: int, tokens: float, context: float, ns_per_token: float) -> float:
    return 2e-5 * sessions + context * ns_per_token * 1e-9 + tokens * context / sessions * 2e-11


def truth_transfer(nbytes: float) -> float:
    return 2e-5 + nbytes / 10e9


def synthetic_samples(
    rng: np.random.Generator, n: int, noise: float, cpu_ns: float, accel_ns: float = 50.0
) -> list[Sample]:
    out = []

    def jitter(t: float) -> float:
        return t * (1 + noise * rng.standard_normal())

    for _ in range(n):
        tok = int(rng.integers(1, 512))
        out.append(Sample(Component.LINEAR, jitter(truth_linear(tok)), tokens=tok))
        ctx = int(rng.integers(16, 200_000))
        out.append(
            Sample(Component.ACCEL_ATTN, jitter(truth_accel_attn(ctx, accel_ns)), context=ctx)
        )
        s = int(rng.integers(1, 32))
        t = s * int(rng.integers(1, 9))
        c = s * int(rng.integers(16, 4096))
        out.append(
            Sample(
                Component.CPU_ATTN,
                jitter(truth_cpu_attn(s, t, c, cpu_ns)),
                tokens=t,
                context=c,
                sessions=s,
            )
        )
        b = int(rng.integers(1_000, 5_000_000))
        out.append(Sample(Component.TRANSFER, jitter(truth_transfer(b)), nbytes=b))
    return out


@pytest.fixture
def make_model() -> Callable[..., CostModel]:
    def make(cpu_ns: float = 80.0, accel_ns: float = 50.0, noise: float = 0.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        return fit_cost_model(synthetic_samples(rng, 200, noise, cpu_ns, accel_ns))

    return make
