"""Every Prometheus metric family of the system, declared once.

Each service builds its own group at start (``DrafterMetrics``,
``VerifierMetrics``, ``KVOffloadMetrics``, ``SchedulerMetrics``) against a
registry, the global one by default. Names carry the ``sled_`` prefix and a
service part, values are in base units (seconds, bytes), counters end in
``_total``. The dashboard and its test read ``metric_names()``, so a family
renamed here and not there fails a test instead of showing an empty panel.
"""

from __future__ import annotations

from typing import NamedTuple
from weakref import WeakKeyDictionary

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Edge latencies span an n-gram draft (well under a millisecond) to a CPU
# prefill of a long prompt (tens of seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Sessions per batched forward; SLED_MAX_SESSIONS defaults to 64.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Tokens per forward: a decode batch of K+1 per session up to a long prefill.
TOKEN_COUNT_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# The adaptive K runs from 0 (plain centralised decoding) up to SLED_MAX_K.
DRAFT_K_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)
# actual / predicted time: 1.0 is a perfect cost model; the spread both ways
# is what matters when judging whether CPU and accelerator work overlap.
ERROR_RATIO_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0,
)  # fmt: skip

TIERS: tuple[str, ...] = ("accelerator", "host")
RESOURCES: tuple[str, ...] = ("accelerator", "cpu")
KV_OPS: tuple[str, ...] = ("open", "append", "attend", "truncate", "evict", "migrate")


class MetricFamily(NamedTuple):
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]


# Filled as families are declared; read by metric_families() after it has
# declared them all on a throwaway registry.
_declared: dict[str, MetricFamily] = {}


def _counter(
    name: str, doc: str, labels: tuple[str, ...] = (), *, registry: CollectorRegistry
) -> Counter:
    _declared[name] = MetricFamily("counter", labels)
    return Counter(name, doc, labels, registry=registry)


def _gauge(
    name: str, doc: str, labels: tuple[str, ...] = (), *, registry: CollectorRegistry
) -> Gauge:
    _declared[name] = MetricFamily("gauge", labels)
    return Gauge(name, doc, labels, registry=registry)


def _histogram(
    name: str,
    doc: str,
    labels: tuple[str, ...] = (),
    *,
    buckets: tuple[float, ...],
    registry: CollectorRegistry,
) -> Histogram:
    _declared[name] = MetricFamily("histogram", labels)
    return Histogram(name, doc, labels, buckets=buckets, registry=registry)


