"""``python -m sled_kvoffload`` and ``python -m sled_scheduler`` as real processes:
readiness, micro discovery, the worker's start-up CPU profile reaching the
scheduler's cost model, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request

import numpy as np
from sled_shared import bus, procs, subjects
from sled_shared.apex.profiles import Component
from sled_shared.kv_client import KVClient, SessionTokens
from sled_shared.sched_protocol import CostModelReply, ModelRequest

from .conftest import SMOL, client, rand

START_TIMEOUT_S = 120.0  # a loaded 2-core box imports numpy and nats slowly


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


async def _start(started: list, tmp_path, name: str, module: str, url: str, *args: str, **env):
    port = procs.free_port()
    environ = {
        **os.environ, "SLED_NATS_URL": url, "SLED_METRICS_HOST": "127.0.0.1",
        "SLED_METRICS_PORT": str(port), "SLED_LOG_FORMAT": "text", **env,
    }  # fmt: skip
    log = tmp_path / f"{name}.log"
    proc = procs.spawn((sys.executable, "-m", module, *args), log_path=log, env=environ)
    started.append(proc)
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    while not _ready(port):
        assert proc.poll() is None, procs.log_tail(log)
        assert asyncio.get_running_loop().time() < deadline, f"{name} never became ready"
        await asyncio.sleep(0.2)
    return proc, port


async def test_worker_and_scheduler_processes_serve_discover_profile_and_stop(tmp_path, nats_url):
    started: list = []
    try:
        await _start(started, tmp_path, "scheduler", "sled_scheduler", nats_url,
                     SLED_SCHED_POLICY="neo")  # fmt: skip
        _, port = await _start(
            started, tmp_path, "kvoffload", "sled_kvoffload", nats_url,
            "--profile-interval-s", "0.5",
            SLED_WORKER_ID="wp", SLED_HOST_KV_BLOCKS="256", SLED_CPU_THREADS="2",
        )  # fmt: skip
        async with client(nats_url) as nc:
            pings = []
            for name in ("sled-kvoffload", "sled-scheduler"):
                pings.append(json.loads((await nc.request(f"$SRV.PING.{name}", b"", 10)).data))
            assert pings[0]["metadata"] == {"worker_id": "wp", "capacity_tokens": "4096"}
            assert pings[1]["metadata"] == {"policy": "neo"}
            info = json.loads((await nc.request("$SRV.INFO.sled-kvoffload", b"", 10)).data)
            assert {e["subject"] for e in info["endpoints"]} == {
                subjects.kv("wp", op) for op in subjects.KV_OPS
            }
            # The first session of a model geometry starts the worker's CPU attention sweep,
            # whose measured samples give the scheduler a CPU attention cost model.
            kv = KVClient(nc, "wp", timeout_s=30)
            await kv.open("s", SMOL)
            rng = np.random.default_rng(0)
            toks = SessionTokens(
                "s", 0, rand(rng, 8, 3, 64), rand(rng, 8, 3, 64), rand(rng, 8, 9, 64)
            )
            assert (await kv.attend(1, 0, [toks])).outputs[0].shape == (8, 9, 64)
            model = None
            for _ in range(300):
                try:
                    model = await bus.request(
                        nc, subjects.sched("model"), ModelRequest(), 10, expect=CostModelReply
                    )
                except bus.RemoteError:
                    model = None
                if model is not None and model.model.has(Component.CPU_ATTN):
                    break
                await asyncio.sleep(0.2)
            assert model is not None and model.model.has(Component.CPU_ATTN)
            assert model.samples >= 24
            # A prediction for the batch just attended, from samples measured on this CPU.
            assert 0 < model.model.cpu_attn(1, 8, 8) < 1.0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'sled_kvoffload_requests_total{op="attend",status="ok"} 1.0' in text
        assert "sled_kvoffload_sessions 1.0" in text
    finally:
        for proc in started:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in started]
    logs = [procs.log_tail(tmp_path / f"{n}.log") for n in ("scheduler", "kvoffload")]
    assert codes == [0, 0], logs
