"""Limits and endings: a full device refuses with 429 + Retry-After, a client
that goes away ends its generation and frees the verifier session, no
verifier means 503, and SIGTERM lets running generations finish."""

from __future__ import annotations

import os
import signal
import time

import httpx2
import openai
import pytest
from drafter_stack import Stack, http_get, tiny_cache
from sled_shared.nats_server import NatsServer

MODEL = "tiny-target"
MESSAGES = [{"role": "user", "content": "Tell me everything about foxes."}]
LONG = 400  # tokens: tens of seconds at the slowed-down verifier below


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    nats = NatsServer(workdir=tmp_path / "nats").start()
    env = {**tiny_cache(tmp_path / "cache", tiny_model_dir), "SLED_NATS_URL": nats.url}
    st = Stack(nats.url, {**os.environ, **env}, tmp_path)
    try:
        yield st
    finally:
        st.stop()
        nats.close()


def client(svc, timeout: float = 300) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc.base_url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def chat(svc, timeout: float = 300, **kw):
    args = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=LONG) | kw
    return client(svc, timeout).chat.completions.create(**args)


def wait_until(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_full_device_refuses_then_a_gone_client_frees_its_slot(stack):
    verifier = stack.verifier("v1", SLED_BATCH_WINDOW_MS="60")
    dev = stack.drafter("dev", "ngram", SLED_DRAFTER_MAX_SESSIONS="1", SLED_DRAFTER_MAX_WAITING="0")
    first = chat(dev, stream=True)
    next(iter(first))  # the generation runs and holds the only slot
    with pytest.raises(openai.RateLimitError) as info:
        chat(dev, max_tokens=4)
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["type"] == "rate_limit_exceeded"
    closed = verifier.metric("sled_verifier_sessions_closed_total")
    first.close()  # the client goes away mid-stream
    wait_until(lambda: verifier.metric("sled_verifier_active_sessions") == 0)
    wait_until(lambda: verifier.metric("sled_verifier_sessions_closed_total") == closed + 1)
    wait_until(lambda: dev.metric("sled_drafter_active_sessions") == 0)
    done = chat(dev, max_tokens=4)
    assert done.usage.completion_tokens >= 1


def test_a_timed_out_whole_request_ends_its_generation(stack):
    verifier = stack.verifier("v1", SLED_BATCH_WINDOW_MS="60")
    dev = stack.drafter("dev", "ngram")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        chat(dev, timeout=1.5)
    wait_until(lambda: verifier.metric("sled_verifier_sessions_opened_total") == 1)
    wait_until(lambda: verifier.metric("sled_verifier_active_sessions") == 0, timeout=15)
    wait_until(lambda: dev.metric("sled_drafter_active_sessions") == 0)
    # 400 rounds of >= 60 ms could not have finished: the session ended early.
    assert time.monotonic() - started < 20
    assert dev.metric("sled_drafter_rounds_total") < LONG - 50


def test_no_verifier_is_a_503_with_retry_after(stack):
    dev = stack.drafter("dev", "ngram", SLED_REQUEST_TIMEOUT_S="1")
    assert http_get(dev.base_url + "/readyz")[0] == 200
    with pytest.raises(openai.InternalServerError) as info:
        chat(dev, max_tokens=4)
    assert info.value.status_code == 503
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert "verifier" in info.value.body["message"]


def test_sigterm_finishes_running_generations_and_refuses_new_ones(stack):
    stack.verifier("v1", SLED_BATCH_WINDOW_MS="30")
    dev = stack.drafter("dev", "ngram")
    running = chat(dev, stream=True, max_tokens=60, stream_options={"include_usage": True})
    chunks = [next(iter(running))]
    os.kill(dev.proc.pid, signal.SIGTERM)
    wait_until(lambda: http_get(dev.metrics_url + "/readyz")[0] == 503)
    with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
        chat(dev, max_tokens=4)
    chunks += list(running)
    ext = chunks[-1].to_dict()["sled"]
    assert chunks[-1].usage.completion_tokens == len(ext["token_ids"])
    assert len(ext["token_ids"]) == 60 or ext["token_ids"][-1] == 2
    assert dev.proc.wait(timeout=60) == 0
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(dev.base_url + "/healthz", timeout=2)
