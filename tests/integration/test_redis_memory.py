"""The shared conversation store against a real Redis (Debian ``redis-server``) on loopback.

Two stores on one Redis stand for two handle replicas behind one Service: a
follow-up question that lands on the other replica still sees the first turn.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

redis = pytest.importorskip("redis")

from wyoming_superwhisper.handle.conversation import ConversationMemory, Turn  # noqa: E402
from wyoming_superwhisper.handle.memory_store import (  # noqa: E402
    RedisConversationStore,
    open_conversation_store,
)

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server (Debian package) not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert REDIS_SERVER is not None
    port = _free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(10)


@pytest.fixture
def stores(redis_url: str, request: pytest.FixtureRequest) -> Iterator[tuple[RedisConversationStore, ...]]:
    prefix = f"test:{request.node.name}:"
    pair = tuple(RedisConversationStore(3, 60, 5, url=redis_url, prefix=prefix) for _ in range(2))
    yield pair
    for store in pair:
        for key in list(store._redis.scan_iter(match=prefix + "*")):
            store._redis.delete(key)
        store.close()


def test_follow_up_on_another_replica_sees_the_first_turn(
    stores: tuple[RedisConversationStore, ...],
) -> None:
    first, second = stores
    first.remember("salon", "Quel temps fait-il aujourd'hui ?", "Il fait beau, 18 degrés.")
    assert second.history("salon") == [Turn("Quel temps fait-il aujourd'hui ?", "Il fait beau, 18 degrés.")]
    second.remember("salon", "Et demain ?", "Demain, de la pluie.")
    assert [t.user for t in first.history("salon")] == ["Quel temps fait-il aujourd'hui ?", "Et demain ?"]
    assert first.history("cuisine") == []
    assert len(first) == 1


def test_keeps_only_the_last_turns_like_the_local_memory(stores: tuple[RedisConversationStore, ...]) -> None:
    store = stores[0]
    local = ConversationMemory(3, 60, 5)
    for i in range(5):
        store.remember("c", f"question {i}", f"réponse {i}")
        local.remember("c", f"question {i}", f"réponse {i}")
    assert store.history("c") == local.history("c")
    assert [t.user for t in store.history("c")] == ["question 2", "question 3", "question 4"]


def test_conversations_expire_after_their_ttl(stores: tuple[RedisConversationStore, ...]) -> None:
    store = stores[0]
    store.remember("explicit", "Allume la lumière", "C'est fait.")
    store.remember("peer:10.0.0.5", "Éteins tout", "Tout est éteint.", implicit=True)
    explicit_ttl = store._redis.pttl(store.prefix + "explicit")
    implicit_ttl = store._redis.pttl(store.prefix + "peer:10.0.0.5")
    assert 55_000 < explicit_ttl <= 60_000
    assert 0 < implicit_ttl <= 5_000
    short = RedisConversationStore(3, 0.2, 0.2, client=store._redis, prefix=store.prefix)
    short.remember("bientôt oublié", "Bonjour", "Bonjour !")
    assert short.history("bientôt oublié")
    deadline = time.monotonic() + 5
    while short.history("bientôt oublié") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert short.history("bientôt oublié") == []


def test_zero_ttl_or_turns_remembers_nothing_and_forget_forgets(
    stores: tuple[RedisConversationStore, ...],
) -> None:
    store = stores[0]
    off = RedisConversationStore(3, 60, 0, client=store._redis, prefix=store.prefix)
    off.remember("peer:10.0.0.9", "Bonjour", "Bonjour !", implicit=True)
    assert off.history("peer:10.0.0.9") == []
    store.remember("x", "Hello", "Hi!")
    store.forget("x")
    assert store.history("x") == []


def test_unreachable_redis_degrades_to_no_memory(caplog: pytest.LogCaptureFixture) -> None:
    dead = RedisConversationStore(3, 60, 5, url=f"redis://127.0.0.1:{_free_port()}/0", timeout_s=0.2)
    with caplog.at_level("WARNING"):
        dead.remember("salon", "Quelle heure est-il ?", "Il est midi.")
        assert dead.history("salon") == []
        assert len(dead) == 0
    assert "conversation memory unavailable" in caplog.text
    dead.close()


def test_open_conversation_store_by_setting(redis_url: str) -> None:
    assert isinstance(open_conversation_store("local", 3, 60, 5), ConversationMemory)
    shared = open_conversation_store(redis_url, 3, 60, 5)
    assert isinstance(shared, RedisConversationStore)
    shared.close()
    with pytest.raises(ValueError, match=r"handle\.memory"):
        open_conversation_store("memcached://x", 3, 60, 5)
