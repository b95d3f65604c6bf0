"""The real scheduler and kvoffload services of the default stack, started by the
launcher as `sled up` starts them: ready, discoverable, configured from the
environment, and stopped with no orphans."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from sled_shared import bus
from sled_shared.launcher import Launcher, default_stack
from sled_shared.settings import CommonSettings


async def _pings(url: str) -> dict[str, dict]:
    nc = await bus.connect(CommonSettings(nats_url=url), name="probe", connect_timeout_s=10)
    try:
        out = {}
        for name in ("sled-scheduler", "sled-kvoffload"):
            out[name] = json.loads((await nc.request(f"$SRV.PING.{name}", b"", timeout=10)).data)
        return out
    finally:
        await nc.close()


def test_launcher_starts_the_real_scheduler_and_kvoffload_with_the_users_settings(tmp_path):
    specs = default_stack(("scheduler", "kvoffload"), drafters=())
    environ = {
        **os.environ,
        "SLED_SCHED_POLICY": "gpu-only",
        "SLED_HOST_KV_BLOCKS": "128",
        "SLED_WORKER_ID": "w-up",
        "SLED_GPU_KV_BLOCKS": "7",
    }
    launcher = Launcher(specs, log_dir=tmp_path / "logs", environ=environ, ready_timeout_s=180)
    with launcher:
        assert [e.service for e in launcher.endpoints if e.kind == "metrics"] == [
            "scheduler", "kvoffload",
        ]  # fmt: skip
        pids = dict(launcher.pids)
        pings = asyncio.run(_pings(launcher.nats_url))
        launcher.check()
    assert pings["sled-scheduler"]["metadata"] == {"policy": "gpu-only"}
    assert pings["sled-kvoffload"]["metadata"] == {"worker_id": "w-up", "capacity_tokens": "2048"}
    assert not [name for name, pid in pids.items() if _alive(pid)]


def _alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
