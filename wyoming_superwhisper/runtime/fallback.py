"""FallbackChain: ordered engines with lazy load, circuit breakers and a quality gate.

Every server puts its engines (bigger model on the GPU, smaller, CPU, remote)
behind one chain. A request is never lost: some level answers, or the caller
gets :class:`AllLevelsFailed` listing every attempt, which the handler turns
into a Wyoming ``error`` event. The chain knows nothing of speech: engines are
opaque objects with a small lifecycle, the work is a coroutine the caller
passes in.

A level's ``timeout_s`` measures the engine's work, not the wait for it: an
engine that serves one request at a time takes its model through
:func:`engine_turn`, and a request that times out still waiting there ends
:attr:`Outcome.QUEUED`, which is overload (``busy`` to the client), not a
broken engine, so it never opens the circuit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

_LOGGER = logging.getLogger(__name__)


class EngineError(Exception):
    """An engine failed in a way the next level of a chain can make up for."""


class QualityRejected(EngineError):
    """The engine answered, but the service's quality gate refused the answer."""


class ClientGone(asyncio.CancelledError):
    """Writing to the client failed: abandon the answer like a cancellation.

    A subclass of ``CancelledError`` so the fallback chain neither takes a client
    that hung up for an engine failure (which would open the circuit) nor asks the
    next level for nobody. Raised by the services' sinks (handle chunks, TTS audio).
    """


class EngineCrashed(EngineError):
    """The engine's worker process died or hung; ``cause`` says how (``SIGSEGV``, ``hang``...).

    Raised by :class:`~.worker.EngineWorker`; the chain opens the level's circuit at once
    (a crashed native engine is broken until its restarted worker passes a probe).
    """

    def __init__(self, engine: str, cause: str) -> None:
        self.engine = engine
        self.cause = cause
        super().__init__(f"{engine}: worker crashed ({cause})")


@runtime_checkable
class Engine(Protocol):
    """What a chain needs of an engine; the work call itself is service-specific."""

    name: str
    """Stable, human-readable id, e.g. ``faster-whisper:whisper-base@cpu``."""
    device: str
    """``cuda:0``, ``cpu`` or ``remote``."""
    quality: int
    """Higher is better; used by routing and by the doctor's report."""

    async def load(self) -> None:
        """Load weights or open connections; may raise. Called once, lazily."""

    async def close(self) -> None:
        """Release what :meth:`load` acquired; the engine may be loaded again."""


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    OK = "ok"
    SKIPPED = "skipped"  # circuit open
    LOAD_FAILED = "load_failed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    REJECTED = "rejected"  # quality gate
    QUEUED = "queued"  # timed out waiting for the engine's turn: overload, not a fault
    CRASHED = "crashed"  # the engine's worker process died or hung


@dataclass
class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; one probe after ``cooldown_s``."""

    failure_threshold: int = 3
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    consecutive_failures: int = 0
    opened_at: float | None = None
    _probing: bool = False

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self.opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allow(self) -> bool:
        """True when a call may go through; in half-open state only one probe at a time."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.opened_at = None
        self._probing = False

    def abandon(self) -> None:
        """A probe that was cancelled (client gone) proves nothing: let another probe."""
        self._probing = False

    def trip(self) -> None:
        """Open now, whatever the count: the engine is known broken (its worker crashed)."""
        self.consecutive_failures = max(self.consecutive_failures, self.failure_threshold)
        self._probing = False
        self.opened_at = self.clock()

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        was_probing = self._probing
        self._probing = False
        if was_probing or self.consecutive_failures >= self.failure_threshold:
            self.opened_at = self.clock()


@dataclass(frozen=True)
class Attempt:
    """One level's try at one request: what the logs, metrics and error events explain."""

    level: int
    engine: str
    outcome: Outcome
    seconds: float
    reason: str = ""


R = TypeVar("R")
E = TypeVar("E", bound=Engine)


@dataclass(frozen=True)
class ChainResult(Generic[R]):
    """A value with its provenance: which level answered and what was tried before."""

    value: R
    level: int
    engine: str
    attempts: tuple[Attempt, ...]
    cached: bool = False
    """The value was kept from an earlier run of that level: no engine ran for it now."""

    @property
    def fell_back(self) -> bool:
        return self.level > 0


