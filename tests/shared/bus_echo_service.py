"""A tiny real service for the bus tests, run in-process or as `python FILE`.

It answers SessionClose with SessionClosed. A session id "sleep:<seconds>"
delays the answer, "boom" makes the handler crash, "gone" raises a
ServiceError("unknown_session").
"""

from __future__ import annotations

import asyncio
import os

from sled_shared import bus
from sled_shared.protocol import ServiceError, SessionClose, SessionClosed
from sled_shared.settings import CommonSettings

SUBJECT = "sled.v1.test.echo"


async def handle(req: SessionClose) -> SessionClosed:
    sid = req.session_id
    if sid.startswith("sleep:"):
        print(f"handling {sid}", flush=True)
        await asyncio.sleep(float(sid.split(":", 1)[1]))
    elif sid == "boom":
        raise RuntimeError("boom")
    elif sid == "gone":
        raise ServiceError("unknown_session", f"no session {sid}")
    return SessionClosed(sid)


def endpoints(max_concurrency: int = 64) -> list[bus.Endpoint]:
    return [bus.Endpoint("echo", SUBJECT, handle, SessionClose, max_concurrency=max_concurrency)]


async def main() -> None:
    nc = await bus.connect(CommonSettings.from_env(), name="echo", connect_timeout_s=10)
    await bus.run_service(
        nc,
        name="echo",
        version="1.0.0",
        endpoints=endpoints(int(os.environ.get("ECHO_MAX_CONCURRENCY", "64"))),
        on_started=lambda svc: print(f"started {svc.id}", flush=True),
    )
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
