"""The handle service: conversation memory + a fallback chain of LLMs, answers streamed.

One :meth:`HandleService.respond` serves both front doors (the Wyoming
handler and the OpenAI-compatible ``/v1`` API): it builds nothing Wyoming,
it streams cleaned text to a sink and returns the final :class:`Answer`.

Streaming and the quality gate meet in :meth:`HandleService._stream_level`.
The last ``handle.stream_holdback_chars`` characters of the answer are held
back while the model writes: until the first characters are released, a
level whose answer is empty, loops, is cut off or is in the wrong language
is *rejected* and the next level answers, invisibly. Once text was
released, that level owns the answer: a loop found later stops the
generation and the held-back repetition is dropped, a timeout or an engine
failure ends the answer where it is (cut back to the last sentence end, or
closed with "…"). So the chunks a client receives always concatenate to the
final text. On the last level a loop is trimmed rather than rejected and the
language is not checked: a short or foreign answer beats an apology. So the
last level has no gate to wait for: its first word is released at once, and
the holdback then only keeps a loop's repetition out of what is said. Once a
level is committed, text that ends a sentence is released whole: the TTS
speaks sentence by sentence, and holding a finished sentence back would only
delay its audio by the holdback's worth of tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wyoming.info import Attribution, HandleModel, HandleProgram, Info

from .. import __version__
from ..config import ConfigError, HandleSettings, Settings
from ..runtime.chains import ChainPlan, PlannedLevel, plan_chain
from ..runtime.fallback import (
    AllLevelsFailed,
    Attempt,
    EngineError,
    FallbackChain,
    Outcome,
    QualityRejected,
)
from ..runtime.limits import InFlight
from ..runtime.server import Connection, EventHandler, ServiceContext, WyomingService
from ..runtime.worker import WorkerOptions, supervised, worker_options
from .conversation import Turn, build_messages
from .engines import ChatEngine, ChatRequest, LlamaCppEngine, OpenAIEngine
from .home import Home, home_of
from .intents import (
    FastAnswer,
    IntentRecognizer,
    asks_for_a_state,
    fast_answer,
    looks_like_command,
    lost_verb_command,
    not_understood,
    state_unknown,
)
from .memory_store import open_conversation_store
from .prompts import (
    clean_for_speech,
    clock_answer,
    ends_a_finished_sentence,
    ends_sentence,
    last_sentence_end,
    loop_start,
    starts_with_a_word,
    system_prompt,
    wrong_language,
)
from .toolcalls import after_tool_result, openai_tool_call, tool_grammar, validate_call

_LOGGER = logging.getLogger(__name__)

ChunkSink = Callable[[str], Awaitable[None]]
SEND_MARGIN_S = 0.5
"""Kept from ``handle.timeout_s`` to send the final events once generation stops."""
PROMPTS_KEPT = 256
TOOL_CALL_TOKENS = 128
"""Least tokens a request with tools gets: a call cut off mid-JSON could not be executed."""


@dataclass(frozen=True)
class Answer:
    """The final answer with its provenance (what metrics, logs and tests explain)."""

    text: str
    level: int
    engine: str
    model: str
    finish_reason: str
    """``stop``, ``length``, ``tool_calls``, or how it was repaired: ``loop``, ``timeout``, ``error``."""
    attempts: tuple[Attempt, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()
    first_chunk_s: float | None = None
    """Seconds from the request to the first released chunk (None: nothing streamed)."""
    tokens: int = 0
    """Pieces of text the engine streamed (one per token for llama.cpp and OpenAI APIs)."""
    tokens_per_second: float | None = None
    """Generation speed from the first to the last token (None: fewer than two tokens)."""

    @property
    def fell_back(self) -> bool:
        return self.level > 0


@dataclass
class _Stream:
    """One level's attempt at one answer (per-request state of :meth:`_stream_level`)."""

    raw: str = ""
    tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    sent: str = ""
    committed: bool = False
    finish: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    first_chunk_at: float | None = None


