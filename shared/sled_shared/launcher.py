"""Supervisor of the local stack (`sled up`): an embedded NATS unless the user
gives SLED_NATS_URL, then each service as its own process, configured through
the environment variables of ``sled_shared.settings``.

Services start one after another, each only once its ``/readyz`` answers 200,
so a failure names the service that caused it (with its log tail). Every
child runs in its own process group and is stopped as a group, and dies with
the launcher even if the launcher is killed (see ``sled_shared.procs``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sled_shared import procs
from sled_shared.nats_server import NatsServer

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One process of the stack. ``openai`` services also get SLED_HTTP_PORT,
    printed as their OpenAI-compatible API."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    openai: bool = False
    # Used only where the user's environment does not set the variable.
    env_defaults: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"service name {self.name!r}: use lowercase letters, digits, - and _")
        if not self.argv:
            raise ValueError(f"service {self.name!r} has no command")


def python_module(name: str, module: str, *, openai: bool = False, **env: str) -> ServiceSpec:
    return ServiceSpec(name, (sys.executable, "-m", module), env, openai)


def drafter(name: str, model: str) -> ServiceSpec:
    return python_module(
        name, "sled_drafter", openai=True, SLED_DEVICE_NAME=name, SLED_DRAFT_MODEL=model
    )


# Heterogeneous devices, each with its own draft model, sharing one verifier.
DEFAULT_DRAFTERS: tuple[tuple[str, str], ...] = (
    ("pi5-int4", "smollm2-135m-int4"),
    ("orin-int8", "smollm2-135m-int8"),
    ("phone-ngram", "ngram"),
)
# Server-side services in start order; drafters come after them.
SERVER_SERVICES: dict[str, ServiceSpec] = {
    "scheduler": python_module("scheduler", "sled_scheduler"),
    "kvoffload": python_module("kvoffload", "sled_kvoffload"),
    # Offload to whichever KV workers answer discovery (the one started above).
    "verifier": replace(
        python_module("verifier", "sled_verifier"), env_defaults={"SLED_KV_WORKERS": "auto"}
    ),
}
# The scheduler and a KV-offload worker first: the verifier plans with the one
# and offloads to the other from its first session on.
DEFAULT_SERVER = ("scheduler", "kvoffload", "verifier")


def default_stack(
    server: Sequence[str] = DEFAULT_SERVER,
    drafters: Sequence[tuple[str, str]] = DEFAULT_DRAFTERS,
) -> list[ServiceSpec]:
    unknown = set(server) - SERVER_SERVICES.keys()
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}; known: {sorted(SERVER_SERVICES)}")
    ordered = [SERVER_SERVICES[n] for n in SERVER_SERVICES if n in server]
    return ordered + [drafter(name, model) for name, model in drafters]


class LaunchError(RuntimeError):
    pass


class Interrupted(LaunchError):
    pass


@dataclass(frozen=True, slots=True)
class EndpointUrl:
    service: str
    kind: str  # "nats" | "monitor" | "metrics" | "openai"
    url: str


@dataclass(slots=True)
class _Running:
    spec: ServiceSpec
    proc: subprocess.Popen
    log_path: Path
    ready_url: str


class Launcher:
    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        *,
        log_dir: Path,
        nats_url: str | None = None,
        host: str = "127.0.0.1",
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 15.0,
        environ: Mapping[str, str] | None = None,
        interrupt: threading.Event | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"service names must be unique: {names}")
        self.specs = list(specs)
        self.log_dir = Path(log_dir)
        self.nats_url = nats_url
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # Inherited whole, so the user's SLED_* settings (SLED_MODEL_CACHE,
        # SLED_GPU_KV_BLOCKS, SLED_SCHED_POLICY, ...) reach every service.
        self.environ = dict(os.environ if environ is None else environ)
        self.interrupt = interrupt or threading.Event()
        self.nats: NatsServer | None = None
        self.running: list[_Running] = []
        self.endpoints: list[EndpointUrl] = []

    @property
    def pids(self) -> dict[str, int]:
        out = {r.spec.name: r.proc.pid for r in self.running}
        if self.nats is not None and self.nats.pid is not None:
            out["nats"] = self.nats.pid
        return out

    def start(self) -> list[EndpointUrl]:
        """Start everything; on any failure stop what was started and raise LaunchError."""
        try:
            self._start_nats()
            for spec in self.specs:
                self._start_service(spec)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _start_nats(self) -> None:
        if self.nats_url is not None:
            self.endpoints.append(EndpointUrl("nats", "nats", _redact(self.nats_url)))
            return
        self.nats = NatsServer(host=self.host, workdir=self.log_dir / "nats").start()
        self.nats_url = self.nats.url
        self.endpoints.append(EndpointUrl("nats", "nats", self.nats.url))
        self.endpoints.append(EndpointUrl("nats", "monitor", self.nats.monitor_url))

    def _start_service(self, spec: ServiceSpec) -> None:
        metrics_port = procs.free_port(self.host)
        env = {
            **spec.env_defaults,
            **self.environ,
            "SLED_NATS_URL": self.nats_url,
            "SLED_METRICS_HOST": self.host,
            "SLED_METRICS_PORT": str(metrics_port),
        }
        base = f"http://{self.host}"
        endpoints = [EndpointUrl(spec.name, "metrics", f"{base}:{metrics_port}/metrics")]
        if spec.openai:
            http_port = procs.free_port(self.host)
            env.update(SLED_HTTP_HOST=self.host, SLED_HTTP_PORT=str(http_port))
            endpoints.insert(0, EndpointUrl(spec.name, "openai", f"{base}:{http_port}"))
        env.update(spec.env)
        log_path = self.log_dir / f"{spec.name}.log"
        proc = procs.spawn(spec.argv, log_path=log_path, env=env)
        run = _Running(spec, proc, log_path, f"{base}:{metrics_port}/readyz")
        self.running.append(run)
        self._wait_ready(run)
        self.endpoints += endpoints

    def _wait_ready(self, run: _Running) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.interrupt.wait(0.1):
            if run.proc.poll() is not None:
                raise LaunchError(self._died(run))
            if _probe(run.ready_url):
                return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"service {run.spec.name} not ready at {run.ready_url} within "
                    f"{self.ready_timeout_s:.0f}s; log {run.log_path}:\n"
                    + procs.log_tail(run.log_path)
                )
        raise Interrupted(f"interrupted while starting {run.spec.name}")

    def _died(self, run: _Running) -> str:
        return (
            f"service {run.spec.name} exited with status {run.proc.returncode}; "
            f"log {run.log_path}:\n{procs.log_tail(run.log_path)}"
        )

    def check(self) -> None:
        """Raise LaunchError if a service or the embedded NATS has died."""
        for run in self.running:
            if run.proc.poll() is not None:
                raise LaunchError(self._died(run))
        if self.nats is not None and not self.nats.running:
            raise LaunchError(f"nats-server died:\n{procs.log_tail(self.nats.log_path)}")

    def stop(self) -> None:
        """Stop the services together (SIGTERM, then SIGKILL after the timeout), then NATS,
        which stays up until the services have drained."""
        procs.stop_groups([r.proc for r in self.running], self.stop_timeout_s)
        self.running.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _probe(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)
