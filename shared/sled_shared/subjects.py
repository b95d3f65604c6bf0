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


KV_OPS = ("open", "append", "attend", "truncate", "evict", "migrate", "stats")
SCHED_TOPICS = ("profile", "load", "plan", "admit", "model")


def kv(worker_id: str, op: str) -> str:
    """A KV-offload worker's subject (messages in ``sled_shared.kv_protocol``)."""
    if op not in KV_OPS:
        raise ValueError(f"kv op {op!r} is not one of {KV_OPS}")
    return f"{PREFIX}.kv.{worker_id}.{op}"


def sched(topic: str) -> str:
    """A scheduler subject (messages in ``sled_shared.sched_protocol``)."""
    if topic not in SCHED_TOPICS:
        raise ValueError(f"scheduler topic {topic!r} is not one of {SCHED_TOPICS}")
    return f"{PREFIX}.sched.{topic}"