def build_engine(planned: PlannedLevel, workers: WorkerOptions | None = None) -> ChatEngine:
    """A planned chain level → its engine (remote URL, or a GGUF model in a supervised worker)."""
    level = planned.level
    if planned.model is None:
        return OpenAIEngine(level.remote, options=level.options)
    spec = planned.model.spec
    if spec.kind != "llm":
        raise ConfigError(
            f"{planned.key}.model", "configuration", f"{spec.ref} is a {spec.kind} model, not an LLM"
        )
    options = {**dict(spec.options), **dict(level.options)}
    engine: ChatEngine = supervised(
        workers,
        LlamaCppEngine,
        planned.model.entry_path,
        streams=("stream",),
        device=planned.device,
        ref=spec.ref,
        quality=spec.quality,
        languages=spec.languages,
        options=options,
    )
    return engine


def model_workers(settings: Settings) -> WorkerOptions | None:
    """Worker supervision for the local models, at ``handle.cpu_nice`` below speech's priority."""
    nice = settings.handle.cpu_nice
    if not 0 <= nice <= 19:
        raise ConfigError("handle.cpu_nice", "configuration", f"must be a whole number 0–19, not {nice}")
    workers = worker_options(settings)
    if workers is None:
        if nice:
            _LOGGER.info("handle: cpu_nice %d not applied: the models run in the server's process", nice)
        return None
    return dataclasses.replace(workers, nice=nice)


