"""How many tokens to draft next round.

The verifier suggests a K from acceptance and server load; settings.max_k
caps it. The device then lowers it when its own costs say fewer drafts give
more tokens per second: a round of K drafts commits on average
E(K) = 1 + a + ... + a^K tokens (a: per-token acceptance, drafts accepted as
a prefix) and takes T(K) = K * d + r (d: draft time per token on this device,
r: round trip to the verifier), so the best K maximises E(K) / T(K). A fast
n-gram draft (d ~ 0) keeps the verifier's K; a slow draft on a fast link
drafts fewer, down to 0 when even one draft costs more than it saves.

Seeded sampling is the exception. The exact rule draws a position's token
differently when it is a draft position (accept or resample) than when it is
the bonus after the last draft, so the text depends on where rounds end.
For a seeded request to give the same text every time (under any load,
after a failover) K must depend on nothing but the tokens so far: it then
comes from the session's acceptance alone, never from timings or the
verifier's load-driven suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass

# Per-token acceptance assumed before a session has verified anything.
ACCEPT_PRIOR = 0.6
# Weight of the newest observation in the moving averages.
EWMA_WEIGHT = 0.2
# Draft i (1-based) is worth sending while the chance it is reached and
# accepted, rate**i, stays at or above this (the reproducible K's rule).
WORTH_DRAFTING = 0.35
# When the device's costs have turned drafting off, draft one token this
# often anyway: the costs are only re-measured while drafting.
PROBE_EVERY = 16


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted mean; ``value`` is None until the first sample."""

    weight: float = EWMA_WEIGHT
    value: float | None = None

    def add(self, sample: float) -> None:
        if self.value is None:
            self.value = sample
        else:
            self.value += self.weight * (sample - self.value)


@dataclass(slots=True)
class DeviceCosts:
    """Draft and round-trip times of one device, shared by its sessions."""

    draft_per_token_s: Ewma
    round_trip_s: Ewma

    @classmethod
    def new(cls) -> DeviceCosts:
        return cls(Ewma(), Ewma())


@dataclass(slots=True)
class Acceptance:
    """Per-token acceptance of one session, estimated from decayed counts.

    Each round accepts a prefix: ``accepted`` successes and, unless all drafts
    were accepted, one failure. successes / (successes + failures) is the
    maximum-likelihood rate for that geometric model (a plain mean of
    accepted / drafted would undercount when K is large).
    """

    successes: float = 0.0
    failures: float = 0.0
    decay: float = 1.0 - EWMA_WEIGHT

    @property
    def rate(self) -> float:
        seen = self.successes + self.failures
        if seen == 0:
            return ACCEPT_PRIOR
        # One prior pseudo-round keeps a short streak from reading as 0 or 1.
        return (self.successes + ACCEPT_PRIOR) / (seen + 1.0)

    def observe(self, drafted: int, accepted: int) -> None:
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted={accepted} outside 0..drafted={drafted}")
        if drafted == 0:
            return
        self.successes = self.successes * self.decay + accepted
        self.failures = self.failures * self.decay + (1.0 if accepted < drafted else 0.0)


def expected_tokens(k: int, rate: float) -> float:
    """Mean tokens one round commits: accepted drafts plus the verifier's own token."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def best_k(
    cap: int, rate: float, draft_per_token_s: float | None, round_trip_s: float | None
) -> int:
    """The K in [0, cap] with the most expected tokens per second.

    Until the device has timed both a draft and a round trip it trusts ``cap``.
    """
    if cap <= 0:
        return 0
    if draft_per_token_s is None or round_trip_s is None:
        return cap
    d, r = max(draft_per_token_s, 0.0), max(round_trip_s, 1e-6)
    rate = min(max(rate, 0.0), 1.0)
    speed = [expected_tokens(k, rate) / (k * d + r) for k in range(cap + 1)]
    return max(range(cap + 1), key=lambda k: (speed[k], k))


def k_for_rate(cap: int, rate: float) -> int:
    """Drafts worth sending at this acceptance, from 1 up to ``cap``."""
    if cap <= 0:
        return 0
    k = 1
    while k < cap and rate ** (k + 1) >= WORTH_DRAFTING:
        k += 1
    return k


@dataclass(slots=True)
class AdaptiveK:
    """One session's K: the verifier's suggestion, capped, then tuned to the device."""

    max_k: int
    costs: DeviceCosts
    suggested: int | None = None  # last suggestion from the verifier
    acceptance: Acceptance | None = None
    reproducible: bool = False  # K from the token history alone (seeded sampling)
    _idle_rounds: int = 0  # rounds in a row the device's costs chose K = 0

    def __post_init__(self) -> None:
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {self.max_k}")
        if self.acceptance is None:
            self.acceptance = Acceptance()

    def next_k(self, room: int) -> int:
        """K for the next round; ``room`` is how many drafts can still be committed."""
        cap = min(self.max_k, room)
        if self.reproducible:
            return k_for_rate(cap, self.acceptance.rate)
        if self.suggested is not None:
            cap = min(cap, self.suggested)
        cap = max(cap, 0)
        k = best_k(
            cap,
            self.acceptance.rate,
            self.costs.draft_per_token_s.value,
            self.costs.round_trip_s.value,
        )
        if k == 0 < cap:
            self._idle_rounds += 1
            if self._idle_rounds >= PROBE_EVERY:
                self._idle_rounds = 0
                return 1
        else:
            self._idle_rounds = 0
        return k

    def observe(self, drafted: int, accepted: int, suggested_k: int) -> None:
        self.acceptance.observe(drafted, accepted)
        self.suggested = max(0, suggested_k)
