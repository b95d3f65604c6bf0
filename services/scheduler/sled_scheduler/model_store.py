"""The scheduler's cost model: a bounded window of recent profile samples per
component, refitted as samples arrive, and the predictions of recent plans
so the measured times verifiers report back can be compared with them.

The window keeps the newest samples: hardware is shared and its speed
drifts (other tenants, thermal limits), and old samples would pin the fit
to how the machine used to be.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable

from sled_shared.apex.cost_model import CostModel, fit_cost_model
from sled_shared.apex.plan import Predicted
from sled_shared.apex.profiles import Component, Sample


class ModelStore:
    def __init__(
        self,
        window: int = 2000,
        refit_every: int = 32,
        refit_interval_s: float = 5.0,
        min_samples: int = 8,
    ) -> None:
        if window < min_samples or refit_every < 1 or refit_interval_s < 0 or min_samples < 5:
            raise ValueError("need window >= min_samples >= 5, refit_every >= 1, interval >= 0")
        self.window = window
        self.refit_every = refit_every
        self.refit_interval_s = refit_interval_s
        self.min_samples = min_samples  # per component, before it is fitted at all
        self._samples: dict[Component, deque[Sample]] = {c: deque(maxlen=window) for c in Component}
        self.model: CostModel | None = None
        self.version = 0  # 0: nothing fitted yet
        self.fitted_samples = 0
        self.received = 0
        self._new = 0
        self._last_fit = 0.0

    def add(self, samples: Iterable[Sample], now: float | None = None) -> int:
        """Take samples in; refit when enough are new or the last fit is old. Returns how many."""
        n = 0
        for s in samples:
            self._samples[s.component].append(s)
            n += 1
        self.received += n
        self._new += n
        now = time.monotonic() if now is None else now
        due = self._new >= self.refit_every or (
            self._new and now - self._last_fit >= self.refit_interval_s
        )
        if due or (n and self.model is None):
            self.refit(now)
        return n

    def refit(self, now: float | None = None) -> CostModel | None:
        usable = [s for group in self._samples.values() if len(group) >= self.min_samples
                  for s in group]  # fmt: skip
        self._new = 0
        self._last_fit = time.monotonic() if now is None else now
        if not usable:
            return self.model
        self.model = fit_cost_model(usable)
        self.version += 1
        self.fitted_samples = len(usable)
        return self.model

    def counts(self) -> dict[str, int]:
        return {c.value: len(group) for c, group in self._samples.items()}


class PlanBook:
    """Predictions of the most recent plans, by plan id (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._next = 1
        self._book: OrderedDict[int, Predicted] = OrderedDict()

    def add(self, predicted: Predicted) -> int:
        plan_id = self._next
        self._next += 1
        self._book[plan_id] = predicted
        if len(self._book) > self.size:
            self._book.popitem(last=False)
        return plan_id

    def pop(self, plan_id: int) -> Predicted | None:
        return self._book.pop(plan_id, None)
