"""The metric groups register, record and expose what the dashboard reads."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sled_shared.metrics import (
    DrafterMetrics,
    KVOffloadMetrics,
    SchedulerMetrics,
    VerifierMetrics,
    metric_families,
    metric_names,
)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def _exposed_families(registry: CollectorRegistry) -> set[str]:
    text = generate_latest(registry).decode()
    # prometheus_client adds a "<name>_created" gauge next to counters and
    # histograms; it is the library's, not a family declared by us.
    return {
        name
        for name in re.findall(r"^# TYPE (\S+) ", text, flags=re.M)
        if not name.endswith("_created")
    }


def _declared(prefix: str) -> set[str]:
    return {name for name in metric_names() if name.startswith(prefix)}


def test_drafter_round_accounting_by_position() -> None:
    registry = CollectorRegistry()
    m = DrafterMetrics("smollm2-135m-int4", "pi5-a", registry)
    m.record_round(drafted=4, accepted=2, round_trip_s=0.03, draft_s=0.02)
    m.record_round(drafted=3, accepted=3, round_trip_s=0.04, draft_s=0.03)
    ids = {"draft_model": "smollm2-135m-int4", "device": "pi5-a"}

    assert _value(registry, "sled_drafter_rounds_total", **ids) == 2
    # Position 0 drafted twice, accepted twice; position 3 drafted once, never accepted.
    assert _value(registry, "sled_drafter_draft_tokens_total", position="0", **ids) == 2
    assert _value(registry, "sled_drafter_accepted_tokens_total", position="0", **ids) == 2
    assert _value(registry, "sled_drafter_draft_tokens_total", position="3", **ids) == 1
    assert (
        registry.get_sample_value("sled_drafter_accepted_tokens_total", {"position": "3", **ids})
        is None
    )
    assert _value(registry, "sled_drafter_accepted_tokens_total", position="2", **ids) == 1
    # Each round commits its accepted drafts plus one correction/bonus token.
    assert _value(registry, "sled_drafter_generated_tokens_total", **ids) == (2 + 1) + (3 + 1)
    assert _value(registry, "sled_drafter_round_trip_seconds_count", **ids) == 2
    assert _value(registry, "sled_drafter_round_trip_seconds_sum", **ids) == pytest.approx(0.07)
    assert _value(
        registry, "sled_drafter_draft_time_per_token_seconds_sum", **ids
    ) == pytest.approx(0.02 / 4 + 0.03 / 3)
    assert _value(registry, "sled_drafter_draft_k_sum", **ids) == 7


def test_drafter_zero_k_round_and_bad_counts() -> None:
    registry = CollectorRegistry()
    m = DrafterMetrics("ngram", "dev", registry)
    m.record_round(drafted=0, accepted=0, round_trip_s=0.01, draft_s=0.0)
    ids = {"draft_model": "ngram", "device": "dev"}
    assert _value(registry, "sled_drafter_generated_tokens_total", **ids) == 1
    # No drafts, so no per-token draft time to observe.
    assert _value(registry, "sled_drafter_draft_time_per_token_seconds_count", **ids) == 0
    with pytest.raises(ValueError, match="accepted=3"):
        m.record_round(drafted=2, accepted=3, round_trip_s=0.01, draft_s=0.01)


def test_drafter_requests_latency_and_labels_per_instance() -> None:
    registry = CollectorRegistry()
    # Two drafters in one process (a benchmark harness) share the families.
    a = DrafterMetrics("smollm2-135m-int8", "jetson", registry)
    b = DrafterMetrics("ngram", "phone", registry)
    a.record_request("ok")
    a.record_request("ok")
    b.record_request("timeout")
    a.ttft.observe(0.4)
    a.tpot.observe(0.05)
    b.active_sessions.inc()
    b.failovers.inc()

    a_ids = {"draft_model": "smollm2-135m-int8", "device": "jetson"}
    b_ids = {"draft_model": "ngram", "device": "phone"}
    assert _value(registry, "sled_drafter_requests_total", status="ok", **a_ids) == 2
    assert _value(registry, "sled_drafter_requests_total", status="ok", **b_ids) == 0
    assert _value(registry, "sled_drafter_requests_total", status="timeout", **b_ids) == 1
    # 0.4 s lands in the 0.5 s bucket but not the 0.25 s one.
    assert _value(registry, "sled_drafter_ttft_seconds_bucket", le="0.5", **a_ids) == 1
    assert _value(registry, "sled_drafter_ttft_seconds_bucket", le="0.25", **a_ids) == 0
    assert _value(registry, "sled_drafter_tpot_seconds_count", **a_ids) == 1
    assert _value(registry, "sled_drafter_active_sessions", **b_ids) == 1
    assert _value(registry, "sled_drafter_failovers_total", **b_ids) == 1
    assert _value(registry, "sled_drafter_failovers_total", **a_ids) == 0


def test_verifier_metrics() -> None:
    registry = CollectorRegistry()
    m = VerifierMetrics(registry)
    m.batch_size.observe(3)
    m.batch_tokens.observe(3 * 5)
    m.forward.observe(0.08)
    m.queue_depth.set(7)
    m.active_sessions.set(3)
    m.set_kv_blocks("accelerator", used=10, capacity=100)
    m.set_kv_blocks("host", used=4, capacity=4096)
    m.rounds.inc(3)
    m.sessions_opened.inc(2)
    m.sessions_evicted.inc()

    assert _value(registry, "sled_verifier_batch_size_bucket", le="4.0") == 1
    assert _value(registry, "sled_verifier_batch_size_bucket", le="2.0") == 0
    assert _value(registry, "sled_verifier_batch_tokens_sum") == 15
    assert _value(registry, "sled_verifier_kv_blocks_used", tier="accelerator") == 10
    assert _value(registry, "sled_verifier_kv_blocks_capacity", tier="host") == 4096
    assert _value(registry, "sled_verifier_queue_depth") == 7
    assert _value(registry, "sled_verifier_rounds_total") == 3
    assert _value(registry, "sled_verifier_sessions_opened_total") == 2
    assert _value(registry, "sled_verifier_sessions_closed_total") == 0
    assert _value(registry, "sled_verifier_sessions_evicted_total") == 1
    with pytest.raises(ValueError, match="tier"):
        m.set_kv_blocks("disk", used=1, capacity=2)
    assert _exposed_families(registry) == _declared("sled_verifier_")


def test_kvoffload_metrics() -> None:
    registry = CollectorRegistry()
    m = KVOffloadMetrics(registry)
    m.attention.observe(0.004)
    m.kv_bytes.set(3 * 2**20)
    m.sessions.set(2)
    m.record_request("attend")
    m.record_request("attend")
    m.record_request("migrate", status="error")

    assert _value(registry, "sled_kvoffload_attention_seconds_count") == 1
    assert _value(registry, "sled_kvoffload_kv_bytes") == 3 * 2**20
    assert _value(registry, "sled_kvoffload_requests_total", op="attend", status="ok") == 2
    assert _value(registry, "sled_kvoffload_requests_total", op="migrate", status="error") == 1
    assert _value(registry, "sled_kvoffload_requests_total", op="append", status="ok") == 0
    with pytest.raises(ValueError, match="op"):
        m.record_request("compact")
    assert _exposed_families(registry) == _declared("sled_kvoffload_")


def test_scheduler_metrics() -> None:
    registry = CollectorRegistry()
    m = SchedulerMetrics(registry)
    m.plan_time.observe(0.002)
    m.record_iteration("cpu", predicted_s=0.010, actual_s=0.012)
    m.record_iteration("accelerator", predicted_s=0.020, actual_s=0.019)
    m.offloaded_sessions.set(5)
    m.record_placement("host")
    m.record_rejection("kv_full")
    m.record_fallback("no_profile")

    assert _value(registry, "sled_scheduler_predicted_seconds", resource="cpu") == 0.010
    assert _value(registry, "sled_scheduler_actual_seconds", resource="cpu") == 0.012
    assert _value(
        registry, "sled_scheduler_prediction_error_ratio_sum", resource="cpu"
    ) == pytest.approx(1.2)
    # 1.2 is above the 1.1 bucket bound and within 1.25.
    assert (
        _value(registry, "sled_scheduler_prediction_error_ratio_bucket", resource="cpu", le="1.1")
        == 0
    )
    assert (
        _value(registry, "sled_scheduler_prediction_error_ratio_bucket", resource="cpu", le="1.25")
        == 1
    )
    assert _value(registry, "sled_scheduler_offloaded_sessions") == 5
    assert _value(registry, "sled_scheduler_placements_total", tier="host") == 1
    assert _value(registry, "sled_scheduler_placements_total", tier="accelerator") == 0
    assert _value(registry, "sled_scheduler_admissions_rejected_total", reason="kv_full") == 1
    assert _value(registry, "sled_scheduler_plan_fallbacks_total", reason="no_profile") == 1
    with pytest.raises(ValueError, match="predicted_s"):
        m.record_iteration("cpu", predicted_s=0.0, actual_s=0.01)
    with pytest.raises(ValueError, match="resource"):
        m.record_iteration("gpu", predicted_s=0.01, actual_s=0.01)
    assert _exposed_families(registry) == _declared("sled_scheduler_")


def test_drafter_exposition_lists_every_drafter_family() -> None:
    registry = CollectorRegistry()
    m = DrafterMetrics("smollm2-135m-int4", "pi5-a", registry)
    m.record_round(drafted=2, accepted=1, round_trip_s=0.02, draft_s=0.01)
    assert _exposed_families(registry) == _declared("sled_drafter_")


def test_groups_share_a_registry_without_clashing() -> None:
    registry = CollectorRegistry()
    DrafterMetrics("ngram", "dev", registry)
    VerifierMetrics(registry)
    KVOffloadMetrics(registry)
    SchedulerMetrics(registry)
    assert _exposed_families(registry) == set(metric_names())
    # Declaring a family twice in one registry is a programming error, not a silent merge.
    with pytest.raises(ValueError, match="Duplicated"):
        VerifierMetrics(registry)
    with pytest.raises(ValueError, match="already exist"):
        DrafterMetrics("ngram", "dev", registry)


def test_naming_conventions() -> None:
    families = metric_families()
    assert len(families) >= 30
    for name, family in families.items():
        assert re.fullmatch(r"sled_(drafter|verifier|kvoffload|scheduler)_[a-z0-9_]+", name), name
        assert name.endswith("_total") == (family.type == "counter"), name
        # Base units only: no milliseconds or kilobytes in a name.
        assert not re.search(r"_(ms|milliseconds|kb|mb|kib|mib)(_|$)", name), name


def test_family_labels_match_the_exposition() -> None:
    registry = CollectorRegistry()
    drafter = DrafterMetrics("ngram", "dev", registry)
    drafter.record_round(drafted=1, accepted=1, round_trip_s=0.01, draft_s=0.001)
    scheduler = SchedulerMetrics(registry)
    scheduler.record_rejection("kv_full")
    families = metric_families()
    assert families["sled_drafter_accepted_tokens_total"].labels == (
        "draft_model",
        "device",
        "position",
    )
    assert families["sled_verifier_kv_blocks_used"].labels == ("tier",)
    assert families["sled_verifier_forward_seconds"] == ("histogram", ())
    # The declared labels are exactly those on the exposed samples.
    for metric in registry.collect():
        name = f"{metric.name}_total" if metric.type == "counter" else metric.name
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == set(families[name].labels), sample
