"""`sled generate` finds a device on NATS by name and prints its completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest
from drafter_stack import Stack, tiny_cache
from sled_shared.nats_server import NatsServer

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("cli")
    nats = NatsServer(workdir=tmp / "nats").start()
    env = {**tiny_cache(tmp / "cache", tiny_model_dir), "SLED_NATS_URL": nats.url}
    st = Stack(nats.url, {**os.environ, **env}, tmp)
    try:
        st.verifier("v-cli")
        st.drafter("alpha", "ngram")
        st.drafter("beta", "tiny-draft")
        yield st
    finally:
        st.stop()
        nats.close()


def sled(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sled_shared", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=stack.env,
    )


def api_answer(stack: Stack, device: str, **kw) -> tuple[str, list[int]]:
    svc = next(s for s in stack.services if s.name == device)
    c = openai.OpenAI(base_url=svc.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    resp = c.chat.completions.create(
        model="tiny-target", messages=[{"role": "user", "content": PROMPT}], **kw
    )
    return resp.choices[0].message.content, resp.to_dict()["sled"]["token_ids"]


def test_json_output_names_the_device_and_matches_the_api(stack):
    run = sled(stack, "--prompt", PROMPT, "--device", "beta", "--max-tokens", "24", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    text, ids = api_answer(stack, "beta", temperature=0, max_tokens=24)
    assert out["token_ids"] == ids and out["text"] == text
    assert out["device"] == "beta" and out["draft_model"] == "tiny-draft"
    assert out["verifier_id"] == "v-cli" and out["rounds"] >= 1
    assert 0 <= out["accepted"] <= out["drafted"]
    assert out["ttft_s"] > 0 and out["usage"]["completion_tokens"] == len(ids)


def test_streamed_text_equals_the_api_text(stack):
    run = sled(stack, "--prompt", PROMPT, "--device", "alpha", "--max-tokens", "24")
    assert run.returncode == 0, run.stderr
    text, _ = api_answer(stack, "alpha", temperature=0, max_tokens=24)
    assert run.stdout == text + "\n"


def test_seeded_sampling_through_the_cli_is_reproducible(stack):
    args = (
        "--prompt",
        PROMPT,
        "--device",
        "beta",
        "--max-tokens",
        "16",
        "--json",
        "--temperature",
        "1.0",
        "--seed",
        "5",
    )
    first, second = (json.loads(sled(stack, *args).stdout) for _ in range(2))
    assert first["token_ids"] == second["token_ids"] and first["seed"] == 5


def test_unknown_device_and_bad_url_are_one_line_errors(stack):
    run = sled(stack, "--prompt", PROMPT, "--device", "nope")
    assert run.returncode == 1
    assert "no device 'nope'" in run.stderr and "alpha" in run.stderr and "beta" in run.stderr
    assert "Traceback" not in run.stderr
    run = sled(stack, "--prompt", PROMPT, "--url", "http://127.0.0.1:9", "--timeout", "5")
    assert run.returncode == 1 and "Traceback" not in run.stderr
