"""The verifier service's figures: Prometheus metrics from engine counters and
batch reports, and the verify endpoint's data in $SRV.STATS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sled_shared.metrics import VerifierMetrics

from .batcher import BatchReport
from .engine import VerifierEngine


@dataclass(slots=True)
class _BatchTally:
    batches: int = 0
    last_size: int = 0
    max_size: int = 0
    last_devices: int = 0
    max_devices: int = 0
    multi_device_batches: int = 0


class ServiceStats:
    def __init__(self, metrics: VerifierMetrics) -> None:
        self.metrics = metrics
        self._tally = _BatchTally()
        metrics.set_kv_blocks("host", 0, 0)  # no host tier until offloading is on

    def after_engine_op(self, engine: VerifierEngine) -> None:
        """On the engine thread: forward histograms and the KV and session gauges."""
        m = self.metrics
        for f in engine.drain_forwards():
            m.forward.observe(f.seconds)
            m.batch_tokens.observe(f.tokens)
            if f.kind == "verify":
                m.batch_size.observe(f.sessions)
        stats = engine.stats()
        m.active_sessions.set(stats.active_sessions)
        m.set_kv_blocks("accelerator", stats.kv_blocks_used, stats.kv_blocks_total)
        host = engine.kv.host
        if host is not None:  # in accelerator-sized blocks, so the tiers compare
            bs = engine.blocks.block_size
            used = sum(host.used_tokens(w) for w in host.capacity)
            m.set_kv_blocks("host", -(-used // bs), sum(host.capacity.values()) // bs)

    def on_batch(self, report: BatchReport) -> None:
        self.metrics.batch_devices.observe(report.devices)
        self.metrics.rounds.inc(len(report.suggested_ks))
        for k in report.suggested_ks:
            self.metrics.suggested_k.observe(k)
        t = self._tally
        t.batches += 1
        t.last_size, t.max_size = report.size, max(t.max_size, report.size)
        t.last_devices, t.max_devices = report.devices, max(t.max_devices, report.devices)
        t.multi_device_batches += report.devices > 1

    def endpoint_data(self, queue_depth: int, sessions: int) -> dict[str, Any]:
        t = self._tally
        return {
            "batches": t.batches,
            "last_batch_size": t.last_size,
            "max_batch_size": t.max_size,
            "last_batch_devices": t.last_devices,
            "max_batch_devices": t.max_devices,
            "multi_device_batches": t.multi_device_batches,
            "queue_depth": queue_depth,
            "sessions": sessions,
        }
