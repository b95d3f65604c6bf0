"""Wire encoding of the APEX planning types (``sled_shared.apex``) inside the
scheduler's messages: column arrays instead of one map per session, so a
plan request for a large batch stays small and decodes in a few numpy calls.

Every ``*_from_wire`` raises ``ProtocolError`` for anything malformed,
including values the apex dataclasses themselves reject.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from sled_shared.apex.cost_model import CostModel, HingeFit
from sled_shared.apex.plan import (
    IterationState,
    Migration,
    Mode,
    ModelShape,
    Plan,
    Policy,
    Predicted,
    SessionState,
    WorkerState,
)
from sled_shared.apex.profiles import Component, Sample
from sled_shared.wire import ProtocolError

T = TypeVar("T")
_COMPONENTS = tuple(Component)  # wire code = index
_SAMPLE_COLS = ("seconds", "tokens", "context", "sessions", "nbytes")


def guard(what: str, build: Callable[[], T]) -> T:
    """Run ``build``; any malformed-input error becomes a ProtocolError naming ``what``."""
    try:
        return build()
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ProtocolError(f"{what}: {type(exc).__name__}: {exc}") from None


def _map(what: str, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} must be a map")
    return body


def _strs(name: str, value: Any, n: int | None = None) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{name} must be a list of strings")
    if n is not None and len(value) != n:
        raise ProtocolError(f"{name} must hold {n} entries, got {len(value)}")
    return list(value)


def _col(name: str, value: Any, n: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.size != n or (n and arr.dtype.kind not in "iuf"):
        raise ProtocolError(f"{name} must be {n} numbers, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _inf_or(x: float) -> float | None:
    return None if math.isinf(x) else x


# -- profile samples ------------------------------------------------------


def samples_to_wire(samples: tuple[Sample, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "component": np.array([_COMPONENTS.index(s.component) for s in samples], np.int32)
    }
    for col in _SAMPLE_COLS:
        out[col] = np.array([getattr(s, col) for s in samples], np.float64)
    return out


def samples_from_wire(body: Any) -> tuple[Sample, ...]:
    body = _map("samples", body)
    codes = np.asarray(body.get("component", ()))
    n = codes.size
    if codes.ndim != 1 or (n and (codes.dtype.kind not in "iu" or codes.min() < 0)):
        raise ProtocolError("samples.component must be non-negative integer codes")
    if n and codes.max() >= len(_COMPONENTS):
        raise ProtocolError(f"samples.component holds an unknown code {int(codes.max())}")
    cols = {c: _col(f"samples.{c}", body.get(c, ()), n) for c in _SAMPLE_COLS}

    def build() -> tuple[Sample, ...]:
        out = []
        for i in range(n):
            ints = {c: int(cols[c][i]) for c in _SAMPLE_COLS[1:]}
            out.append(Sample(_COMPONENTS[int(codes[i])], float(cols["seconds"][i]), **ints))
        return tuple(out)

    return guard("samples", build)


# -- iteration state -------------------------------------------------------


def state_to_wire(state: IterationState) -> dict[str, Any]:
    ss, ws = state.sessions, state.workers
    return {
        "ids": [s.session_id for s in ss],
        "tiers": [s.tier for s in ss],
        "context": np.array([s.context_len for s in ss], np.int32),
        "pending": np.array([s.pending_tokens for s in ss], np.int32),
        "waited": np.array([s.waited_s for s in ss], np.float64),
        "expected": np.array(
            [math.nan if s.expected_tokens is None else s.expected_tokens for s in ss], np.float64
        ),
        "arrival": np.array([s.arrival for s in ss], np.float64),
        "shape": dataclasses.asdict(state.shape),
        "worker_ids": [w.worker_id for w in ws],
        "worker_capacity": np.array([w.capacity_tokens for w in ws], np.float64),
        "worker_used": np.array([w.used_tokens for w in ws], np.float64),
        "accel_kv_tokens": state.accel_kv_tokens,
        "block_size": state.block_size,
        "max_batch_tokens": state.max_batch_tokens,
        "latency_bound_s": _inf_or(state.latency_bound_s),
        "max_wait_s": _inf_or(state.max_wait_s),
        "swap_in_watermark": state.swap_in_watermark,
    }


def state_from_wire(body: Any) -> IterationState:
    b = _map("state", body)

    def build() -> IterationState:
        ids = _strs("state.ids", b["ids"])
        n = len(ids)
        tiers = _strs("state.tiers", b["tiers"], n)
        ctx, pend = _col("context", b["context"], n), _col("pending", b["pending"], n)
        waited, arrival = _col("waited", b["waited"], n), _col("arrival", b["arrival"], n)
        expected = _col("expected", b["expected"], n)
        sessions = tuple(
            SessionState(
                ids[i],
                tiers[i],
                int(ctx[i]),
                int(pend[i]),
                float(waited[i]),
                None if math.isnan(expected[i]) else float(expected[i]),
                float(arrival[i]),
            )
            for i in range(n)
        )
        wids = _strs("state.worker_ids", b["worker_ids"])
        cap = _col("worker_capacity", b["worker_capacity"], len(wids))
        used = _col("worker_used", b["worker_used"], len(wids))
        workers = tuple(
            WorkerState(w, int(c), int(u)) for w, c, u in zip(wids, cap, used, strict=True)
        )
        inf = math.inf
        return IterationState(
            sessions,
            ModelShape(**_map("state.shape", b["shape"])),
            int(b["accel_kv_tokens"]),
            workers,
            block_size=int(b["block_size"]),
            max_batch_tokens=int(b["max_batch_tokens"]),
            latency_bound_s=inf if b["latency_bound_s"] is None else float(b["latency_bound_s"]),
            max_wait_s=inf if b["max_wait_s"] is None else float(b["max_wait_s"]),
            swap_in_watermark=float(b["swap_in_watermark"]),
        )

    return guard("state", build)


# -- plans -----------------------------------------------------------------


def plan_to_wire(plan: Plan) -> dict[str, Any]:
    migs = plan.migrations
    return {
        "policy": plan.policy.value,
        "mode": plan.mode.value,
        "run": list(plan.run),
        "placement": [plan.placement[s] for s in plan.run],
        "sub_batch": np.array(
            [plan.sub_batch[s] for s in plan.run] if plan.sub_batch else [], np.int32
        ),
        "deferred": list(plan.deferred),
        "mig_ids": [m.session_id for m in migs],
        "mig_src": [m.src for m in migs],
        "mig_dst": [m.dst for m in migs],
        "mig_bytes": np.array([m.nbytes for m in migs], np.float64),
        "predicted": dataclasses.asdict(plan.predicted),
    }


def plan_from_wire(body: Any) -> Plan:
    b = _map("plan", body)

    def build() -> Plan:
        run = _strs("plan.run", b["run"])
        placement = _strs("plan.placement", b["placement"], len(run))
        sub = np.asarray(b["sub_batch"])
        if sub.size not in (0, len(run)):
            raise ProtocolError("plan.sub_batch must be empty or one entry per run session")
        mig_ids = _strs("plan.mig_ids", b["mig_ids"])
        n = len(mig_ids)
        src, dst = _strs("mig_src", b["mig_src"], n), _strs("mig_dst", b["mig_dst"], n)
        nbytes = _col("mig_bytes", b["mig_bytes"], n)
        return Plan(
            policy=Policy(b["policy"]),
            mode=Mode(b["mode"]),
            run=tuple(run),
            placement=dict(zip(run, placement, strict=True)),
            deferred=tuple(_strs("plan.deferred", b["deferred"])),
            migrations=tuple(
                Migration(mig_ids[i], src[i], dst[i], int(nbytes[i])) for i in range(n)
            ),
            sub_batch=dict(zip(run, map(int, sub.tolist()), strict=True)) if sub.size else {},
            predicted=Predicted(**_map("plan.predicted", b["predicted"])),
        )

    return guard("plan", build)


# -- cost models -------------------------------------------------------------


def model_to_wire(model: CostModel) -> list[dict[str, Any]]:
    return [
        {
            "kind": kind.value,
            "scale": np.asarray(fit.scale, np.float64),
            "knots": np.asarray(fit.knots, np.float64),
            "coef": np.asarray(fit.coef, np.float64),
            "error": None if math.isnan(model.errors.get(kind, math.nan)) else model.errors[kind],
        }
        for kind, fit in model.fits.items()
    ]


def model_from_wire(body: Any) -> CostModel:
    if not isinstance(body, list | tuple):
        raise ProtocolError("fits must be a list")

    def build() -> CostModel:
        fits, errors = {}, {}
        for item in body:
            f = _map("fit", item)
            kind = Component(f["kind"])
            raw = 3 if kind is Component.CPU_ATTN else 1
            scale = np.array(f["scale"], np.float64)
            knots = np.array(f["knots"], np.float64)
            coef = np.array(f["coef"], np.float64)
            basis = (5 if kind is Component.CPU_ATTN else 2) + knots.size
            if scale.shape != (raw,) or coef.shape != (basis,) or knots.ndim != 1:
                raise ProtocolError(f"fit {kind}: scale/knots/coef shapes do not fit together")
            if not (np.isfinite(scale).all() and np.isfinite(coef).all() and (scale > 0).all()):
                raise ProtocolError(f"fit {kind}: non-finite or non-positive values")
            fits[kind] = HingeFit(kind, scale, knots, coef)
            errors[kind] = math.nan if f["error"] is None else float(f["error"])
        return CostModel(fits, errors)

    return guard("fits", build)
