"""What the bus costs a round: the verifier's compute time per batch against the
end-to-end request time a device sees over NATS, for the same rounds.

Starts a nats-server and ``python -m sled_verifier`` (the real target from the
model registry) as their own processes, then runs D devices at once, each
opening a session and sending R rounds of K drafts back to back. For every
round: round trip at the device, and from the answer the verifier's queue_s
(waiting for its batch), compute_s (the batch's engine call) and batch size.
overhead = round trip - queue_s - compute_s: encoding, NATS hops, handlers.

    .venv/bin/python -m sled_bench.verifier_bus --devices 1 4 --rounds 30 --k 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sled_shared import bus, procs, subjects
from sled_shared.models.registry import DEFAULT_TARGET
from sled_shared.nats_server import NatsServer
from sled_shared.protocol import SessionOpen, SessionOpened, VerifyRequest, VerifyResponse
from sled_shared.settings import CommonSettings

VERIFIER_ID = "v-bench"
PROMPT = [1, 504, 3458, 282, 253, 1789, 30, 198, 1206, 314, 3600, 30]  # any valid ids


@dataclass(slots=True)
class RoundTiming:
    devices: int
    round_trip_s: float
    queue_s: float
    compute_s: float
    batch_size: int

    @property
    def overhead_s(self) -> float:
        return self.round_trip_s - self.queue_s - self.compute_s


async def wait_for_verifier(nc, proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"verifier exited with {proc.returncode}")
        try:
            await nc.request("$SRV.PING.sled-verifier", b"", timeout=1)
            return
        except Exception:
            await asyncio.sleep(0.5)
    raise RuntimeError(f"verifier not up within {timeout_s}s")


async def device(nc, name: str, devices: int, rounds: int, k: int) -> list[RoundTiming]:
    opened = await bus.request(
        nc,
        subjects.SESSION_OPEN,
        SessionOpen(np.array(PROMPT, np.int32), rounds * (k + 1) + 8, "bench", name),
        120,
        expect=SessionOpened,
    )
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    committed, out = len(PROMPT) + 1, []
    for rnd in range(1, rounds + 1):
        drafts = rng.integers(100, 40000, k).astype(np.int32)
        msg = VerifyRequest(opened.session_id, rnd, committed, drafts)
        t0 = time.perf_counter()
        resp = await bus.request(nc, subjects.verify(VERIFIER_ID), msg, 120, expect=VerifyResponse)
        rtt = time.perf_counter() - t0
        committed += resp.accepted + 1
        out.append(RoundTiming(devices, rtt, resp.queue_s, resp.compute_s, resp.batch_size))
    return out


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def summarise(rows: list[RoundTiming]) -> dict[str, float]:
    def ms(values: list[float], q: float) -> float:
        return 1000 * float(np.quantile(values, q))

    out: dict[str, float] = {"rounds": len(rows)}
    for field in ("round_trip_s", "queue_s", "compute_s", "overhead_s"):
        values = [getattr(r, field) for r in rows]
        out[f"{field[:-2]}_p50_ms"] = ms(values, 0.5)
        out[f"{field[:-2]}_p99_ms"] = ms(values, 0.99)
    out["mean_batch_size"] = statistics.fmean(r.batch_size for r in rows)
    return out


async def run(args: argparse.Namespace) -> dict:
    results: dict[str, dict] = {}
    with NatsServer() as nats:
        env = {
            **os.environ,
            "SLED_NATS_URL": nats.url,
            "SLED_VERIFIER_ID": VERIFIER_ID,
            "SLED_TARGET_MODEL": args.target,
            "SLED_BATCH_WINDOW_MS": str(args.window_ms),
            "SLED_LOG_LEVEL": "WARNING",
        }
        proc = procs.spawn(
            [sys.executable, "-m", "sled_verifier"], env=env, log_path=Path(args.log)
        )
        try:
            nc = await bus.connect(CommonSettings(nats_url=nats.url), name="bench")
            try:
                await wait_for_verifier(nc, proc, 600)
                await device(nc, "warmup", 1, 3, args.k)
                for d in args.devices:
                    per_device = await asyncio.gather(
                        *(device(nc, f"dev-{d}-{i}", d, args.rounds, args.k) for i in range(d))
                    )
                    results[str(d)] = summarise([r for rows in per_device for r in rows])
            finally:
                await nc.close()
        finally:
            procs.stop_groups([proc], 30)
    return {
        "machine": machine(),
        "k": args.k,
        "by_devices": results,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--log", default="verifier_bus.log", help="the verifier process's log")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"K={report['k']}, machine: {report['machine']} (p50 / p99, ms)\n")
    print("| devices | batch | round trip | queue | compute | bus overhead |")
    print("|---|---|---|---|---|---|")
    for d, s in report["by_devices"].items():
        cells = [
            f"{s[f'{f}_p50_ms']:.1f} / {s[f'{f}_p99_ms']:.1f}"
            for f in ("round_trip", "queue", "compute", "overhead")
        ]
        print(f"| {d} | {s['mean_batch_size']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
