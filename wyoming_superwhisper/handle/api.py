"""The same brain over HTTP: OpenAI-compatible ``/v1`` here, the Ollama API (:mod:`.ollama`) beside it.

Home Assistant's LLM conversation integrations (its ``llama_cpp`` one among
them) speak this protocol and can pass their home-control ``tools``; the
Wyoming ``handle`` protocol cannot. Same chain, limits and metrics behind it;
optional bearer-token auth (``handle.api_key``). The client sends the whole
conversation, so no server-side memory is used here.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..runtime.fallback import AllLevelsFailed, ClientGone
from .home import ToolError
from .ollama import OllamaRoutes, key_matches
from .prompts import apology, detect_language

if TYPE_CHECKING:
    from .service import HandleService

_LOGGER = logging.getLogger(__name__)


class OpenAIApi:
    """aiohttp app on ``handle.api_host:handle.api_port``; started and stopped by the service."""

    def __init__(self, service: HandleService) -> None:
        self.service = service
        self.settings = service.settings
        self.app = web.Application(middlewares=[self._auth], client_max_size=1024 * 1024)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        OllamaRoutes(service).register(self.app)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.api_host, self.settings.api_port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.settings.api_port
        _LOGGER.info("handle: OpenAI-compatible API on %s:%s", self.settings.api_host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.settings.api_key
        if key:
            given = request.headers.get("Authorization", "")
            if not key_matches(given, key):
                if not request.path.startswith("/v1"):  # the Ollama API's error shape
                    return web.json_response({"error": "unauthorized"}, status=401)
                return _error(401, "invalid or missing bearer token", "invalid_api_key")
        response: web.StreamResponse = await handler(request)
        return response

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        data = [
            {"id": engine.model or engine.name, "object": "model", "created": now, "owned_by": "superwhisper"}
            for engine in self.service.chain.engines
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not valid JSON", "invalid_request_error")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "'messages' must be a non-empty list of objects", "invalid_request_error")
        # Checked here: a malformed message fails in the model's chat template, which would
        # count as a failure of the model (a 503, and enough of them open its circuit).
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role or not isinstance(content, (str, list, type(None))):
                return _error(
                    400,
                    "each message needs a 'role' and a text (or parts) 'content'",
                    "invalid_request_error",
                )
        # null or left out (an assistant's tool calls): empty text, which every template takes
        messages = [{**m, "content": m.get("content") or ""} for m in messages]
        total = sum(len(str(m.get("content") or "")) for m in messages)
        if total > self.settings.max_chars * max(1, self.settings.memory_turns * 2 + 2):
            return _error(400, "conversation too long", "context_length_exceeded")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:  # not ``or``: an explicit 0 is a bad value, not "the default"
            max_tokens = body.get("max_completion_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            return _error(400, "'max_tokens' must be a positive integer", "invalid_request_error")
        last_user = next(
            (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), ""
        )
        language = detect_language(last_user, self.settings.language)
        extra = {k: body[k] for k in ("temperature", "top_p", "stop", "seed") if k in body}
        if not self.service.try_admit():
            self.service.context.metrics.count(self.service.name, "busy")
            return _error(429, "server busy", "rate_limit_exceeded")
        try:
            if body.get("stream"):
                return await self._stream(request, messages, language, max_tokens, body, extra)
            return await self._complete(messages, language, max_tokens, body, extra)
        finally:
            self.service.release()

    async def _complete(
        self,
        messages: list[Any],
        language: str,
        max_tokens: int | None,
        body: dict[str, Any],
        extra: dict[str, Any],
    ) -> web.Response:
        async def ignore(_: str) -> None:
            return None

        try:
            answer = await self.service.respond(
                messages, language, ignore, max_tokens=max_tokens,
                tools=body.get("tools"), tool_choice=body.get("tool_choice"), extra=extra,
            )  # fmt: skip
        except ToolError as error:
            self.service.context.metrics.count(self.service.name, "error")
            return _error(400, str(error), "invalid_request_error")
        except AllLevelsFailed as failure:
            _LOGGER.warning("handle API: no answer: %s", failure)
            self.service.context.metrics.count(self.service.name, "error")
            return _error(503, apology(language), "all_levels_failed")
        self.service.context.metrics.count(self.service.name, "fallback" if answer.fell_back else "ok")
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        finish = "stop" if answer.finish_reason not in ("length", "tool_calls") else answer.finish_reason
        if answer.tool_calls:
            message["tool_calls"] = list(answer.tool_calls)
            finish = "tool_calls"
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": answer.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }
        )

    async def _stream(
        self,
        request: web.Request,
        messages: list[Any],
        language: str,
        max_tokens: int | None,
        body: dict[str, Any],
        extra: dict[str, Any],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self.service.chain.engines[0].model if self.service.chain.engines else "superwhisper"

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {
                "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }  # fmt: skip
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        first = True

        async def on_chunk(piece: str) -> None:
            nonlocal first
            delta = {"role": "assistant", "content": piece} if first else {"content": piece}
            first = False
            try:
                await send(delta)
            except ConnectionError as error:  # the client left: not the model's failure
                raise ClientGone() from error

        try:
            answer = await self.service.respond(
                messages, language, on_chunk, max_tokens=max_tokens,
                tools=body.get("tools"), tool_choice=body.get("tool_choice"), extra=extra,
            )  # fmt: skip
        except ToolError as error:
            self.service.context.metrics.count(self.service.name, "error")
            await response.write(f"data: {json.dumps({'error': {'message': str(error)}})}\n\n".encode())
        except AllLevelsFailed:
            self.service.context.metrics.count(self.service.name, "error")
            await send({"role": "assistant", "content": apology(language)}, "stop")
        else:
            self.service.context.metrics.count(self.service.name, "fallback" if answer.fell_back else "ok")
            finish = "length" if answer.finish_reason == "length" else "stop"
            if answer.tool_calls:
                calls = [{"index": i, **call} for i, call in enumerate(answer.tool_calls)]
                await send({"tool_calls": calls})
                finish = "tool_calls"
            await send({}, finish)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": code, "code": code}}, status=status)
