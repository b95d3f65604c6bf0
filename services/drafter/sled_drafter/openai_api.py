"""The device's OpenAI-compatible HTTP API (aiohttp).

POST /v1/chat/completions and /v1/completions (streamed as SSE or whole),
GET /v1/models, /healthz and /readyz. Every failure is answered with
OpenAI's error object and a fitting status; nothing reaches the client as a
500 with a traceback. A generation ends (and its verifier session closes)
when the client goes away: aiohttp cancels the handler, or the next SSE
write fails.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sled_drafter import openai_format as fmt
from sled_drafter.errors import ApiError, BadRequest, NotFound
from sled_drafter.generation_types import GenerationRequest
from sled_drafter.openai_schema import ModelInfo, ParsedRequest, parse
from sled_drafter.session_runner import Generation, SessionRunner
from sled_drafter.text_output import TextOutput
from sled_drafter.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
ReadyCheck = Callable[[], dict[str, bool]]
_INTERNAL = {
    "error": {
        "message": "internal error; see the device's log",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@dataclass(slots=True)
class OpenAIApi:
    runner: SessionRunner
    tokenizer: Tokenizer
    models: ModelInfo
    ready: ReadyCheck

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_as_json])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model}", self._get_model)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.perf_counter()
        parsed = parse(await _json_body(request), chat, self.tokenizer, self.models)
        req = GenerationRequest(
            parsed.prompt_ids, parsed.max_tokens, parsed.params, seeded=parsed.seeded
        )
        gen = self.runner.generation(req, started=arrived)
        out = TextOutput.new(self.tokenizer, parsed.stop)
        meta = fmt.Meta(
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            created=int(time.time()),
            model=self.models.target,
            chat=chat,
        )
        ok = False
        try:
            async with gen:
                if parsed.stream:
                    response, ok = await self._stream(request, parsed, gen, out, meta)
                else:
                    async for ids in gen:
                        out.push(ids)
                        if out.stopped:
                            break
                    out.finish()
                    response = web.json_response(fmt.whole(meta, self._summary(parsed, gen, out)))
                    ok = True
            return response
        finally:
            self.runner.metrics.record_request("ok" if ok else "error")

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        gen: Generation,
        out: TextOutput,
        meta: fmt.Meta,
    ) -> tuple[web.StreamResponse, bool]:
        """Stream the generation; the flag says whether it ended without an error."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        usage = parsed.include_usage
        error: dict[str, Any] | None = None
        try:
            if meta.chat:
                await _send(response, fmt.chunk(meta, {"role": "assistant", "content": ""}, usage))
            async for ids in gen:
                text = out.push(ids)
                if text:
                    await _send(response, fmt.text_chunk(meta, text, usage))
                if out.stopped:
                    break
            tail = out.finish()
            if tail:
                await _send(response, fmt.text_chunk(meta, tail, usage))
            summary = self._summary(parsed, gen, out)
            for body in fmt.final_chunks(meta, summary, usage):
                await _send(response, body)
        except ConnectionResetError:
            log.info("client of %s went away; generation stopped", meta.id)
            raise
        except ApiError as exc:
            log.warning("stream %s failed: %s", meta.id, exc.message)
            error = exc.body()
        except Exception:
            log.exception("stream %s failed", meta.id)
            error = _INTERNAL
        if error is not None:
            # The headers are sent already: the error travels as an SSE event, as OpenAI does.
            await _send(response, error)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response, error is None

    def _summary(self, parsed: ParsedRequest, gen: Generation, out: TextOutput) -> fmt.Summary:
        finish = "stop" if out.stopped else gen.finish_reason or "length"
        return fmt.Summary(
            text=out.text,
            finish_reason=finish,
            prompt_tokens=len(parsed.prompt_ids),
            token_ids=list(out.token_ids),
            sled=fmt.extension(gen, out.token_ids, self.runner.config),
        )

    async def _list_models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def _get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self._model_cards():
            if card["id"] == name:
                return web.json_response(card)
        raise NotFound(
            f"the model '{name}' does not exist here", param="model", code="model_not_found"
        )

    def _model_cards(self) -> list[dict[str, Any]]:
        cfg = self.runner.config
        cards = [
            {
                "id": self.models.target,
                "object": "model",
                "created": 0,
                "owned_by": "sled",
                "root": self.models.target,
                "max_model_len": self.models.context_len,
                "sled": {
                    "role": "target",
                    "draft_model": cfg.draft_model,
                    "device": cfg.device_name,
                },
            }
        ]
        for name in self.models.served[1:]:
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "sled",
                    "root": self.models.target,
                    "parent": self.models.target,
                    "sled": {"role": "draft", "device": cfg.device_name},
                }
            )
        return cards

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks = self.ready()
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.body(), exc.retry_after_s)
    except web.HTTPException as exc:  # unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        body = {
            "error": {
                "message": exc.reason,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        return _error_response(exc.status, body, None, exc.headers.get("Allow"))
    except Exception:
        log.exception("request %s %s failed", request.method, request.path)
        return _error_response(500, _INTERNAL, None)


def _error_response(
    status: int, body: dict[str, Any], retry_after_s: float | None, allow: str | None = None
) -> web.Response:
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    if allow is not None:
        headers["Allow"] = allow
    return web.json_response(body, status=status, headers=headers)
