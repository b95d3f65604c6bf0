"""OpenAI request bodies -> a checked ``ParsedRequest``; every refusal is a
``BadRequest`` (or ``NotFound`` for the model) naming the offending field.

Unknown fields are ignored, as clients add their own; fields this server
knows but cannot honour (n > 1, logprobs, tools, penalties) are refused
rather than silently dropped.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sled_shared.speculative import SamplingParams

from sled_drafter.errors import BadRequest, NotFound
from sled_drafter.text_output import MAX_STOP_CHARS, MAX_STOP_STRINGS
from sled_drafter.tokenizer import Tokenizer, TokenizerError

_U64 = 1 << 64
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    served: tuple[str, ...]  # names a request may ask for: the target first, then the draft
    context_len: int  # prompt + generated tokens a session may hold

    @property
    def target(self) -> str:
        return self.served[0]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    chat: bool
    prompt_ids: tuple[int, ...]
    max_tokens: int
    params: SamplingParams  # seed always set
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    seeded: bool  # the user gave the seed


def _field(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"'{name}' must be {what}, got a boolean", param=name, code="invalid_type")
    if not isinstance(value, kinds):
        raise BadRequest(
            f"'{name}' must be {what}, got {type(value).__name__}", param=name, code="invalid_type"
        )
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float, low_open: bool = False):
    value = _field(body, name, (int, float), "a number")
    if value is None:
        return None
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise BadRequest(
            f"'{name}' must be in {bound}, got {value}", param=name, code="invalid_value"
        )
    return float(value)


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest(
            "'stop' must be a string or a list of strings", param="stop", code="invalid_type"
        )
    if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise BadRequest(
            f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            param="stop",
            code="invalid_value",
        )
    return tuple(dict.fromkeys(stops))


def _refuse_unsupported(body: Mapping[str, Any], chat: bool) -> None:
    n = _field(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise BadRequest("only n=1 is supported", param="n", code="invalid_value")
    best_of = _field(body, "best_of", int, "an integer")
    if best_of is not None and best_of != 1:
        raise BadRequest("only best_of=1 is supported", param="best_of", code="invalid_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0) not in (None, 0.0):
            raise BadRequest(
                f"'{name}' is not supported (it would change the target's distribution)",
                param=name,
                code="unsupported_parameter",
            )
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        value = body.get(name)
        if value not in (None, False, 0, "", [], {}):
            raise BadRequest(f"'{name}' is not supported", param=name, code="unsupported_parameter")
    fmt = body.get("response_format")
    if chat and fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise BadRequest(
            "only response_format {'type': 'text'} is supported",
            param="response_format",
            code="unsupported_parameter",
        )


def _chat_prompt(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "'messages' must be a non-empty list",
            param="messages",
            code="invalid_type" if messages is not None else "missing_required_parameter",
        )
    flat = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise BadRequest(f"messages[{i}] must be an object", param="messages")
        content = msg.get("content")
        if isinstance(content, list):  # content parts: only text ones can be served
            if not all(
                isinstance(p, Mapping)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
                for p in content
            ):
                raise BadRequest(
                    f"messages[{i}].content: only text parts are supported", param="messages"
                )
            content = "".join(p["text"] for p in content)
        flat.append({"role": msg.get("role"), "content": content})
    try:
        return tokenizer.apply_chat_template(flat)
    except TokenizerError as exc:
        raise BadRequest(str(exc), param="messages") from None


def _completion_prompt(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        if prompt and not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise BadRequest(
                f"prompt token ids must be in [0, {tokenizer.vocab_size})",
                param="prompt",
                code="invalid_value",
            )
        return list(prompt)
    if prompt is None:
        raise BadRequest("'prompt' is required", param="prompt", code="missing_required_parameter")
    raise BadRequest(
        "'prompt' must be a string or a list of token ids (one prompt per request)",
        param="prompt",
        code="invalid_type",
    )


def parse(body: Any, chat: bool, tokenizer: Tokenizer, models: ModelInfo) -> ParsedRequest:
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required", param="model", code="missing_required_parameter")
    if model not in models.served:
        raise NotFound(
            f"the model '{model}' does not exist here; served: {', '.join(models.served)}",
            param="model",
            code="model_not_found",
        )
    _refuse_unsupported(body, chat)
    stream = _field(body, "stream", bool, "a boolean") or False
    options = _field(body, "stream_options", dict, "an object") or {}
    include_usage = _field(options, "include_usage", bool, "a boolean") or False
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    top_k = _field(body, "top_k", int, "an integer")
    if top_k is not None and top_k < 0 and top_k != -1:
        raise BadRequest("'top_k' must be >= 0 (0 or -1: off)", param="top_k", code="invalid_value")
    seed = _field(body, "seed", int, "an integer")
    if seed is not None and not 0 <= seed < _U64:
        raise BadRequest("'seed' must be in [0, 2**64)", param="seed", code="invalid_value")
    stops = _stops(body)
    ids = _chat_prompt(body, tokenizer) if chat else _completion_prompt(body, tokenizer)
    if not ids:
        raise BadRequest(
            "the prompt is empty", param="messages" if chat else "prompt", code="invalid_value"
        )
    room = models.context_len - len(ids)
    if room < 1:
        raise BadRequest(
            f"this model's maximum context length is {models.context_len} tokens; the prompt "
            f"has {len(ids)}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _field(body, name, int, "an integer")
    if max_tokens is None:
        max_tokens = room
    elif not 1 <= max_tokens <= room:
        raise BadRequest(
            f"'{name}' must be in [1, {room}]: the context holds {models.context_len} tokens and "
            f"the prompt takes {len(ids)}",
            param=name,
            code="invalid_value",
        )
    params = SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=max(top_k or 0, 0),
        seed=secrets.randbits(63) if seed is None else seed,
    )
    return ParsedRequest(
        chat, tuple(ids), max_tokens, params, stops, stream, include_usage, seed is not None
    )
