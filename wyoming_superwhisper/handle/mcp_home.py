"""The Wyoming handle acts on the home through Home Assistant's MCP server.

Home Assistant's Ollama integration hands the model its Assist API tools in
each request; a client that sends a transcript straight to our Wyoming handle
sends none. With ``handle.hass_url`` and ``handle.hass_token`` set, each
transcript opens a session with Home Assistant's ``mcp_server`` integration
(2025.2+: Server-Sent Events at ``/mcp_server/sse``, the token as bearer),
reads the same tools (``tools/list``) and the same prompt with the exposed
entities (``prompts/get`` of the Assist API), and asks
:meth:`HandleService.respond` exactly as the Ollama API does: Home
Assistant's sentence templates first, then the chain under the grammar, every
call checked by ``validate_call``. A call in the answer is run with
``tools/call``; its result goes back as a ``tool`` message and ``respond``
words the outcome (at most :data:`MAX_ROUNDS` rounds).

One session per transcript (a few milliseconds on a LAN): nothing to keep
alive, to reconnect or to close when the service stops, and a token changed in
Home Assistant takes effect on the next request.

The calls of an exchange are kept per conversation beside the memory's
turns, so that "Éteins-la" finds the light "Allume la lumière de la cuisine"
turned on, as Home Assistant's own chat log lets its agents do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, HandleSettings
from .home import home_of
from .intents import likely_confirmations

if TYPE_CHECKING:
    from mcp import ClientSession

    from .service import Answer, HandleService

_LOGGER = logging.getLogger(__name__)

SSE_PATH = "/mcp_server/sse"
ASSIST_PROMPT = "Assist"
"""The prompt Home Assistant's MCP server offers for its Assist API (``llm.API.name``)."""
MAX_ROUNDS = 3
"""Model answers per transcript: a call, its confirmation, and one more call at most."""
CALLS_KEPT = 1000
"""Conversations whose last calls are remembered (oldest forgotten first)."""

ChunkSink = Callable[[str], Awaitable[None]]


