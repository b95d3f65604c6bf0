"""Admission and placement of new sessions."""

from __future__ import annotations

import pytest
from sled_scheduler.admission import HOST, VerifierLoad, admit
from sled_shared.apex.plan import ACCEL


def test_least_loaded_verifier_with_accelerator_room_wins():
    vs = [
        VerifierLoad("v1", 10, 64, accel_free_tokens=5000, predicted_iteration_s=0.08),
        VerifierLoad("v2", 30, 64, accel_free_tokens=900, predicted_iteration_s=0.02),
        VerifierLoad("v3", 5, 64, accel_free_tokens=100, host_free_tokens=10**6),
    ]
    a = admit(500, vs, "apex")
    assert (a.verifier_id, a.tier, a.retry_after_s) == ("v2", ACCEL, None)
    # A prompt too big for v2's accelerator room goes to v1.
    assert admit(1000, vs, "apex").verifier_id == "v1"


def test_offloading_policies_start_sessions_on_host_when_accelerators_are_full():
    vs = [VerifierLoad("v1", 3, 64, accel_free_tokens=100, host_free_tokens=50_000)]
    for policy in ("neo", "apex"):
        a = admit(2000, vs, policy)
        assert (a.verifier_id, a.tier) == ("v1", HOST)
    a = admit(2000, vs, "gpu-only")
    assert a.verifier_id is None and a.retry_after_s == 1.0
    assert "no verifier has KV room for 2064 tokens" in a.reason and a.code == "kv_full"


def test_rejects_with_retry_after_when_everything_is_full():
    vs = [
        VerifierLoad("v1", 64, 64, accel_free_tokens=10**6, host_free_tokens=10**6),
        VerifierLoad("v2", 64, 64, accel_free_tokens=10**6),
    ]
    a = admit(10, vs, "apex", retry_after_s=2.5)
    assert (a.verifier_id, a.tier, a.retry_after_s) == (None, None, 2.5)
    assert "session limit" in a.reason and a.code == "session_limit"
    assert admit(10, [], "neo").reason == "at capacity: no verifier registered"


def test_bad_requests_are_rejected():
    v = VerifierLoad("v1", 0, 4, 100)
    with pytest.raises(ValueError, match="prompt_tokens"):
        admit(0, [v], "apex")
    with pytest.raises(ValueError, match="duplicate"):
        admit(5, [v, v], "apex")
    with pytest.raises(ValueError, match="negative"):
        VerifierLoad("v1", -1, 4, 100)
    with pytest.raises(ValueError):
        admit(5, [v], "best-effort")
