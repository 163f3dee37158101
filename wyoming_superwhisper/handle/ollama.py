"""The same brain over the Ollama API: ``/api/chat``, ``/api/generate``, ``/api/tags``...

Home Assistant's Ollama integration (2025.4: ``ollama==0.4.7``) hands the
model the Assist API tools and executes the calls it makes, so serving this
protocol is what lets a Home Assistant user's lights obey our model. Routes
live on the handle service's HTTP API beside ``/v1`` (:mod:`.api`): same
chain, limits, auth and metrics.

Models: ``superwhisper`` (the whole chain, in order) and each chain level's
model by its catalog name (the chain starting at that level). A name Ollama
would not know is a 404 with Ollama's own wording, so the ``ollama`` client
raises ``ResponseError(status_code=404)`` as it would against Ollama.

What is deliberately not Ollama: models stay loaded (``keep_alive`` is
validated and reported but never unloads), ``/api/pull`` of a model the chain
has is an instant success (of one it lacks, Ollama's "file does not exist"),
and ``options.num_ctx`` above the loaded context is ignored; the history is
trimmed from its oldest turns to fit instead of failing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..runtime.fallback import AllLevelsFailed, ClientGone
from .home import ToolError
from .prompts import apology, detect_language

if TYPE_CHECKING:
    from .service import HandleService

_LOGGER = logging.getLogger(__name__)

CHAIN_MODEL = "superwhisper"
OLLAMA_VERSION = "0.6.5"
"""The Ollama release whose API this mirrors (clients check features by version)."""
_OPTION_MAP = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class OllamaRequestError(ValueError):
    """A request Ollama would refuse: ``status`` and Ollama-worded ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> web.Response:
    """Ollama's error shape: ``{"error": "..."}``."""
    return web.json_response({"error": message}, status=status)


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from Ollama's ``keep_alive`` (``"5m"``, ``"-1s"``, ``300``); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise OllamaRequestError(400, 'keep_alive must be a duration like "5m" or a number of seconds')
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value).strip()) if isinstance(value, str) else None
    if match is None:
        raise OllamaRequestError(400, f'time: invalid duration "{value}"')
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class OllamaRoutes:
    """``/api/*`` handlers on the handle API's aiohttp app."""

    def __init__(self, service: HandleService) -> None:
        self.service = service
        self.settings = service.settings

    def register(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/", self.root)
        router.add_get("/api/version", self.version)
        router.add_get("/api/tags", self.tags)
        router.add_get("/api/ps", self.ps)
        router.add_post("/api/show", self.show)
        router.add_post("/api/pull", self.pull)
        router.add_post("/api/chat", self.chat)
        router.add_post("/api/generate", self.generate)

    # -- the models ---------------------------------------------------------------------

    def models(self) -> list[tuple[str, int | None]]:
        """(Ollama name, first chain level) for every model a client may name."""
        names: list[tuple[str, int | None]] = [(f"{CHAIN_MODEL}:latest", None)]
        for index, engine in enumerate(self.service.chain.engines):
            name = engine.model or engine.name
            tagged = name if ":" in name else f"{name}:latest"
            if tagged not in (n for n, _ in names):
                names.append((tagged, index))
        return names

    def resolve(self, name: Any) -> int | None:
        """The chain level a model name starts at (None: the whole chain); 404 if unknown."""
        if not isinstance(name, str) or not name.strip():
            raise OllamaRequestError(400, "model is required")
        wanted = name.strip() if ":" in name else f"{name.strip()}:latest"
        for known, level in self.models():
            if known == wanted:
                return level
        raise OllamaRequestError(404, f'model "{name}" not found, try pulling it first')

    def _model_entry(self, name: str, level: int | None) -> dict[str, Any]:
        engine = self.service.chain.engines[level or 0] if self.service.chain.engines else None
        size = 0
        path = getattr(engine, "model_path", None)
        if path is not None:
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
        return {
            "name": name,
            "model": name,
            "modified_at": _now(),
            "size": size,
            "digest": _digest(name),
            "details": {
                "parent_model": "",
                "format": "gguf" if path is not None else "remote",
                "family": "superwhisper" if level is None else (engine.model if engine else ""),
                "families": None,
                "parameter_size": "",
                "quantization_level": "",
            },
        }

    # -- small endpoints ---------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION, "superwhisper": __version__})

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._model_entry(n, lvl) for n, lvl in self.models()]})

    async def ps(self, request: web.Request) -> web.Response:
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)).isoformat().replace("+00:00", "Z")
        loaded = []
        for name, level in self.models():
            entry = self._model_entry(name, level)
            entry.update({"expires_at": expires, "size_vram": 0})
            loaded.append(entry)
        return web.json_response({"models": loaded})

    async def show(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            name = body.get("model") or body.get("name")
            level = self.resolve(name)
        except OllamaRequestError as error:
            return error_response(error.status, str(error))
        engine = self.service.chain.engines[level or 0]
        entry = self._model_entry(str(name), level)
        capabilities = ["completion"]
        if getattr(engine, "supports_tools", False) or getattr(engine, "model_path", None) is not None:
            capabilities.append("tools")
        return web.json_response(
            {
                "modelfile": (
                    f"# served by wyoming-superwhisper {__version__}\nFROM {engine.model or engine.name}\n"
                ),
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": entry["details"],
                "model_info": {"general.architecture": entry["details"]["family"]},
                "capabilities": capabilities,
                "modified_at": entry["modified_at"],
            }
        )

    async def pull(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            name = body.get("model") or body.get("name")
            self.resolve(name)
        except OllamaRequestError as error:
            if error.status == 404:
                return error_response(500, "pull model manifest: file does not exist")
            return error_response(error.status, str(error))
        if body.get("stream") is False:
            return web.json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for status in ("pulling manifest", "verifying sha256 digest", "success"):
            await response.write(json.dumps({"status": status}).encode() + b"\n")
        await response.write_eof()
        return response

    # -- chat and generate ---------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            level = self.resolve(body.get("model"))
            parse_keep_alive(body.get("keep_alive"))
            messages = chat_messages(body.get("messages"))
            options = _options(body.get("options"))
            tools = body.get("tools") or None
            if tools is not None and not isinstance(tools, list):
                raise OllamaRequestError(400, "tools must be a list")
        except OllamaRequestError as error:
            return error_response(error.status, str(error))
        model = str(body["model"])
        if not messages:
            return _load_reply(model, body, chat=True)
        return await self._answer(request, body, model, level, messages, tools, options, chat=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            level = self.resolve(body.get("model"))
            parse_keep_alive(body.get("keep_alive"))
            options = _options(body.get("options"))
            prompt = body.get("prompt", "")
            system = body.get("system")
            if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
                raise OllamaRequestError(400, "prompt and system must be strings")
        except OllamaRequestError as error:
            return error_response(error.status, str(error))
        model = str(body["model"])
        if not prompt.strip():
            return _load_reply(model, body, chat=False)
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        return await self._answer(request, body, model, level, messages, None, options, chat=False)

    async def _answer(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        model: str,
        level: int | None,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        options: dict[str, Any],
        *,
        chat: bool,
    ) -> web.StreamResponse:
        service = self.service
        metrics = service.context.metrics
        messages = trim_history(
            messages, self.settings.max_chars * max(1, self.settings.memory_turns * 2 + 2)
        )
        last_user = next(
            (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), ""
        )
        language = detect_language(last_user, self.settings.language)
        max_tokens = options.pop("num_predict", None)
        stream = body.get("stream", True) is not False
        if not service.try_admit():
            metrics.count(service.name, "busy")
            return error_response(503, "server busy, please try again.")
        started = time.monotonic_ns()
        response: web.StreamResponse | None = None
        try:
            if stream:
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
            pieces = 0

            async def on_chunk(piece: str) -> None:
                nonlocal pieces
                pieces += 1
                if response is not None:
                    try:
                        await _write(response, _chunk(model, piece, chat=chat))
                    except ConnectionError as error:
                        raise ClientGone() from error

            try:
                answer = await service.respond(
                    messages, language, on_chunk, max_tokens=max_tokens, tools=tools,
                    extra=options, prefer_level=level,
                )  # fmt: skip
            except ToolError as error:
                metrics.count(service.name, "error")
                if response is None:
                    return error_response(400, str(error))
                await _write(response, {"error": str(error)})
                await response.write_eof()
                return response
            except AllLevelsFailed as failure:
                _LOGGER.warning("handle Ollama API: no answer: %s", failure)
                metrics.count(service.name, "error")
                if response is None:
                    return error_response(503, apology(language))
                # Headers are gone: Ollama reports a failure mid-stream as an error line.
                await _write(response, {"error": apology(language)})
                await response.write_eof()
                return response
            metrics.count(service.name, "fallback" if answer.fell_back else "ok")
            final = _final(model, answer, started, chat=chat, with_calls=response is None)
            if response is None:
                message_text = answer.text
                if chat:
                    final["message"]["content"] = message_text
                else:
                    final["response"] = message_text
                return web.json_response(final)
            if chat and answer.tool_calls:
                await _write(response, _tool_chunk(model, answer.tool_calls))
            await _write(response, final)
            await response.write_eof()
            return response
        except (ConnectionError, ClientGone):
            # The client hung up mid-answer: respond() was cancelled or finished; nothing to send.
            _LOGGER.info("handle Ollama API: client gone before the answer ended")
            return response if response is not None else web.Response(status=499)
        finally:
            service.release()


def _load_reply(model: str, body: Mapping[str, Any], *, chat: bool) -> web.Response:
    """Ollama's answer to an empty request: the model is loaded (``keep_alive`` 0: unloaded).

    Ours stay loaded either way; the reply is what clients that preload expect.
    """
    reason = "unload" if parse_keep_alive(body.get("keep_alive")) == 0 else "load"
    reply: dict[str, Any] = {"model": model, "created_at": _now(), "done_reason": reason, "done": True}
    if chat:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    return web.json_response(reply)


def _chunk(model: str, piece: str, *, chat: bool) -> dict[str, Any]:
    if chat:
        return {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": piece},
            "done": False,
        }
    return {"model": model, "created_at": _now(), "response": piece, "done": False}


def _tool_chunk(model: str, calls: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _now(),
        "message": {"role": "assistant", "content": "", "tool_calls": ollama_tool_calls(calls)},
        "done": False,
    }


def ollama_tool_calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style calls (arguments a JSON string) → Ollama's (arguments an object)."""
    out: list[dict[str, Any]] = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                arguments = {}
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments or {}}})
    return out


