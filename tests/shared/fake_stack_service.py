"""A small real service process for the launcher tests, started by the launcher
as `python fake_stack_service.py`. Its behaviour comes from the environment:

FAKE_MODE     ok | crash (exits 3 at once) | never_ready (/readyz 503) |
              stubborn (ignores SIGTERM)
FAKE_OUT_DIR  where it writes <FAKE_NAME>.json: its pid, its child's pid and
              the SLED_* variables it was given
FAKE_CHILD    "1" (default): also start a child process, to prove the whole
              process group is stopped
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from sled_shared.health import HealthServer


async def main() -> None:
    mode = os.environ.get("FAKE_MODE", "ok")
    if mode == "crash":
        print("kaboom: model file missing", file=sys.stderr)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = None
    if os.environ.get("FAKE_CHILD", "1") == "1":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    servers = [
        HealthServer(
            os.environ["SLED_METRICS_HOST"],
            int(os.environ["SLED_METRICS_PORT"]),
            ready=lambda: {"model": True, "nats": mode != "never_ready"},
        )
    ]
    if "SLED_HTTP_PORT" in os.environ:
        http_port = int(os.environ["SLED_HTTP_PORT"])
        servers.append(HealthServer(os.environ["SLED_HTTP_HOST"], http_port))
    for server in servers:
        await server.start()
    record = {
        "pid": os.getpid(),
        "child": child.pid if child else None,
        "env": {k: v for k, v in os.environ.items() if k.startswith("SLED_")},
    }
    out = Path(os.environ["FAKE_OUT_DIR"]) / f"{os.environ['FAKE_NAME']}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(out)
    await asyncio.sleep(300)


if __name__ == "__main__":
    asyncio.run(main())
