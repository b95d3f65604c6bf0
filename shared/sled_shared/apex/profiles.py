"""Profile samples: measured times of the parts of one transformer layer.

Verifiers and kvoffload workers measure these (offline sweeps at start-up
and live iterations) and publish them; the scheduler fits its cost model on
them. Plain dataclasses of numbers and strings, so ``dataclasses.asdict``
goes straight onto the wire and ``Sample(**d)`` comes back from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Component(StrEnum):
    LINEAR = "linear"  # accelerator linear layers (qkv, o, mlp) of one layer, whole batch
    ACCEL_ATTN = "accel_attn"  # accelerator attention of one layer over its resident sessions
    CPU_ATTN = "cpu_attn"  # one kvoffload worker's attention of one layer
    TRANSFER = "transfer"  # q/k/v out to a worker and attention back, one layer


@dataclass(frozen=True, slots=True)
class Sample:
    component: Component
    seconds: float  # measured wall time of that work for one layer
    tokens: int = 0  # new query tokens in the batch (linear, accel_attn, cpu_attn)
    context: int = 0  # KV tokens attended over, summed over sessions (accel_attn, cpu_attn)
    sessions: int = 0  # sessions in the batch (cpu_attn: per-session overhead, flops per byte)
    nbytes: int = 0  # bytes moved (transfer)

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component(self.component))
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"Sample.seconds must be finite and > 0, got {self.seconds}")
        for name in ("tokens", "context", "sessions", "nbytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"Sample.{name} must be >= 0, got {getattr(self, name)}")
        need = {
            Component.LINEAR: ("tokens",),
            Component.ACCEL_ATTN: ("context",),
            Component.CPU_ATTN: ("tokens", "context", "sessions"),
            Component.TRANSFER: ("nbytes",),
        }[self.component]
        missing = [n for n in need if getattr(self, n) <= 0]
        if missing:
            raise ValueError(f"{self.component} sample needs {', '.join(missing)} > 0")


@dataclass(frozen=True, slots=True)
class Profile:
    source: str  # id of the verifier or worker that measured the samples
    samples: tuple[Sample, ...]

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("Profile.source must not be empty")
        object.__setattr__(
            self,
            "samples",
            tuple(s if isinstance(s, Sample) else Sample(**s) for s in self.samples),
        )
