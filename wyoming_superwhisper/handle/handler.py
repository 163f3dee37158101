"""Wyoming events of one handle connection ↔ the service's :meth:`respond`.

``describe`` is answered at once, even while an answer is being generated on
the same connection: the ``transcript`` runs in a task of its own. Events of
an answer, in order: ``handled-start``, ``handled-chunk``… as text is
released, the full ``handled`` (Home Assistant reads only that one), then
``handled-stop``. When every level fails: ``not-handled`` with a spoken
apology in the user's language, never silence.

Home control, two ways:

* ``handle.hass_url`` and a token set: every transcript goes through Home
  Assistant's MCP server (:mod:`.mcp_home`); calls are run there and the
  answer says what happened. Home Assistant unreachable or refusing the token:
  ``not-handled`` with a sentence that says so.
* otherwise, with ``handle.wyoming_intents``, a client that speaks Wyoming
  1.9 or newer (the ``version`` in its event headers) gets a home command Home
  Assistant's sentence templates recognize as ``intents-start`` / ``intent`` /
  ``intents-stop``, which Home Assistant executes itself (names are
  wildcards: it resolves them); ``info`` then advertises
  ``supports_home_control``. Older clients get text, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from typing import Any

from wyoming.asr import Transcript
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Describe, Info
from wyoming.intent import Entity, Intent, IntentsStart, IntentsStop

from ..runtime.fallback import AllLevelsFailed
from ..runtime.fallback import ClientGone as _ClientGone
from ..runtime.limits import ProtocolViolation
from ..runtime.server import Connection, EventHandler
from .conversation import conversation_key
from .home import Home, ToolError
from .intents import IntentMatch, confirmation
from .mcp_home import HomeUnavailable, metrics_home
from .prompts import apology, base_language, detect_language, strip_control
from .service import Answer, HandleService

_LOGGER = logging.getLogger(__name__)

INTENTS_PROTOCOL = (1, 9)
"""First Wyoming release whose clients (Home Assistant 2026.5+) take a handle's intents."""
ACTION_INTENTS = frozenset(
    {
        "HassTurnOn",
        "HassTurnOff",
        "HassToggle",
        "HassLightSet",
        "HassClimateSetTemperature",
        "HassSetPosition",
        "HassFanSetSpeed",
        "HassMediaPause",
        "HassMediaUnpause",
        "HassMediaNext",
        "HassMediaPrevious",
        "HassSetVolume",
        "HassVacuumStart",
        "HassVacuumReturnToBase",
        "HassListAddItem",
        "HassShoppingListAddItem",
    }
)
"""Intents handed to the client: commands whose outcome Home Assistant words or we can.
Questions (state, time, weather) stay with the model: answering them needs the state."""


def protocol_version(version: str | None) -> tuple[int, ...]:
    """``"1.10.2"`` → ``(1, 10, 2)``; unknown or malformed → ``()`` (the oldest client)."""
    if not isinstance(version, str):
        return ()
    parts: list[int] = []
    for piece in version.strip().split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):  # "0rc1": a pre-release of 0, nothing after it counts
            break
    return tuple(parts)


def speaks_intents(version: str | None) -> bool:
    parsed = protocol_version(version)
    return bool(parsed) and parsed >= INTENTS_PROTOCOL


@functools.lru_cache(maxsize=64)
def response_template(intent: str, language: str) -> str | None:
    """Home Assistant's default response to ``intent`` in ``language`` (a Jinja template), if any."""
    from home_assistant_intents import get_intents

    try:
        data = get_intents(base_language(language) or "fr") or {}
    except Exception:  # an unknown language: our own sentence is used
        return None
    responses = (data.get("responses") or {}).get("intents", {}).get(intent) or {}
    found = responses.get("default") if isinstance(responses, dict) else None
    return found.strip() if isinstance(found, str) and found.strip() else None


