from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import msgpack
import pytest
from bus_echo_service import SUBJECT, endpoints
from sled_shared import bus
from sled_shared.nats_server import NatsServer
from sled_shared.protocol import ErrorReply, SessionClose, SessionClosed, decode, encode
from sled_shared.settings import CommonSettings

ECHO_SCRIPT = Path(__file__).with_name("bus_echo_service.py")


@contextlib.asynccontextmanager
async def echo_service(url: str, max_concurrency: int = 64):
    """The echo service in-process; yields its BusService, drains it on exit."""
    nc = await bus.connect(CommonSettings(nats_url=url), name="echo", connect_timeout_s=5)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        bus.run_service(
            nc,
            name="echo",
            version="1.2.3",
            endpoints=endpoints(max_concurrency),
            stop=stop,
            on_started=started.set_result,
        )
    )
    try:
        yield await asyncio.wait_for(started, 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def client(url: str):
    nc = await bus.connect(CommonSettings(nats_url=url), name="test-client", connect_timeout_s=5)
    try:
        yield nc
    finally:
        await nc.close()


async def echo(nc, sid: str, timeout: float = 5.0) -> SessionClosed:
    return await bus.request(nc, SUBJECT, SessionClose(sid), timeout, expect=SessionClosed)


async def test_request_round_trip_and_micro_discovery(nats_url):
    async with echo_service(nats_url) as svc, client(nats_url) as nc:
        assert (await echo(nc, "s-1")).session_id == "s-1"
        await nc.request(SUBJECT, b"\x00not msgpack", timeout=5)
        with pytest.raises(bus.RemoteError):
            await echo(nc, "boom")

        ping = json.loads((await nc.request("$SRV.PING", b"", timeout=5)).data)
        assert ping["name"] == "echo" and ping["id"] == svc.id
        info = json.loads((await nc.request("$SRV.INFO.echo", b"", timeout=5)).data)
        assert info["version"] == "1.2.3"
        assert [(e["name"], e["subject"]) for e in info["endpoints"]] == [("echo", SUBJECT)]
        stats = json.loads((await nc.request(f"$SRV.STATS.echo.{svc.id}", b"", timeout=5)).data)
        (ep,) = stats["endpoints"]
        assert ep["num_requests"] == 3 and ep["num_errors"] == 2
        assert ep["last_error"].startswith("internal: RuntimeError: boom")
        assert ep["processing_time"] > 0 and ep["data"] == {"in_flight": 0}


async def test_bad_input_gets_error_replies_and_service_survives(nats_url):
    async with echo_service(nats_url), client(nats_url) as nc:
        bad = decode((await nc.request(SUBJECT, b"\xc1", timeout=5)).data)
        assert isinstance(bad, ErrorReply) and bad.code == "bad_request"

        body = msgpack.unpackb(encode(SessionClose("s")))
        body["v"] = 99
        old = decode((await nc.request(SUBJECT, msgpack.packb(body), timeout=5)).data)
        assert isinstance(old, ErrorReply) and old.code == "unsupported_version"
        assert "99" in old.message

        with pytest.raises(bus.RemoteError) as err:
            await bus.request(nc, SUBJECT, SessionClose("gone"), 5)
        assert err.value.code == "unknown_session"
        with pytest.raises(bus.RemoteError) as err:
            await echo(nc, "boom")
        assert err.value.code == "internal" and "boom" in str(err.value)

        assert (await echo(nc, "still-here")).session_id == "still-here"


async def test_requests_run_concurrently_up_to_the_bound(nats_url):
    async with echo_service(nats_url, max_concurrency=2), client(nats_url) as nc:
        start = time.monotonic()
        replies = await asyncio.gather(*(echo(nc, "sleep:0.4") for _ in range(4)))
        elapsed = time.monotonic() - start
    assert [r.session_id for r in replies] == ["sleep:0.4"] * 4
    # Two at a time: two waves of 0.4 s; serial would be 1.6 s, unbounded 0.4 s.
    assert 0.8 <= elapsed < 1.4


async def test_no_responders_and_timeout_are_typed(nats_url):
    async with client(nats_url) as nc:
        with pytest.raises(bus.NoResponders):
            await bus.request(nc, "sled.v1.nobody.home", SessionClose("s"), 2)
        sub = await nc.subscribe("sled.v1.silent")  # listens, never answers
        with pytest.raises(bus.RequestTimeout):
            await bus.request(nc, "sled.v1.silent", SessionClose("s"), 0.3)
        await sub.unsubscribe()
        await nc.close()
        with pytest.raises(bus.BusError, match="ConnectionClosedError"):
            await bus.request(nc, "sled.v1.silent", SessionClose("s"), 0.3)


async def test_connect_timeout_names_the_url():
    url = "nats://127.0.0.1:1"
    with pytest.raises(bus.BusError, match=r"127\.0\.0\.1:1"):
        await bus.connect(CommonSettings(nats_url=url), connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(bus.BusError, match="invalid connect url"):
        await bus.connect(CommonSettings(nats_url="nats://127.0.0.1:x"), connect_timeout_s=5)
    assert time.monotonic() - started < 1  # not retried: it can never work


async def test_user_password_auth(tmp_path):
    with NatsServer(user="sled", password="s3cret", workdir=tmp_path) as server:
        good = CommonSettings(nats_url=server.url, nats_user="sled", nats_password="s3cret")
        nc = await bus.connect(good, connect_timeout_s=5)
        assert nc.is_connected
        await nc.close()
        bad = CommonSettings(nats_url=server.url, nats_user="sled", nats_password="wrong")
        with pytest.raises(bus.BusError, match=r"[Aa]uthorization"):
            await bus.connect(bad, connect_timeout_s=1)


async def test_service_and_client_survive_nats_restart(nats_server):
    url = nats_server.url
    async with echo_service(url), client(url) as nc:
        assert (await echo(nc, "before")).session_id == "before"
        nats_server.stop()
        with pytest.raises(bus.BusError):
            await echo(nc, "while-down", timeout=0.5)
        nats_server.start()  # same port
        deadline = time.monotonic() + 15
        while True:
            try:
                reply = await echo(nc, "after", timeout=1)
                break
            except bus.BusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert reply.session_id == "after"
        assert nc.stats["reconnects"] >= 1


async def _line(proc: asyncio.subprocess.Process, prefix: str, timeout: float = 10) -> str:
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        if not line:
            raise AssertionError(f"service exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line


async def test_sigterm_drains_in_flight_request(nats_url):
    env = {**os.environ, "SLED_NATS_URL": nats_url, "SLED_LOG_LEVEL": "INFO"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ECHO_SCRIPT), env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        await _line(proc, "started")
        async with client(nats_url) as nc:
            pending = asyncio.create_task(echo(nc, "sleep:1.5", timeout=10))
            await _line(proc, "handling sleep:1.5")
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            reply = await pending
            assert reply.session_id == "sleep:1.5"
            assert time.monotonic() - sent_at > 1.0  # it finished the work, not cut it short
            await _line(proc, "stopped")
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            with pytest.raises(bus.NoResponders):
                await echo(nc, "after-exit", timeout=2)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
