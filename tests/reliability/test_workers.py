"""Supervised engine workers: real child processes that really segfault, abort, hang or are killed.

The engine inside is :class:`tests.faults.CrashingEngine`; the process, the
pipe, the signals and the supervisor are the real ones. What must hold: the
call in flight fails with :class:`EngineCrashed` naming the signal, the
chain opens the level's circuit and the next level answers, the worker
restarts by itself and serves again, and nothing in the test's own process
is harmed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.faults import CrashingEngine
from wyoming_superwhisper.asr.engines import AsrRequest
from wyoming_superwhisper.handle.engines import ChatRequest
from wyoming_superwhisper.runtime.fallback import EngineCrashed, EngineError, FallbackChain, Outcome
from wyoming_superwhisper.runtime.worker import EngineWorker, WorkerOptions, exit_cause, supervised

OPTIONS = WorkerOptions(cancel_grace_s=0.5, restart_backoff_s=0.1, max_backoff_s=0.5, start_timeout_s=60)
REQUEST = AsrRequest(np.zeros(16000, np.float32), "fr")


def worker(mode: str, **kwargs: Any) -> EngineWorker:
    engine = supervised(
        OPTIONS,
        CrashingEngine,
        mode,
        calls=("transcribe", "synthesize"),
        streams=("stream",),
        **kwargs,
    )
    assert isinstance(engine, EngineWorker)
    return engine


async def wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_exit_causes_name_the_signal() -> None:
    assert exit_cause(-signal.SIGSEGV) == "SIGSEGV"
    assert exit_cause(-signal.SIGABRT) == "SIGABRT"
    assert exit_cause(-signal.SIGKILL) == "SIGKILL"
    assert exit_cause(3) == "exit:3"
    assert exit_cause(None) == "unknown"


@pytest.mark.parametrize(("mode", "cause"), [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
async def test_a_native_crash_fails_the_call_and_the_worker_comes_back(
    mode: str, cause: str, tmp_path: Path
) -> None:
    engine = worker(mode, marker=str(tmp_path / "crashed-once"))
    causes: list[str] = []
    engine.watch_crashes(causes.append)
    await engine.load()
    try:
        first_pid = engine.worker_status()["pid"]
        assert first_pid and first_pid != os.getpid()
        with pytest.raises(EngineCrashed) as crash:
            await engine.transcribe(REQUEST)
        assert crash.value.cause == cause
        assert causes == [cause]
        # The call waits for the restart (backoff 0.1 s), then the new process answers.
        result = await asyncio.wait_for(engine.transcribe(REQUEST), 30)
        assert result.text == "Bonjour, je suis revenu."
        status = engine.worker_status()
        assert status["state"] == "ready"
        assert status["pid"] not in (None, first_pid)
        assert (status["crashes"], status["restarts"], status["last_crash"]) == (1, 1, cause)
        assert engine.calls == 1  # the child's counter, mirrored: the new process served once
    finally:
        await engine.close()
    assert engine.worker_status()["state"] == "stopped"


async def test_a_worker_killed_from_outside_mid_call_fails_that_call() -> None:
    engine = worker("slow", slow_s=30.0)
    await engine.load()
    try:
        call = asyncio.create_task(engine.synthesize("Bonjour.", None))
        await asyncio.sleep(0.3)  # the call is running in the child
        os.kill(engine.worker_status()["pid"], signal.SIGKILL)  # what the OOM killer does
        with pytest.raises(EngineCrashed) as crash:
            await asyncio.wait_for(call, 10)
        assert crash.value.cause == "SIGKILL"
    finally:
        await engine.close()


async def test_a_hung_worker_is_killed_after_the_grace_and_restarted() -> None:
    engine = worker("hang")
    causes: list[str] = []
    engine.watch_crashes(causes.append)
    await engine.load()
    try:
        first_pid = engine.worker_status()["pid"]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):  # the chain's deadline
                await engine.transcribe(REQUEST)
        await wait_for(lambda: causes == ["hang"], 10)  # grace 0.5 s, then SIGKILL
        await wait_for(lambda: engine.worker_status()["state"] == "ready")
        assert engine.worker_status()["pid"] != first_pid
    finally:
        await engine.close()


async def test_a_crash_mid_stream_ends_the_stream_with_the_signal() -> None:
    engine = worker("segv")
    await engine.load()
    try:
        with pytest.raises(EngineCrashed, match="SIGSEGV"):
            async for _ in engine.stream(ChatRequest([{"role": "user", "content": "Bonjour"}])):
                pass
    finally:
        await engine.close()


async def test_a_stream_streams_every_piece_and_the_answer_is_complete() -> None:
    engine = worker("ok", text="Il est dix heures et quart.")
    await engine.load()
    try:
        pieces = [d.text async for d in engine.stream(ChatRequest([{"role": "user", "content": "?"}]))]
        assert "".join(pieces) == "Il est dix heures et quart."
        assert len(pieces) == 7  # six words and the final empty delta, one message each
    finally:
        await engine.close()


async def test_a_crash_while_loading_is_a_crash_and_a_load_error_is_that_error(tmp_path: Path) -> None:
    crashing = worker("segv", crash_on_load=True)
    with pytest.raises(EngineCrashed, match="SIGSEGV"):
        await crashing.load()
    await crashing.close()
    missing = supervised(OPTIONS, _MissingModel, calls=("transcribe",))
    seen: list[str] = []
    missing.watch_crashes(seen.append)
    with pytest.raises(FileNotFoundError, match=r"model\.bin"):
        await missing.load()
    # The supervisor stops the child of a failed load itself: no crash, no restart loop
    # (a SIGKILL "crash" used to overwrite the level's load_failed error, and restart it).
    await asyncio.sleep(OPTIONS.restart_backoff_s + 0.5)
    assert missing.crashes == 0 and seen == []
    assert missing.worker_status()["state"] == "stopped"
    await missing.close()


class _MissingModel:
    name = "missing"
    device = "cpu"
    quality = 0

    async def load(self) -> None:
        raise FileNotFoundError("model.bin")

    async def close(self) -> None:
        return None


async def test_the_chain_answers_from_the_next_level_and_opens_the_crashed_circuit() -> None:
    crashing = worker("segv", name="llama-cpp:broken@cpu")
    healthy = worker("ok", name="llama-cpp:healthy@cpu", text="Voilà.")
    chain: FallbackChain[Any] = FallbackChain("test", [crashing, healthy], failure_threshold=3, cooldown_s=60)
    await chain.load(0)
    await chain.load(1)
    try:

        async def call(engine: Any) -> str:
            return (await engine.transcribe(REQUEST)).text

        result = await chain.run(call)
        assert (result.level, result.value) == (1, "Voilà.")
        assert result.attempts[0].outcome is Outcome.CRASHED
        assert "SIGSEGV" in result.attempts[0].reason
        first = chain.status()[0]
        assert first["circuit"] == "open"  # at once, not after failure_threshold tries
        assert first["worker"]["last_crash"] == "SIGSEGV"
        # While open, requests go straight to the healthy level.
        again = await chain.run(call)
        assert again.level == 1 and again.attempts[0].outcome is Outcome.SKIPPED
    finally:
        await chain.close()


async def test_a_worker_dying_between_requests_opens_its_circuit_at_once() -> None:
    idle = worker("ok", name="idle")
    chain: FallbackChain[Any] = FallbackChain("test", [idle, worker("ok", name="spare")], cooldown_s=60)
    await chain.load(0)
    try:
        os.kill(idle.worker_status()["pid"], signal.SIGKILL)
        await wait_for(lambda: chain.status()[0]["circuit"] == "open", 10)
        assert chain.status()[0]["last_error"] == "crashed: SIGKILL"
    finally:
        await chain.close()


async def test_a_worker_runs_at_its_lower_cpu_priority_and_keeps_it_after_a_restart(tmp_path: Path) -> None:
    engine = supervised(
        dataclasses.replace(OPTIONS, nice=7),
        CrashingEngine,
        "segv",
        marker=str(tmp_path / "crashed-once"),
        calls=("transcribe",),
    )
    assert isinstance(engine, EngineWorker)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    await engine.load()
    try:
        first = engine.worker_status()["pid"]
        assert os.getpriority(os.PRIO_PROCESS, first) == min(19, ours + 7)
        with pytest.raises(EngineCrashed):
            await engine.transcribe(REQUEST)
        await asyncio.wait_for(engine.transcribe(REQUEST), 30)
        second = engine.worker_status()["pid"]
        assert second != first
        assert os.getpriority(os.PRIO_PROCESS, second) == min(19, ours + 7)
        assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the server's own priority is untouched
    finally:
        await engine.close()


async def test_a_closed_worker_refuses_calls_clearly() -> None:
    engine = worker("ok")
    await engine.load()
    await engine.close()
    with pytest.raises(EngineError, match="not loaded"):
        await engine.transcribe(REQUEST)