class AllLevelsFailed(Exception):
    """Every level of the chain failed, was skipped, or was rejected."""

    def __init__(self, service: str, attempts: Sequence[Attempt]) -> None:
        self.service = service
        self.attempts = tuple(attempts)
        detail = "; ".join(
            f"{a.engine}: {a.outcome.value}{' (' + a.reason + ')' if a.reason else ''}" for a in self.attempts
        )
        super().__init__(f"{service}: every engine failed ({detail or 'no engine configured'})")

    @property
    def overloaded(self) -> bool:
        """True when the levels tried were all still busy with other requests: answer ``busy``."""
        tried = [a for a in self.attempts if a.outcome is not Outcome.SKIPPED]
        return bool(tried) and all(a.outcome is Outcome.QUEUED for a in tried)


class _Turn:
    """The time limit of one chain call; restarts when the engine's turn comes."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.limit: asyncio.Timeout | None = None
        self.queued = False
        self.started = False

    def start(self) -> None:
        self.started = True
        if self.limit is not None:  # None once the chain call is over (a task that outlived it)
            self.limit.reschedule(asyncio.get_running_loop().time() + self.timeout_s)


_TURN: ContextVar[_Turn | None] = ContextVar("superwhisper_engine_turn", default=None)


@contextlib.asynccontextmanager
async def engine_turn(lock: AbstractAsyncContextManager[Any]) -> AsyncIterator[None]:
    """Hold an engine's one-at-a-time ``lock`` for a chain call.

    The wait for the lock is queueing behind other requests; the level's
    timeout starts again when the lock is held, so only the engine's own work
    can time it out. Outside a chain call it is just ``async with lock``.
    """
    turn = _TURN.get()
    if turn is not None:
        turn.queued = True
    async with lock:
        if turn is not None:
            turn.start()
        yield


async def until_done(work: Awaitable[R]) -> R:
    """Await work running in a thread; if cancelled, still wait for the thread to end.

    A thread cannot be stopped: releasing an engine's lock while it still runs
    would let a second call start on the same model (and a worker supervisor
    could not tell a hung engine from one that stopped).
    """
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and future.exception() is not None:
            _LOGGER.debug("work abandoned by a cancelled request failed: %s", future.exception())
        raise


class MemoryWatch(Protocol):
    """Watches device memory around calls (runtime.hygiene.VramGuard)."""

    def register(self, chain: FallbackChain[Any]) -> None: ...

    def before(self) -> int | None: ...

    async def after(self, service: str, used_before: int | None) -> None: ...


class ChainObserver(Protocol):
    """Receives the chain's events; metrics implement it, tests may record them."""

    def on_attempt(self, service: str, attempt: Attempt) -> None: ...

    def on_fallback(self, service: str, from_level: int, to_level: int, reason: str) -> None: ...

    def on_circuit(self, service: str, engine: str, state: CircuitState) -> None: ...

    def on_load(self, service: str, engine: str, seconds: float) -> None: ...

    def on_crash(self, service: str, engine: str, level: int | str, cause: str) -> None: ...


@dataclass
class LevelState(Generic[E]):
    """One engine in its chain, with what the chain knows about it."""

    engine: E
    breaker: CircuitBreaker
    loaded: bool = False
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_error: str = ""
    served: int = 0
    failures: int = 0

    def snapshot(self, index: int) -> dict[str, Any]:
        worker_status = getattr(self.engine, "worker_status", None)
        return {
            "level": index,
            "engine": self.engine.name,
            "device": self.engine.device,
            "quality": self.engine.quality,
            "loaded": self.loaded,
            "circuit": self.breaker.state.value,
            "served": self.served,
            "failures": self.failures,
            "last_error": self.last_error,
            "worker": worker_status() if callable(worker_status) else None,
        }


QualityGate = Callable[[R], str | None]
"""Returns ``None`` to accept a result, or the reason to reject it."""


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return "out of memory" in text or "cuda_error_out_of_memory" in text


