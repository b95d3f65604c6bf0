"""Request parsing: what is accepted, defaulted and refused (with the field named)."""

import pytest
from sled_drafter.errors import BadRequest, NotFound
from sled_drafter.openai_schema import ModelInfo, parse
from sled_drafter.tokenizer import Tokenizer

MODELS = ModelInfo(("target", "draft"), context_len=64)
CHAT = {"model": "target", "messages": [{"role": "user", "content": "the fox"}]}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir / "hf")


def test_defaults_follow_openai(tok):
    p = parse(CHAT, True, tok, MODELS)
    assert p.prompt_ids == tuple(tok.apply_chat_template(CHAT["messages"]))
    assert p.max_tokens == MODELS.context_len - len(p.prompt_ids)  # the rest of the context
    assert p.params.temperature == 1.0 and p.params.top_p == 1.0 and p.params.top_k == 0
    assert p.params.seed is not None and not p.seeded
    assert not p.stream and not p.include_usage and p.stop == ()


def test_fields_are_honoured(tok):
    body = CHAT | {
        "model": "draft",
        "max_tokens": 3,
        "max_completion_tokens": 5,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": -1,
        "seed": 9,
        "stop": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "user": "someone",
    }
    p = parse(body, True, tok, MODELS)
    assert p.max_tokens == 5  # max_completion_tokens wins over the older max_tokens
    assert p.params.greedy and p.params.top_p == 0.5 and p.params.top_k == 0
    assert p.params.seed == 9 and p.seeded and p.stop == ("x",)
    assert p.stream and p.include_usage


def test_content_parts_and_prompt_forms(tok):
    parts = {
        "model": "target",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "fox"}],
            }
        ],
    }
    assert parse(parts, True, tok, MODELS).prompt_ids == parse(CHAT, True, tok, MODELS).prompt_ids
    ids = tok.encode("the fox")
    for prompt in ("the fox", ["the fox"], ids, [ids]):
        assert parse({"model": "target", "prompt": prompt}, False, tok, MODELS).prompt_ids == (
            tuple(ids)
        )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        (CHAT | {"messages": [{"role": "user"}]}, "messages"),
        (CHAT | {"messages": "hi"}, "messages"),
        (CHAT | {"max_tokens": "5"}, "max_tokens"),
        (CHAT | {"max_tokens": True}, "max_tokens"),
        (CHAT | {"temperature": float("nan")}, "temperature"),
        (CHAT | {"top_k": -2}, "top_k"),
        (CHAT | {"seed": 2**64}, "seed"),
        (CHAT | {"stop": ["a", 3]}, "stop"),
        (CHAT | {"stream": "yes"}, "stream"),
        (CHAT | {"stream_options": {"include_usage": 1}}, "include_usage"),
        (CHAT | {"presence_penalty": 0.5}, "presence_penalty"),
        (CHAT | {"tools": [{"type": "function"}]}, "tools"),
        (CHAT | {"response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "target"}, "messages"),
    ],
)
def test_bad_chat_fields_are_refused_by_name(tok, body, param):
    with pytest.raises(BadRequest) as info:
        parse(body, True, tok, MODELS)
    assert info.value.param == param and info.value.status == 400


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], [10**6], "", [], {"text": "x"}, None])
def test_bad_prompts_are_refused(tok, prompt):
    with pytest.raises(BadRequest) as info:
        parse({"model": "target", "prompt": prompt}, False, tok, MODELS)
    assert info.value.param == "prompt"


def test_model_and_context_limits(tok):
    with pytest.raises(NotFound) as info:
        parse(CHAT | {"model": "other"}, True, tok, MODELS)
    assert info.value.status == 404 and info.value.code == "model_not_found"
    with pytest.raises(BadRequest) as info:
        parse({"model": "target", "prompt": list(range(64))}, False, tok, MODELS)
    assert info.value.code == "context_length_exceeded"
    assert (
        parse(
            {"model": "target", "prompt": [1] * 63, "max_tokens": 1}, False, tok, MODELS
        ).max_tokens
        == 1
    )
    with pytest.raises(BadRequest):
        parse({"model": "target", "prompt": [1] * 63, "max_tokens": 2}, False, tok, MODELS)
    with pytest.raises(BadRequest):
        parse([CHAT], True, tok, MODELS)
