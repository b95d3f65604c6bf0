"""Adaptive K: the verifier's suggestion capped, then lowered by the device's own costs."""

import pytest
from sled_drafter.adaptive_k import (
    ACCEPT_PRIOR,
    PROBE_EVERY,
    Acceptance,
    AdaptiveK,
    DeviceCosts,
    best_k,
    expected_tokens,
    k_for_rate,
)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0, 0.7) == pytest.approx(1.0)
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(4, 1.0) == 5.0


def test_free_drafts_keep_the_cap():
    # An n-gram draft costs nothing: more drafts never slow a round down.
    assert best_k(8, 0.3, 0.0, 0.05) == 8


def test_costly_drafts_lower_k_to_the_best_throughput():
    rate, d, r = 0.66, 0.008, 0.07
    k = best_k(8, rate, d, r)
    speeds = {j: expected_tokens(j, rate) / (j * d + r) for j in range(9)}
    assert speeds[k] == max(speeds.values())
    assert 2 <= k <= 5  # the int4 draft on this machine's numbers drafts a few, not all 8


def test_drafting_stops_when_one_draft_costs_more_than_it_saves():
    # (1 + a) / (d + r) < 1 / r  <=>  a * r < d: a slow device on a fast link.
    assert best_k(8, 0.5, 0.05, 0.02) == 0
    assert best_k(8, 0.5, 0.005, 0.02) > 0


def test_untimed_device_trusts_the_cap():
    assert best_k(5, 0.1, None, 0.05) == 5
    assert best_k(5, 0.1, 0.01, None) == 5
    assert best_k(0, 0.9, 0.0, 0.05) == 0


def test_acceptance_is_the_prefix_mle_with_one_prior_round():
    acc = Acceptance(decay=1.0)
    assert acc.rate == ACCEPT_PRIOR
    acc.observe(4, 4)  # all accepted: 4 successes, no failure
    acc.observe(4, 1)  # 1 success then a reject
    assert acc.rate == pytest.approx((5 + ACCEPT_PRIOR) / (5 + 1 + 1))
    acc.observe(0, 0)  # K = 0 rounds say nothing about the draft
    assert acc.rate == pytest.approx((5 + ACCEPT_PRIOR) / 7)
    with pytest.raises(ValueError):
        acc.observe(2, 3)


def test_acceptance_forgets_old_rounds():
    acc = Acceptance()
    for _ in range(30):
        acc.observe(4, 0)
    low = acc.rate
    for _ in range(30):
        acc.observe(4, 4)
    assert low < 0.15 and acc.rate > 0.9


def test_suggestion_max_k_and_room_all_cap_k():
    ak = AdaptiveK(max_k=6, costs=DeviceCosts.new())
    assert ak.next_k(room=100) == 6
    ak.observe(drafted=6, accepted=6, suggested_k=3)
    assert ak.next_k(room=100) == 3
    assert ak.next_k(room=2) == 2
    assert ak.next_k(room=0) == 0
    ak.observe(drafted=3, accepted=3, suggested_k=0)  # the verifier is loaded: plain decoding
    assert ak.next_k(room=100) == 0


def test_device_costs_lower_the_suggestion_and_probe_now_and_then():
    costs = DeviceCosts.new()
    costs.draft_per_token_s.add(0.05)
    costs.round_trip_s.add(0.02)
    ak = AdaptiveK(max_k=8, costs=costs, suggested=8)
    ks = [ak.next_k(room=100) for _ in range(2 * PROBE_EVERY)]
    # Drafting does not pay here, but one token is drafted every PROBE_EVERY rounds
    # so that the costs get measured again.
    assert ks.count(1) == 2 and ks.count(0) == 2 * PROBE_EVERY - 2
    assert ks[PROBE_EVERY - 1] == 1


def test_reproducible_k_follows_the_token_history_only():
    costs = DeviceCosts.new()
    costs.draft_per_token_s.add(0.5)  # drafting looks hopeless on timings...
    costs.round_trip_s.add(0.001)
    ak = AdaptiveK(max_k=8, costs=costs, suggested=0, reproducible=True)
    # ...and the verifier asks for K = 0, yet K comes from acceptance alone.
    assert ak.next_k(room=100) == k_for_rate(8, ACCEPT_PRIOR) == 2
    for _ in range(20):
        ak.observe(drafted=8, accepted=8, suggested_k=0)
    assert ak.next_k(room=100) == 8 and ak.next_k(room=3) == 3
    twin = AdaptiveK(max_k=8, costs=DeviceCosts.new(), reproducible=True)
    for _ in range(20):
        twin.observe(drafted=8, accepted=8, suggested_k=5)
    assert twin.next_k(room=100) == ak.next_k(room=100)


def test_k_for_rate_sends_drafts_worth_sending():
    assert k_for_rate(8, 0.3) == 1  # at least one
    assert k_for_rate(8, 0.6) == 2  # 0.6**2 = 0.36 >= 0.35 > 0.6**3
    assert k_for_rate(8, 0.99) == 8 and k_for_rate(0, 0.99) == 0
