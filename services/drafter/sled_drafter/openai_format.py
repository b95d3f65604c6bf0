"""OpenAI response bodies: whole completions, stream chunks, usage, and the
``sled`` extension object (rounds, acceptance, token ids, timings) that rides
on the final response or chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sled_drafter.generation_types import DrafterConfig
from sled_drafter.session_runner import Generation


@dataclass(frozen=True, slots=True)
class Meta:
    id: str
    created: int
    model: str
    chat: bool

    def head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


@dataclass(frozen=True, slots=True)
class Summary:
    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int]
    sled: dict[str, Any]

    @property
    def usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


def extension(gen: Generation, token_ids: list[int], config: DrafterConfig) -> dict[str, Any]:
    s = gen.stats
    return {
        "rounds": s.rounds,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "acceptance": s.acceptance,
        "failovers": s.failovers,
        "token_ids": token_ids,
        "ttft_s": s.ttft_s,
        "tpot_s": s.tpot_s,
        "draft_s": s.draft_s,
        "draft_model": config.draft_model,
        "device": config.device_name,
        "verifier_id": s.verifier_id,
        "seed": gen.req.params.seed,
    }


def whole(meta: Meta, summary: Summary) -> dict[str, Any]:
    if meta.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": summary.text}}
    else:
        choice = {"index": 0, "text": summary.text}
    choice |= {"logprobs": None, "finish_reason": summary.finish_reason}
    return meta.head(chunk=False) | {
        "choices": [choice],
        "usage": summary.usage,
        "sled": summary.sled,
    }


def chunk(
    meta: Meta, delta: dict[str, Any], with_usage: bool, finish_reason: str | None = None
) -> dict[str, Any]:
    """One streamed choice; ``delta`` is the chat delta (completions take its content)."""
    if meta.chat:
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": delta.get("content", "")}
    choice |= {"logprobs": None, "finish_reason": finish_reason}
    body = meta.head(chunk=True) | {"choices": [choice]}
    if with_usage:  # OpenAI sends "usage": null on every chunk but the last
        body["usage"] = None
    return body


def text_chunk(meta: Meta, text: str, with_usage: bool) -> dict[str, Any]:
    return chunk(meta, {"content": text}, with_usage)


def final_chunks(meta: Meta, summary: Summary, with_usage: bool) -> list[dict[str, Any]]:
    """The finishing chunk, then (when asked) the usage chunk; the last carries ``sled``."""
    last = chunk(meta, {}, with_usage, summary.finish_reason)
    out = [last]
    if with_usage:
        last = meta.head(chunk=True) | {"choices": [], "usage": summary.usage}
        out.append(last)
    last["sled"] = summary.sled
    return out
