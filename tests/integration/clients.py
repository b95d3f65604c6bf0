"""Talking to the running stack as its users do: the real `openai` client
against a device's OpenAI-compatible API, several requests at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import openai
from sled_shared.models.registry import DEFAULT_TARGET
from stack import LocalStack

TIMEOUT_S = 600.0
T = TypeVar("T")


def chat(stack: LocalStack, device: str, prompt: str, **kw: Any) -> dict[str, Any]:
    """One chat completion (greedy unless ``kw`` says otherwise); the whole body as a dict."""
    client = openai.OpenAI(
        base_url=stack.url(device, "openai") + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=TIMEOUT_S,
    )
    resp = client.chat.completions.create(
        model=DEFAULT_TARGET,
        messages=[{"role": "user", "content": prompt}],
        **({"temperature": 0} | kw),
    )
    return resp.to_dict()


def concurrently(calls: list[Callable[[], T]]) -> list[T]:
    """Run the calls in threads released together, so their requests overlap."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))
