"""docker-compose.yml runs the project's real programs with settings they read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deploy_checks import (
    ROOT,
    built_here,
    check_command,
    check_settings,
    compose_defaults,
    service_environment,
)
from sled_shared.models.registry import DRAFT_INT4, DRAFT_INT8, NGRAM
from sled_shared.settings import CommonSettings

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _program(service: dict[str, Any]) -> str:
    return check_command(list(service["command"]))


def _published(port: str | int | dict[str, Any]) -> tuple[int, int]:
    """(host port, container port) of one `ports` entry."""
    if isinstance(port, dict):
        return int(port["published"]), int(port["target"])
    parts = compose_defaults(str(port)).split(":")
    assert len(parts) in (2, 3), f"port {port!r} publishes no fixed host port"
    return int(parts[-2]), int(parts[-1].split("/")[0])


def _stages(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text(encoding="utf-8")
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I))


def test_project_services_run_project_entry_points(services: dict[str, Any]) -> None:
    programs = {name: _program(svc) for name, svc in services.items() if built_here(svc)}
    assert programs == {
        "models": "sled",
        "verifier": "sled-verifier",
        "scheduler": "sled-scheduler",
        "kvoffload": "sled-kvoffload",
        "drafter-int4": "sled-drafter",
        "drafter-int8": "sled-drafter",
        "drafter-ngram": "sled-drafter",
    }


def test_builds_name_existing_dockerfiles_and_stages(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if not built_here(svc):
            continue
        build = svc["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, f"{name}: context is not the repo root"
        dockerfile = ROOT / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        if "target" in build:
            assert build["target"] in _stages(dockerfile), f"{name}: no stage {build['target']}"
        # The image carries the program it is started with.
        program = svc["command"][0]
        assert f'"{program}"' in dockerfile.read_text(encoding="utf-8"), (name, program)


def test_sled_env_vars_are_declared_settings(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        program = _program(svc) if built_here(svc) else None
        environ = service_environment(svc)
        if program is None:
            # A third-party container (NATS) may only reuse the services' names.
            check_settings(name, environ)
        else:
            check_settings(program, environ)


def test_services_share_one_nats_with_its_credentials(services: dict[str, Any]) -> None:
    nats_env = service_environment(services["nats"])
    assert set(nats_env) >= {"SLED_NATS_USER", "SLED_NATS_PASSWORD"}
    for name, svc in services.items():
        if not built_here(svc) or name == "models":
            continue
        settings = CommonSettings.from_env(service_environment(svc))
        assert settings.nats_url == "nats://nats:4222", name
        assert settings.nats_user == nats_env["SLED_NATS_USER"], name
        assert settings.nats_password == nats_env["SLED_NATS_PASSWORD"], name


def test_host_ports_do_not_collide(services: dict[str, Any]) -> None:
    seen: dict[int, str] = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host, _ = _published(port)
            assert host not in seen, f"host port {host}: {seen.get(host)} and {name}"
            seen[host] = name
    assert {8001, 8002, 8003} <= set(seen)


def test_three_drafters_of_different_kinds(services: dict[str, Any]) -> None:
    drafters = {
        name: service_environment(svc)
        for name, svc in services.items()
        if built_here(svc) and _program(svc) == "sled-drafter"
    }
    models = sorted(env["SLED_DRAFT_MODEL"] for env in drafters.values())
    assert models == sorted([DRAFT_INT4, DRAFT_INT8, NGRAM])
    assert len({env["SLED_DEVICE_NAME"] for env in drafters.values()}) == len(drafters)
    for name, env in drafters.items():
        # The published port reaches the port the drafter's API listens on.
        targets = {_published(port)[1] for port in services[name]["ports"]}
        assert targets == {int(env["SLED_HTTP_PORT"])}, name


def test_volumes_are_declared_and_bind_sources_exist(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"
                used.add(source)
            assert target.startswith("/"), (name, volume)
    assert used == named, f"declared but unused: {named - used}"


def test_model_cache_is_shared_where_settings_expect_it(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if not built_here(svc) or name in ("scheduler", "kvoffload"):
            continue
        cache = service_environment(svc)["SLED_MODEL_CACHE"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        assert mounts.get(cache) == "models", f"{name}: {cache} is not the models volume"
        # Only the one-shot preparer writes the cache.
        writable = not any(
            v.startswith("models:") and v.endswith(":ro") for v in svc.get("volumes", [])
        )
        assert writable == (name == "models"), name


def test_depends_on_targets_and_conditions(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            assert condition in CONDITIONS, (name, target, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is not one-shot"
    # Nothing starts before the model cache it reads is complete.
    for name in ("verifier", "drafter-int4", "drafter-int8", "drafter-ngram"):
        condition = services[name]["depends_on"]["models"]["condition"]
        assert condition == "service_completed_successfully", name


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if svc.get("restart") == "no":
            continue
        check = svc.get("healthcheck")
        assert check and check["test"][0] == "CMD", f"{name}: no exec-form healthcheck"
        if built_here(svc):
            # Both endpoints, on the port the service serves them on.
            script = " ".join(check["test"])
            port = service_environment(svc)["SLED_METRICS_PORT"]
            assert f"127.0.0.1:{port}" in script, name
            assert "/healthz" in script and "/readyz" in script, name
