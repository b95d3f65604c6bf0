"""Counters the service turns into metrics: per-forward records and running totals."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .messages import ForwardStat

_FORWARD_LOG = 1024  # forward records kept until drained; older ones are dropped


@dataclass(slots=True)
class Counters:
    forwards: int = 0
    forward_seconds: float = 0.0
    tokens: int = 0  # fed through forwards
    rounds: int = 0  # answered (retries not counted)
    drafted: int = 0  # draft tokens fed
    accepted: int = 0  # draft tokens committed
    log: deque[ForwardStat] = field(
        init=False, repr=False, default_factory=lambda: deque(maxlen=_FORWARD_LOG)
    )

    def forward(self, kind: str, seconds: float, sessions: int, tokens: int) -> None:
        self.log.append(ForwardStat(kind, seconds, sessions, tokens))
        self.forwards += 1
        self.forward_seconds += seconds
        self.tokens += tokens

    def round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted

    def drain(self) -> list[ForwardStat]:
        out = list(self.log)
        self.log.clear()
        return out
