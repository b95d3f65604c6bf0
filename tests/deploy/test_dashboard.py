"""The Grafana dashboard queries only metrics and labels the services export,
in PromQL the real parser accepts."""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser
import pytest
import yaml
from deploy_checks import ROOT
from sled_shared.metrics import MetricFamily, metric_families

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sled.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# Labels Prometheus attaches to every scraped series (compose and k8s configs).
TARGET_LABELS = {"instance", "job", "service", "node", "pod", "stack"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana replaces these before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$draft_model": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]]


def _parse(expr: str) -> promql_parser.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return promql_parser.parse(expr)


def _family(series: str) -> tuple[str, MetricFamily]:
    """The declared family a series name belongs to."""
    families = metric_families()
    if series in families:
        return series, families[series]
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and families.get(base, MetricFamily("", ())).type == "histogram":
            return base, families[base]
    raise AssertionError(f"{series} is no series of a family in sled_shared.metrics")


def _allowed_labels(series: str) -> set[str]:
    _, family = _family(series)
    labels = set(family.labels) | TARGET_LABELS
    if series.endswith("_bucket"):
        labels.add("le")
    return labels


def _selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found = []

    def visit(expr: promql_parser.Expr) -> None:
        if isinstance(expr, promql_parser.VectorSelector):
            found.append(expr)

    promql_parser.walk(node, pre_visit=visit)
    return found


def _check_labels(node: promql_parser.Expr, expr: str) -> None:
    """Matchers and by-clauses name labels the selected series carry."""

    def visit(sub: promql_parser.Expr) -> None:
        if isinstance(sub, promql_parser.VectorSelector):
            for matcher in sub.matchers.matchers:
                if matcher.name != "__name__":
                    assert matcher.name in _allowed_labels(sub.name), (matcher.name, expr)
        if isinstance(sub, promql_parser.AggregateExpr) and sub.modifier is not None:
            allowed = set.union(*(_allowed_labels(s.name) for s in _selectors(sub.expr)))
            unknown = set(sub.modifier.labels) - allowed
            assert not unknown, (unknown, expr)

    promql_parser.walk(node, pre_visit=visit)


def test_every_query_parses_and_uses_declared_metrics(dashboard: dict[str, Any]) -> None:
    exprs = _exprs(dashboard)
    assert len(exprs) >= 20
    for expr in exprs:
        node = _parse(expr)
        selectors = _selectors(node)
        assert selectors, expr
        for selector in selectors:
            _family(selector.name)
        _check_labels(node, expr)


def test_quantiles_come_from_bucket_series_grouped_by_le(dashboard: dict[str, Any]) -> None:
    quantiles = 0
    for expr in _exprs(dashboard):
        for match in re.finditer(r"histogram_quantile\(", expr):
            quantiles += 1
            inner = expr[match.end() :]
            assert re.match(r"0\.\d+, sum by \(le[,)]", inner), expr
            assert re.match(r"0\.\d+, sum by \([^)]*\) \(rate\(\w+_bucket", inner), expr
    assert quantiles >= 8


def test_dashboard_shows_the_system_at_a_glance(dashboard: dict[str, Any]) -> None:
    used = {_family(s.name)[0] for expr in _exprs(dashboard) for s in _selectors(_parse(expr))}
    required = {
        "sled_drafter_generated_tokens_total",  # throughput
        "sled_drafter_accepted_tokens_total",  # acceptance and accepted length
        "sled_drafter_draft_tokens_total",
        "sled_drafter_rounds_total",
        "sled_drafter_ttft_seconds",
        "sled_drafter_tpot_seconds",
        "sled_verifier_batch_size",
        "sled_verifier_kv_blocks_used",
        "sled_verifier_kv_blocks_capacity",
        "sled_scheduler_prediction_error_ratio",
        "sled_scheduler_predicted_seconds",
        "sled_scheduler_actual_seconds",
        "sled_verifier_active_sessions",
        "sled_verifier_queue_depth",
    }
    assert required <= used, sorted(required - used)
    # Most families have a panel; the rest are a click away in Explore.
    assert len(used) >= 0.8 * len(metric_families())
    titles = " ".join(p["title"].lower() for p in _panels(dashboard))
    for word in ("throughput", "acceptance", "ttft", "tpot", "batch", "kv", "queue", "predict"):
        assert word in titles, word


def test_per_draft_model_panels_follow_the_variable(dashboard: dict[str, Any]) -> None:
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "draft_model"
    query = variable["query"]["query"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
    assert label in _family(metric)[1].labels
    for expr in _exprs(dashboard):
        for selector in re.findall(r"sled_drafter_\w+(?:\{[^}]*\})?", expr):
            assert 'draft_model=~"$draft_model"' in selector, expr


def test_layout_and_datasource(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == source["uid"]


def test_grafana_loads_the_dashboard_from_where_compose_mounts_it() -> None:
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "sled.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    url = datasources["datasources"][0]["url"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", url).groups()
    assert host in compose["services"]
    assert f"{port}:{port}" in compose["services"][host]["ports"]