class HandleHandler(EventHandler):
    """Translates events only; the service owns models, memory and the chain."""

    def __init__(self, connection: Connection, service: HandleService) -> None:
        super().__init__(connection)
        self.service = service
        self._task: asyncio.Task[None] | None = None
        self.home = service.home_control

    def info(self, client_version: str | None) -> Info:
        """The service's ``info``, with ``supports_home_control`` where it is true for this client."""
        info = self.service.info()
        controls = self.home is not None or self._intents_for(client_version)
        for program in info.handle:
            program.supports_home_control = controls
        return info

    def _intents_for(self, client_version: str | None) -> bool:
        """Whether home commands go back to this client as intents (``handle.wyoming_intents``)."""
        return self.service.settings.wyoming_intents and speaks_intents(client_version)

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.connection.write(self.info(getattr(event, "version", None)).event())
            return True
        if Transcript.is_type(event.type):
            if self._task is not None and not self._task.done():
                await self.connection.error("an answer is already being generated on this connection", "busy")
                self.service.context.metrics.count(self.service.name, "busy")
                return True
            text, language, context = self._parse(event.data)
            if not self.service.try_admit():
                self.service.context.metrics.count(self.service.name, "busy")
                await self.connection.error("server busy: too many requests waiting", "busy")
                return True
            self._task = asyncio.create_task(
                self._answer(text, language, context, getattr(event, "version", None)),
                name=f"handle-answer {self.connection.peer}",
            )
            # Released when the task ends in any way, even cancelled before it first ran
            # (a client that hangs up at once): a slot must never leak.
            self._task.add_done_callback(lambda _task: self.service.release())
            return True
        _LOGGER.debug("handle %s: ignoring event %s", self.connection.peer, event.type)
        return True

    def _parse(self, data: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
        raw = data.get("text")
        if not isinstance(raw, str):
            raise ProtocolViolation("bad-value", "'text' of a transcript must be a string")
        limit = self.service.settings.max_chars
        if len(raw) > limit:
            raise ProtocolViolation("too-long", f"transcript longer than {limit} characters ({len(raw)})")
        text = strip_control(raw)
        if not text:
            raise ProtocolViolation("bad-value", "empty transcript")
        language = data.get("language")
        if language is not None and (not isinstance(language, str) or len(language) > 16):
            raise ProtocolViolation("bad-value", "'language' must be a short string like 'fr'")
        if not language:
            language = detect_language(text, self.service.settings.language)
        context = data.get("context")
        if context is not None and not isinstance(context, dict):
            raise ProtocolViolation("bad-value", "'context' must be an object")
        return text, base_language(language) or self.service.settings.language, context

    async def _answer(
        self, text: str, language: str, context: dict[str, Any] | None, client_version: str | None = None
    ) -> None:
        service = self.service
        metrics = service.context.metrics
        key, implicit = conversation_key(context, self.connection.peer)
        reply_context = {**(context or {}), "conversation_id": key}
        started = asyncio.get_running_loop().time()
        started_sent = False

        async def on_chunk(piece: str) -> None:
            nonlocal started_sent
            if not started_sent:
                started_sent = True
                await self._send(HandledStart(context=reply_context).event())
            await self._send(HandledChunk(text=piece).event())

        try:
            history = await service.read_conversation(key)
            messages = service.conversation_messages(key, text, language, history)
            calls: list[dict[str, Any]] = []
            try:
                if self.home is not None:
                    done = await self.home.answer(self.home.with_calls(key, messages), language, on_chunk)
                    answer, said, calls = done.answer, done.text, done.calls
                else:
                    if self._intents_for(client_version) and await self._answer_with_intent(
                        text, language, key, implicit, reply_context
                    ):
                        return
                    answer = await service.respond(messages, language, on_chunk)
                    said = answer.text
            except HomeUnavailable as unavailable:
                _LOGGER.warning("handle %s: Home Assistant unusable: %s", self.connection.peer, unavailable)
                metrics_home(metrics, "mcp", unavailable.reason)
                metrics.count(service.name, "error")
                await self._send(
                    NotHandled(text=unavailable.sentence(language), context=reply_context).event()
                )
                return
            except (AllLevelsFailed, ToolError) as failure:
                _LOGGER.warning("handle %s: no answer: %s", self.connection.peer, failure)
                metrics.count(service.name, "error")
                await self._send(NotHandled(text=apology(language), context=reply_context).event())
                return
            except ConnectionError:
                raise
            except Exception:
                if self.home is None:
                    raise
                # Home Assistant answered something the MCP path did not expect: the user
                # still hears an apology, the log has the traceback, the server keeps serving.
                _LOGGER.exception("handle %s: home control failed", self.connection.peer)
                metrics_home(metrics, "mcp", "protocol")
                metrics.count(service.name, "error")
                await self._send(NotHandled(text=apology(language), context=reply_context).event())
                return
            if not started_sent:  # nothing streamed (cannot happen with text, kept for safety)
                await self._send(HandledStart(context=reply_context).event())
            await self._send(Handled(text=said, context=reply_context).event())
            # The answer is out: remembered and counted even when the client hangs up before
            # handled-stop, as a client that has read ``handled`` may.
            await service.remember(key, text, said, implicit=implicit)
            if self.home is not None:
                self.home.remember_calls(key, text, calls, implicit=implicit)
            metrics.count(service.name, "fallback" if answer.fell_back else "ok")
            with contextlib.suppress(_ClientGone):
                await self._send(HandledStop().event())
            self._observe(answer, started)
        except (ConnectionError, _ClientGone):
            _LOGGER.info("handle %s: client gone before the answer ended", self.connection.peer)

    def _observe(self, answer: Answer, started: float) -> None:
        service = self.service
        metrics = service.context.metrics
        elapsed = asyncio.get_running_loop().time() - started
        if answer.first_chunk_s is not None:
            metrics.observe(service.name, "first_chunk", answer.first_chunk_s, answer.level)
        metrics.observe(service.name, "generation", elapsed, answer.level)
        if answer.tokens_per_second is not None:
            metrics.tokens_per_second.labels(str(answer.level)).observe(answer.tokens_per_second)
        _LOGGER.info(
            "handle %s: answered by %s (%s) in %.2f s",
            self.connection.peer,
            answer.engine,
            answer.finish_reason,
            elapsed,
        )

    async def _answer_with_intent(
        self, text: str, language: str, key: str, implicit: bool, reply_context: dict[str, Any]
    ) -> bool:
        """A home command for a Wyoming 1.9+ client: the intent it executes; False: not one.

        Home Assistant runs the intent against its own entities and speaks our
        ``text`` when its handler wrote none (it does not for on/off). That text
        is the response template its own agent would use (``home-assistant-intents``;
        Home Assistant renders it with the matched states), so the answer reads
        the same as with its default agent.
        """
        service = self.service
        try:
            match: IntentMatch | None = await asyncio.to_thread(
                service.intents.recognize, text, language, None
            )
        except Exception:  # the templates failing must never cost the user an answer
            _LOGGER.exception("handle: intent recognition failed; the model answers")
            return False
        if match is None or match.intent not in ACTION_INTENTS or not match.slots:
            return False
        call = {"name": match.intent, "arguments": dict(match.slots)}
        done = {"response_type": "action_done", "data": {"success": [], "failed": []}}
        spoken = confirmation(call, done, language, Home()) or ""
        template = response_template(match.intent, language) or spoken
        entities = [Entity(name=name, value=value) for name, value in match.slots.items()]
        await self._send(IntentsStart(context=reply_context).event())
        await self._send(
            Intent(name=match.intent, entities=entities, text=template or None, context=reply_context).event()
        )
        await self._send(IntentsStop(context=reply_context).event())
        await service.remember(key, text, spoken, implicit=implicit)
        service.context.metrics.count(service.name, "ok")
        metrics_home(service.context.metrics, "intent", "ok")
        _LOGGER.info(
            "handle %s: %s handed to the client as intent %s %s",
            self.connection.peer,
            text[:80],
            match.intent,
            match.slots,
        )
        return True

    async def _send(self, event: Event) -> None:
        try:
            await self.connection.write(event)
        except ConnectionError as error:
            raise _ClientGone() from error

    async def disconnect(self) -> None:
        """The client left: stop the generation (the engine frees the model within a token)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
