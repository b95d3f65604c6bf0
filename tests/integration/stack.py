"""The local stack exactly as a user gets it: `sled up` as a subprocess, its
endpoints read from the lines it prints, stopped with the SIGTERM a Ctrl-C or
an orchestrator sends.

Every process under `sled up` (embedded nats-server, scheduler, kvoffload,
verifier, drafters) is recorded once the stack is ready, so a test can check
that stopping it left none of them behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sled_shared import procs

SLED = str(Path(sys.executable).with_name("sled"))
# torch import and model loads, one service after another, on a loaded 2-core machine.
READY_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 60.0
SERVER_SERVICES = ("scheduler", "kvoffload", "verifier")


@dataclass(frozen=True, slots=True)
class Endpoint:
    service: str
    kind: str  # nats | monitor | metrics | openai
    url: str


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), None when it is
    gone or a zombie; with the pid it names one process even if the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; everything after its ")" is fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live process below ``root`` (any depth): pid -> start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            started = _start_time(pid)
            if started is not None:
                found[pid] = started
                todo.append(pid)
    return found


@dataclass(slots=True)
class LocalStack:
    proc: subprocess.Popen
    log_dir: Path
    endpoints: list[Endpoint]
    processes: dict[int, int]  # every process of the stack at ready time: pid -> start time

    @property
    def nats_url(self) -> str:
        return self.url("nats", "nats")

    @property
    def drafters(self) -> list[str]:
        return [e.service for e in self.endpoints if e.kind == "openai"]

    @property
    def services(self) -> list[str]:
        """Every service serving metrics, in start order."""
        return [e.service for e in self.endpoints if e.kind == "metrics"]

    def url(self, service: str, kind: str) -> str:
        for e in self.endpoints:
            if (e.service, e.kind) == (service, kind):
                return e.url
        raise KeyError(f"no {kind} endpoint of {service}; have {self.endpoints}")

    def base(self, service: str) -> str:
        """The service's health server (serving /metrics, /healthz, /readyz)."""
        return self.url(service, "metrics").removesuffix("/metrics")

    def env(self) -> dict[str, str]:
        """The environment a `sled` command needs to reach this stack."""
        return {**os.environ, "SLED_NATS_URL": self.nats_url}

    def log(self, service: str, lines: int = 40) -> str:
        return procs.log_tail(self.log_dir / f"{service}.log", lines)

    def survivors(self) -> list[int]:
        """Recorded processes still alive (the same process, not a reused pid)."""
        return [pid for pid, started in self.processes.items() if _start_time(pid) == started]


def _read_endpoints(out: Path) -> list[Endpoint] | None:
    """The endpoint lines `sled up` printed, or None until it has printed `ready`."""
    try:
        lines = out.read_text().splitlines()
    except FileNotFoundError:
        return None
    if "ready" not in lines:
        return None
    endpoints = []
    for line in lines[: lines.index("ready")]:
        parts = line.split()
        if len(parts) == 3 and parts[0] != "logs":
            endpoints.append(Endpoint(*parts))
    return endpoints


def start(log_dir: Path, *args: str) -> LocalStack:
    """Run `sled up ARGS` with its own embedded NATS on free ports, until it prints `ready`."""
    out = log_dir / "sled-up.log"
    env = {k: v for k, v in os.environ.items() if k != "SLED_NATS_URL"}
    argv = [SLED, "up", "--log-dir", str(log_dir), "--ready-timeout", str(READY_TIMEOUT_S), *args]
    # In its own process group, killed by the kernel should this test process die.
    proc = procs.spawn(argv, log_path=out, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S + 30
    while (endpoints := _read_endpoints(out)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            procs.stop_groups([proc], STOP_TIMEOUT_S)
            raise RuntimeError(f"sled up did not get ready:\n{procs.log_tail(out, 60)}")
        time.sleep(0.25)
    return LocalStack(proc, log_dir, endpoints, descendants(proc.pid))


def stop(stack: LocalStack) -> int:
    """SIGTERM `sled up` as Ctrl-C would and wait for it; returns its exit status."""
    stack.proc.send_signal(signal.SIGTERM)
    try:
        return stack.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        procs.stop_groups([stack.proc], 5.0)
        raise


def http_get(url: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def http_json(url: str, timeout: float = 30.0) -> Any:
    status, _, body = http_get(url, timeout)
    if status != 200:
        raise AssertionError(f"GET {url}: HTTP {status}: {body[:500]}")
    return json.loads(body)
