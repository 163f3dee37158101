"""Every FallbackChain transition, with fake engines (the chain is the thing under test)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from wyoming_superwhisper.runtime.fallback import (
    AllLevelsFailed,
    Attempt,
    CircuitState,
    FallbackChain,
    Outcome,
    QualityRejected,
    engine_turn,
)


@dataclass
class FakeEngine:
    name: str
    device: str = "cpu"
    quality: int = 1
    answer: str = ""
    fail_load: bool = False
    fail_call: BaseException | None = None
    hang: bool = False
    work_s: float = 0.0
    """With a delay, the engine serves one request at a time, as a real model does."""
    loads: int = 0
    closes: int = 0
    calls: int = 0

    async def load(self) -> None:
        self.loads += 1
        if self.fail_load:
            raise OSError(f"{self.name}: model file is corrupt")

    async def close(self) -> None:
        self.closes += 1

    turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def work(self, text: str) -> str:
        self.calls += 1
        if self.work_s:
            async with engine_turn(self.turn):
                await asyncio.sleep(3600 if self.hang else self.work_s)
                return self.answer or f"{self.name}:{text}"
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_call is not None:
            raise self.fail_call
        return self.answer or f"{self.name}:{text}"


@dataclass
class Recorder:
    attempts: list[Attempt] = field(default_factory=list)
    fallbacks: list[tuple[int, int, str]] = field(default_factory=list)
    circuits: list[tuple[str, CircuitState]] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    crashes: list[tuple[int, str]] = field(default_factory=list)

    def on_attempt(self, service: str, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    def on_fallback(self, service: str, from_level: int, to_level: int, reason: str) -> None:
        self.fallbacks.append((from_level, to_level, reason))

    def on_circuit(self, service: str, engine: str, state: CircuitState) -> None:
        self.circuits.append((engine, state))

    def on_load(self, service: str, engine: str, seconds: float) -> None:
        self.loads.append(engine)

    def on_crash(self, service: str, engine: str, level: int, cause: str) -> None:
        self.crashes.append((level, cause))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_chain(*engines: FakeEngine, **kwargs: object) -> tuple[FallbackChain[FakeEngine], Recorder, Clock]:
    recorder, clock = Recorder(), Clock()
    options: dict[str, object] = {"timeout_s": 0.2, "failure_threshold": 2, "cooldown_s": 30.0}
    options.update(kwargs)
    chain = FallbackChain("test", list(engines), observer=recorder, clock=clock, **options)  # type: ignore[arg-type]
    return chain, recorder, clock


async def ask(chain: FallbackChain[FakeEngine], text: str = "bonjour") -> tuple[str, int]:
    result = await chain.run(lambda engine: engine.work(text))
    return result.value, result.level


async def test_primary_answers_and_loads_lazily_once() -> None:
    big, small = FakeEngine("big"), FakeEngine("small")
    chain, recorder, _ = make_chain(big, small)
    assert big.loads == 0
    assert await ask(chain) == ("big:bonjour", 0)
    assert await ask(chain) == ("big:bonjour", 0)
    assert big.loads == 1 and small.loads == 0
    assert recorder.loads == ["big"]


async def test_load_failure_moves_to_next_level() -> None:
    big, small = FakeEngine("big", fail_load=True), FakeEngine("small")
    chain, recorder, _ = make_chain(big, small)
    result = await chain.run(lambda e: e.work("x"))
    assert (result.value, result.level, result.fell_back) == ("small:x", 1, True)
    assert [a.outcome for a in result.attempts] == [Outcome.LOAD_FAILED, Outcome.OK]
    assert "corrupt" in result.attempts[0].reason
    assert recorder.fallbacks == [(0, 1, "load_failed")]


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (RuntimeError("CUDA failed: out of memory"), Outcome.OUT_OF_MEMORY),
        (MemoryError(), Outcome.OUT_OF_MEMORY),
        (ValueError("bad tensor"), Outcome.FAILED),
    ],
)
async def test_call_failure_moves_to_next_level(error: BaseException, outcome: Outcome) -> None:
    chain, _, _ = make_chain(FakeEngine("big", fail_call=error), FakeEngine("small"))
    result = await chain.run(lambda e: e.work("x"))
    assert result.level == 1
    assert result.attempts[0].outcome is outcome


async def test_timeout_moves_to_next_level(caplog: pytest.LogCaptureFixture) -> None:
    chain, _, _ = make_chain(FakeEngine("big", hang=True), FakeEngine("small"), timeout_s=0.05)
    with caplog.at_level(logging.WARNING, logger="wyoming_superwhisper.runtime.fallback"):
        result = await chain.run(lambda e: e.work("x"))
    assert result.level == 1
    assert result.attempts[0].outcome is Outcome.TIMEOUT
    assert any("big timed out after 0.05 s" in r.getMessage() for r in caplog.records)  # not silent


async def test_quality_gate_rejects_and_next_level_answers() -> None:
    chain, _, _ = make_chain(FakeEngine("big", answer="Sous-titres réalisés par"), FakeEngine("small"))
    result = await chain.run(
        lambda e: e.work("x"), quality_gate=lambda text: "hallucination" if "Sous-titres" in text else None
    )
    assert result.value == "small:x"
    assert result.attempts[0].outcome is Outcome.REJECTED
    assert result.attempts[0].reason == "hallucination"


async def test_engine_raising_quality_rejected_counts_as_rejected() -> None:
    chain, _, _ = make_chain(FakeEngine("big", fail_call=QualityRejected("looping")), FakeEngine("small"))
    result = await chain.run(lambda e: e.work("x"))
    assert result.attempts[0].outcome is Outcome.REJECTED


async def test_every_level_failing_raises_with_all_attempts() -> None:
    chain, _, _ = make_chain(
        FakeEngine("big", fail_load=True), FakeEngine("small", fail_call=OSError("gone"))
    )
    with pytest.raises(AllLevelsFailed) as raised:
        await chain.run(lambda e: e.work("x"))
    assert [a.engine for a in raised.value.attempts] == ["big", "small"]
    assert "big: load_failed" in str(raised.value) and "small: failed (gone)" in str(raised.value)


async def test_empty_chain_fails_clearly() -> None:
    chain, _, _ = make_chain()
    with pytest.raises(AllLevelsFailed, match="no engine configured"):
        await chain.run(lambda e: e.work("x"))


async def test_circuit_opens_after_threshold_and_skips_the_engine() -> None:
    big = FakeEngine("big", fail_call=OSError("boom"))
    chain, recorder, _ = make_chain(big, FakeEngine("small"))
    await ask(chain)
    assert chain.levels[0].breaker.state is CircuitState.CLOSED
    await ask(chain)
    assert chain.levels[0].breaker.state is CircuitState.OPEN
    assert ("big", CircuitState.OPEN) in recorder.circuits
    calls = big.calls
    assert await ask(chain) == ("small:bonjour", 1)
    assert big.calls == calls  # skipped, not tried
    assert chain.status()[0]["circuit"] == "open"


async def test_half_open_probe_recovers_the_primary() -> None:
    big = FakeEngine("big", fail_call=OSError("boom"))
    chain, recorder, clock = make_chain(big, FakeEngine("small"))
    await ask(chain)
    await ask(chain)
    clock.now += 31
    assert chain.levels[0].breaker.state is CircuitState.HALF_OPEN
    big.fail_call = None
    assert await ask(chain) == ("big:bonjour", 0)
    assert chain.levels[0].breaker.state is CircuitState.CLOSED
    assert recorder.circuits[-1] == ("big", CircuitState.CLOSED)


async def test_failed_probe_reopens_for_another_cooldown() -> None:
    big = FakeEngine("big", fail_call=OSError("boom"))
    chain, _, clock = make_chain(big, FakeEngine("small"))
    await ask(chain)
    await ask(chain)
    clock.now += 31
    assert await ask(chain) == ("small:bonjour", 1)  # the probe failed
    assert chain.levels[0].breaker.state is CircuitState.OPEN
    clock.now += 10
    assert chain.levels[0].breaker.state is CircuitState.OPEN


async def test_only_one_probe_at_a_time_when_half_open() -> None:
    big = FakeEngine("big", fail_call=OSError("boom"))
    chain, _, clock = make_chain(big, FakeEngine("small"))
    await ask(chain)
    await ask(chain)
    clock.now += 31
    breaker = chain.levels[0].breaker
    assert breaker.allow() is True
    assert breaker.allow() is False
    breaker.abandon()
    assert breaker.allow() is True


async def test_cancelled_probe_does_not_wedge_the_circuit() -> None:
    big = FakeEngine("big", fail_call=OSError("boom"))
    chain, _, clock = make_chain(big, FakeEngine("small"), timeout_s=10)
    await ask(chain)
    await ask(chain)
    clock.now += 31
    big.fail_call, big.hang = None, True
    task = asyncio.create_task(ask(chain))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    big.hang = False
    assert await ask(chain) == ("big:bonjour", 0)


async def test_healthy_and_unload() -> None:
    big = FakeEngine("big", fail_call=OSError("boom"))
    chain, _, _ = make_chain(big)
    for _ in range(2):
        with pytest.raises(AllLevelsFailed):
            await ask(chain)
    assert chain.healthy() is False
    small = FakeEngine("small")
    chain2, _, _ = make_chain(small)
    await ask(chain2)
    await chain2.unload(0)
    assert small.closes == 1 and chain2.levels[0].loaded is False
    await ask(chain2)
    assert small.loads == 2
    await chain2.close()
    assert small.closes == 2


async def test_warm_up_load_reports_failure() -> None:
    chain, _, _ = make_chain(FakeEngine("big", fail_load=True), FakeEngine("small"))
    assert await chain.load(0) is False
    assert await chain.load(1) is True
    assert chain.status()[0]["last_error"].startswith("load_failed")


async def test_concurrent_requests_load_once() -> None:
    big = FakeEngine("big")
    chain, _, _ = make_chain(big)
    results = await asyncio.gather(*(ask(chain, str(i)) for i in range(8)))
    assert [r[0] for r in results] == [f"big:{i}" for i in range(8)]
    assert big.loads == 1


async def test_quality_rejections_never_open_the_circuit() -> None:
    chain, _, _ = make_chain(FakeEngine("big", answer="garbage"), FakeEngine("small"))
    for _ in range(5):
        result = await chain.run(
            lambda e: e.work("x"), quality_gate=lambda text: "garbage" if text == "garbage" else None
        )
        assert result.level == 1
    assert chain.levels[0].breaker.state is CircuitState.CLOSED
    assert chain.levels[0].last_error == "rejected: garbage"


async def test_waiting_for_the_engine_is_not_engine_time() -> None:
    # Each request works 0.6 timeout: the second is answered 1.2 timeouts after it was asked.
    chain, recorder, _ = make_chain(FakeEngine("big", work_s=0.3), FakeEngine("small"), timeout_s=0.5)
    results = await asyncio.gather(ask(chain, "0"), ask(chain, "1"))
    assert results == [("big:0", 0), ("big:1", 0)]
    assert [a.outcome for a in recorder.attempts] == [Outcome.OK] * 2


async def test_a_request_still_queued_at_its_timeout_is_overload_not_a_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    big = FakeEngine("big", work_s=0.5)
    chain, recorder, _ = make_chain(big, failure_threshold=1)
    first = asyncio.create_task(chain.run(lambda e: e.work("long"), timeout_s=5.0))
    await asyncio.sleep(0.05)  # the first one holds the model
    with caplog.at_level(logging.WARNING, logger="wyoming_superwhisper.runtime.fallback"):
        for _ in range(3):
            with pytest.raises(AllLevelsFailed) as failure:
                await chain.run(lambda e: e.work("x"), timeout_s=0.05)
            assert failure.value.overloaded
            assert [a.outcome for a in failure.value.attempts] == [Outcome.QUEUED]
    assert chain.levels[0].breaker.state is CircuitState.CLOSED  # one failure would have opened it
    assert (await first).value == "big:long"
    assert any("big still busy with other requests after 0.05 s" in r.getMessage() for r in caplog.records)
    assert recorder.circuits == []


async def test_a_queued_request_goes_to_the_next_level() -> None:
    chain, _, _ = make_chain(FakeEngine("big", work_s=0.5), FakeEngine("small"), timeout_s=0.1)
    first = asyncio.create_task(chain.run(lambda e: e.work("long"), timeout_s=5.0))
    await asyncio.sleep(0.05)
    result = await chain.run(lambda e: e.work("x"))
    assert (result.value, [a.outcome for a in result.attempts]) == ("small:x", [Outcome.QUEUED, Outcome.OK])
    await first


async def test_an_engine_that_hangs_with_the_model_still_times_out_and_opens_the_circuit() -> None:
    chain, _, _ = make_chain(FakeEngine("big", work_s=0.1, hang=True), failure_threshold=1, timeout_s=0.05)
    with pytest.raises(AllLevelsFailed) as failure:
        await chain.run(lambda e: e.work("x"))
    assert not failure.value.overloaded
    assert [a.outcome for a in failure.value.attempts] == [Outcome.TIMEOUT]
    assert chain.levels[0].breaker.state is CircuitState.OPEN


async def test_a_task_that_outlives_its_chain_call_can_still_take_the_engine() -> None:
    # A task spawned inside a call inherits the call's context, turn included.
    lock = asyncio.Lock()
    later: list[asyncio.Task[str]] = []

    async def spawn(engine: FakeEngine) -> str:
        async def afterwards() -> str:
            await asyncio.sleep(0.05)
            async with engine_turn(lock):
                return "served"

        later.append(asyncio.create_task(afterwards()))
        return engine.name

    chain, _, _ = make_chain(FakeEngine("big"))
    assert (await chain.run(spawn)).value == "big"
    assert await later[0] == "served"  # the call's time limit is over; it must not be touched
