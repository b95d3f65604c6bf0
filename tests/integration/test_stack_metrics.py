"""Every service of the running `sled up` stack serves /metrics, /healthz and
/readyz; each exposes exactly the `sled_` families that sled_shared.metrics
declares for its kind; and after a generation the drafters' and the
verifier's counters account for it exactly as the answers report it.

The scheduler and the KV-offload worker are only checked for their families
and health: in the default stack nothing a short generation does reaches them
(no session leaves the accelerator tier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import scrape
from clients import chat, concurrently
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from sled_shared.metrics import DrafterMetrics, KVOffloadMetrics, SchedulerMetrics, VerifierMetrics
from stack import LocalStack, http_get, http_json

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
PROMPTS = {
    "pi5-int4": "Name three colours of the rainbow.",
    "orin-int8": "What is 12 plus 30?",
    "phone-ngram": "Say hello in French.",
}
SERVER_GROUPS = {
    "verifier": VerifierMetrics,
    "scheduler": SchedulerMetrics,
    "kvoffload": KVOffloadMetrics,
}


def declared(service: str) -> dict[str, str]:
    """Family name -> type of the metric group the service builds (drafters: DrafterMetrics)."""
    registry = CollectorRegistry()
    if service in SERVER_GROUPS:
        SERVER_GROUPS[service](registry)
    else:
        DrafterMetrics("probe", "probe", registry)
    return {f.name: f.type for f in registry.collect()}


def scrape_all(stack: LocalStack) -> dict[str, dict[str, Metric]]:
    return {s: scrape.families(stack.url(s, "metrics")) for s in stack.services}


@dataclass(frozen=True, slots=True)
class Generation:
    answers: dict[str, dict[str, Any]]
    before: dict[str, dict[str, Metric]]
    after: dict[str, dict[str, Metric]]

    def delta(self, service: str, sample: str, **labels: str) -> float:
        return scrape.total(self.after[service], sample, **labels) - scrape.total(
            self.before[service], sample, **labels
        )


@pytest.fixture(scope="module")
def generation(sled_stack: LocalStack) -> Generation:
    """One greedy answer per device, all at once, between two scrapes of every service.

    The second scrape waits until the verifier has closed every session, so
    the gauges are back at rest.
    """
    before = scrape_all(sled_stack)
    devices = sled_stack.drafters
    calls = [partial(chat, sled_stack, d, PROMPTS[d], max_tokens=MAX_TOKENS) for d in devices]
    answers = dict(zip(devices, concurrently(calls), strict=True))
    closed_before = scrape.total(before["verifier"], "sled_verifier_sessions_closed_total")
    deadline = time.monotonic() + 60
    while True:
        after = scrape_all(sled_stack)
        closed = scrape.total(after["verifier"], "sled_verifier_sessions_closed_total")
        if closed - closed_before >= len(devices) or time.monotonic() > deadline:
            return Generation(answers, before, after)
        time.sleep(0.5)


def test_every_service_answers_health_and_readiness(sled_stack: LocalStack) -> None:
    assert len(sled_stack.services) == 6
    for service in sled_stack.services:
        base = sled_stack.base(service)
        assert http_json(base + "/healthz") == {"status": "ok"}, service
        ready = http_json(base + "/readyz")
        assert ready["ready"] is True, (service, ready)
        assert all(ready.get("checks", {}).values()), (service, ready)
        status, content_type, body = http_get(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain"), service
        assert "# TYPE sled_" in body, service
        assert http_get(base + "/no-such-page")[0] == 404, service


def test_each_service_exposes_exactly_its_declared_families(sled_stack: LocalStack) -> None:
    for service in sled_stack.services:
        found = scrape.families(sled_stack.url(service, "metrics"))
        expected = declared(service)
        # prometheus_client adds a "<family>_created" timestamp gauge to counters and
        # histograms in the text format; it is no family of ours.
        created = {f"{name}_created" for name in expected}
        exposed = {
            name: f.type
            for name, f in found.items()
            if name.startswith("sled_") and name not in created
        }
        assert exposed == expected, service


def test_drafter_counters_account_for_each_answer(generation: Generation) -> None:
    for device, answer in generation.answers.items():
        ext, delta = answer["sled"], partial(generation.delta, device)
        assert answer["choices"][0]["finish_reason"] in ("length", "stop")
        assert ext["rounds"] > 0
        assert delta("sled_drafter_rounds_total") == ext["rounds"], device
        assert delta("sled_drafter_draft_tokens_total") == ext["drafted"], device
        assert delta("sled_drafter_accepted_tokens_total") == ext["accepted"], device
        # Every token after the first (which comes with the prefill) is committed by a round.
        generated = answer["usage"]["completion_tokens"] - 1
        assert delta("sled_drafter_generated_tokens_total") == generated, device
        assert delta("sled_drafter_requests_total", status="ok") == 1, device
        assert delta("sled_drafter_requests_total", status="error") == 0, device
        assert delta("sled_drafter_ttft_seconds_count") == 1, device
        assert delta("sled_drafter_tpot_seconds_count") == 1, device
        assert delta("sled_drafter_round_trip_seconds_count") == ext["rounds"], device
        assert delta("sled_drafter_draft_k_count") == ext["rounds"], device
        assert delta("sled_drafter_draft_k_sum") == ext["drafted"], device
        assert delta("sled_drafter_failovers_total") == 0, device
        assert scrape.total(generation.after[device], "sled_drafter_active_sessions") == 0
        # Position 0 is drafted in every round that drafts at all; later ones no more often.
        positions = [delta("sled_drafter_draft_tokens_total", position=str(i)) for i in range(16)]
        assert positions == sorted(positions, reverse=True), (device, positions)
    # The model drafts were drafted and accepted (the n-gram one may find nothing to copy).
    for device in ("pi5-int4", "orin-int8"):
        assert generation.delta(device, "sled_drafter_accepted_tokens_total") > 0, device


def test_verifier_counters_match_the_devices_rounds(generation: Generation) -> None:
    delta = partial(generation.delta, "verifier")
    sessions = len(generation.answers)
    rounds = sum(a["sled"]["rounds"] for a in generation.answers.values())
    assert delta("sled_verifier_rounds_total") == rounds
    # Each round is one session of one batched forward.
    assert delta("sled_verifier_batch_size_sum") == rounds
    batches = delta("sled_verifier_batch_devices_count")
    assert 1 <= batches <= rounds
    assert delta("sled_verifier_batch_devices_sum") <= rounds
    assert delta("sled_verifier_suggested_k_count") == rounds
    assert delta("sled_verifier_forward_seconds_count") >= batches
    assert delta("sled_verifier_sessions_opened_total") == sessions
    assert delta("sled_verifier_sessions_closed_total") == sessions
    assert delta("sled_verifier_prefill_seconds_count") == sessions
    assert delta("sled_verifier_sessions_evicted_total") == 0
    after = generation.after["verifier"]
    assert scrape.total(after, "sled_verifier_active_sessions") == 0
    assert scrape.total(after, "sled_verifier_queue_depth") == 0
    # Closed sessions give their KV blocks back.
    assert scrape.total(after, "sled_verifier_kv_blocks_used", tier="accelerator") == 0
    assert scrape.total(after, "sled_verifier_kv_blocks_capacity", tier="accelerator") > 0
    # Forwards fed each prompt once (prefill), then per round the newest token and its drafts.
    prompts = sum(a["usage"]["prompt_tokens"] for a in generation.answers.values())
    drafted = sum(a["sled"]["drafted"] for a in generation.answers.values())
    assert delta("sled_verifier_batch_tokens_sum") == prompts + rounds + drafted
