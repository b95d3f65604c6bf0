"""docs/deploy.md names files, stages and kustomizations that exist."""

from __future__ import annotations

import re

from deploy_checks import ROOT

DOC = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")


def test_build_commands_name_real_dockerfiles_and_stages() -> None:
    joined = re.sub(r"\\\n\s*", " ", DOC)
    builds = re.findall(r"docker (?:buildx )?build [^`\n]*", joined)
    assert len(builds) >= 7
    for command in builds:
        dockerfile = re.search(r"-f (\S+)", command)
        assert dockerfile, command
        path = ROOT / dockerfile.group(1)
        assert path.is_file(), command
        target = re.search(r"--target (\S+)", command)
        if target:
            assert re.search(rf"^FROM .+ AS {target.group(1)}$", path.read_text(), re.M), command
        assert command.rstrip().endswith(" ."), f"context is not the repo root: {command}"


def test_drafter_is_built_for_both_architectures() -> None:
    assert re.search(
        r"buildx build --platform linux/amd64,linux/arm64 \\\n\s+-f services/drafter/Dockerfile",
        DOC,
    )


def test_applied_kustomizations_exist() -> None:
    applied = re.findall(r"kubectl (?:apply -k|kustomize)\s+(k8s/\S+?)[`\s]", DOC)
    assert {"k8s/overlays/edge", "k8s/overlays/gpu"} <= set(applied)
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file(), path


def test_node_labels_match_the_edge_overlay() -> None:
    overlay = "".join(p.read_text() for p in (ROOT / "k8s" / "overlays" / "edge").rglob("*.yaml"))
    for label in set(re.findall(r"--node-label (sled\.io/[\w-]+=[\w.-]+)", DOC)):
        key, value = label.split("=")
        assert f"{key}: {value}" in overlay, label
