"""Service settings read from the environment.

Every environment variable a service honours is declared here, once, so the
deployment files (compose, k8s) can be checked against this list. Command-line
flags of each service override these values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

# name -> (env var, type); kept as metadata on each dataclass field.
_ENV = "env"


def _env(name: str, default, **kw):
    return field(default=default, metadata={_ENV: name}, **kw)


def _convert(raw: str, default):
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


class _FromEnv:
    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides):
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f.metadata.get(_ENV)
            if name and name in env and env[name] != "":
                try:
                    values[f.name] = _convert(env[name], f.default)
                except ValueError as exc:
                    raise ValueError(f"{name}={env[name]!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def env_vars(cls) -> list[str]:
        return [f.metadata[_ENV] for f in fields(cls) if _ENV in f.metadata]


@dataclass(slots=True)
class CommonSettings(_FromEnv):
    nats_url: str = _env("SLED_NATS_URL", "nats://127.0.0.1:4222")
    nats_user: str = _env("SLED_NATS_USER", "")
    nats_password: str = _env("SLED_NATS_PASSWORD", "")
    model_cache: str = _env("SLED_MODEL_CACHE", "")
    metrics_host: str = _env("SLED_METRICS_HOST", "0.0.0.0")
    metrics_port: int = _env("SLED_METRICS_PORT", 0)  # 0: pick a free port
    log_level: str = _env("SLED_LOG_LEVEL", "INFO")
    log_format: str = _env("SLED_LOG_FORMAT", "json")  # json | text


@dataclass(slots=True)
class VerifierSettings(CommonSettings):
    verifier_id: str = _env("SLED_VERIFIER_ID", "")  # empty: generated at start
    target_model: str = _env("SLED_TARGET_MODEL", "smollm2-135m")
    device: str = _env("SLED_DEVICE", "auto")  # auto | cpu | cuda
    gpu_kv_blocks: int = _env("SLED_GPU_KV_BLOCKS", 0)  # 0: size from free memory
    block_size: int = _env("SLED_BLOCK_SIZE", 16)
    max_batch_tokens: int = _env("SLED_MAX_BATCH_TOKENS", 512)
    max_sessions: int = _env("SLED_MAX_SESSIONS", 64)
    batch_window_ms: float = _env("SLED_BATCH_WINDOW_MS", 2.0)
    session_ttl_s: float = _env("SLED_SESSION_TTL_S", 300.0)
    sched_policy: str = _env("SLED_SCHED_POLICY", "apex")  # gpu-only | neo | apex
    # the host KV tier: kvoffload worker ids (comma-separated) or "auto" (discovered); empty: off
    kv_workers: str = _env("SLED_KV_WORKERS", "")
    plan_deadline_ms: float = _env("SLED_PLAN_DEADLINE_MS", 20.0)  # then it plans locally


@dataclass(slots=True)
class DrafterSettings(CommonSettings):
    device_name: str = _env("SLED_DEVICE_NAME", "")  # empty: hostname
    draft_model: str = _env("SLED_DRAFT_MODEL", "smollm2-135m-int4")
    http_host: str = _env("SLED_HTTP_HOST", "0.0.0.0")
    http_port: int = _env("SLED_HTTP_PORT", 8000)
    max_k: int = _env("SLED_MAX_K", 8)
    request_timeout_s: float = _env("SLED_REQUEST_TIMEOUT_S", 30.0)
    # The model the device serves (its tokenizer and context length); drafts share its tokenizer.
    target_model: str = _env("SLED_TARGET_MODEL", "smollm2-135m")
    max_sessions: int = _env("SLED_DRAFTER_MAX_SESSIONS", 8)  # generations running at once
    max_waiting: int = _env("SLED_DRAFTER_MAX_WAITING", 32)  # requests queued beyond those


@dataclass(slots=True)
class KVOffloadSettings(CommonSettings):
    worker_id: str = _env("SLED_WORKER_ID", "")  # empty: generated at start
    host_kv_blocks: int = _env("SLED_HOST_KV_BLOCKS", 4096)
    threads: int = _env("SLED_CPU_THREADS", 0)  # 0: all cores


@dataclass(slots=True)
class SchedulerSettings(CommonSettings):
    sched_policy: str = _env("SLED_SCHED_POLICY", "apex")
    plan_deadline_ms: float = _env("SLED_PLAN_DEADLINE_MS", 20.0)
