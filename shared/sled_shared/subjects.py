"""NATS subject names. Everything is versioned under ``sled.v1`` so a future
wire format can run side by side with this one."""

from __future__ import annotations

PREFIX = "sled.v1"

SESSION_OPEN = f"{PREFIX}.session.open"
VERIFIER_QUEUE = "verifiers"


def verify(verifier_id: str) -> str:
    return f"{PREFIX}.verify.{verifier_id}"


def session_close(verifier_id: str) -> str:
    return f"{PREFIX}.session.close.{verifier_id}"


def kv(worker_id: str, op: str) -> str:
    """``op`` is one of append/attend/truncate/evict/migrate."""
    return f"{PREFIX}.kv.{worker_id}.{op}"


def sched(topic: str) -> str:
    """``topic`` is e.g. ``profile``, ``plan``, ``admit``."""
    return f"{PREFIX}.sched.{topic}"
