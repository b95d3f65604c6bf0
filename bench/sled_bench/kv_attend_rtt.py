"""Per-layer attend round trip to a KV-offload worker over NATS: worker compute vs end-to-end.

Measured, not simulated: an embedded nats-server and a real ``sled_kvoffload``
worker process on this machine, driven by the verifier's client
(``sled_shared.kv_client.KVClient``). Each session is prefilled with
``--context`` tokens in every layer; each forward then sends, layer after
layer, one attend request carrying every session's new tokens (q/k/v,
SmolLM2-135M heads by default), and truncates them off afterwards so the
context stays fixed. Per request it records the end-to-end time seen by the
client, the worker's own append + attention time (``compute_s``) and its
queueing time; the rest is transport and encoding (NATS, msgpack, copies).

    PYTHONPATH=bench .venv/bin/python -m sled_bench.kv_attend_rtt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from sled_shared import bus, procs
from sled_shared.kv_client import KVClient, SessionTokens
from sled_shared.kv_protocol import KVGeometry
from sled_shared.nats_server import NatsServer
from sled_shared.settings import CommonSettings

SMOLLM2 = KVGeometry(num_layers=30, q_heads=9, kv_heads=3, head_dim=64)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _tokens(rng, g: KVGeometry, session: str, start: int, n: int) -> SessionTokens:
    def r(heads: int) -> np.ndarray:
        return rng.standard_normal((n, heads, g.head_dim)).astype(np.float32)

    return SessionTokens(session, start, r(g.kv_heads), r(g.kv_heads), r(g.q_heads))


async def measure(url: str, worker_id: str, args: argparse.Namespace) -> dict:
    g = SMOLLM2
    rng = np.random.default_rng(0)
    nc = await bus.connect(CommonSettings(nats_url=url), name="bench", connect_timeout_s=30)
    try:
        kv = KVClient(nc, worker_id, timeout_s=30)
        names = [f"s{i}" for i in range(args.sessions)]
        for s in names:
            await kv.open(s, g)
        for layer in range(g.num_layers):
            await kv.append(0, layer, [_tokens(rng, g, s, 0, args.context) for s in names])
        e2e, compute, queue, truncs = [], [], [], []
        for fwd in range(1, args.warmup + args.forwards + 1):
            # Fresh q/k/v per layer, made before timing: the verifier has them already.
            batches = [
                [_tokens(rng, g, s, args.context, args.new_tokens) for s in names]
                for _ in range(g.num_layers)
            ]
            for layer, batch in enumerate(batches):
                t0 = time.perf_counter()
                res = await kv.attend(fwd, layer, batch)
                took = time.perf_counter() - t0
                if fwd > args.warmup:
                    e2e.append(took)
                    compute.append(res.compute_s)
                    queue.append(res.queue_s)
            t0 = time.perf_counter()
            await kv.truncate({s: args.context for s in names})
            if fwd > args.warmup:
                truncs.append(time.perf_counter() - t0)
    finally:
        await nc.close()
    e2e_a, comp_a, queue_a = np.array(e2e), np.array(compute), np.array(queue)
    other = e2e_a - comp_a - queue_a

    def stats(x: np.ndarray) -> dict:
        return {
            "median_ms": float(np.median(x) * 1e3),
            "p90_ms": float(np.percentile(x, 90) * 1e3),
            "mean_ms": float(x.mean() * 1e3),
        }

    q_bytes = args.sessions * args.new_tokens * (g.q_heads + 2 * g.kv_heads) * g.head_dim * 4
    return {
        "shape": f"SmolLM2-135M heads (q {g.q_heads}, kv {g.kv_heads}, d {g.head_dim})",
        "sessions": args.sessions,
        "new_tokens": args.new_tokens,
        "context": args.context,
        "requests": len(e2e),
        "request_payload_bytes": q_bytes,
        "end_to_end": stats(e2e_a),
        "worker_compute": stats(comp_a),
        "worker_queue": stats(queue_a),
        "transport_and_codec": stats(other),
        "truncate_round_trip": stats(np.array(truncs)),
        "forward_30_layers_end_to_end_ms": float(np.median(e2e_a) * 1e3 * g.num_layers),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=5)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--forwards", type=int, default=20, help="timed forwards of 30 layers each")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="worker CPU attention threads")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, NatsServer(workdir=Path(tmp) / "nats") as nats:
        port = procs.free_port()
        env = {**os.environ, "SLED_NATS_URL": nats.url, "SLED_METRICS_PORT": str(port),
               "SLED_METRICS_HOST": "127.0.0.1", "SLED_WORKER_ID": "bench",
               "SLED_CPU_THREADS": str(args.threads), "SLED_LOG_FORMAT": "text"}  # fmt: skip
        log = Path(tmp) / "kvoffload.log"
        argv_ = (sys.executable, "-m", "sled_kvoffload", "--no-calibrate")
        proc = procs.spawn(argv_, log_path=log, env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"worker did not start:\n{procs.log_tail(log)}") from None
                    time.sleep(0.2)
            load_before = os.getloadavg()[0]
            result = asyncio.run(measure(nats.url, "bench", args))
        finally:
            procs.stop_groups([proc], 15)
    result["machine"] = f"{cpu_name()}, {os.cpu_count()} cpus"
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