class FallbackChain(Generic[E]):
    """Try engines in order until one gives an accepted result.

    ``run(call)`` awaits ``call(engine)`` for each level whose circuit allows it,
    under ``timeout_s``; a load failure, exception, timeout, out-of-memory or a
    quality-gate rejection moves on to the next level. After ``cooldown_s`` an
    open circuit lets one request probe the engine again, so the primary takes
    over as soon as it is healthy.
    """

    def __init__(
        self,
        service: str,
        engines: Sequence[E],
        *,
        timeout_s: float = 30.0,
        load_timeout_s: float = 300.0,
        failure_threshold: int = 3,
        cooldown_s: float = 30.0,
        observer: ChainObserver | None = None,
        memory: MemoryWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.memory = memory
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.observer = observer
        self._clock = clock
        self.levels: list[LevelState[E]] = [
            LevelState(engine, CircuitBreaker(failure_threshold, cooldown_s, clock)) for engine in engines
        ]
        if memory is not None:
            memory.register(self)
        for index, engine in enumerate(engines):
            watch = getattr(engine, "watch_crashes", None)
            if callable(watch):
                watch(functools.partial(self._crashed, index))

    @property
    def engines(self) -> list[E]:
        return [level.engine for level in self.levels]

    def healthy(self) -> bool:
        """True when at least one level's circuit would let a request through."""
        return any(lv.breaker.state is not CircuitState.OPEN for lv in self.levels)

    def status(self) -> list[dict[str, Any]]:
        return [level.snapshot(i) for i, level in enumerate(self.levels)]

    async def load(self, level: int = 0) -> bool:
        """Load one level ahead of traffic (warm-up); False if it failed (logged)."""
        attempt = await self._ensure_loaded(level)
        if attempt is not None:
            self._fail(level, attempt)
            return False
        return True

    async def unload(self, level: int) -> None:
        """Close one level's engine (memory hygiene); it loads again on next use."""
        state = self.levels[level]
        async with state.load_lock:
            if state.loaded:
                state.loaded = False
                await state.engine.close()

    async def close(self) -> None:
        for index in range(len(self.levels)):
            try:
                await self.unload(index)
            except Exception:  # closing must go on for the other levels
                _LOGGER.exception("%s: closing %s failed", self.service, self.levels[index].engine.name)

    async def run(
        self,
        call: Callable[[E], Awaitable[R]],
        *,
        quality_gate: QualityGate[R] | None = None,
        timeout_s: float | None = None,
        levels: Sequence[int] | None = None,
    ) -> ChainResult[R]:
        """Answer with the first level that succeeds; raise AllLevelsFailed otherwise."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        order = range(len(self.levels)) if levels is None else levels
        attempts: list[Attempt] = []
        previous_failed: int | None = None
        for index in order:
            state = self.levels[index]
            name = state.engine.name
            if not state.breaker.allow():
                attempts.append(self._record(Attempt(index, name, Outcome.SKIPPED, 0.0, "circuit open")))
                continue
            if previous_failed is not None and self.observer is not None:
                self.observer.on_fallback(self.service, previous_failed, index, attempts[-1].outcome.value)
            load_failure = await self._ensure_loaded(index)
            if load_failure is not None:
                attempts.append(self._fail(index, load_failure))
                previous_failed = index
                continue
            started = self._clock()
            used_before = self.memory.before() if self.memory is not None else None
            measured = False
            turn = _Turn(timeout)
            token = _TURN.set(turn)
            try:
                async with asyncio.timeout(timeout) as turn.limit:
                    value = await call(state.engine)
            except asyncio.CancelledError:
                state.breaker.abandon()
                raise
            except TimeoutError:
                if turn.queued and not turn.started:
                    _LOGGER.warning(
                        "%s: %s still busy with other requests after %g s", self.service, name, timeout
                    )
                    attempt = Attempt(
                        index, name, Outcome.QUEUED, self._clock() - started, f"waited {timeout:g} s"
                    )
                else:
                    _LOGGER.warning("%s: %s timed out after %g s", self.service, name, timeout)
                    attempt = Attempt(
                        index, name, Outcome.TIMEOUT, self._clock() - started, f"over {timeout:g} s"
                    )
            except Exception as error:  # any engine failure is the next level's cue
                outcome = Outcome.OUT_OF_MEMORY if _is_out_of_memory(error) else Outcome.FAILED
                if isinstance(error, QualityRejected):
                    outcome = Outcome.REJECTED
                elif isinstance(error, EngineCrashed):
                    outcome = Outcome.CRASHED
                _LOGGER.warning(
                    "%s: %s failed: %s",
                    self.service,
                    name,
                    error,
                    exc_info=not isinstance(error, EngineError),
                )
                attempt = Attempt(index, name, outcome, self._clock() - started, _short(error))
            else:
                if self.memory is not None:
                    await self.memory.after(self.service, used_before)
                    measured = True
                reason = quality_gate(value) if quality_gate is not None else None
                seconds = self._clock() - started
                if reason is None:
                    ok = self._record(Attempt(index, name, Outcome.OK, seconds))
                    attempts.append(ok)
                    self._succeed(index)
                    return ChainResult(value, index, name, tuple(attempts))
                _LOGGER.info("%s: %s answer rejected: %s", self.service, name, reason)
                attempt = Attempt(index, name, Outcome.REJECTED, seconds, reason)
            finally:
                turn.limit = None
                _TURN.reset(token)
            if self.memory is not None and not measured:
                await self.memory.after(self.service, used_before)
            attempts.append(self._fail(index, attempt))
            previous_failed = index
        raise AllLevelsFailed(self.service, attempts)

    async def _ensure_loaded(self, index: int) -> Attempt | None:
        state = self.levels[index]
        if state.loaded:
            return None
        async with state.load_lock:
            if state.loaded:
                return None
            started = self._clock()
            try:
                await asyncio.wait_for(state.engine.load(), self.load_timeout_s)
            except TimeoutError:
                return Attempt(
                    index, state.engine.name, Outcome.LOAD_FAILED, self._clock() - started, "load timed out"
                )
            except Exception as error:  # a broken model file, a missing library, OOM, a crash
                crashed = isinstance(error, EngineCrashed)
                _LOGGER.warning(
                    "%s: loading %s failed: %s", self.service, state.engine.name, error, exc_info=not crashed
                )
                outcome = Outcome.CRASHED if crashed else Outcome.LOAD_FAILED
                return Attempt(index, state.engine.name, outcome, self._clock() - started, _short(error))
            state.loaded = True
            seconds = self._clock() - started
            _LOGGER.info("%s: loaded %s in %.2f s", self.service, state.engine.name, seconds)
            if self.observer is not None:
                self.observer.on_load(self.service, state.engine.name, seconds)
            return None

    def _crashed(self, index: int, cause: str) -> None:
        """An engine's worker died (during a request or between two): open its circuit now."""
        state = self.levels[index]
        before = state.breaker.state
        state.breaker.trip()
        state.last_error = f"crashed: {cause}"
        if self.observer is not None:
            self.observer.on_crash(self.service, state.engine.name, index, cause)
            if before is not CircuitState.OPEN:
                self.observer.on_circuit(self.service, state.engine.name, CircuitState.OPEN)
        if before is not CircuitState.OPEN:
            _LOGGER.warning(
                "%s: circuit of %s is now open (worker %s)", self.service, state.engine.name, cause
            )

    def _record(self, attempt: Attempt) -> Attempt:
        if self.observer is not None:
            self.observer.on_attempt(self.service, attempt)
        return attempt

    def _succeed(self, index: int) -> None:
        state = self.levels[index]
        before = state.breaker.state
        state.breaker.record_success()
        state.served += 1
        if before is not CircuitState.CLOSED and self.observer is not None:
            self.observer.on_circuit(self.service, state.engine.name, CircuitState.CLOSED)

    def _fail(self, index: int, attempt: Attempt) -> Attempt:
        state = self.levels[index]
        before = state.breaker.state
        if attempt.outcome in (Outcome.REJECTED, Outcome.QUEUED):
            # A rejected answer says more about the input (noise, an odd prompt) than about
            # the engine, a queued one about the load: either moves the request on, but
            # never opens a healthy engine's circuit.
            state.breaker.abandon()
            state.last_error = f"{attempt.outcome.value}: {attempt.reason}"
            return self._record(attempt)
        if attempt.outcome is Outcome.CRASHED:
            state.breaker.trip()
        else:
            state.breaker.record_failure()
        state.failures += 1
        state.last_error = f"{attempt.outcome.value}: {attempt.reason}"
        after = state.breaker.state
        if after is not before:
            _LOGGER.warning("%s: circuit of %s is now %s", self.service, state.engine.name, after.value)
            if self.observer is not None:
                self.observer.on_circuit(self.service, state.engine.name, after)
        return self._record(attempt)


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
