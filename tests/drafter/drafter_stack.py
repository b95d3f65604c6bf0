"""Real processes for the drafter's end-to-end tests: nats-server, verifier(s)
and drafter(s), each a subprocess started as `sled up` starts them, waited on
through /readyz, and stopped as a process group."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sled_shared import procs
from sled_shared.models.registry import register_model

READY_TIMEOUT_S = 300.0  # torch import and model load on a loaded 2-core machine


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: Path
    metrics_port: int
    http_port: int | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str) -> float:
        """Sum of every sample of a metric family (all label sets)."""
        body = http_get(self.metrics_url + "/metrics")[1]
        total = 0.0
        for line in body.splitlines():
            if re.match(rf"^{re.escape(name)}(\{{.*\}})? ", line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def log(self) -> str:
        return procs.log_tail(self.log_path, 60)


@dataclass
class Stack:
    nats_url: str
    env: dict[str, str]
    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def _start(self, name: str, module: str, env: dict[str, str], http: bool) -> Service:
        metrics_port = procs.free_port()
        full = {
            **self.env,
            **env,
            "SLED_METRICS_HOST": "127.0.0.1",
            "SLED_METRICS_PORT": str(metrics_port),
            "SLED_LOG_FORMAT": "text",
        }
        http_port = None
        if http:
            http_port = procs.free_port()
            full.update(SLED_HTTP_HOST="127.0.0.1", SLED_HTTP_PORT=str(http_port))
        log_path = self.log_dir / f"{name}.log"
        proc = procs.spawn([sys.executable, "-m", module], log_path=log_path, env=full)
        svc = Service(name, proc, log_path, metrics_port, http_port)
        self.services.append(svc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while http_get(svc.metrics_url + "/readyz")[0] != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{svc.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {READY_TIMEOUT_S}s:\n{svc.log()}")
            time.sleep(0.1)
        return svc

    def verifier(self, verifier_id: str, **env: str) -> Service:
        env = {"SLED_VERIFIER_ID": verifier_id, "SLED_DEVICE": "cpu", **env}
        return self._start(verifier_id, "sled_verifier", env, http=False)

    def drafter(self, device: str, draft_model: str, **env: str) -> Service:
        env = {"SLED_DEVICE_NAME": device, "SLED_DRAFT_MODEL": draft_model, **env}
        return self._start(device, "sled_drafter", env, http=True)

    def stop(self) -> None:
        procs.stop_groups([s.proc for s in self.services], 20.0)
        self.services.clear()


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def http_post(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, dict, str]:
    """(status, headers, body) of a raw POST: for bodies the openai client cannot send."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def tiny_cache(cache: Path, tiny_model_dir: Path) -> dict[str, str]:
    """A model cache holding the tiny random Llama as target and its ONNX export as draft."""
    register_model("tiny-target", "target", "hf", tiny_model_dir / "hf", cache)
    register_model("tiny-draft", "draft", "ort-genai", tiny_model_dir / "ort", cache)
    return {"SLED_MODEL_CACHE": str(cache), "SLED_TARGET_MODEL": "tiny-target"}
