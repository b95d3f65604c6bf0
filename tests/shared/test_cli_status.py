from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sled_shared.cli_status import discover, format_table
from test_bus import client, echo, echo_service

SLED = str(Path(sys.executable).with_name("sled"))  # the installed console script


async def sled_status(nats_url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SLED, "status", "--wait", "0.5",
        env={**os.environ, "SLED_NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_status_lists_services_with_request_counts(nats_url):
    async with echo_service(nats_url) as svc, client(nats_url) as nc:
        await echo(nc, "a")
        await echo(nc, "b")
        (found,) = await discover(nc, 0.5)
        assert found["info"]["id"] == svc.id and found["stats"]["endpoints"][0]["num_requests"] == 2
        table = format_table([found]).splitlines()
        assert table[0].split() == ["NAME", "ID", "VERSION", "ENDPOINT", "SUBJECT", "REQUESTS",
                                    "ERRORS", "AVG_MS"]  # fmt: skip
        assert table[1].split()[:7] == ["echo", svc.id, "1.2.3", "echo", "sled.v1.test.echo",
                                        "2", "0"]  # fmt: skip

        code, out, _ = await sled_status(nats_url)
        assert code == 0
        assert out.splitlines()[1].split()[:6] == ["echo", svc.id, "1.2.3", "echo",
                                                  "sled.v1.test.echo", "2"]  # fmt: skip


async def test_status_with_no_services_says_so(nats_url):
    code, out, err = await sled_status(nats_url)
    assert code == 1 and out == ""
    assert f"no services answered on {nats_url}" in err


async def test_status_without_nats_is_a_one_line_error():
    code, _, err = await sled_status("nats://127.0.0.1:1")
    assert code == 1
    assert err.strip().startswith("sled: error: cannot connect to NATS at nats://127.0.0.1:1")
