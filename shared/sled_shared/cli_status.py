"""`sled status`: every service on the bus, discovered through nats.micro's
``$SRV.INFO`` and ``$SRV.STATS``, one row per endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from sled_shared.cli import CliError

_COLUMNS = ("NAME", "ID", "VERSION", "ENDPOINT", "SUBJECT", "REQUESTS", "ERRORS", "AVG_MS")
_MAX_ANSWERS = 10_000  # bound on what one discovery collects


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "status",
        help="list the services on NATS (SLED_NATS_URL) with their request counts",
    )
    p.add_argument(
        "--wait", type=float, default=1.0, metavar="S", help="how long to collect answers"
    )
    p.add_argument("--json", action="store_true", help="print the raw answers as JSON")
    p.set_defaults(func=_run)


async def discover(nc, wait_s: float = 1.0) -> list[dict[str, Any]]:
    """Ask all services for INFO and STATS; returns one dict per service id
    with keys "info" and "stats" (either may be missing if it did not answer)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_msgs_limit=_MAX_ANSWERS)
    found: dict[str, dict[str, Any]] = {}
    try:
        await nc.publish("$SRV.INFO", b"", reply=inbox)
        await nc.publish("$SRV.STATS", b"", reply=inbox)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0 and len(found) < _MAX_ANSWERS:
            try:
                msg = await sub.next_msg(timeout=left)
            except TimeoutError:
                break
            try:
                body = json.loads(msg.data)
                kind = "info" if body["type"].endswith("info_response") else "stats"
                found.setdefault(body["id"], {})[kind] = body
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # not a nats.micro answer; ignore it
    finally:
        await sub.unsubscribe()
    return sorted(found.values(), key=lambda s: (s.get("info") or s.get("stats"))["name"])


def format_table(services: list[dict[str, Any]]) -> str:
    rows = []
    for svc in services:
        info, stats = svc.get("info", {}), svc.get("stats", {})
        head = info or stats
        counts = {e["name"]: e for e in stats.get("endpoints", [])}
        endpoints = info.get("endpoints") or stats.get("endpoints") or [{}]
        for ep in endpoints:
            st = counts.get(ep.get("name"), {})
            avg_ns = st.get("average_processing_time")
            rows.append(
                (
                    head["name"],
                    head["id"],
                    head.get("version", "?"),
                    ep.get("name", "-"),
                    ep.get("subject", "-"),
                    str(st.get("num_requests", "-")),
                    str(st.get("num_errors", "-")),
                    f"{avg_ns / 1e6:.2f}" if isinstance(avg_ns, int | float) else "-",
                )
            )
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [_COLUMNS, *rows]
    )


async def discover_at(client_name: str, wait_s: float) -> tuple[str, list[dict]]:
    """Discover the services on SLED_NATS_URL over a connection of our own: (url, services)."""
    from sled_shared import bus
    from sled_shared.settings import CommonSettings

    settings = CommonSettings.from_env()
    try:
        nc = await bus.connect(settings, name=client_name, connect_timeout_s=3.0)
    except bus.BusError as exc:
        raise CliError(str(exc)) from None
    try:
        return settings.nats_url, await discover(nc, wait_s)
    finally:
        await nc.close()


async def _status(wait_s: float, as_json: bool) -> int:
    nats_url, services = await discover_at("sled-status", wait_s)
    if not services:
        print(f"no services answered on {nats_url}", file=sys.stderr)
        return 1
    print(json.dumps(services, indent=2) if as_json else format_table(services))
    return 0


def _run(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args.wait, args.json))
