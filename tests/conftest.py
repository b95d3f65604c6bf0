"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sled_shared.nats_server import NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server on free ports, stopped after the test.

    ``nats_server.stop(); nats_server.start()`` restarts it on the same port.
    """
    server = NatsServer(workdir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url