def _final(model: str, answer: Any, started_ns: int, *, chat: bool, with_calls: bool) -> dict[str, Any]:
    """The ``done`` line. ``with_calls``: only when not streaming — in a stream the calls went
    out in their own line, and Home Assistant runs every call of every line it reads."""
    total = time.monotonic_ns() - started_ns
    done_reason = "length" if answer.finish_reason == "length" else "stop"
    final: dict[str, Any] = {"model": model, "created_at": _now()}
    if chat:
        final["message"] = {"role": "assistant", "content": ""}
        if answer.tool_calls and with_calls:
            final["message"]["tool_calls"] = ollama_tool_calls(answer.tool_calls)
    else:
        final["response"] = ""
    final.update(
        {
            "done_reason": done_reason,
            "done": True,
            "total_duration": total,
            "load_duration": 0,
            "prompt_eval_count": 0,
            "prompt_eval_duration": 0,
            "eval_count": answer.tokens,
            "eval_duration": total,
        }
    )
    return final


async def _write(response: web.StreamResponse, line: Mapping[str, Any]) -> None:
    """One NDJSON line; a client that left raises ``ConnectionError`` (handled by the caller)."""
    await response.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as error:
        raise OllamaRequestError(400, f"invalid character in request body: {error}") from error
    if not isinstance(body, dict):
        raise OllamaRequestError(400, "request body must be a JSON object")
    return body


