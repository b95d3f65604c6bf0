"""Reading a service's /metrics the way Prometheus does: the real text parser."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from stack import http_get


def families(metrics_url: str) -> dict[str, Metric]:
    """Every family a /metrics page exposes, by name (counters without ``_total``)."""
    status, _, body = http_get(metrics_url)
    assert status == 200, f"GET {metrics_url}: HTTP {status}"
    return {f.name: f for f in text_string_to_metric_families(body)}


def total(found: dict[str, Metric], sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` whose labels include ``labels``
    (0 when none exists yet: a labelled child appears on its first increment)."""
    return sum(
        s.value
        for family in found.values()
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )
