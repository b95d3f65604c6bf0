"""The device's OpenAI API through the real `openai` client, end to end.

Real processes: nats-server, a verifier on the tiny random Llama, and two
drafters (n-gram and the tiny model's ONNX export). Greedy outputs are
checked token for token against transformers' own greedy decoding of the
same weights.
"""

from __future__ import annotations

import json
import os

import openai
import pytest
import torch
from drafter_stack import Stack, http_get, http_post, tiny_cache
from sled_drafter.tokenizer import Tokenizer
from sled_shared.nats_server import NatsServer
from transformers import AutoModelForCausalLM

MODEL = "tiny-target"
DRAFTS = ["ngram", "tiny-draft"]
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("stack")
    nats = NatsServer(workdir=tmp / "nats").start()
    env = {**tiny_cache(tmp / "cache", tiny_model_dir), "SLED_NATS_URL": nats.url}
    st = Stack(nats.url, {**os.environ, **env}, tmp)
    try:
        st.verifier("v-api")
        for draft in DRAFTS:
            st.drafter(f"dev-{draft}", draft, SLED_MAX_K="4")
        yield st
    finally:
        st.stop()
        nats.close()


def drafter(stack: Stack, draft: str = "ngram"):
    return next(s for s in stack.services if s.name == f"dev-{draft}")


def client(stack: Stack, draft: str = "ngram") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=drafter(stack, draft).base_url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir / "hf")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "hf", dtype=torch.float32).eval()

    def greedy(prompt_ids: list[int], max_new: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt_ids]),
                do_sample=False,
                max_new_tokens=max_new,
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            )
        return out[0, len(prompt_ids) :].tolist()

    return greedy


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    # The tiny model's vocabulary (512) is padded past its tokenizer's: those ids have no text.
    return tok.decode([i for i in ids if i < tok.vocab_size])


def sled(resp) -> dict:
    return resp.to_dict()["sled"]


def test_models_lists_the_target_and_the_draft(stack):
    names = [m.id for m in client(stack, "tiny-draft").models.list()]
    assert names == [MODEL, "tiny-draft"]
    assert client(stack).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(stack).models.retrieve("gpt-4")


@pytest.mark.parametrize("draft", DRAFTS)
def test_greedy_chat_equals_the_target_and_reports_usage(stack, tok, reference, draft):
    resp = client(stack, draft).chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=48
    )
    ext = sled(resp)
    prompt = tok.apply_chat_template(MESSAGES)
    want = reference(prompt, 48)
    assert ext["token_ids"] == want
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text_of(tok, want)
    assert choice.finish_reason == ("stop" if want[-1] == 2 else "length")
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == len(want)
    assert resp.usage.total_tokens == len(prompt) + len(want)
    assert ext["draft_model"] == draft and ext["device"] == f"dev-{draft}"
    assert ext["verifier_id"] == "v-api" and ext["failovers"] == 0
    assert 1 <= ext["rounds"] <= len(want)
    assert 0 <= ext["accepted"] <= ext["drafted"] <= 4 * ext["rounds"]
    # Each round commits its accepted drafts plus one token; the open commits the first.
    assert 1 + ext["accepted"] + ext["rounds"] >= len(want)
    assert ext["ttft_s"] > 0 and ext["tpot_s"] >= 0


def test_streamed_chat_concatenates_to_the_whole_text(stack):
    c = client(stack, "tiny-draft")
    args = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40)
    whole = c.chat.completions.create(**args)
    chunks = list(
        c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert [f.choices[0].finish_reason for f in finishing] == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert sled(last)["token_ids"] == sled(whole)["token_ids"]
    assert len({ch.id for ch in chunks}) == 1


def test_completions_whole_streamed_and_from_token_ids(stack, tok, reference):
    c = client(stack)
    prompt = "Speculative decoding drafts tokens"
    ids = tok.encode(prompt)
    whole = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30)
    assert whole.object == "text_completion"
    assert sled(whole)["token_ids"] == reference(ids, 30)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=30, stream=True
        )
        if ch.choices
    )
    assert streamed == whole.choices[0].text
    from_ids = c.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=30)
    assert from_ids.choices[0].text == whole.choices[0].text


