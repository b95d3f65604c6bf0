"""Predicted forward-pass time of a batch arrangement, from the cost model.

Per layer, a sub-batch j costs the accelerator ``L_j`` (linear layers over
all its tokens, offloaded sessions included) and ``A_j`` (attention over its
resident sessions), and costs the CPU side ``C_j`` (transfers plus the
slowest worker's attention). The CPU attention of j can start once j's
q/k/v exist and must end before j's next linear step; what the accelerator
does in between hides it:

* SEQUENTIAL, one batch:  ``L + A + C`` (nothing hides it).
* ASYNC, one batch:       ``L + max(A, C)`` (hidden under the accelerator's
  own attention; no batch split, so weights are read once per layer).
* PIPELINED, two batches: ``L0 + A0 + L1 + A1`` plus the stalls
  ``max(0, C0 - (A0 + L1 + A1))`` and ``max(0, C1 - (A1 + L0 + A0))``;
  the linear layers run twice per layer, which is the price of the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sled_shared.apex.cost_model import CostModel
from sled_shared.apex.plan import ACCEL, Mode, ModelShape, Predicted, SessionState


@dataclass(slots=True)
class Load:
    """Running totals of one (sub-)batch: all the cost model needs."""

    tokens: int = 0  # new tokens of every session in it (linear layers)
    accel_context: int = 0  # KV tokens read by accelerator attention
    workers: dict[str, list[int]] = field(default_factory=dict)  # id -> [sessions, tokens, ctx]
    gain: float = 0.0  # committed tokens expected
    members: list[str] = field(default_factory=list)  # session ids, in insertion order

    def add(self, s: SessionState, where: str) -> None:
        self.tokens += s.pending_tokens
        self.gain += s.gain
        self.members.append(s.session_id)
        if where == ACCEL:
            self.accel_context += s.attended
        else:
            w = self.workers.setdefault(where, [0, 0, 0])
            w[0] += 1
            w[1] += s.pending_tokens
            w[2] += s.attended

    def remove(self, s: SessionState, where: str) -> None:
        self.tokens -= s.pending_tokens
        self.gain -= s.gain
        self.members.remove(s.session_id)
        if where == ACCEL:
            self.accel_context -= s.attended
        else:
            w = self.workers[where]
            w[0] -= 1
            w[1] -= s.pending_tokens
            w[2] -= s.attended
            if w[0] == 0:
                del self.workers[where]

    def copy(self) -> Load:
        return Load(
            self.tokens,
            self.accel_context,
            {k: list(v) for k, v in self.workers.items()},
            self.gain,
            list(self.members),
        )


def accel_layer(model: CostModel, load: Load) -> tuple[float, float]:
    """(linear, attention) seconds of one layer on the accelerator."""
    return model.linear(load.tokens), model.accel_attn(load.accel_context)


def cpu_layer(model: CostModel, shape: ModelShape, load: Load) -> float:
    """CPU-side seconds of one layer: transfers, then the slowest worker."""
    if not load.workers:
        return 0.0
    offload_tokens = sum(w[1] for w in load.workers.values())
    xfer = model.transfer(offload_tokens * shape.offload_bytes_per_token)
    return xfer + max(model.cpu_attn(*w) for w in load.workers.values())


def predict(model: CostModel, shape: ModelShape, mode: Mode, loads: list[Load]) -> Predicted:
    layers = shape.num_layers
    gain = sum(b.gain for b in loads)
    if mode is Mode.PIPELINED:
        if len(loads) != 2:
            raise ValueError("PIPELINED needs exactly two sub-batches")
        (l0, a0), (l1, a1) = accel_layer(model, loads[0]), accel_layer(model, loads[1])
        c0, c1 = cpu_layer(model, shape, loads[0]), cpu_layer(model, shape, loads[1])
        busy = l0 + a0 + l1 + a1
        stall = max(0.0, c0 - (a0 + l1 + a1)) + max(0.0, c1 - (a1 + l0 + a0))
        cpu = max(c0, c1)
    else:
        if len(loads) != 1:
            raise ValueError(f"{mode} takes one batch")
        lin, att = accel_layer(model, loads[0])
        cpu = cpu_layer(model, shape, loads[0])
        busy = lin + att
        stall = cpu if mode is Mode.SEQUENTIAL else max(0.0, cpu - att)
    return Predicted(
        iteration_s=(busy + stall) * layers,
        accel_s=busy * layers,
        cpu_s=cpu * layers,
        stall_s=stall * layers,
        tokens=gain,
    )