class HomeUnavailable(Exception):
    """Home Assistant's MCP server cannot be used now; ``reason`` for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        """``unreachable``, ``unauthorized``, ``not_configured``, ``timeout`` or ``protocol``."""
        super().__init__(f"{reason}: {detail}")

    def sentence(self, language: str) -> str:
        """What the user hears instead of an answer (the server keeps serving)."""
        fr = not language.lower().startswith("en")
        if self.reason == "unauthorized":
            return (
                "Home Assistant a refusé mon accès : vérifiez le jeton configuré."
                if fr
                else "Home Assistant refused my access: please check the configured token."
            )
        if self.reason == "not_configured":
            return (
                "Le serveur MCP de Home Assistant n'est pas activé : "
                "ajoutez l'intégration Model Context Protocol Server."
                if fr
                else "Home Assistant's MCP server is not set up: "
                "add the Model Context Protocol Server integration."
            )
        return (
            "Je n'arrive pas à joindre Home Assistant. Réessayez dans un instant."
            if fr
            else "I cannot reach Home Assistant right now. Please try again in a moment."
        )


# --- conversions (pure) ----------------------------------------------------------------------


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """MCP ``tools/list`` entries → the OpenAI/Ollama ``tools`` shape ``respond`` takes.

    Home Assistant's MCP server sends each intent's parameters as
    ``{"type": "object", "properties": ...}`` without ``required`` (every slot is
    optional to an intent); they are passed on as they are.
    """
    converted: list[dict[str, Any]] = []
    for tool in tools:
        name = getattr(tool, "name", None)
        if not isinstance(name, str) or not name:
            continue
        schema = getattr(tool, "inputSchema", None)
        parameters = dict(schema) if isinstance(schema, Mapping) else {}
        parameters.setdefault("type", "object")
        parameters.setdefault("properties", {})
        converted.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": str(getattr(tool, "description", "") or ""),
                    "parameters": parameters,
                },
            }
        )
    return converted


def prompt_text(result: Any) -> str:
    """The text of a ``prompts/get`` result (Home Assistant: one message, the Assist prompt)."""
    parts: list[str] = []
    for message in getattr(result, "messages", None) or []:
        content = getattr(message, "content", None)
        text = getattr(content, "text", None)
        if isinstance(text, str) and text.strip():
            parts.append(text.strip())
    return "\n\n".join(parts)


def tool_result_content(result: Any, language: str = "fr") -> str:
    """A ``tools/call`` result → the ``tool`` message content the model and templates read.

    Home Assistant returns the intent response as JSON text; a failed call
    (``isError``: no such device, a bad value) becomes ``{"error", "error_text"}``
    as Home Assistant's own chat log writes tool errors, which the templates
    word as "Je n'ai pas pu le faire : …" (so the text is short and in the
    user's language, see :func:`spoken_error`).
    """
    texts = [
        str(getattr(item, "text", ""))
        for item in getattr(result, "content", None) or []
        if getattr(item, "type", "") == "text"
    ]
    text = "\n".join(t for t in texts if t)
    if getattr(result, "isError", False):
        return json.dumps(
            {"error": "HomeAssistantError", "error_text": spoken_error(text, language)}, ensure_ascii=False
        )
    return text or "{}"


_NO_MATCH = {
    "fr": "aucun appareil exposé à Assist ne correspond",
    "en": "no device exposed to Assist matches",
}


def spoken_error(text: str, language: str) -> str:
    """Home Assistant's error for a failed tool, as a clause a person can hear.

    ``Error calling tool: <MatchFailedError result=MatchTargetsResult(...)>`` is
    what Home Assistant 2025.4 sends when no entity matches: said aloud it is noise.
    """
    fr = not language.lower().startswith("en")
    detail = text.strip()
    for prefix in ("Error calling tool:", "Error calling tool"):
        if detail.startswith(prefix):
            detail = detail[len(prefix) :].strip()
    if "MatchFailedError" in detail or "no_match_reason" in detail:
        return _NO_MATCH["fr" if fr else "en"]
    if detail.startswith("<"):  # an exception's repr: its class name is all that means anything
        detail = detail[1:].split(" ", 1)[0].rstrip(">")
    detail = detail.rstrip(".")
    if not detail:
        return "l'action a échoué" if fr else "the action failed"
    return detail if len(detail) <= 160 else detail[:157].rstrip() + "…"


def system_with_home(system: str, assist_prompt: str) -> str:
    """Our voice prompt followed by Home Assistant's (its rules and the exposed entities)."""
    return f"{system}\n\n{assist_prompt}" if assist_prompt else system


def _arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    raw = function.get("arguments") if isinstance(function, Mapping) else None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw or "{}")
        except ValueError:
            raw = {}
    return dict(raw) if isinstance(raw, Mapping) else {}


def classify_failure(error: BaseException) -> HomeUnavailable:
    """Why a session could not be used, from what httpx/anyio/mcp raised (groups unwrapped)."""
    import httpx
    from mcp.shared.exceptions import McpError

    for leaf in _leaves(error):
        if isinstance(leaf, HomeUnavailable):
            return leaf
        if isinstance(leaf, httpx.HTTPStatusError):
            status = leaf.response.status_code
            if status in (401, 403):
                return HomeUnavailable("unauthorized", f"HTTP {status} from {leaf.request.url}")
            if status == 404:
                return HomeUnavailable("not_configured", f"HTTP 404 from {leaf.request.url}")
            return HomeUnavailable("protocol", f"HTTP {status} from {leaf.request.url}")
        if isinstance(leaf, (TimeoutError, httpx.TimeoutException)):
            return HomeUnavailable("timeout", str(leaf) or type(leaf).__name__)
        if isinstance(leaf, (httpx.TransportError, OSError)):
            return HomeUnavailable("unreachable", str(leaf) or type(leaf).__name__)
        if isinstance(leaf, McpError):
            return HomeUnavailable("protocol", str(leaf))
    return HomeUnavailable("protocol", f"{type(error).__name__}: {error}")


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    chained = error.__cause__ or error.__context__
    return [error, *(_leaves(chained) if chained is not None and chained is not error else [])]


