"""Conversation memory: the last exchanges of each conversation, forgotten when idle.

So that "et demain ?" follows "quel temps fait-il aujourd'hui ?", the prompt
carries the previous turns of the same conversation.

Which conversation a request belongs to (:func:`conversation_key`):

* the client's ``context`` names it (``conversation_id``, as newer Home
  Assistant releases send): that id, kept ``handle.memory_ttl_s`` seconds;
* no id (Home Assistant 2025.4's wyoming 1.5.4 drops the context; plain
  clients send none): an *implicit* conversation per peer host, kept only
  ``handle.implicit_memory_ttl_s`` seconds. Home Assistant opens a new TCP
  connection per request, so the port means nothing, but the host is stable;
  every satellite behind one Home Assistant shares that host, hence the short
  lifetime: a follow-up question comes within a minute or two, an unrelated
  request from another room usually does not. 0 turns implicit memory off.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

IMPLICIT_PREFIX = "peer:"
MAX_CONVERSATIONS = 1000
"""Conversations remembered at most (oldest forgotten first): a bound on memory use."""
MAX_ID_CHARS = 200


@dataclass(frozen=True)
class Turn:
    """One exchange: what the user said, what the assistant answered."""

    user: str
    assistant: str


@dataclass
class _Conversation:
    turns: deque[Turn]
    ttl_s: float
    last_used: float = field(default=0.0)


def conversation_key(context: Mapping[str, Any] | None, peer: str) -> tuple[str, bool]:
    """(key, implicit) for a request: the client's conversation id, or its peer host."""
    if isinstance(context, Mapping):
        for name in ("conversation_id", "conversationId", "id"):
            value = context.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()[:MAX_ID_CHARS], False
    # Connection.peer is "<host>:<port>" (IPv6 hosts contain colons too): drop the port.
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    return IMPLICIT_PREFIX + host, True


class ConversationMemory:
    """Last ``turns`` exchanges per conversation; idle conversations expire.

    Thread-safe (the OpenAI API and the Wyoming handler share one memory).
    """

    does_io = False
    """In memory: called on the event loop directly (see :attr:`RedisConversationStore.does_io`)."""

    def __init__(
        self,
        turns: int,
        ttl_s: float,
        implicit_ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_conversations: int = MAX_CONVERSATIONS,
    ) -> None:
        self.turns = max(0, turns)
        self.ttl_s = ttl_s
        self.implicit_ttl_s = implicit_ttl_s
        self._clock = clock
        self._max = max_conversations
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def history(self, key: str) -> list[Turn]:
        """The remembered turns, oldest first (empty for a new or expired conversation)."""
        with self._lock:
            self._expire()
            found = self._conversations.get(key)
            return list(found.turns) if found is not None else []

    def remember(self, key: str, user: str, assistant: str, *, implicit: bool = False) -> None:
        ttl = self.implicit_ttl_s if implicit else self.ttl_s
        if self.turns == 0 or ttl <= 0:
            return
        with self._lock:
            self._expire()
            found = self._conversations.get(key)
            if found is None:
                found = _Conversation(deque(maxlen=self.turns), ttl)
                self._conversations[key] = found
            found.turns.append(Turn(user, assistant))
            found.last_used = self._clock()
            self._conversations.move_to_end(key)
            while len(self._conversations) > self._max:
                self._conversations.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._conversations.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._conversations)

    def _expire(self) -> None:
        now = self._clock()
        stale = [k for k, c in self._conversations.items() if now - c.last_used >= c.ttl_s]
        for key in stale:
            del self._conversations[key]


def build_messages(system: str, history: list[Turn], user: str) -> list[dict[str, Any]]:
    """OpenAI-style chat messages: system prompt, the remembered turns, the new request."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": user})
    return messages
