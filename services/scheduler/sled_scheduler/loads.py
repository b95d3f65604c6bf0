"""What the scheduler knows of each verifier's load, for admission.

Verifiers report periodically; a verifier silent for ``ttl_s`` is taken
for gone and gets no new sessions. Between two reports each admission is
booked against the verifier it went to, so a burst of new sessions spreads
over the cluster instead of piling onto whoever looked emptiest last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from sled_shared.apex.plan import ACCEL
from sled_shared.sched_protocol import VerifierLoadReport

from sled_scheduler.admission import VerifierLoad


@dataclass(slots=True)
class _Entry:
    load: VerifierLoad
    seen: float  # monotonic time of the last report


class VerifierLoads:
    def __init__(self, ttl_s: float = 10.0, max_verifiers: int = 1024) -> None:
        if ttl_s <= 0 or max_verifiers < 1:
            raise ValueError("ttl_s must be > 0 and max_verifiers >= 1")
        self.ttl_s = ttl_s
        self.max_verifiers = max_verifiers
        self._entries: dict[str, _Entry] = {}

    def update(self, report: VerifierLoadReport, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._expire(now)
        if report.verifier_id not in self._entries and len(self._entries) >= self.max_verifiers:
            raise ValueError(f"more than {self.max_verifiers} verifiers report load")
        load = VerifierLoad(
            report.verifier_id,
            report.sessions,
            report.max_sessions,
            report.accel_free_tokens,
            report.host_free_tokens,
            report.predicted_iteration_s,
        )
        self._entries[report.verifier_id] = _Entry(load, now)

    def fresh(self, now: float | None = None) -> list[VerifierLoad]:
        self._expire(time.monotonic() if now is None else now)
        return [e.load for e in self._entries.values()]

    def book(self, verifier_id: str, tier: str, tokens: int) -> None:
        """Count an admitted session against its verifier until its next report."""
        entry = self._entries.get(verifier_id)
        if entry is None:
            return
        load = entry.load
        if tier == ACCEL:
            load = replace(load, accel_free_tokens=max(0, load.accel_free_tokens - tokens))
        else:
            load = replace(load, host_free_tokens=max(0, load.host_free_tokens - tokens))
        entry.load = replace(load, sessions=load.sessions + 1)

    def _expire(self, now: float) -> None:
        for vid in [v for v, e in self._entries.items() if now - e.seen > self.ttl_s]:
            del self._entries[vid]
