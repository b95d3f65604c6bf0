from __future__ import annotations

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from sled_shared.health import HealthServer
from sled_shared.settings import CommonSettings


async def test_metrics_health_and_readiness():
    registry = CollectorRegistry()
    Counter("sled_test_requests", "requests", registry=registry).inc(3)
    state = {"model": False, "nats": True}

    async def ready():
        return dict(state)

    async def hello(_request):
        return web.Response(text="hi")

    server = HealthServer("127.0.0.1", 0, ready=ready, registry=registry)
    server.app.router.add_get("/hello", hello)
    async with server, aiohttp.ClientSession() as http:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        async with http.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert "sled_test_requests_total 3.0" in await resp.text()
        async with http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{server.url}/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {"ready": False, "checks": state}
        state["model"] = True
        async with http.get(f"{server.url}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True
        async with http.get(f"{server.url}/hello") as resp:
            assert await resp.text() == "hi"


async def test_failing_readiness_check_is_not_ready():
    def broken() -> bool:
        raise RuntimeError("model gone")

    settings = CommonSettings(metrics_host="127.0.0.1", metrics_port=0)
    server = HealthServer.from_settings(settings, ready=broken)
    async with server, aiohttp.ClientSession() as http, http.get(f"{server.url}/readyz") as resp:
        assert resp.status == 503
        assert "model gone" in (await resp.json())["error"]
