"""Cost models fitted on profile samples, with their held-out error.

Choice: weighted least-squares fits of piecewise-linear (hinge) functions,
not NEO's lookup tables with interpolation. Why:

* Samples here come from live iterations at whatever batch shapes occurred,
  not from a grid; a table needs a grid, a regression takes scattered points.
* Edge hosts are shared and noisy (timings on the 2-core dev box swing by
  2x under load); interpolation passes through every noisy point, least
  squares averages the noise out.
* The physics is piecewise linear: a flat memory-bound floor, then a slope
  once compute-bound, and a kink where data stops fitting in cache. A few
  hinges at sample quantiles capture that and extrapolate linearly past the
  profiled range (a table can only clamp there).
* Rows are weighted by 1/time, so the fit minimises relative error: short
  and long batches count alike, which is what scheduling decisions need.

CPU attention depends on more than one number; its basis is per-session
overhead (sessions), bytes streamed (context, with hinges for cache
effects), and flops per byte (tokens * context / sessions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from sled_shared.apex.profiles import Component, Sample

Features = Callable[[np.ndarray], np.ndarray]  # [n, raw] -> [n, basis]


def _hinges(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    return np.maximum(x[:, None] - knots[None, :], 0.0)


@dataclass(frozen=True, slots=True)
class HingeFit:
    """y ~ basis(raw) @ coef, fitted in scaled units (raw / scale)."""

    kind: Component
    scale: np.ndarray  # [raw]: divisor per raw input, keeps the system well conditioned
    knots: np.ndarray  # hinge positions on the (scaled) main input
    coef: np.ndarray  # [basis]

    def basis(self, raw: np.ndarray) -> np.ndarray:
        x = raw / self.scale
        if self.kind is Component.CPU_ATTN:
            sessions, tokens, context = x[:, 0], x[:, 1], x[:, 2]
            per_byte = tokens * context / np.maximum(sessions, 1e-12)
            cols = [np.ones_like(context), sessions, tokens, context, per_byte]
            return np.column_stack([*cols, _hinges(context, self.knots)])
        main = x[:, 0]
        return np.column_stack([np.ones_like(main), main, _hinges(main, self.knots)])

    def predict(self, raw: np.ndarray) -> np.ndarray:
        return np.maximum(self.basis(np.atleast_2d(raw).astype(float)) @ self.coef, 0.0)


def _raw(kind: Component, samples: list[Sample]) -> np.ndarray:
    if kind is Component.CPU_ATTN:
        return np.array([[s.sessions, s.tokens, s.context] for s in samples], float)
    attr = {Component.LINEAR: "tokens", Component.ACCEL_ATTN: "context"}.get(kind, "nbytes")
    return np.array([[getattr(s, attr)] for s in samples], float)


def fit_component(kind: Component, samples: list[Sample], segments: int = 4) -> HingeFit:
    fixed = 5 if kind is Component.CPU_ATTN else 2  # basis columns besides the hinges
    if len(samples) < fixed:
        raise ValueError(f"{kind} needs at least {fixed} samples to fit, got {len(samples)}")
    raw = _raw(kind, samples)
    y = np.array([s.seconds for s in samples])
    scale = np.maximum(raw.max(axis=0), 1.0)
    main = raw[:, -1] / scale[-1]  # context for cpu_attn, the only input otherwise
    distinct = np.unique(main)
    # At most one knot per 3 samples and never more parameters than distinct points.
    n_knots = max(0, min(segments - 1, len(samples) // 3 - fixed, distinct.size - 2))
    knots = np.quantile(distinct, np.linspace(0, 1, n_knots + 2)[1:-1]) if n_knots else np.empty(0)
    fit = HingeFit(kind, scale, knots, np.empty(0))
    a = fit.basis(raw) / y[:, None]  # weight rows by 1/y: least relative error
    coef, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    return HingeFit(kind, scale, knots, coef)


def relative_error(fit: HingeFit, samples: list[Sample]) -> float:
    """Mean absolute relative error of ``fit`` on ``samples``."""
    y = np.array([s.seconds for s in samples])
    return float(np.mean(np.abs(fit.predict(_raw(fit.kind, samples)) - y) / y))


@dataclass(frozen=True, slots=True)
class CostModel:
    """Per-layer time predictions (seconds); a missing component raises on use."""

    fits: dict[Component, HingeFit]
    errors: dict[Component, float] = field(default_factory=dict)  # held-out MARE; nan: too few

    def _fit(self, kind: Component) -> HingeFit:
        try:
            return self.fits[kind]
        except KeyError:
            raise ValueError(f"cost model has no {kind} profile samples") from None

    def has(self, kind: Component) -> bool:
        return kind in self.fits

    def linear(self, tokens: float) -> float:
        return 0.0 if tokens <= 0 else float(self._fit(Component.LINEAR).predict([tokens])[0])

    def accel_attn(self, context: float) -> float:
        return 0.0 if context <= 0 else float(self._fit(Component.ACCEL_ATTN).predict([context])[0])

    def cpu_attn(self, sessions: int, tokens: float, context: float) -> float:
        if sessions <= 0:
            return 0.0
        return float(self._fit(Component.CPU_ATTN).predict([sessions, tokens, context])[0])

    def transfer(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else float(self._fit(Component.TRANSFER).predict([nbytes])[0])


def fit_cost_model(
    samples: Iterable[Sample], holdout: float = 0.25, seed: int = 0, segments: int = 4
) -> CostModel:
    """Fit every component that has samples.

    The error of each component is measured on a random ``holdout`` share
    of its samples with a fit on the rest; the returned model is then fitted
    on all samples.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    by_kind: dict[Component, list[Sample]] = {}
    for s in samples:
        by_kind.setdefault(s.component, []).append(s)
    rng = np.random.default_rng(seed)
    fits, errors = {}, {}
    for kind, group in by_kind.items():
        fits[kind] = fit_component(kind, group, segments)
        n_test = int(len(group) * holdout)
        errors[kind] = math.nan
        if n_test >= 2 and len(group) - n_test >= 8:
            order = rng.permutation(len(group))
            test = [group[i] for i in order[:n_test]]
            train = [group[i] for i in order[n_test:]]
            errors[kind] = relative_error(fit_component(kind, train, segments), test)
    return CostModel(fits, errors)
