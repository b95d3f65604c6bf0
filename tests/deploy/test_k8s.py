"""k8s/: every kustomization rendered by the real `kubectl kustomize` and each
object validated strictly against the Kubernetes schemas, offline; then the
checks the schemas cannot make (settings, probes, security, references)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_checks import ROOT, check_command, check_settings
from sled_shared.models.registry import DRAFT_INT4, DRAFT_INT8, NGRAM

K8S = ROOT / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.glob("**/kustomization.yaml"))
# Roots a user applies: the base and every overlay (not the drafter pieces the
# edge overlay assembles).
ROOTS = [K8S / "base", *sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))]
# The oldest Kubernetes the manifests target (K3s stable when written) and the
# newest the validator knows.
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
WORKLOADS = {"Deployment", "DaemonSet", "Job"}
SLED_IMAGES = ("sled/",)


def _root_id(root: Path) -> str:
    return str(root.relative_to(K8S))


def _render(root: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/"
    result = subprocess.run(
        [kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=ROOTS, ids=_root_id)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(request.param)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"])
        for o in objects
        if o["kind"] in WORKLOADS
    ]


def _is_sled(container: dict[str, Any]) -> bool:
    return container["image"].startswith(SLED_IMAGES)


def _environment(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The variables a container gets, as the kubelet assembles them."""
    configmaps, secrets = _by_kind(objects, "ConfigMap"), _by_kind(objects, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= configmaps[source["configMapRef"]["name"]]["data"]
        else:
            data = secrets[source["secretRef"]["name"]]["data"]
            env |= {k: base64.b64decode(v).decode() for k, v in data.items()}
    for var in container.get("env", []):
        # Downward-API values are only known in the pod; any string will do.
        env[var["name"]] = var.get("value", "from-the-pod")
    return env


def test_every_kustomization_is_reachable_from_a_root() -> None:
    reached = set(ROOTS)
    edge = (K8S / "overlays" / "edge").resolve()
    reached |= {p for p in KUSTOMIZATIONS if edge in p.resolve().parents}
    assert set(KUSTOMIZATIONS) == reached


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_strictly(rendered: list[dict[str, Any]], version: str) -> None:
    errors = []
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_everything_lives_in_the_sled_namespace(rendered: list[dict[str, Any]]) -> None:
    namespaced = [o for o in rendered if o["kind"] not in ("Namespace", "RuntimeClass")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"sled"}
    assert "sled" in _by_kind(rendered, "Namespace")


def test_containers_run_project_programs_with_declared_settings(
    rendered: list[dict[str, Any]],
) -> None:
    for _workload, template in _pod_specs(rendered):
        for container in template["spec"]["containers"]:
            env = _environment(container, rendered)
            if _is_sled(container):
                program = check_command(container["command"])
                check_settings(program, env)
            else:
                check_settings(container["name"], env)


def test_security_context_and_resources(rendered: list[dict[str, Any]]) -> None:
    for workload, template in _pod_specs(rendered):
        pod = template["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, workload
        assert pod_security.get("runAsUser", 0) != 0, workload
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            where = f"{workload}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert security.get("readOnlyRootFilesystem") is True, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), where
            if _is_sled(container):
                # Python, torch and onnxruntime want a writable /tmp.
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], where


def test_long_running_containers_have_probes(rendered: list[dict[str, Any]]) -> None:
    for workload, template in _pod_specs(rendered):
        if workload.startswith("Job/"):
            continue
        for container in template["spec"]["containers"]:
            where = f"{workload}/{container['name']}"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                assert get["port"] in ports or get["port"] in ports.values(), where
            if _is_sled(container):
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where


def test_sled_pods_are_scraped_on_their_metrics_port(rendered: list[dict[str, Any]]) -> None:
    scraped = 0
    for workload, template in _pod_specs(rendered):
        for container in template["spec"]["containers"]:
            if not _is_sled(container) or workload.startswith("Job/"):
                continue
            annotations = template["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", workload
            assert annotations.get("prometheus.io/path") == "/metrics", workload
            port = _environment(container, rendered)["SLED_METRICS_PORT"]
            assert annotations.get("prometheus.io/port") == port, workload
            metrics = [p for p in container["ports"] if p["name"] == "metrics"]
            assert [p["containerPort"] for p in metrics] == [int(port)], workload
            scraped += 1
    assert scraped >= 3


def test_references_resolve(rendered: list[dict[str, Any]]) -> None:
    names = {kind: set(_by_kind(rendered, kind)) for kind in ("ConfigMap", "Secret")}
    claims = set(_by_kind(rendered, "PersistentVolumeClaim"))
    accounts = set(_by_kind(rendered, "ServiceAccount")) | {"default"}
    for workload, template in _pod_specs(rendered):
        pod = template["spec"]
        assert pod.get("serviceAccountName", "default") in accounts, workload
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names["ConfigMap"], workload
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, workload
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        assert source[key]["name"] in names[kind], workload
            declared = {v["name"] for v in pod.get("volumes", [])}
            assert {m["name"] for m in container.get("volumeMounts", [])} <= declared, workload
    for binding in _by_kind(rendered, "RoleBinding").values():
        assert binding["roleRef"]["name"] in _by_kind(rendered, "Role")
        assert {s["name"] for s in binding["subjects"]} <= accounts


def test_services_select_pods_and_their_ports(rendered: list[dict[str, Any]]) -> None:
    templates = [t for _, t in _pod_specs(rendered)]
    for name, service in _by_kind(rendered, "Service").items():
        selector = service["spec"]["selector"]
        matching = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert len(matching) == 1, f"Service/{name} selects {len(matching)} pod templates"
        port_names = {p["name"] for c in matching[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service/{name} {port['targetPort']}"


def test_nats_requires_the_secret_credentials(rendered: list[dict[str, Any]]) -> None:
    nats = _by_kind(rendered, "Deployment")["nats"]["spec"]["template"]["spec"]
    container = nats["containers"][0]
    assert container["command"] == ["nats-server", "-c", "/etc/nats/nats.conf"]
    secret_refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    secret = _by_kind(rendered, "Secret")[secret_refs[0]]
    assert set(secret["data"]) == {"SLED_NATS_USER", "SLED_NATS_PASSWORD"}
    config_volume = next(v for v in nats["volumes"] if "configMap" in v)
    conf = _by_kind(rendered, "ConfigMap")[config_volume["configMap"]["name"]]["data"]["nats.conf"]
    assert "user: $SLED_NATS_USER" in conf and "password: $SLED_NATS_PASSWORD" in conf
    # Every NATS client uses that same secret.
    for workload, template in _pod_specs(rendered):
        for c in template["spec"]["containers"]:
            if _is_sled(c) and not workload.startswith("Job/"):
                assert {"secretRef": {"name": secret_refs[0]}} in c["envFrom"], workload


def test_model_cache_prepared_by_a_job_and_read_by_the_verifier(
    rendered: list[dict[str, Any]],
) -> None:
    job = _by_kind(rendered, "Job")["models-prepare"]["spec"]["template"]["spec"]
    verifier = _by_kind(rendered, "Deployment")["verifier"]["spec"]["template"]["spec"]
    assert check_command(job["containers"][0]["command"]) == "sled"
    caches = []
    for pod in (job, verifier):
        container = pod["containers"][0]
        cache = _environment(container, rendered)["SLED_MODEL_CACHE"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cache)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        caches.append((cache, volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly")))
    # Same claim at the same path (registry.json holds absolute paths); only the Job writes.
    assert caches[0][:2] == caches[1][:2]
    assert caches[0][2] is not True and caches[1][2] is True


def test_edge_overlay_places_drafters_and_server_components() -> None:
    objects = _render(K8S / "overlays" / "edge")
    daemonsets = _by_kind(objects, "DaemonSet")
    models = {}
    for name, ds in daemonsets.items():
        pod = ds["spec"]["template"]["spec"]
        selector = pod["nodeSelector"]
        assert selector["kubernetes.io/arch"] == "arm64", name
        assert selector["sled.io/role"] == "edge-device", name
        container = pod["containers"][0]
        assert check_command(container["command"]) == "sled-drafter"
        env = _environment(container, objects)
        # The node label picks the drafter variant, which runs that draft model.
        assert env["SLED_DRAFT_MODEL"] == selector["sled.io/draft-model"], name
        models[name] = env["SLED_DRAFT_MODEL"]
        # The device's own cache copy, at the path registry.json was written with.
        mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
        assert mount["mountPath"] == env["SLED_MODEL_CACHE"] and mount.get("readOnly"), name
        http = next(p for p in container["ports"] if p["name"] == "http")
        assert http["containerPort"] == int(env["SLED_HTTP_PORT"]) == http["hostPort"], name
    assert sorted(models.values()) == sorted([DRAFT_INT4, DRAFT_INT8, NGRAM])
    selectors = [
        tuple(sorted(ds["spec"]["selector"]["matchLabels"].items())) for ds in daemonsets.values()
    ]
    assert len(set(selectors)) == len(selectors), "drafter variants must not share pods"
    for workload, template in _pod_specs(objects):
        if not workload.startswith("DaemonSet/"):
            assert template["spec"]["nodeSelector"] == {"sled.io/role": "server"}, workload


def test_gpu_overlay_gives_the_verifier_a_gpu() -> None:
    objects = _render(K8S / "overlays" / "gpu")
    pod = _by_kind(objects, "Deployment")["verifier"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _environment(container, objects)["SLED_DEVICE"] == "cuda"
    assert container["image"].endswith("-cu128")
    assert pod["runtimeClassName"] in _by_kind(objects, "RuntimeClass")


def test_prometheus_discovers_the_annotated_pods() -> None:
    config = yaml.safe_load((K8S / "base" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"own_namespace": True}}]
    relabels = job["relabel_configs"]
    keep = next(r for r in relabels if r["action"] == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert keep["regex"] == "true"
    sources = {label for r in relabels for label in r["source_labels"]}
    # Prometheus turns the annotation prometheus.io/port into this meta label.
    assert "__meta_kubernetes_pod_annotation_prometheus_io_port" in sources
    assert "__meta_kubernetes_pod_annotation_prometheus_io_path" in sources
    targets = {r.get("target_label") for r in relabels}
    assert {"__address__", "__metrics_path__", "service"} <= targets
    base = _render(K8S / "base")
    role = _by_kind(base, "Role")["prometheus"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
