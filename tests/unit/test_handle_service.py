"""Handle service without models: the chain by VRAM, the streaming gate, the protocol.

Engines here are scripted fakes: the chain, the gate and the handler are
under test, not the model (that is tests/integration/test_handle_llm.py).
Everything else is real: settings, registry, the TCP server, the wyoming client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from wyoming_superwhisper.config import ConfigError, GpuSettings, Settings
from wyoming_superwhisper.handle.engines import ChatDelta, ChatEngine, ChatRequest, LlamaCppEngine
from wyoming_superwhisper.handle.service import HandleService, model_workers
from wyoming_superwhisper.runtime.fallback import EngineError
from wyoming_superwhisper.runtime.gpu import GpuDevice, choose_gpu
from wyoming_superwhisper.runtime.metrics import Metrics
from wyoming_superwhisper.runtime.registry import ModelRegistry, _packaged_catalog, load_catalog
from wyoming_superwhisper.runtime.server import ServiceContext

from ..conftest import LOOPBACK, HangsUpAfter, make_context, make_settings

GIB = 1024**3

# --- the chain by VRAM -------------------------------------------------------------

PRODUCTION_CHAIN = [
    {"model": "nous-hermes-13b", "device": "cuda"},
    {"model": "nous-hermes-2-mistral-7b-dpo-q4ks", "device": "cuda"},
    {"model": "phi-3-mini", "device": "cuda"},
    {"remote": "http://127.0.0.1:9/v1"},
    {"model": "nous-hermes-2-mistral-7b-dpo-q4ks", "device": "cpu"},
]


def production_registry(root: Path) -> ModelRegistry:
    """The packaged catalog, with fake files for the big GGUFs in a tmp root (never loaded)."""
    catalog = load_catalog(_packaged_catalog())
    for ref in ("nous-hermes-13b", "nous-hermes-2-mistral-7b-dpo-q4ks", "phi-3-mini"):
        directory = root / ref
        directory.mkdir(parents=True)
        for name in catalog[ref].files:
            (directory / name).write_bytes(b"GGUF fake")
    return ModelRegistry(catalog, [root], root / "cache")


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        (
            ("NVIDIA GeForce RTX 3090", 24),
            [
                "llama-cpp:nous-hermes-13b@cuda:0",
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cuda:0",
                "llama-cpp:phi-3-mini@cuda:0",
                "openai:http://127.0.0.1:9/v1",
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cpu",
            ],
        ),
        (
            ("NVIDIA RTX A4000", 16),
            [
                "llama-cpp:nous-hermes-13b@cuda:0",
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cuda:0",
                "llama-cpp:phi-3-mini@cuda:0",
                "openai:http://127.0.0.1:9/v1",
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cpu",
            ],
        ),
        (
            ("NVIDIA GeForce RTX 3070", 8),
            [
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cuda:0",
                "llama-cpp:phi-3-mini@cuda:0",
                "openai:http://127.0.0.1:9/v1",
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cpu",
            ],
        ),
        (
            ("NVIDIA GeForce GTX 1650", 4),
            [
                "llama-cpp:phi-3-mini@cuda:0",
                "openai:http://127.0.0.1:9/v1",
                "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cpu",
            ],
        ),
        (
            None,
            ["openai:http://127.0.0.1:9/v1", "llama-cpp:nous-hermes-2-mistral-7b-dpo-q4ks@cpu"],
        ),
    ],
    ids=["24GB", "16GB", "8GB", "4GB", "no-gpu"],
)
def test_chain_follows_the_pinned_gpus_memory(
    tmp_path: Path, gpu: tuple[str, int] | None, expected: list[str]
) -> None:
    settings = make_settings(**{"handle.chain": PRODUCTION_CHAIN})
    devices = [] if gpu is None else [GpuDevice(0, gpu[0], gpu[1] * GIB, "00000000:01:00.0")]
    decision = choose_gpu(devices, GpuSettings())
    context = ServiceContext(settings, production_registry(tmp_path), decision, Metrics(CollectorRegistry()))
    service = HandleService(context)
    assert [engine.name for engine in service.chain.engines] == expected
    llamas = [getattr(e, "engine", e) for e in service.chain.engines]
    llamas = [e for e in llamas if isinstance(e, LlamaCppEngine)]
    assert len(llamas) == sum(name.startswith("llama-cpp:") for name in expected)
    for engine in llamas:
        if isinstance(engine, LlamaCppEngine):
            layers = engine.llama_kwargs()["n_gpu_layers"]
            assert layers == (-1 if engine.device == "cuda:0" else 0)
    assert service.plan is not None
    skipped_for_vram = [s for s in service.plan.skipped if "GPU memory" in s.reason]
    assert len(skipped_for_vram) == {24: 0, 16: 0, 8: 1, 4: 2}.get(gpu[1] if gpu else 0, 0)
    # what describe offers: the planned models, and nothing that does not apply here
    names = [m.name for m in service.info().handle[0].models]
    assert len(names) == len(expected)


def test_missing_model_is_offered_as_not_installed(tmp_path: Path) -> None:
    settings = make_settings(
        **{"handle.chain": [{"model": "phi-3-mini", "device": "cpu"}, {"remote": "http://127.0.0.1:9"}]}
    )
    registry = ModelRegistry(load_catalog(_packaged_catalog()), [tmp_path], tmp_path / "cache")
    context = ServiceContext(settings, registry, choose_gpu(None, settings.gpu), Metrics(CollectorRegistry()))
    service = HandleService(context)
    models = {m.name: m.installed for m in service.info().handle[0].models}
    assert models == {"openai:http://127.0.0.1:9/v1": True, "phi-3-mini": False}


# --- scripted engines ------------------------------------------------------------------


class ScriptedEngine(ChatEngine):
    """Yields the given pieces; ``fail_at`` raises EngineError before that piece."""

    def __init__(
        self,
        name: str,
        pieces: Sequence[str],
        *,
        finish: str = "stop",
        fail_at: int | None = None,
        fail_load: bool = False,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.model = name
        self.device = "cpu"
        self.quality = 1
        self.pieces = list(pieces)
        self.finish = finish
        self.fail_at = fail_at
        self.fail_load = fail_load
        self.delay_s = delay_s
        self.requests: list[ChatRequest] = []
        self.produced = 0
        self.closed_early = False

    async def load(self) -> None:
        if self.fail_load:
            raise EngineError(f"{self.name}: broken model file")

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        self.requests.append(request)
        finished = False
        try:
            for i, piece in enumerate(self.pieces):
                if self.fail_at == i:
                    raise EngineError(f"{self.name}: crashed")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.produced += 1
                last = i == len(self.pieces) - 1
                yield ChatDelta(piece, self.finish if last else None)
            finished = True
        finally:
            self.closed_early = not finished


def service_with(engines: Sequence[ChatEngine], **overrides: Any) -> HandleService:
    settings: Settings = make_settings(**overrides)
    return HandleService(make_context(settings), engines=engines)


async def ask(
    port: int, text: str, *, language: str | None = "fr", context: dict[str, Any] | None = None
) -> list[Event]:
    """Send one transcript, return every event up to the last one of the answer."""
    events: list[Event] = []
    async with AsyncTcpClient(LOOPBACK, port) as client:
        await client.write_event(Transcript(text=text, language=language, context=context).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 30)
            assert event is not None, "server closed the connection"
            events.append(event)
            if event.type in ("handled-stop", "not-handled", "error"):
                return events


def chunks_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "handled-chunk")


def final_of(events: list[Event]) -> str:
    (handled,) = [e for e in events if e.type == "handled"]
    return str(handled.data["text"])


FRENCH = ["Il ", "fait ", "très ", "beau ", "aujourd'hui ", "à ", "Paris, ", "profitez-en ", "bien."]
ENGLISH = ["The ", "weather ", "is ", "very ", "nice ", "today ", "in ", "Paris, ", "enjoy ", "it."]


@pytest.mark.parametrize("holdback", [0, 8, 32, 500])
async def test_events_in_order_and_chunks_make_the_final_text(serve: Any, holdback: int) -> None:
    engine = ScriptedEngine("a", ["**Il** ", "fait ", "beau", " aujourd", "'hui 😀", "."])
    service = service_with([engine], **{"handle.stream_holdback_chars": holdback})
    async with serve(service) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    types = [e.type for e in events]
    assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"]
    assert set(types[1:-2]) == {"handled-chunk"}
    assert final_of(events) == "Il fait beau aujourd'hui ."
    assert chunks_of(events) == final_of(events)
    if holdback == 0:
        assert types.count("handled-chunk") >= 4


async def test_last_level_releases_its_first_word_at_once_others_wait_for_the_gate(serve: Any) -> None:
    """The holdback is for the gate: a level that could still be rejected holds back
    32 characters; the last level, which nothing can replace, sends its first word at once."""
    holdback = {"handle.stream_holdback_chars": 32}
    alone = ScriptedEngine("alone", FRENCH)
    async with serve(service_with([alone], **holdback)) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    first = next(e.data["text"] for e in events if e.type == "handled-chunk")
    assert first == "Il"
    assert chunks_of(events) == final_of(events)

    primary, spare = ScriptedEngine("primary", FRENCH), ScriptedEngine("spare", FRENCH)
    async with serve(service_with([primary, spare], **holdback)) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    first = next(e.data["text"] for e in events if e.type == "handled-chunk")
    # Released only once more than 32 characters were written: the gate read them first.
    assert len("".join(FRENCH[:7])) > 32 and first.startswith("Il fait") and len(first) > 1
    assert chunks_of(events) == final_of(events) and spare.requests == []

    # A list marker may still be taken back by the cleaner: not released as a first word.
    listed = ScriptedEngine("listed", ["1", ". ", "Il ", "fait ", "beau."])
    async with serve(service_with([listed], **holdback)) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    assert final_of(events) == "Il fait beau." and chunks_of(events) == final_of(events)


async def test_wrong_language_start_falls_to_next_level_unseen(serve: Any) -> None:
    english, french = ScriptedEngine("en", ENGLISH), ScriptedEngine("fr", FRENCH)
    service = service_with([english, french], **{"handle.stream_holdback_chars": 32})
    async with serve(service) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    assert final_of(events) == "Il fait très beau aujourd'hui à Paris, profitez-en bien."
    assert chunks_of(events) == final_of(events)
    assert english.closed_early  # the rejected generation was stopped, not run to its end
    assert service.chain.status()[0]["last_error"].startswith("rejected: answer in en")


async def test_last_level_may_answer_in_the_wrong_language(serve: Any) -> None:
    service = service_with([ScriptedEngine("en", ENGLISH)])
    async with serve(service) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    assert final_of(events).startswith("The weather is very nice today")


async def test_empty_and_broken_levels_fall_through(serve: Any) -> None:
    broken = ScriptedEngine("broken", FRENCH, fail_load=True)
    empty = ScriptedEngine("empty", [" ", "\n", "**"])
    crash = ScriptedEngine("crash", FRENCH, fail_at=0)
    good = ScriptedEngine("good", FRENCH)
    service = service_with([broken, empty, crash, good])
    async with serve(service) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    assert final_of(events).startswith("Il fait très beau")
    outcomes = [lv["last_error"].split(":")[0] for lv in service.chain.status()]
    assert outcomes == ["load_failed", "rejected", "failed", ""]


async def test_loop_before_release_is_rejected_after_release_is_trimmed(serve: Any) -> None:
    loop_pieces = ["Le ", "Canada, ", "le ", "Canada, ", "le ", "Canada, ", "le ", "Canada"]
    looping, good = ScriptedEngine("loop", loop_pieces), ScriptedEngine("good", FRENCH)
    service = service_with([looping, good], **{"handle.stream_holdback_chars": 32})
    async with serve(service) as server:
        events = await ask(server.port, "Quelle est la capitale du Canada ?")
    assert final_of(events).startswith("Il fait très beau")

    looping = ScriptedEngine("loop", ["Bien sûr, ", *loop_pieces])
    service = service_with([looping, good], **{"handle.stream_holdback_chars": 0})
    async with serve(service) as server:
        events = await ask(server.port, "Quelle est la capitale du Canada ?")
    assert chunks_of(events) == final_of(events)
    assert final_of(events).count("Canada") < 4
    assert looping.closed_early


async def test_cut_off_answer_ends_at_a_sentence(serve: Any) -> None:
    engine = ScriptedEngine("cut", ["Il fait beau. ", "Demain il ", "pleuvra sur"], finish="length")
    service = service_with([engine], **{"handle.stream_holdback_chars": 32})
    async with serve(service) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    assert final_of(events) == "Il fait beau."
    assert chunks_of(events) == final_of(events)


async def test_failure_after_release_keeps_what_was_said(serve: Any) -> None:
    first = ScriptedEngine("dies", [*FRENCH[:6], "x"], fail_at=6)
    second = ScriptedEngine("never", ENGLISH)
    service = service_with([first, second], **{"handle.stream_holdback_chars": 0})
    async with serve(service) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    assert final_of(events) == "Il fait très beau aujourd'hui à…"
    assert chunks_of(events) == final_of(events)
    assert second.requests == []  # the answer was started: no second voice in the middle


async def test_every_level_failed_gives_a_spoken_apology(serve: Any) -> None:
    service = service_with([ScriptedEngine("a", FRENCH, fail_at=0), ScriptedEngine("b", [""])])
    async with serve(service) as server:
        french = await ask(server.port, "Quel temps fait-il ?")
        english = await ask(server.port, "What's the weather?", language="en")
    assert [e.type for e in french] == ["not-handled"]
    assert french[0].data["text"].startswith("Désolé")
    assert english[0].data["text"].startswith("Sorry")


async def test_slow_levels_still_answer_within_the_timeout(serve: Any) -> None:
    slow = ScriptedEngine("slow", ["Il ", "fait ", "beau."], delay_s=5.0)
    service = service_with([slow], **{"handle.timeout_s": 1.0})
    async with serve(service) as server:
        events = await asyncio.wait_for(ask(server.port, "Quel temps fait-il ?"), 3.0)
    assert [e.type for e in events] == ["not-handled"]


async def test_memory_per_conversation_and_implicit_peer(serve: Any) -> None:
    engine = ScriptedEngine("a", FRENCH)
    service = service_with([engine])
    async with serve(service) as server:
        await ask(server.port, "Quel temps fait-il aujourd'hui ?", context={"conversation_id": "cuisine"})
        await ask(server.port, "Et demain ?", context={"conversation_id": "cuisine"})
        await ask(server.port, "Bonjour", context={"conversation_id": "salon"})
        await ask(server.port, "Sans identifiant", context=None)
        await ask(server.port, "Toujours sans", context=None)
    kitchen = [m["content"] for m in engine.requests[1].messages]
    assert kitchen[1:] == [
        "Quel temps fait-il aujourd'hui ?",
        "Il fait très beau aujourd'hui à Paris, profitez-en bien.",
        "Et demain ?",
    ]
    assert len(engine.requests[2].messages) == 2  # salon: system + request only
    implicit = [m["content"] for m in engine.requests[4].messages]
    assert implicit[1] == "Sans identifiant" and "cuisine" not in str(implicit)
    assert service.last_prompt(f"peer:{LOOPBACK}") == list(engine.requests[4].messages)


async def test_an_answer_read_before_the_client_leaves_is_remembered_and_counted() -> None:
    engine = ScriptedEngine("a", FRENCH)
    service = service_with([engine])
    await service.start()
    context = {"conversation_id": "cuisine"}
    try:
        for text in ("Quel temps fait-il ?", "Et demain ?"):
            client = HangsUpAfter("handled")
            handler = service.create_handler(client)  # type: ignore[arg-type]
            await handler.handle_event(Transcript(text=text, language="fr", context=context).event())
            assert handler._task is not None
            await asyncio.wait_for(handler._task, 5)
            assert client.events[-1].type == "handled"
    finally:
        await service.stop()
    assert service.context.metrics.requests.labels("handle", "ok")._value.get() == 2
    follow_up = [m["content"] for m in engine.requests[1].messages]
    assert follow_up[1:] == [
        "Quel temps fait-il ?",
        "Il fait très beau aujourd'hui à Paris, profitez-en bien.",
        "Et demain ?",
    ]


async def test_limits_and_bad_values_get_error_events_and_the_server_keeps_serving(serve: Any) -> None:
    service = service_with([ScriptedEngine("a", FRENCH)], **{"handle.max_chars": 50})
    async with serve(service) as server, AsyncTcpClient(LOOPBACK, server.port) as client:
        await client.write_event(Transcript(text="x" * 51, language="fr").event())
        error = await asyncio.wait_for(client.read_event(), 10)
        assert error is not None and error.type == "error" and error.data["code"] == "too-long"
        await client.write_event(Event(type="transcript", data={"text": 42}))
        error = await asyncio.wait_for(client.read_event(), 10)
        assert error is not None and error.data["code"] == "bad-value"
        await client.write_event(Transcript(text="Quel temps fait-il ?", language="fr").event())
        seen = []
        while not seen or seen[-1] != "handled-stop":
            event = await asyncio.wait_for(client.read_event(), 10)
            assert event is not None
            seen.append(event.type)
        assert "handled" in seen


async def test_describe_is_answered_while_generating(serve: Any) -> None:
    slow = ScriptedEngine("slow", ["Il ", "fait ", "très ", "beau ", "aujourd'hui."], delay_s=0.3)
    service = service_with([slow], **{"handle.stream_holdback_chars": 0})
    async with serve(service) as server, AsyncTcpClient(LOOPBACK, server.port) as client:
        await client.write_event(Transcript(text="Quel temps fait-il ?", language="fr").event())
        await client.write_event(Event(type="describe"))
        events: list[Event] = []
        while not events or events[-1].type != "handled-stop":
            event = await asyncio.wait_for(client.read_event(), 10)
            assert event is not None
            events.append(event)
    types = [e.type for e in events]
    assert types.index("info") < types.index("handled")
    info = events[types.index("info")]
    assert info.data["handle"][0]["supports_handled_streaming"] is True
    assert info.data["handle"][0]["models"][0]["name"] == "slow"


async def test_disconnect_mid_stream_stops_the_engine(serve: Any) -> None:
    slow = ScriptedEngine("slow", ["mot "] * 3 + [f"numéro{i} " for i in range(200)], delay_s=0.05)
    service = service_with([slow], **{"handle.stream_holdback_chars": 0})
    async with serve(service) as server:
        async with AsyncTcpClient(LOOPBACK, server.port) as client:
            await client.write_event(Transcript(text="Raconte une histoire.", language="fr").event())
            while True:
                event = await asyncio.wait_for(client.read_event(), 10)
                assert event is not None
                if event.type == "handled-chunk":
                    break
        for _ in range(200):
            if slow.closed_early:
                break
            await asyncio.sleep(0.05)
        assert slow.closed_early
        assert slow.produced < 203
        assert service.in_flight.count == 0


async def test_queue_limit_answers_busy(serve: Any) -> None:
    slow = ScriptedEngine("slow", ["Il ", "fait ", "beau."], delay_s=0.5)
    service = service_with([slow], **{"handle.queue_size": 1})
    async with serve(service) as server:
        results = await asyncio.gather(*(ask(server.port, "Quel temps ?") for _ in range(3)))
    kinds = sorted(r[-1].type for r in results)
    assert "handled-stop" in kinds and "error" in kinds
    assert all(r[-1].data.get("code") == "busy" for r in results if r[-1].type == "error")


def sized(name: str, quality: int, pieces: Sequence[str], **kwargs: Any) -> ScriptedEngine:
    engine = ScriptedEngine(name, pieces, **kwargs)
    engine.quality = quality
    return engine


async def test_short_requests_go_to_the_smallest_local_model_first(serve: Any) -> None:
    big, medium, small = sized("13b", 3, FRENCH), sized("7b", 2, FRENCH), sized("mini", 1, FRENCH)
    service = service_with([big, medium, small], **{"handle.route_short_chars": 40})
    async with serve(service) as server:
        await ask(server.port, "Allume la cuisine.")
        assert (len(small.requests), len(big.requests), len(medium.requests)) == (1, 0, 0)
        await ask(server.port, "Peux-tu me dire ce que je dois mettre dans la valise pour la montagne ?")
        assert (len(small.requests), len(big.requests), len(medium.requests)) == (1, 1, 0)
    # Tools need the big model; routing off by default.
    assert service.route([{"role": "user", "content": "Allume."}], tools=[{"type": "function"}]) == [0, 1, 2]
    assert service_with([big, small]).route([{"role": "user", "content": "Allume."}]) == [0, 1]


async def test_a_routed_request_that_the_small_model_fails_goes_back_to_chain_order(serve: Any) -> None:
    big, small = sized("13b", 3, FRENCH), sized("mini", 1, ENGLISH)  # the small one answers in English
    remote = sized("remote", 0, FRENCH)
    remote.device = "remote"  # never the "small local model", whatever its quality
    service = service_with([big, remote, small], **{"handle.route_short_chars": 40})
    assert service.route([{"role": "user", "content": "Allume la cuisine."}]) == [2, 0, 1]
    async with serve(service) as server:
        events = await ask(server.port, "Allume la cuisine.")
    assert final_of(events).startswith("Il fait très beau")  # the gate moved it on to the big one
    assert len(small.requests) == 1 and len(big.requests) == 1 and remote.requests == []


async def test_a_finished_sentence_is_released_whole_without_waiting_for_the_holdback(serve: Any) -> None:
    """The TTS speaks sentence by sentence: a committed answer's finished sentence goes out
    at once instead of 32 characters (some 8 tokens) later; an unfinished one is held back."""
    pieces = ["Il ", "fait ", "beau. ", "Demain ", "il ", "pleuvra ", "sur ", "Paris, ", "hélas."]
    engine = ScriptedEngine("one", pieces)
    async with serve(service_with([engine], **{"handle.stream_holdback_chars": 32})) as server:
        events = await ask(server.port, "Quel temps fait-il ?")
    prefixes, text = [], ""
    for piece in (e.data["text"] for e in events if e.type == "handled-chunk"):
        text += piece
        prefixes.append(text)
    assert "Il fait beau." in prefixes
    assert not any(p.endswith(("Demain", "pleuvra", "sur")) for p in prefixes)  # held back mid-sentence
    assert text == final_of(events) == "Il fait beau. Demain il pleuvra sur Paris, hélas."


async def test_a_silent_redis_never_holds_the_event_loop(serve: Any) -> None:
    """``handle.memory: redis://…`` on a Redis that accepts and never answers: every memory
    call waits out its 0.5 s socket timeout, in a worker thread; ``describe`` on another
    connection is answered meanwhile, and the request is still answered (without memory)."""
    pytest.importorskip("redis")
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _reader, writer: held.append(writer), LOOPBACK, 0)
    port = silent.sockets[0].getsockname()[1]
    engine = ScriptedEngine("a", FRENCH)
    service = service_with([engine], **{"handle.memory": f"redis://{LOOPBACK}:{port}/0"})
    try:
        async with serve(service) as server:
            answer = asyncio.create_task(ask(server.port, "Quel temps fait-il ?"))
            await asyncio.sleep(0.1)  # the request is now waiting for the silent Redis
            assert not answer.done()
            started = asyncio.get_running_loop().time()
            async with AsyncTcpClient(LOOPBACK, server.port) as client:
                await client.write_event(Event("describe"))
                info = await asyncio.wait_for(client.read_event(), 5)
            waited = asyncio.get_running_loop().time() - started
            events = await answer
        assert info is not None and info.type == "info"
        assert waited < 0.3, f"describe waited {waited:.2f} s behind the memory call"
        assert final_of(events).startswith("Il fait très beau")
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_cpu_priority_outside_nice_range_is_a_config_error_naming_the_key(nice: int) -> None:
    with pytest.raises(ConfigError) as error:
        model_workers(make_settings(**{"handle.cpu_nice": nice}))
    assert error.value.key == "handle.cpu_nice"


def test_local_models_get_the_configured_cpu_priority_only_in_workers() -> None:
    workers = model_workers(make_settings(**{"handle.cpu_nice": 12}))
    assert workers is not None and workers.nice == 12
    assert model_workers(make_settings(**{"server.engine_workers": False})) is None


@pytest.mark.parametrize("local_intents", [True, False])
async def test_the_clock_answers_the_time_and_the_model_the_rest(serve: Any, local_intents: bool) -> None:
    """ "Quelle heure est-il ?" is said from the service's clock, streamed and remembered like any
    answer, and no model is asked; ``handle.local_intents: false`` gives it to the model."""
    engine = ScriptedEngine("a", FRENCH)
    settings = make_settings(**{"handle.local_intents": local_intents})
    service = HandleService(
        make_context(settings), engines=[engine], clock=lambda: dt.datetime(2026, 12, 7, 23, 41)
    )
    context = {"conversation_id": "cuisine"}
    async with serve(service) as server:
        time_asked = await ask(server.port, "Quelle heure est-il ?", context=context)
        date_asked = await ask(server.port, "What is the date today?", language="en")
        other = await ask(server.port, "Quelle est la capitale de la France ?", context=context)
    clock = service.context.metrics.local_intents.labels("clock")._value.get()
    if not local_intents:
        assert len(engine.requests) == 3 and clock == 0
        return
    assert final_of(time_asked) == chunks_of(time_asked) == "Il est 23 h 41."
    assert final_of(date_asked) == "Today is Monday 7 December 2026."
    assert final_of(other) == "Il fait très beau aujourd'hui à Paris, profitez-en bien."
    assert len(engine.requests) == 1 and clock == 2
    remembered = [m["content"] for m in engine.requests[0].messages]
    assert remembered[1:3] == ["Quelle heure est-il ?", "Il est 23 h 41."]
    assert "Nous sommes le lundi 7 décembre 2026." in remembered[0]