def _options(raw: Any) -> dict[str, Any]:
    """Ollama ``options`` → our sampling parameters (``num_predict`` kept for max tokens)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OllamaRequestError(400, "options must be an object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _OPTION_MAP:
            out[_OPTION_MAP[key]] = value
        elif key == "num_predict":
            if not _whole(value):
                raise OllamaRequestError(400, "option num_predict must be an integer")
            if value > 0:  # Ollama: -1 or 0 mean "no limit": our cap applies
                out["num_predict"] = int(value)
        elif key == "num_ctx" and (not _whole(value) or value < 1):  # HA sends 8192.0 (a float)
            raise OllamaRequestError(400, "option num_ctx must be a positive integer")
        # every other Ollama option (num_thread, mirostat...) is accepted and ignored, as Ollama
        # ignores the ones its runner lacks
    for key in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], (int, float))):
            raise OllamaRequestError(400, f"option {key} must be a number")
    if "stop" in out and isinstance(out["stop"], str):
        out["stop"] = [out["stop"]]
    return out


def _whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()


def chat_messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama chat messages → OpenAI-style ones the chain takes (tool calls with JSON strings)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise OllamaRequestError(400, "messages must be a list of objects")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        role = message.get("role")
        content = message.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise OllamaRequestError(400, f"messages[{index}]: invalid role {role!r}")
        if content is not None and not isinstance(content, str):
            raise OllamaRequestError(400, f"messages[{index}]: content must be a string")
        converted: dict[str, Any] = {"role": role, "content": content or ""}
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise OllamaRequestError(400, f"messages[{index}]: tool_calls must be a list")
            converted["tool_calls"] = []
            for number, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise OllamaRequestError(
                        400, f"messages[{index}].tool_calls[{number}]: needs function.name"
                    )
                arguments = function.get("arguments") or {}
                converted["tool_calls"].append(
                    {
                        "id": f"call_{index}_{number}",
                        "type": "function",
                        "function": {
                            "name": function["name"],
                            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                        },
                    }
                )
        out.append(converted)
    return out


def trim_history(messages: list[dict[str, Any]], budget_chars: int) -> list[dict[str, Any]]:
    """Drop the oldest turns after the system prompt until the content fits ``budget_chars``.

    Ollama truncates to ``num_ctx`` silently; a voice command must not fail because the
    conversation grew. The system prompt and the newest message always stay.
    """

    def size(items: Sequence[Mapping[str, Any]]) -> int:
        return sum(len(str(m.get("content") or "")) for m in items)

    if size(messages) <= budget_chars:
        return messages
    head = [m for m in messages[:1] if m.get("role") == "system"]
    rest = messages[len(head) :]
    while len(rest) > 1 and size(head) + size(rest) > budget_chars:
        rest = rest[1:]
        while len(rest) > 1 and rest[0].get("role") == "tool":  # never start with an orphan result
            rest = rest[1:]
    return head + rest


def basic_auth_key(header: str) -> str | None:
    """The password of an HTTP Basic ``Authorization`` header (a URL like ``http://x:KEY@host``)."""
    if not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[1] if ":" in decoded else None


def key_matches(header: str, key: str) -> bool:
    """Bearer ``key``, or Basic with ``key`` as password (Home Assistant's Ollama client sends no token)."""
    if hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):
        return True
    password = basic_auth_key(header)
    return password is not None and hmac.compare_digest(password.encode(), key.encode())
