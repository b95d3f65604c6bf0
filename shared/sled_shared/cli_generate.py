"""`sled generate`: one completion from a device's OpenAI API.

The device is found on NATS (SLED_NATS_URL) through nats.micro discovery:
every drafter registers as ``sled-drafter`` with its device name and HTTP
URL in its metadata. ``--url`` skips discovery. Text is streamed to stdout
as it is generated; ``--json`` prints the finished completion's token ids,
text and speculative-decoding figures instead. Only the standard library
talks HTTP, so the shared package stays light.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from sled_shared.cli import CliError

DRAFTER_SERVICE = "sled-drafter"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text on a device (found on NATS, or at --url)",
        description="Send one chat message to a device's OpenAI-compatible API and print "
        "the answer as it streams in.",
    )
    p.add_argument("--prompt", required=True, help="the user message")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", help="device name (default: the first one found)")
    where.add_argument("--url", help="the device's API base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print token ids, text and figures")
    p.add_argument("--wait", type=float, default=1.0, metavar="S", help="discovery time")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="HTTP timeout")
    p.set_defaults(func=_run)


def find_device(device: str | None, wait_s: float) -> tuple[str, str]:
    """(device name, API URL) of the named drafter, or of the first one found."""
    drafters = asyncio.run(_drafters(wait_s))
    if not drafters:
        raise CliError("no drafter answered on NATS; start one (`sled up`) or pass --url")
    if device is None:
        name = min(drafters)
        if len(drafters) > 1:
            print(
                f"(device {name}; others: {', '.join(sorted(set(drafters) - {name}))})",
                file=sys.stderr,
            )
        return name, drafters[name]
    if device not in drafters:
        raise CliError(f"no device {device!r} on NATS; found: {', '.join(sorted(drafters))}")
    return device, drafters[device]


async def _drafters(wait_s: float) -> dict[str, str]:
    from sled_shared.cli_status import discover_at

    _, services = await discover_at("sled-generate", wait_s)
    found = {}
    for svc in services:
        info = svc.get("info") or {}
        meta = info.get("metadata") or {}
        if info.get("name") == DRAFTER_SERVICE and meta.get("device") and meta.get("http_url"):
            found[meta["device"]] = meta["http_url"]
    return found


def _request(url: str, body: dict[str, Any] | None, timeout: float):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.reason
        raise CliError(f"{url}: HTTP {err.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _events(resp) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream, up to ``data: [DONE]``."""
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            raise CliError(f"generation failed: {event['error'].get('message')}")
        yield event


def _body(args: argparse.Namespace, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stream": stream,
    }
    if args.raw:
        body["prompt"] = args.prompt
    else:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _summary(done: dict[str, Any], text: str) -> dict[str, Any]:
    ext = done.get("sled", {})
    keys = (
        "rounds",
        "drafted",
        "accepted",
        "acceptance",
        "ttft_s",
        "tpot_s",
        "failovers",
        "device",
        "draft_model",
        "verifier_id",
        "seed",
    )
    choice = (done.get("choices") or [{}])[0]
    return {
        "text": text,
        "token_ids": ext.get("token_ids", []),
        "finish_reason": choice.get("finish_reason"),
        "usage": done.get("usage"),
        **{k: ext.get(k) for k in keys},
    }


def _run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CliError("--max-tokens must be >= 1")
    if args.url:
        base = args.url.rstrip("/")
    else:
        _name, base = find_device(args.device, args.wait)
    with _request(base + "/v1/models", None, args.timeout) as resp:
        model = json.load(resp)["data"][0]["id"]
    path = "/v1/completions" if args.raw else "/v1/chat/completions"
    if args.json:
        with _request(base + path, _body(args, model, stream=False), args.timeout) as resp:
            done = json.load(resp)
        choice = done["choices"][0]
        text = choice["text"] if args.raw else choice["message"]["content"]
        print(json.dumps(_summary(done, text), indent=2))
        return 0
    with _request(base + path, _body(args, model, stream=True), args.timeout) as resp:
        for event in _events(resp):
            for choice in event.get("choices", []):
                piece = choice.get("text") if args.raw else choice.get("delta", {}).get("content")
                if piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