class _DrafterFamilies:
    """The drafter's families in one registry, shared by every drafter in it.

    A benchmark harness runs several drafters in one process; their
    ``(draft_model, device)`` labels keep them apart in one registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        base = ("draft_model", "device")
        self.bound: set[tuple[str, str]] = set()
        self.rounds = _counter(
            "sled_drafter_rounds_total",
            "Verification rounds completed (one draft sent, one answer received).",
            base,
            registry=registry,
        )
        self.draft_tokens = _counter(
            "sled_drafter_draft_tokens_total",
            "Draft tokens sent for verification, by position within the round (0-based).",
            (*base, "position"),
            registry=registry,
        )
        self.accepted_tokens = _counter(
            "sled_drafter_accepted_tokens_total",
            "Draft tokens the verifier accepted, by position within the round (0-based).",
            (*base, "position"),
            registry=registry,
        )
        self.generated_tokens = _counter(
            "sled_drafter_generated_tokens_total",
            "Tokens committed to users (accepted drafts plus correction or bonus tokens).",
            base,
            registry=registry,
        )
        self.requests = _counter(
            "sled_drafter_requests_total",
            "Completion requests finished, by status.",
            (*base, "status"),
            registry=registry,
        )
        self.failovers = _counter(
            "sled_drafter_failovers_total",
            "Sessions reopened on another verifier after their verifier disappeared.",
            base,
            registry=registry,
        )
        self.active_sessions = _gauge(
            "sled_drafter_active_sessions",
            "Sessions of this device currently generating.",
            base,
            registry=registry,
        )
        self.ttft = _histogram(
            "sled_drafter_ttft_seconds",
            "Time from request arrival to the first generated token.",
            base,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = _histogram(
            "sled_drafter_tpot_seconds",
            "Mean time per output token after the first, one observation per request.",
            base,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.draft_time_per_token = _histogram(
            "sled_drafter_draft_time_per_token_seconds",
            "Local draft-model time per drafted token, one observation per round.",
            base,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.round_trip = _histogram(
            "sled_drafter_round_trip_seconds",
            "Time from sending a round to the verifier until its answer arrives.",
            base,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.draft_k = _histogram(
            "sled_drafter_draft_k",
            "Draft length K used per round (adaptive; 0 is plain centralised decoding).",
            base,
            buckets=DRAFT_K_BUCKETS,
            registry=registry,
        )


_drafter_families: WeakKeyDictionary[CollectorRegistry, _DrafterFamilies] = WeakKeyDictionary()


class DrafterMetrics:
    """One drafter: one device running one draft model.

    Every family carries ``draft_model`` (the registry name, e.g.
    ``smollm2-135m-int4`` or ``ngram``) and ``device``, so the dashboard can
    compare heterogeneous drafts across devices. The attributes are the
    children bound to this drafter's labels.
    """

    def __init__(
        self, draft_model: str, device: str, registry: CollectorRegistry = REGISTRY
    ) -> None:
        families = _drafter_families.get(registry)
        if families is None:
            families = _drafter_families[registry] = _DrafterFamilies(registry)
        ids = (draft_model, device)
        if ids in families.bound:
            # Two drafters adding into one series would double-count silently.
            raise ValueError(f"drafter metrics for {ids} already exist in this registry")
        families.bound.add(ids)
        self._families = families
        self._ids = ids
        self.rounds = families.rounds.labels(*ids)
        self.generated_tokens = families.generated_tokens.labels(*ids)
        self.failovers = families.failovers.labels(*ids)
        self.active_sessions = families.active_sessions.labels(*ids)
        self.ttft = families.ttft.labels(*ids)
        self.tpot = families.tpot.labels(*ids)
        self.draft_time_per_token = families.draft_time_per_token.labels(*ids)
        self.round_trip = families.round_trip.labels(*ids)
        self.draft_k = families.draft_k.labels(*ids)
        for status in ("ok", "error"):
            families.requests.labels(*ids, status)

    def record_round(
        self, drafted: int, accepted: int, round_trip_s: float, draft_s: float
    ) -> None:
        """Account one answered round.

        Accepted drafts are always a prefix of the round's drafts, so position
        ``i`` was accepted exactly when ``i < accepted``. The verifier adds one
        correction or bonus token on top of the accepted ones.
        """
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted={accepted} outside 0..drafted={drafted}")
        self.rounds.inc()
        self.draft_k.observe(drafted)
        for position in range(drafted):
            self._families.draft_tokens.labels(*self._ids, str(position)).inc()
        for position in range(accepted):
            self._families.accepted_tokens.labels(*self._ids, str(position)).inc()
        self.generated_tokens.inc(accepted + 1)
        self.round_trip.observe(round_trip_s)
        if drafted:
            self.draft_time_per_token.observe(draft_s / drafted)

    def record_request(self, status: str) -> None:
        """``status``: ``ok`` for a finished completion, else a short error class."""
        self._families.requests.labels(*self._ids, status).inc()


class VerifierMetrics:
    """One verifier process: the target model and its paged KV cache."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.batch_size = _histogram(
            "sled_verifier_batch_size",
            "Sessions in one batched forward.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_devices = _histogram(
            "sled_verifier_batch_devices",
            "Distinct devices whose rounds one batched forward verified together.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = _histogram(
            "sled_verifier_batch_tokens",
            "Tokens fed through one batched forward (ragged across sessions).",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=registry,
        )
        self.forward = _histogram(
            "sled_verifier_forward_seconds",
            "Wall time of one batched verification forward.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prefill = _histogram(
            "sled_verifier_prefill_seconds",
            "Wall time of a session's prompt prefill.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = _gauge(
            "sled_verifier_queue_depth",
            "Rounds waiting for the next batch.",
            registry=registry,
        )
        self.active_sessions = _gauge(
            "sled_verifier_active_sessions",
            "Sessions with KV state on this verifier.",
            registry=registry,
        )
        self._kv_blocks_used = _gauge(
            "sled_verifier_kv_blocks_used",
            "KV cache blocks in use, by tier.",
            ("tier",),
            registry=registry,
        )
        self._kv_blocks_capacity = _gauge(
            "sled_verifier_kv_blocks_capacity",
            "KV cache blocks available in total, by tier.",
            ("tier",),
            registry=registry,
        )
        self.rounds = _counter(
            "sled_verifier_rounds_total",
            "Verification rounds answered (retried rounds count once).",
            registry=registry,
        )
        self.suggested_k = _histogram(
            "sled_verifier_suggested_k",
            "Draft length suggested to devices for their next round.",
            buckets=DRAFT_K_BUCKETS,
            registry=registry,
        )
        self.sessions_opened = _counter(
            "sled_verifier_sessions_opened_total",
            "Sessions opened (prefilled) on this verifier.",
            registry=registry,
        )
        self.sessions_closed = _counter(
            "sled_verifier_sessions_closed_total",
            "Sessions closed by their device or finished.",
            registry=registry,
        )
        self.sessions_evicted = _counter(
            "sled_verifier_sessions_evicted_total",
            "Sessions evicted after being idle past SLED_SESSION_TTL_S.",
            registry=registry,
        )
        self.plan_timeouts = _counter(
            "sled_verifier_plan_timeouts_total",
            "Plan requests that missed their deadline; the local fallback policy ran.",
            registry=registry,
        )
        for tier in TIERS:
            self._kv_blocks_used.labels(tier)
            self._kv_blocks_capacity.labels(tier)

    def set_kv_blocks(self, tier: str, used: int, capacity: int) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} is not one of {TIERS}")
        self._kv_blocks_used.labels(tier).set(used)
        self._kv_blocks_capacity.labels(tier).set(capacity)


