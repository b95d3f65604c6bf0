"""Choosing which offloaded sessions' attention runs this iteration, and how.

Both functions start from the accelerator-resident rounds already chosen
(``base``) plus the offloaded rounds that must run now (``forced``: waited
too long), and pick among the other offloaded rounds (``optional``).

* ``neo_select``: NEO's load-aware rule. Accelerator work sits in sub-batch
  0; each offloaded round, oldest first, joins the sub-batch with the most
  slack (time its CPU attention can hide in) and is dropped if it would not
  hide. Pipelining is kept only if its predicted rate beats running the
  accelerator batch alone.
* ``apex_select``: prediction-driven. Offloaded rounds are ranked by
  predicted CPU seconds per expected committed token; every prefix of that
  ranking is evaluated both as one batch with CPU attention overlapping the
  accelerator's (ASYNC, no batch split) and as two pipelined sub-batches
  (stalls allowed), beside the stall-free pipelines NEO's rule builds from
  that ranking and from arrival order; the arrangement with the highest
  predicted throughput within the latency bound wins, so APEX never
  predicts worse than NEO when NEO's choice meets the bound. This is
  myopic (per iteration); ``max_wait_s`` (the forced set) bounds how long
  a costly round can be left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sled_shared.apex.cost_model import CostModel
from sled_shared.apex.plan import Mode, ModelShape, Predicted, SessionState
from sled_shared.apex.timing import Load, accel_layer, cpu_layer, predict


@dataclass(frozen=True, slots=True)
class Choice:
    mode: Mode
    loads: tuple[Load, ...]  # one batch, or sub-batches 0 and 1 when PIPELINED
    predicted: Predicted


def _one_batch(model: CostModel, shape: ModelShape, base: Load, mode: Mode) -> Choice:
    return Choice(mode, (base,), predict(model, shape, mode, [base]))


def _slacks(model: CostModel, shape: ModelShape, b0: Load, b1: Load) -> tuple[float, float]:
    (l0, a0), (l1, a1) = accel_layer(model, b0), accel_layer(model, b1)
    c0, c1 = cpu_layer(model, shape, b0), cpu_layer(model, shape, b1)
    return (a0 + l1 + a1) - c0, (a1 + l0 + a0) - c1


def _stall(model: CostModel, shape: ModelShape, b0: Load, b1: Load) -> float:
    return sum(max(0.0, -x) for x in _slacks(model, shape, b0, b1))


def _place(
    model: CostModel, shape: ModelShape, b0: Load, b1: Load, s: SessionState, must: bool
) -> bool:
    """Put s in the sub-batch with more slack; undo (False) if that adds stall and not ``must``."""
    s0, s1 = _slacks(model, shape, b0, b1)
    before = max(0.0, -s0) + max(0.0, -s1)
    target = b1 if s1 >= s0 else b0
    target.add(s, s.tier)
    if must or _stall(model, shape, b0, b1) <= before:
        return True
    target.remove(s, s.tier)
    return False


def _label(base: Load) -> Mode:
    return Mode.SEQUENTIAL if not base.workers else Mode.ASYNC


def _hiding_pipeline(
    model: CostModel,
    shape: ModelShape,
    base: Load,
    forced: list[SessionState],
    order: list[SessionState],
    token_room: int,
) -> tuple[Load, Load]:
    """Sub-batches built by NEO's rule, offering the optional rounds in ``order``."""
    b0, b1 = base.copy(), Load()
    for s in forced:
        _place(model, shape, b0, b1, s, must=True)
    for s in order:
        if s.pending_tokens <= token_room and _place(model, shape, b0, b1, s, must=False):
            token_room -= s.pending_tokens
    return b0, b1


def _piped(model: CostModel, shape: ModelShape, b0: Load, b1: Load) -> Choice:
    return Choice(
        Mode.PIPELINED, (b0.copy(), b1.copy()), predict(model, shape, Mode.PIPELINED, [b0, b1])
    )


def neo_select(
    model: CostModel,
    shape: ModelShape,
    base: Load,
    forced: list[SessionState],
    optional: list[SessionState],
    token_room: int,
) -> Choice:
    fcfs = sorted(optional, key=lambda s: -s.waited_s)
    b0, b1 = _hiding_pipeline(model, shape, base, forced, fcfs, token_room)
    alone = base.copy()
    for s in forced:
        alone.add(s, s.tier)
    sequential = _one_batch(model, shape, alone, Mode.SEQUENTIAL)
    if not b1.members:
        return sequential
    piped = _piped(model, shape, b0, b1)
    return piped if piped.predicted.throughput > sequential.predicted.throughput else sequential


def apex_select(
    model: CostModel,
    shape: ModelShape,
    base: Load,
    forced: list[SessionState],
    optional: list[SessionState],
    token_room: int,
    latency_bound_s: float,
) -> Choice:
    def cost_per_token(s: SessionState) -> float:
        return model.cpu_attn(1, s.pending_tokens, s.attended) / max(s.gain, 1e-9)

    ranked = sorted(optional, key=cost_per_token)
    one = base.copy()
    b0, b1 = base.copy(), Load()
    for s in forced:
        one.add(s, s.tier)
        _place(model, shape, b0, b1, s, must=True)

    def arrangements(label: Mode) -> list[Choice]:
        out = [_one_batch(model, shape, one.copy(), label)]
        if b1.members:
            out.append(_piped(model, shape, b0, b1))
        return out

    must = arrangements(_label(one))
    extra: list[Choice] = []
    room = token_room
    for s in ranked:  # every prefix of the ranking, stalls allowed
        if s.pending_tokens > room:
            continue
        room -= s.pending_tokens
        one.add(s, s.tier)
        _place(model, shape, b0, b1, s, must=True)
        extra.extend(arrangements(Mode.ASYNC))
    for order in (ranked, sorted(optional, key=lambda s: -s.waited_s)):  # stall-free pipelines
        h0, h1 = _hiding_pipeline(model, shape, base, forced, order, token_room)
        if h1.members:
            extra.append(_piped(model, shape, h0, h1))
    within = [c for c in must + extra if c.predicted.iteration_s <= latency_bound_s]
    if not within:  # even the rounds that must run overshoot: run just them, fastest way
        return min(must, key=lambda c: c.predicted.iteration_s)
    return max(within, key=lambda c: (c.predicted.throughput, -c.predicted.iteration_s))


def no_offload(model: CostModel, shape: ModelShape, base: Load) -> Choice:
    """GPU-only: the accelerator batch alone."""
    return _one_batch(model, shape, base, Mode.SEQUENTIAL)
