"""LLM engines: llama-cpp-python in process, and any OpenAI-compatible HTTP server.

Engines know nothing of Wyoming nor of the quality gate: they take chat
messages and yield text deltas as the model produces them. Closing the
stream (``aclose()``, or cancelling the task that iterates it) stops the
generation within one token and frees the model for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ..runtime.fallback import EngineError

_LOGGER = logging.getLogger(__name__)

SAMPLING_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logit_bias",
    "stop",
)
"""Level/catalog options passed to the model as generation parameters."""


@dataclass(frozen=True)
class ChatRequest:
    """One generation: the messages and the caps (tokens, and tools for the /v1 API)."""

    messages: Sequence[Mapping[str, Any]]
    max_tokens: int = 160
    temperature: float | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further sampling parameters from an API client (top_p, stop, seed...)."""
    language: str = "fr"
    """The user's language (the tool-calling instructions are written in it)."""
    grammar: str | None = None
    """GBNF for a request with tools, built once by the service (:func:`.toolcalls.tool_grammar`)."""


@dataclass(frozen=True)
class ChatDelta:
    """A piece of the answer as the model produced it."""

    text: str = ""
    finish_reason: str | None = None
    """``stop``, ``length``, ``tool_calls`` on the last delta; None before."""
    tool_calls: Sequence[Mapping[str, Any]] | None = None
    """OpenAI-style tool-call deltas (only with tools)."""


@dataclass
class GenerationStats:
    """What the last generation of an engine did (for tests, logs and the doctor)."""

    tokens: int = 0
    cancelled: bool = False
    finish_reason: str | None = None
    running: bool = False


class ChatEngine(ABC):
    """The handle service's engine protocol (see ``runtime.fallback.Engine``)."""

    name: str
    device: str
    quality: int
    model: str
    """Model name for ``/v1/models`` and the ``info`` event."""
    languages: tuple[str, ...] = ("fr", "en")
    supports_tools: bool = False

    async def load(self) -> None:
        """Load weights or check the remote; may raise."""

    async def close(self) -> None:
        """Release what :meth:`load` acquired."""

    @abstractmethod
    def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        """Yield deltas as they are generated; raise :class:`EngineError` on failure."""


_END = object()


