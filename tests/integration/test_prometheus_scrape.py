"""A real Prometheus server scrapes the running `sled up` stack.

The scrape config is the shipped deploy/prometheus/prometheus.yml (its jobs
and `service` labels) with the stack's metrics endpoints as targets and a 1 s
interval. After generations, PromQL over Prometheus' HTTP API gives the
acceptance rate from the sled_ counters, and every query of the Grafana
dashboard evaluates without error, the headline panels with data.

Needs Debian's `prometheus` package (/usr/bin/prometheus); `make test`
installs it.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import scrape
import yaml
from clients import chat, concurrently
from sled_shared import procs
from stack import LocalStack, http_get, http_json

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sled.json"
PROMETHEUS = Path("/usr/bin/prometheus")
# Grafana substitutes these before a query reaches Prometheus; 1m spans many 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$draft_model": ".*"}
DRAFTERS = ("pi5-int4", "orin-int8")  # the model drafts: they draft and get accepted
PROMPTS = ("Name a large animal.", "What colour is the sky?")
MAX_TOKENS = 24
WAIT_S = 120.0


@dataclass(frozen=True, slots=True)
class Prometheus:
    url: str

    def query(self, promql: str) -> dict[str, Any]:
        """The whole API answer to an instant query at the current time."""
        status, _, body = http_get(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (promql, answer)
        return answer

    def vector(self, promql: str) -> list[tuple[dict[str, str], float]]:
        data = self.query(promql)["data"]
        assert data["resultType"] == "vector", (promql, data)
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def scalar(self, promql: str) -> float | None:
        """The value of a one-series answer; None while there is none."""
        found = self.vector(promql)
        assert len(found) <= 1, (promql, found)
        return found[0][1] if found else None

    def wait_for(self, promql: str, expected: float) -> None:
        """Until a scrape has brought ``promql`` to ``expected``."""
        deadline = time.monotonic() + WAIT_S
        while (value := self.scalar(promql)) != expected:
            assert time.monotonic() < deadline, f"{promql} = {value}, expected {expected}"
            time.sleep(0.5)


def scrape_config(stack: LocalStack) -> dict[str, Any]:
    """The shipped config, every `service` group aimed at the stack's endpoints of that kind."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text(encoding="utf-8"))
    config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s"}
    by_kind: dict[str, list[str]] = {}
    for service in stack.services:
        kind = "drafter" if service in stack.drafters else service
        netloc = urllib.parse.urlsplit(stack.url(service, "metrics")).netloc
        by_kind.setdefault(kind, []).append(netloc)
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = by_kind.pop(group["labels"]["service"])
    assert not by_kind, f"services no job of {DEPLOY_CONFIG.name} scrapes: {by_kind}"
    return config


@pytest.fixture(scope="module")
def prometheus(sled_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: `make test` installs Debian's prometheus package")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(sled_stack)), encoding="utf-8")
    port = procs.free_port()
    argv = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = procs.spawn(argv, log_path=tmp / "prometheus.log", env={})
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + WAIT_S
        while not _ready(server.url):
            assert proc.poll() is None, procs.log_tail(tmp / "prometheus.log")
            assert time.monotonic() < deadline, procs.log_tail(tmp / "prometheus.log")
            time.sleep(0.25)
        yield server
    finally:
        procs.stop_groups([proc], 15.0)


def _ready(url: str) -> bool:
    try:
        return http_get(url + "/-/ready", timeout=2)[0] == 200
    except OSError:
        return False


def test_every_target_of_the_stack_is_up(prometheus: Prometheus, sled_stack: LocalStack) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        targets = http_json(prometheus.url + "/api/v1/targets")["data"]["activeTargets"]
        if len(targets) == len(sled_stack.services) and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, targets
        time.sleep(0.5)
    found = {t["labels"]["service"] for t in targets}
    assert found == {"drafter", "verifier", "scheduler", "kvoffload"}
    # Each target's own series arrived, under the labels the dashboard groups by.
    ups = prometheus.vector("up")
    assert len(ups) == len(sled_stack.services) and all(v == 1 for _, v in ups)
    assert prometheus.scalar("count(sled_verifier_rounds_total)") == 1


def drafter_totals(stack: LocalStack) -> dict[str, float]:
    """Rounds, drafted and accepted tokens over every drafter, read from their /metrics."""
    names = {
        "rounds": "sled_drafter_rounds_total",
        "drafted": "sled_drafter_draft_tokens_total",
        "accepted": "sled_drafter_accepted_tokens_total",
    }
    found = [scrape.families(stack.url(d, "metrics")) for d in stack.drafters]
    return {key: sum(scrape.total(f, name) for f in found) for key, name in names.items()}


@pytest.fixture(scope="module")
def generated(prometheus: Prometheus, sled_stack: LocalStack) -> dict[str, float]:
    """Two rounds of generations, each waited for in Prometheus: the per-position
    series appear with the first, so the second gives rate() increases to see."""
    for _ in range(2):
        calls = [
            partial(chat, sled_stack, d, p, max_tokens=MAX_TOKENS)
            for d, p in zip(DRAFTERS, PROMPTS, strict=True)
        ]
        concurrently(calls)
        totals = drafter_totals(sled_stack)
        # Counters only grow: once the rounds are all in, so is the rest of each scrape.
        prometheus.wait_for("sum(sled_drafter_rounds_total)", totals["rounds"])
    return totals


def test_promql_gives_the_acceptance_rate(prometheus: Prometheus, generated) -> None:
    rate = prometheus.scalar(
        "sum(sled_drafter_accepted_tokens_total) / sum(sled_drafter_draft_tokens_total)"
    )
    assert rate is not None and 0 < rate <= 1
    assert rate == pytest.approx(generated["accepted"] / generated["drafted"])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out.append((panel["title"], expr))
    return out


def test_every_dashboard_query_evaluates(prometheus: Prometheus, generated) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        answer = prometheus.query(expr)  # asserts success
        assert not answer.get("warnings"), (title, expr, answer["warnings"])
    # The template variable lists the stack's draft models.
    values = http_json(
        prometheus.url
        + "/api/v1/label/draft_model/values?"
        + urllib.parse.urlencode({"match[]": "sled_drafter_rounds_total"})
    )["data"]
    assert set(values) == {"smollm2-135m-int4", "smollm2-135m-int8", "ngram"}


def test_headline_panels_show_the_generations(prometheus: Prometheus, generated) -> None:
    panels: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        panels.setdefault(title, []).append(expr)
    (throughput,) = panels["Throughput (tokens/s, all devices)"]
    assert (prometheus.scalar(throughput) or 0) > 0
    (acceptance_expr,) = panels["Acceptance rate per draft model"]
    acceptance = {
        labels["draft_model"]: value
        for labels, value in prometheus.vector(acceptance_expr)
        if not math.isnan(value)  # a draft model that drafted nothing in the window: 0/0
    }
    assert {"smollm2-135m-int4", "smollm2-135m-int8"} <= set(acceptance), acceptance
    assert all(0 < v <= 1 for v in acceptance.values()), acceptance
    for expr in panels["Batch size (sessions per forward)"]:  # median and mean
        batch = prometheus.vector(expr)
        assert batch and all(v > 0 for _, v in batch), (expr, batch)
