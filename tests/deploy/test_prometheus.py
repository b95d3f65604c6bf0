"""deploy/prometheus/prometheus.yml scrapes every compose service that serves
metrics, at the port it serves them on."""

from __future__ import annotations

from collections import Counter
from typing import Any

import yaml
from deploy_checks import ROOT, built_here, service_environment

CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def _targets() -> list[tuple[str, str, dict[str, str]]]:
    """(job, host:port, static labels) for every static target."""
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    return [
        (job["job_name"], target, group.get("labels", {}))
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    ]


def test_config_parses_with_unique_jobs() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs))
    assert config["global"]["scrape_interval"].endswith("s")


def test_targets_are_compose_services_on_their_metrics_port(services: dict[str, Any]) -> None:
    for job, target, _ in _targets():
        host, port = target.rsplit(":", 1)
        assert host in services, f"{job}: {host} is no compose service"
        env = service_environment(services[host])
        assert env.get("SLED_METRICS_PORT") == port, f"{job}: {host} serves metrics elsewhere"


def test_every_metrics_serving_service_is_scraped_once(services: dict[str, Any]) -> None:
    scraped = Counter(target.rsplit(":", 1)[0] for _, target, _ in _targets())
    serving = {
        name
        for name, svc in services.items()
        if built_here(svc) and svc.get("restart") != "no"  # the one-shot preparer serves none
    }
    assert set(scraped) == serving
    assert set(scraped.values()) == {1}


def test_service_label_matches_the_program(services: dict[str, Any]) -> None:
    # The dashboard groups by `service`; k8s derives the same value from the
    # pod's app.kubernetes.io/name label.
    for _, target, labels in _targets():
        host = target.rsplit(":", 1)[0]
        program = services[host]["command"][0]
        assert labels["service"] == program.removeprefix("sled-"), target
