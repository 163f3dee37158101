"""A stand-in Ollama server that records what Home Assistant's Ollama integration sends.

Test-side code: it is not the server under test (ours is the handle service's
Ollama-compatible API); it is the other end Home Assistant talks to when the test
wants to see Home Assistant's requests verbatim, or to script the model's answers
(a tool call, then a sentence) and check that Home Assistant executes them.

It speaks the wire format of a real Ollama 0.6 server, as the ``ollama`` Python
client (0.4.7, the one Home Assistant 2025.4.4 pins) reads it: ``GET /api/tags``,
``GET /api/version``, ``POST /api/show``, and ``POST /api/chat`` / ``/api/generate``
streamed as NDJSON (one JSON object a line, the last with ``done: true``) or answered
in one object when ``stream`` is false. Every request is recorded (method, path,
headers, JSON body) in arrival order.

It runs its own event loop in a thread, so that it answers whatever loop (or none)
the test is using while Home Assistant, another process, calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_LOGGER = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MODEL = "superwhisper:latest"
VERSION = "0.6.5"
"""The Ollama version the stub claims (``/api/version``)."""

_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "qwen2",
    "families": ["qwen2"],
    "parameter_size": "1.5B",
    "quantization_level": "Q4_K_M",
}
_DIGEST = "0123456789abcdef" * 4
_MODIFIED_AT = "2025-04-20T10:00:00.000000000+02:00"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    """The JSON body, or None (no body, or not JSON: then ``raw`` holds it)."""
    raw: str = ""
    at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "headers": self.headers, "body": self.body}


@dataclass(frozen=True)
class ChatReply:
    """What the stub's "model" answers to one ``/api/chat``: text and/or tool calls."""

    content: str = ""
    tool_calls: Sequence[dict[str, Any]] = ()
    """As Ollama sends them: ``{"function": {"name": ..., "arguments": {...}}}``."""

    @classmethod
    def tool_call(cls, tool: str, arguments: dict[str, Any], content: str = "") -> ChatReply:
        return cls(content, ({"function": {"name": tool, "arguments": dict(arguments)}},))


DEFAULT_REPLY = ChatReply("D'accord.")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _chat_chunks(model: str, reply: ChatReply) -> list[dict[str, Any]]:
    """The NDJSON lines of a streamed answer, as Ollama 0.6 streams one.

    Text comes word by word (``done: false``); tool calls come whole in one chunk with
    empty content; the last line has empty content, ``done: true``, the reason and
    the counters.
    """
    chunks: list[dict[str, Any]] = []
    if reply.tool_calls:
        chunks.append(
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": "", "tool_calls": list(reply.tool_calls)},
                "done": False,
            }
        )
    words = reply.content.split(" ") if reply.content else []
    for index, word in enumerate(words):
        piece = word if index == 0 else " " + word
        chunks.append(
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": piece},
                "done": False,
            }
        )
    chunks.append(
        {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": "stop",
            "done": True,
            "total_duration": 123_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": 100,
            "prompt_eval_duration": 50_000_000,
            "eval_count": max(len(words), 1),
            "eval_duration": 70_000_000,
        }
    )
    return chunks


def _merged(model: str, reply: ChatReply) -> dict[str, Any]:
    """The single object of a ``stream: false`` answer."""
    last = dict(_chat_chunks(model, reply)[-1])
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = list(reply.tool_calls)
    last["message"] = message
    return last


class OllamaStub:
    """The stub server; ``with ollama_stub() as stub: stub.url`` (see the module docstring)."""

    def __init__(self, models: Sequence[str] = (MODEL,)) -> None:
        self.models = list(models)
        self.requests: list[RecordedRequest] = []
        self.replies: dict[int, list[dict[str, Any]]] = {}
        """Per index into ``requests`` (a chat or generate): the lines answered."""
        self._script: list[ChatReply] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # --- what the test sees and scripts ---------------------------------------------

    def script(self, *replies: ChatReply) -> None:
        """The answers to the next chats, in order; after them, ``DEFAULT_REPLY``."""
        with self._lock:
            self._script.extend(replies)

    def recorded(self, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def calls(self) -> list[str]:
        """``"GET /api/tags"``, ... in arrival order."""
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def reply_to(self, request: RecordedRequest) -> list[dict[str, Any]]:
        with self._lock:
            return self.replies.get(self.requests.index(request), [])

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.replies.clear()

    # --- the server ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as error:  # reported to start()'s caller
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="ollama-stub", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the Ollama stub did not start")
        if failure:
            raise failure[0]
        _LOGGER.info("Ollama stub listening on %s", self.url)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the port the OS gave

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.text() if request.can_read_body else ""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = None
        record = RecordedRequest(
            request.method, request.path, dict(request.headers), body, raw if body is None else ""
        )
        with self._lock:
            self.requests.append(record)
            index = len(self.requests) - 1
        _LOGGER.info("Ollama stub: %s %s", request.method, request.path)
        route = (request.method, request.path)
        if route == ("GET", "/api/version"):
            return web.json_response({"version": VERSION})
        if route == ("GET", "/api/tags"):
            return web.json_response({"models": [self._model_entry(name) for name in self.models]})
        if route == ("GET", "/api/ps"):
            return web.json_response({"models": []})
        if route == ("POST", "/api/show"):
            name = (body or {}).get("model") or (body or {}).get("name")
            if name not in self.models:
                return web.json_response({"error": f"model '{name}' not found"}, status=404)
            return web.json_response(self._show(name))
        if route in (("POST", "/api/chat"), ("POST", "/api/generate")):
            return await self._answer(request, index, body or {})
        if request.method == "HEAD" and request.path == "/":
            return web.Response()
        if route == ("GET", "/"):
            return web.Response(text="Ollama is running")
        return web.json_response({"error": f"{request.method} {request.path}: not served"}, status=404)

    async def _answer(self, request: web.Request, index: int, body: dict[str, Any]) -> web.StreamResponse:
        model = str(body.get("model", ""))
        if model not in self.models:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        with self._lock:
            reply = self._script.pop(0) if self._script else DEFAULT_REPLY
        chat = request.path == "/api/chat"
        if body.get("stream", True):
            lines = _chat_chunks(model, reply)
            if not chat:
                lines = [self._as_generate(line) for line in lines]
            with self._lock:
                self.replies[index] = lines
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            for line in lines:
                await response.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
            await response.write_eof()
            return response
        single = _merged(model, reply)
        if not chat:
            single = self._as_generate(single)
        with self._lock:
            self.replies[index] = [single]
        return web.json_response(single)

    @staticmethod
    def _as_generate(line: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in line.items() if k != "message"}
        out["response"] = line["message"]["content"]
        return out

    @staticmethod
    def _model_entry(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": _MODIFIED_AT,
            "size": 986_061_892,
            "digest": _DIGEST,
            "details": dict(_DETAILS),
        }

    @staticmethod
    def _show(name: str) -> dict[str, Any]:
        return {
            "modelfile": f"# Modelfile of {name} (stub)\nFROM {name}\n",
            "parameters": "num_ctx 8192",
            "template": "{{ .Prompt }}",
            "details": dict(_DETAILS),
            "model_info": {"general.architecture": "qwen2", "qwen2.context_length": 32768},
            "capabilities": ["completion", "tools"],
            "modified_at": _MODIFIED_AT,
        }


@contextlib.contextmanager
def ollama_stub(models: Sequence[str] = (MODEL,)) -> Iterator[OllamaStub]:
    stub = OllamaStub(models)
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()
