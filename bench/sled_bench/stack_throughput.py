"""Throughput of the real local stack: one verifier, 1, 2 and 4 devices, each
serving a few concurrent OpenAI requests, greedy, fixed prompts.

The stack is what `sled up` runs (embedded NATS, scheduler, kvoffload,
verifier, drafters as their own processes), started once with two sets of
devices: SLED devices of mixed draft kinds (int4, int8, n-gram, int4, ...)
and, as the centralised baseline, devices started with SLED_MAX_K=0, which
never draft: every token is one plain decoding step of the same verifier
(their draft model is never consulted, so they run the model-free n-gram).
Each phase uses the first N devices of one set; SLED and baseline phases
alternate, so drift on a shared machine hits both.

Per phase: total tokens/s (completion tokens over the phase's wall time),
per-request TPOT and TTFT (from each answer's ``sled`` figures), the mean
batch size (sessions per verification forward, from the verifier's
histogram over the phase), acceptance and mean K.

    .venv/bin/python -m sled_bench.stack_throughput --devices 1 2 4 --per-device 2

All processes share this machine's CPUs: drafting competes with the
verifier here, which separate edge devices would not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from sled_shared.launcher import (
    DEFAULT_SERVER,
    SERVER_SERVICES,
    Launcher,
    ServiceSpec,
    python_module,
)
from sled_shared.models.registry import DEFAULT_TARGET, DRAFT_INT4, DRAFT_INT8, NGRAM

from sled_bench.verifier_bus import machine

# SLED device i drafts with KINDS[i % 3]: every mix of 2 or more has a model draft and more.
KINDS = (DRAFT_INT4, DRAFT_INT8, NGRAM)
PROMPTS = (
    "Explain how a refrigerator works, step by step.",
    "Write a short story about a lighthouse keeper.",
    "Describe the water cycle in detail.",
    "Give ten tips for writing clean Python code.",
    "Explain the difference between a virus and a bacterium.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe how to bake bread at home.",
    "Explain why the sky is blue.",
)
TIMEOUT_S = 900.0


@dataclass(frozen=True, slots=True)
class Phase:
    mode: str  # "sled" | "k0"
    devices: int
    requests: int
    tokens: int
    wall_s: float
    tpot_mean_s: float
    tpot_p90_s: float
    ttft_mean_s: float
    mean_batch: float
    acceptance: float | None
    mean_k: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def device_specs(n: int) -> tuple[list[ServiceSpec], list[ServiceSpec]]:
    """(SLED devices, K=0 devices), ``n`` of each."""
    sled = [
        python_module(
            f"sled{i}",
            "sled_drafter",
            openai=True,
            SLED_DEVICE_NAME=f"sled{i}-{KINDS[i % len(KINDS)]}",
            SLED_DRAFT_MODEL=KINDS[i % len(KINDS)],
        )
        for i in range(n)
    ]
    k0 = [
        python_module(
            f"k0-{i}",
            "sled_drafter",
            openai=True,
            SLED_DEVICE_NAME=f"k0-{i}",
            SLED_DRAFT_MODEL=NGRAM,
            SLED_MAX_K="0",
        )
        for i in range(n)
    ]
    return sled, k0


def verifier_batches(metrics_url: str) -> tuple[float, float]:
    """(sessions summed over verification forwards, forwards) so far."""
    with urllib.request.urlopen(metrics_url, timeout=30) as resp:
        body = resp.read().decode()
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name in ("sled_verifier_batch_size_sum", "sled_verifier_batch_size_count")
    }
    return values["sled_verifier_batch_size_sum"], values["sled_verifier_batch_size_count"]


async def complete(
    http: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": DEFAULT_TARGET,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    async with http.post(base + "/v1/chat/completions", json=body) as resp:
        answer = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status}: {answer}")
        return answer


async def run_phase(
    mode: str, bases: list[str], per_device: int, max_tokens: int, metrics_url: str
) -> Phase:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        jobs = [
            complete(http, base, PROMPTS[(d * per_device + j) % len(PROMPTS)], max_tokens)
            for d, base in enumerate(bases)
            for j in range(per_device)
        ]
        sessions0, forwards0 = verifier_batches(metrics_url)
        t0 = time.perf_counter()
        answers = await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
        sessions1, forwards1 = verifier_batches(metrics_url)
    ext = [a["sled"] for a in answers]
    tpots = sorted(e["tpot_s"] for e in ext)
    drafted, accepted = sum(e["drafted"] for e in ext), sum(e["accepted"] for e in ext)
    return Phase(
        mode=mode,
        devices=len(bases),
        requests=len(answers),
        tokens=sum(a["usage"]["completion_tokens"] for a in answers),
        wall_s=wall,
        tpot_mean_s=statistics.fmean(tpots),
        tpot_p90_s=tpots[min(len(tpots) - 1, int(0.9 * len(tpots)))],
        ttft_mean_s=statistics.fmean(e["ttft_s"] for e in ext),
        mean_batch=(sessions1 - sessions0) / max(forwards1 - forwards0, 1),
        acceptance=accepted / drafted if drafted else None,
        mean_k=drafted / sum(e["rounds"] for e in ext),
    )


async def measure(
    args: argparse.Namespace, sled: list[str], k0: list[str], metrics_url: str
) -> list[Phase]:
    """``sled`` and ``k0``: the two sets of devices' API URLs."""
    # Warm every device (ONNX sessions, verifier kernels) before anything is timed.
    await run_phase("warmup", sled + k0, 1, 8, metrics_url)
    phases = []
    for n in args.devices:
        for mode, bases in (("sled", sled[:n]), ("k0", k0[:n])):
            phases.append(
                await run_phase(mode, bases, args.per_device, args.max_tokens, metrics_url)
            )
    return phases


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = [SERVER_SERVICES[name] for name in DEFAULT_SERVER]
    sled, k0 = device_specs(max(args.devices))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="sled-stack-throughput-"))
    environ = {**os.environ, "SLED_LOG_LEVEL": "WARNING"}
    environ.pop("SLED_NATS_URL", None)  # always its own embedded NATS
    load_before = os.getloadavg()[0]
    launcher = Launcher(server + sled + k0, log_dir=log_dir, ready_timeout_s=600, environ=environ)
    with launcher as up:
        urls = {(e.service, e.kind): e.url for e in up.endpoints}
        phases = asyncio.run(
            measure(
                args,
                [urls[s.name, "openai"] for s in sled],
                [urls[s.name, "openai"] for s in k0],
                urls["verifier", "metrics"],
            )
        )
    return {
        "machine": machine(),
        # Other work on the machine shares its CPUs with every process of the stack.
        "load_1m": [load_before, os.getloadavg()[0]],
        "max_tokens": args.max_tokens,
        "per_device": args.per_device,
        "sled_kinds": [KINDS[i % len(KINDS)] for i in range(max(args.devices))],
        "log_dir": str(log_dir),
        "phases": [asdict(p) | {"tokens_per_s": p.tokens_per_s} for p in phases],
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"Stack throughput, measured on {report['machine']}; verifier on CPU, all processes "
        f"on this machine. Greedy, {report['max_tokens']} tokens, {report['per_device']} "
        f"concurrent requests per device; SLED devices draft with "
        f"{', '.join(report['sled_kinds'])} (in that order); k0 = the same verifier with "
        "SLED_MAX_K=0 devices (plain centralised decoding). 1-minute load average "
        f"{report['load_1m'][0]:.1f} at start, {report['load_1m'][1]:.1f} at the end.",
        "",
        "| devices | mode | requests | tokens | wall s | tokens/s | vs k0 | TPOT mean / p90 ms "
        "| TTFT mean ms | mean batch | acceptance | mean K |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(p["devices"], p["mode"]): p for p in report["phases"]}
    for p in report["phases"]:
        base = by_key.get((p["devices"], "k0"))
        ratio = f"{p['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        acceptance = "-" if p["acceptance"] is None else f"{p['acceptance']:.2f}"
        lines.append(
            f"| {p['devices']} | {p['mode']} | {p['requests']} | {p['tokens']} "
            f"| {p['wall_s']:.1f} | {p['tokens_per_s']:.1f} | {ratio} "
            f"| {1000 * p['tpot_mean_s']:.0f} / {1000 * p['tpot_p90_s']:.0f} "
            f"| {1000 * p['ttft_mean_s']:.0f} | {p['mean_batch']:.2f} | {acceptance} "
            f"| {p['mean_k']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--per-device", type=int, default=2, help="concurrent requests per device")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--log-dir", help="where the services' logs go (default: a new temp dir)")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = p.parse_args(argv)
    if min(args.devices) < 1 or args.per_device < 1 or args.max_tokens < 2:
        p.error("need --devices >= 1, --per-device >= 1 and --max-tokens >= 2")
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