def test_a_stop_string_cuts_the_text_right_before_it(stack, tok):
    c = client(stack, "tiny-draft")
    args = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=60)
    full = c.chat.completions.create(**args)
    text, ids = full.choices[0].message.content, sled(full)["token_ids"]
    # A stop string taken from the middle of the greedy text.
    stop = next(
        text[i : i + 3]
        for i in range(len(text) // 2, len(text) - 3)
        if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3]
    )
    cut = c.chat.completions.create(**args, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kept = sled(cut)["token_ids"]
    assert kept == ids[: len(kept)] and len(kept) < len(ids)
    assert cut.usage.completion_tokens == len(kept)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(**args, stop=stop, stream=True)
        if ch.choices
    )
    assert streamed == cut.choices[0].message.content


@pytest.mark.parametrize("draft", DRAFTS)
def test_seeded_sampling_is_reproducible(stack, draft):
    c = client(stack, draft)
    args = dict(model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.9, max_tokens=32)
    first = sled(c.chat.completions.create(**args, seed=1234))
    again = sled(c.chat.completions.create(**args, seed=1234))
    assert first["token_ids"] == again["token_ids"] and first["seed"] == 1234
    others = [sled(c.chat.completions.create(**args, seed=s))["token_ids"] for s in (1, 2, 3)]
    assert any(o != first["token_ids"] for o in others)
    unseeded = sled(c.chat.completions.create(**args))
    assert isinstance(unseeded["seed"], int)


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        (dict(model="gpt-4"), openai.NotFoundError, "model"),
        (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(max_tokens=5000), openai.BadRequestError, "max_tokens"),
        (dict(max_completion_tokens=-3), openai.BadRequestError, "max_completion_tokens"),
        (
            dict(messages=[{"role": "user", "content": "fox " * 4200}]),
            openai.BadRequestError,
            "messages",
        ),
        (dict(messages=[]), openai.BadRequestError, "messages"),
        (dict(temperature=3.5), openai.BadRequestError, "temperature"),
        (dict(top_p=0), openai.BadRequestError, "top_p"),
        (dict(n=2), openai.BadRequestError, "n"),
        (dict(seed=-1), openai.BadRequestError, "seed"),
        (dict(stop=[""]), openai.BadRequestError, "stop"),
        (dict(logprobs=True), openai.BadRequestError, "logprobs"),
    ],
)
def test_bad_requests_raise_the_matching_client_error(stack, kwargs, error, param):
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=8) | kwargs
    with pytest.raises(error) as info:
        client(stack).chat.completions.create(**args)
    # The client unwraps OpenAI's {"error": {...}} envelope.
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert info.value.param == param
    assert body["param"] == param and body["message"]
    if param == "messages" and "content" in str(kwargs):
        assert body["code"] == "context_length_exceeded"


def test_malformed_bodies_and_unknown_routes_get_openai_errors(stack):
    base = drafter(stack).base_url
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        status, _, body = http_post(base + "/v1/chat/completions", raw)
        assert status == 400, raw
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = http_post(base + "/v1/completions", json.dumps({"model": MODEL}).encode())
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"
    status, body = http_get(base + "/v1/embeddings")
    assert status == 404 and json.loads(body)["error"]["message"]
    status, _, body = http_post(base + "/v1/models", b"{}")
    assert status == 405 and "error" in json.loads(body)


def test_health_readiness_and_metrics(stack):
    d = drafter(stack, "tiny-draft")
    assert http_get(d.base_url + "/healthz")[0] == 200
    status, body = http_get(d.base_url + "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {
        "model": True,
        "nats": True,
        "accepting": True,
    }
    before = d.metric("sled_drafter_rounds_total")
    resp = client(stack, "tiny-draft").chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=16
    )
    ext = sled(resp)
    assert d.metric("sled_drafter_rounds_total") - before == ext["rounds"]
    assert d.metric("sled_drafter_draft_tokens_total") >= ext["drafted"] > 0
    assert d.metric("sled_drafter_ttft_seconds_count") >= 1
    assert d.metric("sled_drafter_active_sessions") == 0
