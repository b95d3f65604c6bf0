"""Which verifier gets a new session, or "at capacity, retry later".

A session needs KV room for its prompt plus some headroom to decode into.
Verifiers with accelerator room come first; under ``neo``/``apex`` a verifier
whose kvoffload workers have host room is next (the session starts
offloaded); among equals the least loaded (shortest predicted iteration,
then most free memory) wins. ``gpu-only`` never starts a session offloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sled_shared.apex.plan import ACCEL, Policy
from sled_shared.sched_protocol import HOST


@dataclass(frozen=True, slots=True)
class VerifierLoad:
    verifier_id: str
    sessions: int  # open sessions
    max_sessions: int  # its session limit
    accel_free_tokens: int  # free accelerator KV, in tokens
    host_free_tokens: int = 0  # free KV on the kvoffload workers it uses, in tokens
    predicted_iteration_s: float = 0.0  # its current predicted forward time: a load signal

    def __post_init__(self) -> None:
        if not self.verifier_id:
            raise ValueError("VerifierLoad.verifier_id must not be empty")
        if min(self.sessions, self.max_sessions, self.accel_free_tokens, self.host_free_tokens) < 0:
            raise ValueError(f"verifier {self.verifier_id!r}: negative load figures")
        if self.predicted_iteration_s < 0:
            raise ValueError(f"verifier {self.verifier_id!r}: negative predicted_iteration_s")


@dataclass(frozen=True, slots=True)
class Admission:
    verifier_id: str | None  # None: at capacity
    tier: str | None  # ACCEL or HOST: where the prefilled KV goes
    retry_after_s: float | None  # when at capacity: ask again after this long
    reason: str  # why, for logs and the error reply
    code: str = "admitted"  # at capacity: no_verifier | session_limit | kv_full (metric label)


def admit(
    prompt_tokens: int,
    verifiers: Sequence[VerifierLoad],
    policy: Policy | str,
    headroom_tokens: int = 64,
    retry_after_s: float = 1.0,
) -> Admission:
    policy = Policy(policy)
    if prompt_tokens <= 0:
        raise ValueError(f"prompt_tokens must be positive, got {prompt_tokens}")
    if headroom_tokens < 0 or retry_after_s <= 0:
        raise ValueError("headroom_tokens must be >= 0 and retry_after_s > 0")
    ids = [v.verifier_id for v in verifiers]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate verifier ids")
    need = prompt_tokens + headroom_tokens
    open_ = [v for v in verifiers if v.sessions < v.max_sessions]
    on_accel = [v for v in open_ if v.accel_free_tokens >= need]
    if on_accel:
        best = min(on_accel, key=lambda v: (v.predicted_iteration_s, -v.accel_free_tokens))
        return Admission(best.verifier_id, ACCEL, None, "accelerator room")
    if policy is not Policy.GPU_ONLY:
        on_host = [v for v in open_ if v.host_free_tokens >= need]
        if on_host:
            best = min(on_host, key=lambda v: (v.predicted_iteration_s, -v.host_free_tokens))
            return Admission(best.verifier_id, HOST, None, "host room (offloaded)")
    if not verifiers:
        code, why = "no_verifier", "no verifier registered"
    elif not open_:
        code, why = "session_limit", "every verifier is at its session limit"
    else:
        code, why = "kv_full", f"no verifier has KV room for {need} tokens"
    return Admission(None, None, retry_after_s, f"at capacity: {why}", code)