class HandleService(WyomingService):
    """Wyoming ``handle`` server (and, when ``handle.api_port`` is set, the ``/v1`` API)."""

    name = "handle"

    def __init__(
        self,
        context: ServiceContext,
        *,
        engines: Sequence[ChatEngine] | None = None,
        clock: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        super().__init__(context)
        self.settings: HandleSettings = context.settings.handle
        self.plan: ChainPlan | None = None
        if engines is None:
            self.plan = plan_chain("handle.chain", self.settings.chain, context.registry, context.gpu)
            for skipped in self.plan.skipped:
                log = _LOGGER.warning if skipped.degraded else _LOGGER.info
                log("handle: %s skipped: %s", skipped.key, skipped.reason)
            workers = model_workers(context.settings)
            engines = [build_engine(planned, workers) for planned in self.plan.levels]
        self.chain: FallbackChain[ChatEngine] = FallbackChain(
            "handle",
            engines,
            timeout_s=self.settings.timeout_s + 5.0,  # the real deadline is enforced per request
            failure_threshold=self.settings.failure_threshold,
            cooldown_s=self.settings.cooldown_s,
            observer=context.metrics,
            memory=context.vram,
        )
        try:
            self.memory = open_conversation_store(
                self.settings.memory,
                self.settings.memory_turns,
                self.settings.memory_ttl_s,
                self.settings.implicit_memory_ttl_s,
            )
        except ValueError as error:
            raise ConfigError("handle.memory", "configuration", str(error)) from error
        self._clock = clock
        self._prompts: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.in_flight = InFlight(self.settings.queue_size, context.metrics.queue_depth.labels(self.name))
        self._api: Any = None
        self.intents = IntentRecognizer()
        """Home Assistant's own sentence templates, matched before any model (``handle.local_intents``)."""
        from .mcp_home import HomeControl, home_control_enabled  # it types against this module

        self.home_control: HomeControl | None = (
            HomeControl(self) if home_control_enabled(self.settings) else None
        )
        """Acting through Home Assistant's MCP server (``handle.hass_url``); built here so that a bad
        URL stops the start with the key named, and one per service (it keeps calls per conversation)."""

    def status(self) -> dict[str, Any]:
        """The base status, and with ``handle.hass_url`` how the last exchange with Home Assistant went."""
        data = super().status()
        if self.home_control is not None:
            data["home"] = dict(self.home_control.reached)
        return data

    # -- WyomingService ------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.settings.uri

    def chains(self) -> Sequence[FallbackChain[Any]]:
        return [self.chain]

    def create_handler(self, connection: Connection) -> EventHandler:
        from .handler import HandleHandler

        return HandleHandler(connection, self)

    async def start(self) -> None:
        await super().start()
        if self.settings.local_intents:
            # Compiled now, not at the first command (about 0.2 s a language on two cores).
            for language in dict.fromkeys((self.settings.language, "fr", "en")):
                await asyncio.to_thread(self.intents.prepare, language)
        if self.home_control is not None:
            self.background(self.home_control.warm(), "warm-home")
        if self.settings.api_port:
            from .api import OpenAIApi

            self._api = OpenAIApi(self)
            await self._api.start()

    async def stop(self) -> None:
        if self._api is not None:
            await self._api.stop()
            self._api = None
        await super().stop()

    async def smoke(self) -> str:
        """A few real tokens from the first level that answers, no gate."""
        language = self.settings.language
        request = ChatRequest(build_messages(self._system(language), [], "Dis bonjour."), max_tokens=16)

        async def call(engine: ChatEngine) -> str:
            text = ""
            async with contextlib.aclosing(engine.stream(request)) as stream:
                async for delta in stream:
                    text += delta.text
            if not starts_with_a_word(text.strip()):
                raise QualityRejected(f"no text in the answer ({text.strip()[:40]!r})")
            reason = wrong_language(text, language)  # None when too short to tell
            if reason:
                raise QualityRejected(reason)
            return text.strip()

        result = await self.chain.run(call, timeout_s=self.settings.timeout_s)
        return f"{result.engine}: {result.value!r}"

    # -- describe ----------------------------------------------------------------------

    def info(self) -> Info:
        """``info`` for ``describe``: one program, the chain's models (missing ones not installed)."""
        models: list[HandleModel] = []
        for engine in self.chain.engines:
            spec = None
            if self.plan is not None:
                for planned in self.plan.levels:
                    if planned.spec is not None and planned.spec.ref == getattr(engine, "model", ""):
                        spec = planned.spec
            models.append(
                HandleModel(
                    name=engine.model or engine.name,
                    description=spec.description if spec else engine.name,
                    attribution=Attribution(
                        name=spec.attribution.name if spec else "remote OpenAI-compatible API",
                        url=spec.attribution.url if spec else getattr(engine, "base_url", ""),
                    ),
                    installed=True,
                    version=spec.version if spec else None,
                    languages=list(spec.languages if spec else engine.languages),
                )
            )
        if self.plan is not None:
            for skipped in self.plan.skipped:
                if not skipped.degraded:
                    continue  # does not apply here (a GPU level on a CPU box): not offered
                ref = skipped.level.model
                try:
                    spec = self.context.registry.spec(ref)
                except Exception:  # an unknown ref was already a ConfigError at planning
                    continue
                models.append(
                    HandleModel(
                        name=ref,
                        description=spec.description,
                        attribution=Attribution(name=spec.attribution.name, url=spec.attribution.url),
                        installed=False,
                        version=spec.version,
                        languages=list(spec.languages),
                    )
                )
        program = HandleProgram(
            name="superwhisper-handle",
            description="Assistant vocal local (LLM) avec mémoire de conversation et repli",
            attribution=Attribution(
                name="wyoming-superwhisper", url="https://github.com/wyoming-superwhisper"
            ),
            installed=True,
            version=__version__,
            models=models,
            supports_handled_streaming=True,
        )
        return Info(handle=[program])

    # -- the work ------------------------------------------------------------------

    def _system(self, language: str) -> str:
        return system_prompt(
            self.settings.assistant_name, language, self._clock(), self.settings.system_prompt
        )

    def conversation_messages(
        self, key: str, text: str, language: str, history: list[Turn] | None = None
    ) -> list[dict[str, Any]]:
        """The prompt for a request in a conversation: system, remembered turns, the request.

        Kept per conversation (:meth:`last_prompt`) so tests and debug logs can see
        exactly what the model was given. ``history``: the turns already read
        (:meth:`read_conversation`); None reads them here.
        """
        turns = self.memory.history(key) if history is None else history
        messages = build_messages(self._system(language), turns, text)
        self._prompts[key] = messages
        self._prompts.move_to_end(key)
        while len(self._prompts) > PROMPTS_KEPT:
            self._prompts.popitem(last=False)
        return messages

    async def read_conversation(self, key: str) -> list[Turn]:
        """The remembered turns, read off the event loop when the store does I/O (Redis)."""
        if self.memory.does_io:
            return await asyncio.to_thread(self.memory.history, key)
        return self.memory.history(key)

    async def remember(self, key: str, text: str, answer: str, *, implicit: bool) -> None:
        """Keep one exchange, off the event loop when the store does I/O (Redis)."""
        if self.memory.does_io:
            await asyncio.to_thread(self.memory.remember, key, text, answer, implicit=implicit)
        else:
            self.memory.remember(key, text, answer, implicit=implicit)

    def last_prompt(self, key: str) -> list[dict[str, Any]] | None:
        return self._prompts.get(key)

    def try_admit(self) -> bool:
        """Count a request in; False (answer ``busy``) when ``handle.queue_size`` are in flight."""
        return self.in_flight.try_enter()

    def release(self) -> None:
        self.in_flight.leave()

    async def respond(
        self,
        messages: Sequence[Mapping[str, Any]],
        language: str,
        on_chunk: ChunkSink,
        *,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        extra: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        prefer_level: int | None = None,
    ) -> Answer:
        """Stream an answer through the chain; raise :class:`AllLevelsFailed` when none answers.

        Always returns (or raises) within ``timeout_s`` (default ``handle.timeout_s``).
        ``prefer_level``: the level tried first (a client that named that level's model).
        Raises :class:`ToolError` for ``tools`` that cannot be used, before any model runs.
        """
        if self.settings.local_intents:
            clock = await self._clock_answer(messages, language, on_chunk)
            if clock is not None:
                return clock
        home = home_of(messages, tools) if tools else None
        if home is not None and home.tools and self.settings.local_intents:
            local = await self._local_answer(messages, language, home, on_chunk)
            if local is not None:
                return local
        grammar = None
        if home is not None and home.tools:
            # Built once per request, in a thread (thousands of names take milliseconds of pure
            # Python); a schema the grammar cannot express is the client's error, raised here.
            grammar = await asyncio.to_thread(tool_grammar, home, allow_calls=not after_tool_result(messages))
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = self.settings.timeout_s if timeout_s is None else timeout_s
        deadline = started + max(0.1, budget - SEND_MARGIN_S)
        request = ChatRequest(
            messages=list(messages),
            max_tokens=min(
                max(max_tokens or self.settings.max_tokens, TOOL_CALL_TOKENS if home else 0),
                max(self.settings.max_tokens, self.settings.api_max_tokens, TOOL_CALL_TOKENS if home else 0),
            ),
            tools=tools,
            tool_choice=tool_choice,
            extra=dict(extra or {}),
            language=language,
            grammar=grammar,
        )
        engines = self.chain.engines
        order = self.route(messages, tools)
        if prefer_level is not None and prefer_level in order:
            order = [prefer_level, *(i for i in order if i != prefer_level)]

        async def call(engine: ChatEngine) -> Answer:
            index = engines.index(engine)
            answer = await self._stream_level(
                engine, index, request, language, on_chunk, deadline, started, index == order[-1]
            )
            if home is not None:
                for tool_call in answer.tool_calls:
                    function = tool_call.get("function") or {}
                    problem = validate_call(str(function.get("name", "")), function.get("arguments"), home)
                    if problem:  # the next level answers: an invalid call must never reach the home
                        raise QualityRejected(f"invalid tool call: {problem}")
            return answer

        try:
            async with asyncio.timeout_at(started + max(0.1, budget - SEND_MARGIN_S / 2)):
                result = await self.chain.run(call, timeout_s=budget + 5.0, levels=order)
        except TimeoutError:
            # Only reachable while nothing was released (e.g. a slow lazy load).
            raise AllLevelsFailed(
                "handle",
                [Attempt(-1, "chain", Outcome.TIMEOUT, loop.time() - started, f"over {budget:g} s")],
            ) from None
        answer = result.value
        return Answer(
            text=answer.text,
            level=result.level,
            engine=result.engine,
            model=answer.model,
            finish_reason=answer.finish_reason,
            attempts=result.attempts,
            tool_calls=answer.tool_calls,
            first_chunk_s=answer.first_chunk_s,
            tokens=answer.tokens,
            tokens_per_second=answer.tokens_per_second,
        )

    async def _local_answer(
        self, messages: Sequence[Mapping[str, Any]], language: str, home: Home, on_chunk: ChunkSink
    ) -> Answer | None:
        """The answer of Home Assistant's sentence templates, or None for the chain to answer.

        Home Assistant runs the call and hands its result back; the words after it
        come from the same templates. No model runs, so nothing can name a wrong
        entity, and a command is answered in milliseconds even on a busy CPU.
        """
        started = asyncio.get_running_loop().time()
        try:
            fast: FastAnswer | None = await asyncio.to_thread(
                fast_answer, self.intents, messages, language, home
            )
        except Exception:  # the templates failing must never cost the user an answer
            _LOGGER.exception("handle: local intents failed; the model answers")
            return None
        if fast is None and not any(engine.supports_tools for engine in self.chain.engines):
            # No level may act: a command or a state question the templates missed gets the truth,
            # not a guess.
            text = next(
                (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), ""
            )
            if messages and messages[-1].get("role") == "user":
                if looks_like_command(text, language):
                    fast = FastAnswer(text=not_understood(language), reason="not_understood")
                elif lost_verb_command(text, language, home):
                    said = not_understood(language, device_heard=True)
                    fast = FastAnswer(text=said, reason="not_understood")
                elif home.entities and asks_for_a_state(text, language, home):
                    # A words-only model would state a device's state it never read.
                    fast = FastAnswer(text=state_unknown(language), reason="state_unknown")
        if fast is None or not (fast.text or fast.tool_call):
            return None
        return await self._said_locally(fast, started, on_chunk)

    async def _clock_answer(
        self, messages: Sequence[Mapping[str, Any]], language: str, on_chunk: ChunkSink
    ) -> Answer | None:
        """The clock answers "Quelle heure est-il ?" or "What is the date today?", not a model
        (none reads one), home or no home; Home Assistant's own sentences recognize the question."""
        if not messages or messages[-1].get("role") != "user":
            return None
        started = asyncio.get_running_loop().time()
        text = str(messages[-1].get("content") or "")
        # A thread: a language met for the first time compiles its templates (up to 0.2 s).
        intent = await asyncio.to_thread(self.intents.clock_question, text, language)
        if intent is None:
            return None
        fast = FastAnswer(text=clock_answer(intent, self._clock(), language), reason="clock")
        return await self._said_locally(fast, started, on_chunk)

    async def _said_locally(self, fast: FastAnswer, started: float, on_chunk: ChunkSink) -> Answer:
        """A template's answer as the chain's would be: streamed, counted, logged."""
        self.context.metrics.local_intents.labels(fast.reason).inc()
        _LOGGER.info("handle: answered from Home Assistant's templates (%s)", fast.reason)
        calls: tuple[dict[str, Any], ...] = ()
        if fast.tool_call is not None:
            calls = (openai_tool_call(str(fast.tool_call["name"]), fast.tool_call.get("arguments") or {}),)
        elif fast.text:
            await on_chunk(fast.text)
        return Answer(
            text=fast.text,
            level=0,
            engine="local-intents",
            model="home-assistant-intents",
            finish_reason="tool_calls" if calls else "stop",
            tool_calls=calls,
            first_chunk_s=asyncio.get_running_loop().time() - started,
        )

    def route(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The order the chain's levels are tried in for this request (``handle.route_short_chars``).

        A short request without tools goes first to the smallest local model
        that is smaller than the first level; everything else keeps chain order.
        """
        order = list(range(len(self.chain.levels)))
        limit = self.settings.route_short_chars
        if limit <= 0 or tools or len(order) < 2:
            return order
        text = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        if len(text.strip()) > limit:
            return order
        engines = self.chain.engines
        smaller = [
            i for i in order[1:] if engines[i].device != "remote" and engines[i].quality < engines[0].quality
        ]
        if not smaller:
            return order
        small = min(smaller, key=lambda i: (engines[i].quality, i))
        return [small, *(i for i in order if i != small)]

    async def _stream_level(
        self,
        engine: ChatEngine,
        index: int,
        request: ChatRequest,
        language: str,
        on_chunk: ChunkSink,
        deadline: float,
        started: float,
        is_last: bool,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        holdback = max(0, self.settings.stream_holdback_chars)
        state = _Stream()
        clean = ""
        final: str | None = None
        repaired = ""

        async def release(text: str) -> None:
            if len(text) > len(state.sent) and text.startswith(state.sent):
                piece = text[len(state.sent) :]
                state.sent = text
                if state.first_chunk_at is None:
                    state.first_chunk_at = loop.time()
                await on_chunk(piece)

        # A level that says nothing at all for first_token_timeout_s is hung: give the rest
        # of the budget to the next level instead of spending all of it here.
        first_token_s = self.settings.first_token_timeout_s
        waiting_first = first_token_s > 0 and loop.time() + first_token_s < deadline
        try:
            async with asyncio.timeout_at(
                loop.time() + first_token_s if waiting_first else deadline
            ) as time_limit:
                async with contextlib.aclosing(engine.stream(request)) as stream:
                    async for delta in stream:
                        if waiting_first:
                            waiting_first = False
                            time_limit.reschedule(deadline)
                        state.raw += delta.text
                        if delta.text:
                            state.tokens += 1
                            state.last_token_at = loop.time()
                            if state.first_token_at is None:
                                state.first_token_at = state.last_token_at
                        state.finish = delta.finish_reason or state.finish
                        if delta.tool_calls:
                            _merge_tool_calls(state.tool_calls, delta.tool_calls)
                        clean = clean_for_speech(state.raw)
                        loop_at = loop_start(clean)
                        if loop_at is not None:
                            if not state.committed and not is_last:
                                raise QualityRejected("looping answer")
                            final = clean[: max(loop_at, len(state.sent))]
                            repaired = "loop"
                            break
                        if not state.committed:
                            visible = clean.strip()
                            if not visible:
                                continue
                            if is_last and starts_with_a_word(visible):
                                # Nothing can take over from the last level: no gate to wait
                                # for, its first word goes out at once (time to first chunk).
                                state.committed = True
                                await release(clean.rstrip())
                                continue
                            if len(visible) <= holdback:
                                continue
                            reason = None if is_last else wrong_language(clean, language)
                            if reason:
                                raise QualityRejected(reason)
                            state.committed = True
                        if ends_a_finished_sentence(clean):
                            # A whole sentence with no loop in it: the TTS can speak it now; the
                            # holdback would only make it wait for the next few tokens.
                            await release(clean.rstrip())
                        else:
                            await release(clean[: max(0, len(clean) - holdback)].rstrip())
        except TimeoutError:
            if not state.committed:
                raise
            repaired = "timeout"
            _LOGGER.info("handle: %s ran out of time, ending the answer where it is", engine.name)
        except EngineError as error:
            if not state.committed or isinstance(error, QualityRejected):
                raise
            repaired = "error"
            _LOGGER.warning("handle: %s failed mid-answer (%s), ending it where it is", engine.name, error)

        text = (clean if final is None else final).rstrip()
        finish = repaired or state.finish or "stop"
        tool_calls = tuple(state.tool_calls[i] for i in sorted(state.tool_calls))
        if not state.committed:
            if not text and not tool_calls:
                raise QualityRejected("empty answer")
            if not tool_calls and not is_last:
                if finish == "length" and not ends_sentence(text) and last_sentence_end(text) < 0:
                    raise QualityRejected("cut off by the token limit")
                reason = wrong_language(text, language)
                if reason:
                    raise QualityRejected(reason)
        if finish in ("length", "timeout", "error") and text and not ends_sentence(text):
            end = last_sentence_end(text, max(0, len(state.sent) - 1))  # may end where `sent` ends
            text = text[:end] if end > 0 else text + "…"
        if not text.startswith(state.sent):  # cleaning changed released text: keep what was said
            text = state.sent
        await release(text)
        return Answer(
            text=text,
            level=index,
            engine=engine.name,
            model=engine.model,
            finish_reason=finish,
            tool_calls=tool_calls,
            first_chunk_s=None if state.first_chunk_at is None else state.first_chunk_at - started,
            tokens=state.tokens,
            tokens_per_second=_rate(state),
        )


def _rate(state: _Stream) -> float | None:
    if state.tokens < 2 or state.first_token_at is None or state.last_token_at is None:
        return None
    span = state.last_token_at - state.first_token_at
    return (state.tokens - 1) / span if span > 0 else None


def _merge_tool_calls(into: dict[int, dict[str, Any]], deltas: Sequence[Mapping[str, Any]]) -> None:
    """Accumulate OpenAI tool-call deltas (arguments arrive in pieces) into whole calls."""
    for delta in deltas:
        index = int(delta.get("index", 0) or 0)
        call = into.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]
