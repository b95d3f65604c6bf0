"""`python -m sled_verifier` as a real process: readiness, metrics, flags over the
environment, a SIGTERM that drains the round in flight, and a clear start failure."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from sled_shared import bus
from sled_shared.models.registry import register_model

from .service_harness import TIMEOUT, client, open_session, srv, verify

START_TIMEOUT = 180.0  # importing torch and loading the model on a busy shared CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_cache(tmp_path, tiny_model_dirs) -> Path:
    cache = tmp_path / "cache"
    register_model("tiny-target", "target", "hf", tiny_model_dirs["gqa"], cache=cache)
    return cache


def service_env(nats_url: str, cache: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "SLED_NATS_URL": nats_url,
        "SLED_MODEL_CACHE": str(cache),
        "SLED_TARGET_MODEL": "tiny-target",
        "SLED_VERIFIER_ID": "v-env",
        "SLED_METRICS_HOST": "127.0.0.1",
        "SLED_METRICS_PORT": str(port),
        "SLED_DEVICE": "cpu",
        "SLED_GPU_KV_BLOCKS": "64",
        "SLED_BLOCK_SIZE": "4",
        "SLED_LOG_FORMAT": "json",
        **extra,
    }


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


async def wait_ready(http, base: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"verifier exited with {proc.returncode}:\n{log.read_text()}")
        try:
            status, _ = await get(http, f"{base}/readyz")
            if status == 200:
                return
        except aiohttp.ClientError:
            pass  # not listening yet
        await asyncio.sleep(0.2)
    raise AssertionError(f"verifier not ready within {START_TIMEOUT}s:\n{log.read_text()}")


async def test_process_serves_and_sigterm_drains_the_round_in_flight(
    nats_url, tiny_cache, tmp_path
):
    port, log = free_port(), tmp_path / "verifier.log"
    # A long batching window keeps the round in flight when SIGTERM arrives.
    env = service_env(nats_url, tiny_cache, port, SLED_BATCH_WINDOW_MS="1500")
    argv = [sys.executable, "-m", "sled_verifier", "--verifier-id", "v-flag", "--max-sessions", "4"]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, base, proc, log)
            assert (await get(http, f"{base}/healthz"))[0] == 200
            status, text = await get(http, f"{base}/metrics")
            assert status == 200 and "sled_verifier_batch_devices_bucket" in text
            assert 'sled_verifier_kv_blocks_capacity{tier="accelerator"} 64.0' in text

        async with client(nats_url) as nc:
            opened = await open_session(nc, [5, 6, 7], device="pi")
            assert opened.verifier_id == "v-flag"  # the flag beats SLED_VERIFIER_ID
            ping = await srv(nc, "$SRV.PING.sled-verifier")
            assert ping["metadata"]["verifier_id"] == "v-flag"
            assert ping["metadata"]["max_sessions"] == "4"
            pending = asyncio.create_task(verify(nc, "v-flag", opened.session_id, 1, 4, [8, 9]))
            for _ in range(int(TIMEOUT / 0.02)):
                stats = await srv(nc, f"$SRV.STATS.sled-verifier.{ping['id']}")
                data = next(e for e in stats["endpoints"] if e["name"] == "verify")["data"]
                if data["queue_depth"] == 1:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the round never reached the batcher")
            proc.send_signal(signal.SIGTERM)
            resp = await pending
            assert resp.round == 1 and resp.batch_size == 1 and resp.next_token >= 0
            assert resp.queue_s > 0.5  # it waited out the window: finished, not cut short
            assert await asyncio.wait_for(proc.wait(), 60) == 0
            with pytest.raises(bus.NoResponders):
                await verify(nc, "v-flag", opened.session_id, 2, 5, [])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "verifier v-flag stopped" in log.read_text()


def test_unknown_target_model_fails_with_a_clear_message(nats_url, tiny_cache, tmp_path):
    env = service_env(nats_url, tiny_cache, free_port(), SLED_LOG_FORMAT="text")
    done = subprocess.run(
        [sys.executable, "-m", "sled_verifier", "--target-model", "no-such-model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert done.returncode == 1
    assert "no-such-model" in done.stderr and "failed to start" in done.stderr
