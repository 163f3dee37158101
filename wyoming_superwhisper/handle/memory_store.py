"""Conversation memory shared by every handle replica, in Redis (``handle.memory: redis://…``).

On Kubernetes, Home Assistant opens a new TCP connection per request and the
Service spreads connections over the replicas: "et demain ?" may reach another
pod than "quel temps fait-il aujourd'hui ?". The in-process
:class:`~.conversation.ConversationMemory` cannot follow; this store keeps the
same interface (``history``, ``remember``, ``forget``, ``len``) on a Redis
that every replica reaches.

One Redis list per conversation holds its turns as JSON, trimmed to the last
``turns`` and expiring ``ttl_s`` (or ``implicit_ttl_s``) after the last
exchange, like the local memory. Redis does the expiry, so no replica scans.

Memory is a comfort, not a requirement: if Redis is unreachable, ``history``
answers no turns and ``remember`` drops the exchange (logged, rate-limited),
so the assistant still answers. Calls are synchronous like the local store's;
the handler runs them in a worker thread (``does_io``), so a slow Redis never
holds the event loop, and a short socket timeout bounds how long one takes.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .conversation import ConversationMemory, Turn

_LOGGER = logging.getLogger(__name__)

KEY_PREFIX = "superwhisper:conversation:"
WARN_EVERY_S = 60.0


class RedisConversationStore:
    """Last ``turns`` exchanges per conversation in Redis; idle conversations expire."""

    does_io = True
    """Every call is a network round trip: the handler runs it off the event loop."""

    def __init__(
        self,
        turns: int,
        ttl_s: float,
        implicit_ttl_s: float,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        client: Any = None,
        prefix: str = KEY_PREFIX,
        timeout_s: float = 0.5,
    ) -> None:
        self.turns = max(0, turns)
        self.ttl_s = ttl_s
        self.implicit_ttl_s = implicit_ttl_s
        self.prefix = prefix
        if client is None:
            import redis

            client = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
            )
        self._redis = client
        self._last_warning = 0.0

    def history(self, key: str) -> list[Turn]:
        """The remembered turns, oldest first (empty for a new or expired conversation)."""
        import redis

        try:
            raw = self._redis.lrange(self.prefix + key, 0, -1)
        except redis.RedisError as error:
            self._warn("read", error)
            return []
        turns = []
        for item in raw:
            try:
                data = json.loads(item)
                turns.append(Turn(str(data["user"]), str(data["assistant"])))
            except (ValueError, KeyError, TypeError):
                _LOGGER.warning("skipping a malformed turn in %s", self.prefix + key)
        return turns

    def remember(self, key: str, user: str, assistant: str, *, implicit: bool = False) -> None:
        import redis

        ttl = self.implicit_ttl_s if implicit else self.ttl_s
        if self.turns == 0 or ttl <= 0:
            return
        name = self.prefix + key
        item = json.dumps({"user": user, "assistant": assistant}, ensure_ascii=False)
        try:
            # One round trip, atomic: append, keep the last turns, push the expiry back.
            pipe = self._redis.pipeline(transaction=True)
            pipe.rpush(name, item)
            pipe.ltrim(name, -self.turns, -1)
            pipe.pexpire(name, max(1, int(ttl * 1000)))
            pipe.execute()
        except redis.RedisError as error:
            self._warn("write", error)

    def forget(self, key: str) -> None:
        import redis

        try:
            self._redis.delete(self.prefix + key)
        except redis.RedisError as error:
            self._warn("delete", error)

    def __len__(self) -> int:
        """Conversations currently remembered (a SCAN: for tests and /status, not the hot path)."""
        import redis

        try:
            return sum(1 for _ in self._redis.scan_iter(match=self.prefix + "*", count=500))
        except redis.RedisError as error:
            self._warn("count", error)
            return 0

    def close(self) -> None:
        self._redis.close()

    def _warn(self, what: str, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            _LOGGER.warning("conversation memory unavailable (%s): %s; answering without it", what, error)


def open_conversation_store(
    memory: str, turns: int, ttl_s: float, implicit_ttl_s: float
) -> ConversationMemory | RedisConversationStore:
    """``handle.memory``: ``local`` (in this process) or a ``redis://`` / ``rediss://`` URL."""
    if memory in ("", "local"):
        return ConversationMemory(turns, ttl_s, implicit_ttl_s)
    if memory.startswith(("redis://", "rediss://", "unix://")):
        return RedisConversationStore(turns, ttl_s, implicit_ttl_s, url=memory)
    raise ValueError(f"handle.memory must be 'local' or a redis:// URL, not {memory!r}")
