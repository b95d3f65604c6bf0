"""The NATS config of compose and k8s, run by the real nats-server."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from deploy_checks import ROOT
from nats.errors import Error as NatsError
from sled_shared.nats_server import nats_server_binary

CONF = ROOT / "deploy" / "nats" / "nats.conf"
K8S_CONF = ROOT / "k8s" / "base" / "nats" / "nats.conf"
USER, PASSWORD = "sled-test", "s3cret-for-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(**creds: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_NATS_")}
    return env | creds


def test_k8s_carries_the_same_config() -> None:
    assert K8S_CONF.read_bytes() == CONF.read_bytes()


def test_config_is_valid_and_needs_the_credentials() -> None:
    binary = str(nats_server_binary())
    ok = subprocess.run(
        [binary, "-c", str(CONF), "-t"],
        env=_server_env(SLED_NATS_USER=USER, SLED_NATS_PASSWORD=PASSWORD),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Without the variables the server refuses to start rather than run open.
    missing = subprocess.run(
        [binary, "-c", str(CONF), "-t"],
        env=_server_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode != 0
    assert "SLED_NATS_USER" in missing.stdout + missing.stderr


@pytest.fixture
def nats_with_config(tmp_path: Path) -> Iterator[str]:
    port, monitor = _free_port(), _free_port()
    log = (tmp_path / "nats.log").open("w")
    # Command-line flags override the file's ports and bind only to loopback.
    argv = [str(nats_server_binary()), "-c", str(CONF), "-a", "127.0.0.1"]
    proc = subprocess.Popen(
        [*argv, "-p", str(port), "-m", str(monitor)],
        env=_server_env(SLED_NATS_USER=USER, SLED_NATS_PASSWORD=PASSWORD),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "nats.log").read_text()
                assert time.monotonic() < deadline, "nats-server did not become healthy"
                time.sleep(0.1)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def test_server_admits_only_the_configured_user(nats_with_config: str) -> None:
    client = await nats.connect(nats_with_config, user=USER, password=PASSWORD)
    try:
        sub = await client.subscribe("sled.v1.test")
        await client.publish("sled.v1.test", b"ping")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"ping"
    finally:
        await client.close()

    with pytest.raises(NatsError):
        await nats.connect(
            nats_with_config,
            user=USER,
            password="wrong",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )
    with pytest.raises(NatsError):
        await nats.connect(
            nats_with_config, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
        )