class LlamaCppEngine(ChatEngine):
    """A GGUF model through llama-cpp-python, all layers on the pinned GPU or none.

    Generation runs in its own thread (not the default executor, so a long answer
    cannot starve other ``to_thread`` users); tokens reach the event loop through
    ``call_soon_threadsafe``. An ``asyncio.Lock`` queues requests without holding
    threads; a ``threading.Lock`` around the model call makes concurrent use
    impossible even if a waiter is cancelled twice.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        ref: str = "",
        quality: int = 0,
        languages: Sequence[str] = ("fr", "en"),
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.device = device
        self.model = ref or self.model_path.stem
        self.name = f"llama-cpp:{self.model}@{device}"
        self.quality = quality
        self.languages = tuple(languages)
        self.options = dict(options or {})
        self.supports_tools = bool(self.options.get("tools", True))
        """May this model call tools? A grammar keeps its calls valid, not right: a model that
        picks the wrong device more often than the right one (the catalog's ``tools: false``,
        e.g. SmolLM2-135M, right for 12 % of home commands) answers in words only, and says it
        did not understand, rather than switching something at random."""
        self.n_ctx = int(self.options.get("n_ctx", 2048))
        self.stats = GenerationStats()
        self._llm: Any = None
        self._lock: asyncio.Lock | None = None
        self._model_lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """True while a generation holds the model."""
        return self._model_lock.locked() or (self._lock is not None and self._lock.locked())

    async def load(self) -> None:
        if not self.model_path.is_file():
            raise EngineError(f"{self.name}: model file {self.model_path} not found")
        self._lock = asyncio.Lock()
        self._llm = await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> Any:
        from llama_cpp import Llama  # after the GPU guard: the import may touch CUDA

        return Llama(**self.llama_kwargs())

    def llama_kwargs(self) -> dict[str, Any]:
        """What ``Llama(...)`` gets: every layer on ``cuda:0`` when the guard pinned a GPU."""
        kwargs: dict[str, Any] = {
            "model_path": str(self.model_path),
            "n_gpu_layers": -1 if self.device.startswith("cuda") else 0,
            "n_ctx": self.n_ctx,
            "verbose": False,
        }
        for key in ("chat_format", "n_threads", "n_batch", "flash_attn", "seed"):
            if key in self.options:
                kwargs[key] = self.options[key]
        return kwargs

    async def close(self) -> None:
        if self._lock is not None:
            async with self._lock:
                llm, self._llm = self._llm, None
        else:
            llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(self._close_blocking, llm)

    def _close_blocking(self, llm: Any) -> None:
        with self._model_lock:  # a generation that outlived its waiter finishes first
            llm.close()

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {key: self.options[key] for key in SAMPLING_OPTIONS if key in self.options}
        params.update({k: v for k, v in request.extra.items() if k in SAMPLING_OPTIONS})
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if "logit_bias" in params:  # JSON/YAML keys are strings; llama.cpp wants token ids
            params["logit_bias"] = {int(k): float(v) for k, v in params["logit_bias"].items()}
        params["max_tokens"] = request.max_tokens
        return params

    def _tool_setup(self, request: ChatRequest) -> tuple[list[dict[str, Any]], str | None]:
        """Messages and grammar for a request with tools (see :mod:`.toolcalls`); none without."""
        messages = [dict(m) for m in request.messages]
        if not request.tools:
            return messages, None
        from .home import home_of
        from .toolcalls import (
            after_tool_result,
            example_turns,
            plain_messages,
            tool_grammar,
            tools_prompt,
            words_only_prompt,
        )

        home = home_of(messages, request.tools)
        if not home.tools:
            return plain_messages(messages), None
        calls_allowed = self.supports_tools and not after_tool_result(messages)
        if self.supports_tools:
            grammar = request.grammar or tool_grammar(home, allow_calls=calls_allowed)
        else:
            grammar = tool_grammar(home, allow_calls=False)  # text only: cheap, no schema
        plain = plain_messages(messages)
        if not self.supports_tools and not after_tool_result(messages):
            refusal = words_only_prompt(request.language)
            if plain and plain[0]["role"] == "system":
                plain[0]["content"] = refusal + "\n" + plain[0]["content"]
            else:
                plain.insert(0, {"role": "system", "content": refusal})
        if calls_allowed:
            instructions = tools_prompt(home, request.language)
            if plain and plain[0]["role"] == "system":
                plain[0]["content"] = instructions + "\n" + plain[0]["content"]
            else:
                plain.insert(0, {"role": "system", "content": instructions})
            plain[1:1] = example_turns(home, request.language)
        return plain, grammar

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        if self._llm is None or self._lock is None:
            raise EngineError(f"{self.name} is not loaded")
        params = self._params(request)
        try:
            messages, grammar = self._tool_setup(request)
        except ValueError as error:  # ToolError: already refused by the service, kept safe here
            raise EngineError(f"{self.name}: {error}") from error
        async with self._lock:
            llm = self._llm
            if llm is None:
                raise EngineError(f"{self.name} was closed")
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            cancel = threading.Event()
            finished = loop.create_future()

            def emit(item: Any) -> None:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            def done() -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_done, finished)

            stats = GenerationStats(running=True)
            self.stats = stats
            thread = threading.Thread(
                target=self._generate,
                args=(llm, messages, params, cancel, emit, done, stats, grammar),
                name=f"llm-{self.model}",
                daemon=True,
            )
            thread.start()
            try:
                while True:
                    item = await queue.get()
                    if item is _END:
                        break
                    if isinstance(item, BaseException):
                        raise EngineError(f"{self.name}: {item}") from item
                    yield item
            finally:
                cancel.set()
                if not finished.done():
                    try:
                        await asyncio.shield(finished)
                    except asyncio.CancelledError:
                        # Cancelled again while waiting: the thread stops within one
                        # token and the model lock keeps the next call out until then.
                        raise

    def _generate(
        self,
        llm: Any,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        cancel: threading.Event,
        emit: Any,
        done: Any,
        stats: GenerationStats,
        grammar: str | None = None,
    ) -> None:
        try:
            with self._model_lock:
                if grammar is not None:
                    from llama_cpp import LlamaGrammar

                    params = {**params, "grammar": LlamaGrammar.from_string(grammar, verbose=False)}
                chunks = llm.create_chat_completion(messages=messages, stream=True, **params)
                call_text: str | None = None  # a call is sent whole, once the grammar closed it
                try:
                    for chunk in chunks:
                        if cancel.is_set():
                            stats.cancelled = True
                            break
                        choice = chunk["choices"][0]
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or ""
                        if text:
                            stats.tokens += 1
                        finish = choice.get("finish_reason")
                        if finish:
                            stats.finish_reason = finish
                        if grammar is not None and (call_text is not None or text.lstrip().startswith("{")):
                            call_text = (call_text or "") + text
                            if finish:
                                emit(_call_delta(call_text, finish))
                            continue
                        if text or finish or delta.get("tool_calls"):
                            emit(ChatDelta(text, finish, delta.get("tool_calls")))
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
        except Exception as error:  # handed to the event loop, raised there as EngineError
            _LOGGER.warning("%s: generation failed: %s", self.name, error)
            emit(error)
        finally:
            stats.running = False
            emit(_END)
            done()


def _call_delta(text: str, finish: str) -> ChatDelta:
    """The grammar-constrained JSON the model wrote → one OpenAI-style tool-call delta."""
    from .toolcalls import openai_tool_call, parse_call

    call = parse_call(text)  # ToolError when cut off by max_tokens: the level fails, the next answers
    if call is None:
        return ChatDelta(text, finish)
    return ChatDelta("", "tool_calls", [openai_tool_call(call["name"], call["arguments"])])


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class OpenAIEngine(ChatEngine):
    """Any OpenAI-compatible ``/v1`` server (llama.cpp server, Ollama, vLLM, OpenAI).

    Streams with server-sent events; ``options``: ``model`` (default: the first
    model the server lists), ``api_key``, ``connect_timeout_s``,
    ``read_timeout_s`` (longest silence between two tokens), ``tools``
    (the remote model does function calling).
    """

    def __init__(
        self,
        base_url: str,
        *,
        options: Mapping[str, Any] | None = None,
        quality: int = 0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.options = dict(options or {})
        self.model = str(self.options.get("model", ""))
        self.name = f"openai:{self.base_url}"
        self.device = "remote"
        self.quality = quality
        self.languages = tuple(self.options.get("languages", ("fr", "en")))
        self.supports_tools = bool(self.options.get("tools", True))
        self.api_key = str(self.options.get("api_key", ""))
        self.connect_timeout_s = float(self.options.get("connect_timeout_s", 3.0))
        self.read_timeout_s = float(self.options.get("read_timeout_s", 20.0))
        self._session = session
        self._own_session = session is None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, connect=self.connect_timeout_s, sock_connect=self.connect_timeout_s,
            sock_read=self.read_timeout_s,
        )  # fmt: skip

    async def load(self) -> None:
        """Open the session and ask ``/models``: a server that is down fails here, early."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout())
            self._own_session = True
        try:
            async with self._session.get(f"{self.base_url}/models", headers=self._headers()) as resp:
                if resp.status != 200:
                    raise EngineError(f"{self.name}: /models answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, EngineError) as error:
            await self.close()  # a failed load is not "loaded": nobody else would close it
            if isinstance(error, EngineError):
                raise
            raise EngineError(f"{self.name}: unreachable ({error or type(error).__name__})") from error
        if not self.model:
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, list) and data and isinstance(data[0], dict):
                self.model = str(data[0].get("id", ""))
        self.name = f"openai:{self.model or 'default'}@{self.base_url}"

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model or "default",
            "messages": [dict(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "stream": True,
        }
        for key in SAMPLING_OPTIONS:
            if key in self.options:
                body[key] = self.options[key]
        body.update({k: v for k, v in request.extra.items() if k in SAMPLING_OPTIONS})
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.tools and self.supports_tools:
            body["tools"] = list(request.tools)
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
        return body

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        if self._session is None or self._session.closed:
            raise EngineError(f"{self.name} is not loaded")
        url = f"{self.base_url}/chat/completions"
        try:
            async with self._session.post(
                url, json=self._body(request), headers=self._headers(), timeout=self._timeout()
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:200]
                    raise EngineError(f"{self.name}: HTTP {resp.status}: {detail}")
                async for delta in _read_sse(resp):
                    yield delta
        except (aiohttp.ClientError, TimeoutError) as error:
            raise EngineError(f"{self.name}: {error or type(error).__name__}") from error


async def _read_sse(resp: aiohttp.ClientResponse) -> AsyncGenerator[ChatDelta, None]:
    """OpenAI server-sent events → deltas; ``data: [DONE]`` ends the stream."""
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError as error:
            raise EngineError(f"remote sent invalid JSON in its stream: {payload[:80]}") from error
        if isinstance(chunk, dict) and "error" in chunk:
            raise EngineError(f"remote error: {str(chunk['error'])[:200]}")
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices:
            continue
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        finish = choice.get("finish_reason")
        tool_calls = delta.get("tool_calls")
        if text or finish or tool_calls:
            yield ChatDelta(text, finish, tool_calls)