class KVOffloadMetrics:
    """One KV-offload worker: host-RAM KV blocks and CPU attention."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.attention = _histogram(
            "sled_kvoffload_attention_seconds",
            "CPU attention time for one attend request (all its sessions and heads).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.kv_bytes = _gauge(
            "sled_kvoffload_kv_bytes",
            "Bytes of KV cache held in host RAM.",
            registry=registry,
        )
        self.sessions = _gauge(
            "sled_kvoffload_sessions",
            "Offloaded sessions held by this worker.",
            registry=registry,
        )
        self.migrated_bytes = _counter(
            "sled_kvoffload_migrated_bytes_total",
            "KV bytes moved in or out of this worker by migrations.",
            registry=registry,
        )
        self._requests = _counter(
            "sled_kvoffload_requests_total",
            "Requests handled, by operation and status.",
            ("op", "status"),
            registry=registry,
        )
        for op in KV_OPS:
            self._requests.labels(op, "ok")

    def record_request(self, op: str, status: str = "ok") -> None:
        if op not in KV_OPS:
            raise ValueError(f"op {op!r} is not one of {KV_OPS}")
        self._requests.labels(op, status).inc()


class SchedulerMetrics:
    """The cluster's scheduler: cost models, placement, admission, plans."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.plan_time = _histogram(
            "sled_scheduler_plan_seconds",
            "Time to compute one per-iteration dispatch plan.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._error_ratio = _histogram(
            "sled_scheduler_prediction_error_ratio",
            "Actual over predicted iteration time, by resource (1.0 is exact).",
            ("resource",),
            buckets=ERROR_RATIO_BUCKETS,
            registry=registry,
        )
        self._predicted = _gauge(
            "sled_scheduler_predicted_seconds",
            "Predicted time of the last reported iteration, by resource.",
            ("resource",),
            registry=registry,
        )
        self._actual = _gauge(
            "sled_scheduler_actual_seconds",
            "Measured time of the last reported iteration, by resource.",
            ("resource",),
            registry=registry,
        )
        self.offloaded_sessions = _gauge(
            "sled_scheduler_offloaded_sessions",
            "Sessions currently placed on the host tier (CPU attention).",
            registry=registry,
        )
        self._placements = _counter(
            "sled_scheduler_placements_total",
            "Sessions placed, by tier.",
            ("tier",),
            registry=registry,
        )
        self._admissions_rejected = _counter(
            "sled_scheduler_admissions_rejected_total",
            "New sessions refused by admission control, by reason.",
            ("reason",),
            registry=registry,
        )
        self._plan_fallbacks = _counter(
            "sled_scheduler_plan_fallbacks_total",
            "Plans produced by the fallback policy instead of the cost model, by reason.",
            ("reason",),
            registry=registry,
        )
        for resource in RESOURCES:
            self._predicted.labels(resource)
            self._actual.labels(resource)
        for tier in TIERS:
            self._placements.labels(tier)

    def record_iteration(self, resource: str, predicted_s: float, actual_s: float) -> None:
        """Compare one iteration's measured time on ``resource`` with its prediction."""
        if resource not in RESOURCES:
            raise ValueError(f"resource {resource!r} is not one of {RESOURCES}")
        if predicted_s <= 0:
            raise ValueError(f"predicted_s must be positive, got {predicted_s}")
        self._predicted.labels(resource).set(predicted_s)
        self._actual.labels(resource).set(actual_s)
        self._error_ratio.labels(resource).observe(actual_s / predicted_s)

    def record_placement(self, tier: str) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} is not one of {TIERS}")
        self._placements.labels(tier).inc()

    def record_rejection(self, reason: str) -> None:
        self._admissions_rejected.labels(reason).inc()

    def record_fallback(self, reason: str) -> None:
        self._plan_fallbacks.labels(reason).inc()


def metric_families() -> dict[str, MetricFamily]:
    """Every family by name as written in PromQL (counters with ``_total``).

    Built by declaring each group on a throwaway registry, so it can never
    drift from the declarations above.
    """
    registry = CollectorRegistry()
    DrafterMetrics("probe", "probe", registry)
    VerifierMetrics(registry)
    KVOffloadMetrics(registry)
    SchedulerMetrics(registry)
    names = {
        # prometheus_client strips a counter's "_total" from the family name.
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }
    return {name: _declared[name] for name in sorted(names)}


def metric_names() -> list[str]:
    """Sorted family names, as written in PromQL (counters with ``_total``)."""
    return sorted(metric_families())