# --- the session ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HomeSnapshot:
    """What one session read from Home Assistant: the tools and the Assist prompt."""

    tools: list[dict[str, Any]]
    prompt: str


class McpHome:
    """One Home Assistant: opens MCP sessions, runs a transcript's tool rounds in one."""

    def __init__(self, url: str, token: str, timeout_s: float) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError("handle.hass_url", "configuration", f"must be an http(s):// URL, not {url!r}")
        if timeout_s <= 0:
            raise ConfigError("handle.hass_timeout_s", "configuration", "must be more than 0 seconds")
        self.sse_url = url.rstrip("/") + SSE_PATH
        self.token = token
        self.timeout_s = timeout_s

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[ClientSession]:
        """An initialized MCP session; :class:`HomeUnavailable` when it cannot be had."""
        from mcp import ClientSession
        from mcp.client.sse import sse_client

        stack = contextlib.AsyncExitStack()
        try:
            async with asyncio.timeout(self.timeout_s):
                streams = await stack.enter_async_context(
                    sse_client(
                        self.sse_url,
                        headers={"Authorization": f"Bearer {self.token}"},
                        timeout=self.timeout_s,
                        sse_read_timeout=max(60.0, self.timeout_s * 6),
                    )
                )
                session = await stack.enter_async_context(
                    ClientSession(
                        streams[0], streams[1], read_timeout_seconds=dt.timedelta(seconds=self.timeout_s)
                    )
                )
                await session.initialize()
        except asyncio.CancelledError:
            await _close_quietly(stack)
            raise
        except BaseException as error:  # anyio raises groups: classified below
            await _close_quietly(stack)
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise classify_failure(error) from error
        try:
            yield session
        finally:
            await _close_quietly(stack)

    async def snapshot(self, session: ClientSession) -> HomeSnapshot:
        """The Assist tools and prompt, read fresh (an entity exposed a minute ago is in)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                listed = await session.list_tools()
                prompts = await session.list_prompts()
                names = [p.name for p in prompts.prompts]
                name = ASSIST_PROMPT if ASSIST_PROMPT in names else (names[0] if names else None)
                prompt = prompt_text(await session.get_prompt(name)) if name else ""
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise classify_failure(error) from error
        return HomeSnapshot(openai_tools(listed.tools), prompt)

    async def call(
        self, session: ClientSession, name: str, arguments: Mapping[str, Any], language: str = "fr"
    ) -> str:
        """Run one tool; its ``tool`` message content (a tool's own failure is content too)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await session.call_tool(name, dict(arguments))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            failure = classify_failure(error)
            if failure.reason != "protocol":
                raise failure from error
            # The server answered with a JSON-RPC error (an unknown tool, bad arguments):
            # the call failed, not the session; the user hears why.
            return json.dumps(
                {"error": "McpError", "error_text": spoken_error(str(error), language)}, ensure_ascii=False
            )
        return tool_result_content(result, language)


async def _close_quietly(stack: contextlib.AsyncExitStack) -> None:
    """Leave the SSE client; an error while hanging up (HA already gone) changes nothing."""
    try:
        await stack.aclose()
    except asyncio.CancelledError:
        raise
    except BaseException as error:  # anyio task-group errors on the way out
        _LOGGER.debug("hass mcp: error while closing the session: %r", error)


# --- a transcript through the home ------------------------------------------------------------


@dataclass
class HomeAnswer:
    """The spoken answer of one transcript and what was done to reach it."""

    answer: Answer
    text: str
    calls: list[dict[str, Any]]
    """The messages of this exchange's calls (assistant ``tool_calls``, then ``tool`` results)."""
    rounds: int


class HomeControl:
    """The Wyoming handle's home control: one per service, created when ``hass_url`` is set."""

    def __init__(self, service: HandleService, home: McpHome | None = None) -> None:
        settings: HandleSettings = service.settings
        self.service = service
        self.home = home or McpHome(settings.hass_url, settings.hass_token, settings.hass_timeout_s)
        self._calls: OrderedDict[str, tuple[float, list[tuple[str, list[dict[str, Any]]]]]] = OrderedDict()
        self.reached: dict[str, Any] = {"reachable": None}
        """How the last exchange with Home Assistant went (``/status``): None before the first."""

    async def warm(self) -> None:
        """Reach Home Assistant once at start, off the request path.

        The first command after a start otherwise paid for importing the MCP client and
        for Home Assistant's first session; a wrong URL or token shows in the log and
        ``/status`` at once instead of at the first command.
        """
        try:
            async with self.home.session() as session:
                snapshot = await self.home.snapshot(session)
        except HomeUnavailable as error:
            self._failed(error)
            _LOGGER.warning("hass mcp: Home Assistant not usable at start (%s): %s", self.home.sse_url, error)
            return
        self._reached(snapshot)
        language = self.service.settings.language
        try:
            home = home_of([{"role": "system", "content": snapshot.prompt}], snapshot.tools)
            offered = self.service.context.phrases.offer(language, likely_confirmations(home, language))
        except Exception:  # preparing is a bonus: never a reason to fail the start
            _LOGGER.exception("hass mcp: could not list the confirmations to prepare")
            offered = 0
        _LOGGER.info(
            "hass mcp: Home Assistant reached, %d tools; %d confirmations offered to be ready",
            len(snapshot.tools),
            offered,
        )

    def _reached(self, snapshot: HomeSnapshot) -> None:
        self.reached = {"reachable": True, "tools": len(snapshot.tools)}

    def _failed(self, error: HomeUnavailable) -> None:
        self.reached = {"reachable": False, "reason": error.reason, "detail": str(error)}

    # -- per-conversation calls (so a pronoun finds its target) --------------------------------

    def _ttl(self, implicit: bool) -> float:
        settings = self.service.settings
        return settings.implicit_memory_ttl_s if implicit else settings.memory_ttl_s

    def remember_calls(self, key: str, user: str, calls: list[dict[str, Any]], *, implicit: bool) -> None:
        if not calls or self._ttl(implicit) <= 0:
            return
        expires = time.monotonic() + self._ttl(implicit)
        kept = [(u, c) for u, c in self._calls.get(key, (0.0, []))[1] if u != user]
        kept = [*kept, (user, calls)][-max(1, self.service.settings.memory_turns) :]
        self._calls[key] = (expires, kept)
        self._calls.move_to_end(key)
        while len(self._calls) > CALLS_KEPT:
            self._calls.popitem(last=False)

    def with_calls(self, key: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with each remembered turn's calls between its request and its answer."""
        found = self._calls.get(key)
        if found is None:
            return messages
        if found[0] < time.monotonic():
            del self._calls[key]
            return messages
        by_user = dict(found[1])
        out: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            out.append(message)
            is_past_turn = index + 1 < len(messages) and messages[index + 1].get("role") == "assistant"
            if message.get("role") == "user" and is_past_turn:
                out.extend(by_user.get(str(message.get("content")), []))
        return out

    # -- one transcript --------------------------------------------------------------------------

    async def answer(
        self,
        messages: list[dict[str, Any]],
        language: str,
        on_chunk: ChunkSink,
    ) -> HomeAnswer:
        """Answer ``messages`` (system, turns, request) with Home Assistant's tools at hand.

        Raises :class:`HomeUnavailable` (nothing was said yet) when Home
        Assistant cannot be used, and :class:`AllLevelsFailed` as ``respond`` does.
        """
        try:
            async with self.home.session() as session:
                snapshot = await self.home.snapshot(session)
                self._reached(snapshot)
                return await self._rounds(session, snapshot, messages, language, on_chunk)
        except HomeUnavailable as error:
            self._failed(error)
            raise

    async def _rounds(
        self,
        session: Any,
        snapshot: HomeSnapshot,
        messages: list[dict[str, Any]],
        language: str,
        on_chunk: ChunkSink,
    ) -> HomeAnswer:
        """The model's (or the templates') tool rounds of :meth:`answer`, in an open session."""
        metrics = self.service.context.metrics
        spoken: list[str] = []

        async def say(piece: str) -> None:
            spoken.append(piece)
            await on_chunk(piece)

        conversation = [dict(m) for m in messages]
        if conversation and conversation[0].get("role") == "system":
            conversation[0]["content"] = system_with_home(
                str(conversation[0].get("content") or ""), snapshot.prompt
            )
        else:
            conversation.insert(0, {"role": "system", "content": snapshot.prompt})
        calls: list[dict[str, Any]] = []
        answer: Answer | None = None
        rounds = 0
        while rounds < MAX_ROUNDS:
            rounds += 1
            answer = await self.service.respond(conversation, language, say, tools=snapshot.tools or None)
            if not answer.tool_calls:
                break
            if rounds == MAX_ROUNDS:
                _LOGGER.warning("hass mcp: still calling tools after %d rounds; stopping", rounds)
                break
            made: list[dict[str, Any]] = []
            results: list[dict[str, Any]] = []
            for call in answer.tool_calls:
                function = call.get("function") or {}
                name = str(function.get("name", ""))
                arguments = _arguments(call)
                started = time.monotonic()
                content = await self.home.call(session, name, arguments, language)
                failed = _is_error(content)
                metrics_home(metrics, "mcp", "tool_error" if failed else "ok")
                _LOGGER.info(
                    "hass mcp: %s(%s) → %s in %.0f ms",
                    name,
                    json.dumps(arguments, ensure_ascii=False),
                    "error" if failed else "done",
                    (time.monotonic() - started) * 1000,
                )
                call_id = str(call.get("id") or f"call_{len(calls) + len(results)}")
                made.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name,
                            "arguments": json.dumps(arguments, ensure_ascii=False),
                        },
                    }
                )
                results.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": content})
            assistant = {"role": "assistant", "content": answer.text or "", "tool_calls": made}
            conversation += [assistant, *results]
            calls += [assistant, *results]
        assert answer is not None
        text = "".join(spoken).strip() or answer.text
        if not spoken and text:
            await on_chunk(text)
        if not text:  # the model only called tools: say that something was done rather than nothing
            text = "C'est fait." if not language.lower().startswith("en") else "Done."
            await on_chunk(text)
        return HomeAnswer(answer=answer, text=text, calls=calls, rounds=rounds)


def _is_error(content: str) -> bool:
    try:
        value = json.loads(content)
    except ValueError:
        return False
    return isinstance(value, Mapping) and (bool(value.get("error")) or value.get("response_type") == "error")


def metrics_home(metrics: Any, path: str, outcome: str) -> None:
    """Count one home action (``superwhisper_handle_home_actions_total``)."""
    metrics.home_actions.labels(path, outcome).inc()


def home_control_enabled(settings: HandleSettings) -> bool:
    """Both a URL and a token: a URL alone is a half-done setup, said once in the log."""
    url, token = settings.hass_url.strip(), settings.hass_token.strip()
    if url and not token and url not in _WARNED:
        _WARNED.add(url)
        _LOGGER.warning(
            "handle.hass_url is set but handle.hass_token is empty (SUPERWHISPER_HANDLE__HASS_TOKEN): "
            "the Wyoming handle will not act on the home"
        )
    return bool(url) and bool(token)


_WARNED: set[str] = set()
