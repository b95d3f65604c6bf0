"""Failover: the verifier serving a generation is killed mid-stream; the device
resumes the session on the other verifier with its history and the user gets
exactly the tokens of an uninterrupted run (greedy, and seeded sampling)."""

from __future__ import annotations

import os
import time

import openai
import pytest
from drafter_stack import Stack, tiny_cache
from sled_shared.nats_server import NatsServer

MODEL = "tiny-target"
MESSAGES = [{"role": "user", "content": "Write a long story about a quick brown fox."}]
MAX_TOKENS = 90
# Rounds wait this long for company on the verifier, so a generation lasts seconds.
WINDOW_MS = "60"


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    nats = NatsServer(workdir=tmp_path / "nats").start()
    env = {**tiny_cache(tmp_path / "cache", tiny_model_dir), "SLED_NATS_URL": nats.url}
    st = Stack(nats.url, {**os.environ, **env}, tmp_path)
    try:
        for vid in ("va", "vb"):
            st.verifier(vid, SLED_BATCH_WINDOW_MS=WINDOW_MS)
        st.drafter("dev", "tiny-draft", SLED_REQUEST_TIMEOUT_S="3")
        yield st
    finally:
        st.stop()
        nats.close()


def service(stack: Stack, name: str):
    return next(s for s in stack.services if s.name == name)


def stream(stack: Stack, **sampling):
    c = openai.OpenAI(
        base_url=service(stack, "dev").base_url + "/v1", api_key="x", max_retries=0, timeout=300
    )
    return c.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        **sampling,
    )


def collect(chunks) -> tuple[str, dict]:
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks[-1].to_dict()["sled"]


def serving_verifier(stack: Stack) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = [
            v for v in ("va", "vb") if service(stack, v).metric("sled_verifier_active_sessions") > 0
        ]
        if len(busy) == 1:
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("no single verifier holds the session")


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0), dict(temperature=1.0, top_p=0.95, seed=77)],
    ids=["greedy", "seeded-sampling"],
)
def test_killing_the_serving_verifier_loses_and_repeats_nothing(stack, sampling):
    want_text, want = collect(list(stream(stack, **sampling)))
    assert len(want["token_ids"]) >= 40, "the reference run is too short to interrupt"
    assert want["failovers"] == 0

    chunks = []
    victim = None
    for ch in stream(stack, **sampling):
        chunks.append(ch)
        if victim is None and len(chunks) == 4:
            victim = serving_verifier(stack)
            service(stack, victim).kill()
    text, got = collect(chunks)
    assert victim is not None
    assert got["failovers"] == 1
    assert got["verifier_id"] == ({"va", "vb"} - {victim}).pop()
    assert got["token_ids"] == want["token_ids"]
    assert text == want_text
    assert chunks[-1].usage.completion_tokens == len(want["token_ids"])
    assert service(stack, "dev").metric("sled_drafter_failovers_total") == 1
