"""Wyoming events of one handle connection ↔ the service's :meth:`respond`.

``describe`` is answered at once, even while an answer is being generated on
the same connection: the ``transcript`` runs in a task of its own. Events of
an answer, in order: ``handled-start``, ``handled-chunk``… as text is
released, the full ``handled`` (Home Assistant reads only that one), then
``handled-stop``. When every level fails: ``not-handled`` with a spoken
apology in the user's language, never silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from wyoming.asr import Transcript
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Describe

from ..runtime.fallback import AllLevelsFailed
from ..runtime.limits import ProtocolViolation
from ..runtime.server import Connection, EventHandler
from .conversation import conversation_key
from .prompts import apology, base_language, detect_language, strip_control
from .service import ClientGone as _ClientGone
from .service import HandleService

_LOGGER = logging.getLogger(__name__)


class HandleHandler(EventHandler):
    """Translates events only; the service owns models, memory and the chain."""

    def __init__(self, connection: Connection, service: HandleService) -> None:
        super().__init__(connection)
        self.service = service
        self._task: asyncio.Task[None] | None = None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.connection.write(self.service.info().event())
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
                self._answer(text, language, context), name=f"handle-answer {self.connection.peer}"
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

    async def _answer(self, text: str, language: str, context: dict[str, Any] | None) -> None:
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
            try:
                answer = await service.respond(messages, language, on_chunk)
            except AllLevelsFailed as failure:
                _LOGGER.warning("handle %s: no answer: %s", self.connection.peer, failure)
                metrics.count(service.name, "error")
                await self._send(NotHandled(text=apology(language), context=reply_context).event())
                return
            if not started_sent:  # nothing streamed (cannot happen with text, kept for safety)
                await self._send(HandledStart(context=reply_context).event())
            await self._send(Handled(text=answer.text, context=reply_context).event())
            # The answer is out: remembered and counted even when the client hangs up before
            # handled-stop, as a client that has read ``handled`` may.
            await service.remember(key, text, answer.text, implicit=implicit)
            metrics.count(service.name, "fallback" if answer.fell_back else "ok")
            with contextlib.suppress(_ClientGone):
                await self._send(HandledStop().event())
            if answer.first_chunk_s is not None:
                metrics.observe(service.name, "first_chunk", answer.first_chunk_s, answer.level)
            metrics.observe(
                service.name, "generation", asyncio.get_running_loop().time() - started, answer.level
            )
            if answer.tokens_per_second is not None:
                metrics.tokens_per_second.labels(str(answer.level)).observe(answer.tokens_per_second)
            _LOGGER.info(
                "handle %s: answered by %s (%s) in %.2f s",
                self.connection.peer,
                answer.engine,
                answer.finish_reason,
                asyncio.get_running_loop().time() - started,
            )
        except (ConnectionError, _ClientGone):
            _LOGGER.info("handle %s: client gone before the answer ended", self.connection.peer)

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
