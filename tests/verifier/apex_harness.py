"""Helpers of the APEX tests beyond ``sled_bench.apex_stack``: a kvoffload worker
as its own process, and prompts for the tiny models."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from sled_bench.apex_stack import TIMEOUT
from sled_shared import procs


def worker_process(tmp_path: Path, url: str, worker_id: str, blocks: int = 512):
    """``python -m sled_kvoffload`` as its own process, ready to serve."""
    port = procs.free_port()
    env = {
        **os.environ, "SLED_NATS_URL": url, "SLED_METRICS_HOST": "127.0.0.1",
        "SLED_METRICS_PORT": str(port), "SLED_LOG_FORMAT": "text", "SLED_WORKER_ID": worker_id,
        "SLED_HOST_KV_BLOCKS": str(blocks), "SLED_CPU_THREADS": "1",
    }  # fmt: skip
    log = tmp_path / f"{worker_id}.log"
    proc = procs.spawn((sys.executable, "-m", "sled_kvoffload", "--no-calibrate"), log_path=log,
                       env=env)  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        assert proc.poll() is None, procs.log_tail(log)
        assert time.monotonic() < deadline, "kvoffload worker never became ready"
        time.sleep(0.2)


def prompts_of(n: int, seed: int = 7, low: int = 8, high: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 96, int(rng.integers(low, high))).tolist() for _ in range(n)]
