"""The small HTTP server every service runs for Prometheus and its orchestrator:

- ``/metrics``: Prometheus exposition of a registry (the global one by default)
- ``/healthz``: 200 while the process is alive and its event loop turns
- ``/readyz``: 200 when the readiness callback says so, else 503

The callback returns a bool or a mapping of named checks (for example
``{"model": True, "nats": nc.is_connected}``), ready when all are true; the
body names the failing ones. Services may add their own routes to ``app``
before ``start()``.

Needs aiohttp, which every service depends on (sled_shared itself does not).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from sled_shared.settings import CommonSettings

log = logging.getLogger(__name__)

ReadyResult = bool | Mapping[str, bool]
ReadyCheck = Callable[[], ReadyResult | Awaitable[ReadyResult]]


class HealthServer:
    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        ready: ReadyCheck | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host = host
        self.port = port  # 0 until start() when a free port is wanted
        self.registry = registry
        self._ready = ready or (lambda: True)
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None

    @classmethod
    def from_settings(cls, settings: CommonSettings, **kwargs) -> HealthServer:
        return cls(settings.metrics_host, settings.metrics_port, **kwargs)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        self._runner = web.AppRunner(self.app, access_log=None)  # scrapes would flood the log
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("health and metrics on %s", self.url)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        try:
            result = self._ready()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.exception("readiness check failed")
            return web.json_response({"ready": False, "error": repr(exc)}, status=503)
        if isinstance(result, Mapping):
            checks = {name: bool(ok) for name, ok in result.items()}
            ready = all(checks.values())
            body = {"ready": ready, "checks": checks}
        else:
            ready = bool(result)
            body = {"ready": ready}
        return web.json_response(body, status=200 if ready else 503)
