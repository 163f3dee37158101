"""Supervised engine workers: a native engine in its own process, so a crash costs one request.

llama.cpp, CTranslate2 and ONNX Runtime run native code that can segfault,
abort or hang on a CPU or a driver they were not built for; inside the
server's process that ends every service at once. Here such an engine lives
in a child process (``spawn``: no inherited threads, locks or CUDA state)
and the service holds an :class:`EngineWorker`: a proxy with the engine's
attributes and work calls. Weights are loaded in the child only.

What a crash does:

* the child dies (a signal, the OOM killer, an exit) or does not finish a
  cancelled call within ``cancel_grace_s`` (a hang: the supervisor kills it);
* every call in flight fails with :class:`EngineCrashed`, which a
  :class:`~.fallback.FallbackChain` takes as that level's failure: the next
  level answers, the level's circuit opens at once;
* the crash is logged with its signal and reported to the chain's watchers
  (``superwhisper_engine_crashes_total``), the child restarts in the
  background with exponential backoff, and the chain's half-open probe puts
  the level back in service.

Engines know nothing of this: the child builds the engine from a picklable
factory and runs its coroutines on its own event loop. The proxy keeps a
*shadow* instance (built, never loaded) for the engine's static attributes
and mirrors the public scalar attributes the child's engine changes (a
voice's sample rate, its speakers) after each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import enum
import faulthandler
import functools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .fallback import EngineCrashed, EngineError

_LOGGER = logging.getLogger(__name__)

_SIMPLE = (str, int, float, bool, type(None), Path)
_STATE_AT = {"result": 3, "error": 3, "end": 2, "cancelled": 2}
"""Where each final answer of the child carries the engine's changed state."""


class CancelToken:
    """Stands for a ``threading.Event`` argument: the child passes its own, set on cancel."""


@dataclass(frozen=True)
class WorkerOptions:
    """How workers are supervised (``server.worker_*`` settings)."""

    cancel_grace_s: float = 30.0
    """After a call is cancelled (timeout, client gone), how long the child may take to stop
    it before it is taken for hung and killed, in seconds."""
    restart_backoff_s: float = 1.0
    """First wait before restarting a crashed worker; doubles per crash in a row."""
    max_backoff_s: float = 60.0
    start_timeout_s: float = 300.0
    """Process start plus the engine's load, in seconds."""
    log_level: str = "INFO"
    nice: int = 0
    """How much lower the child's CPU priority is than the server's (Unix nice increment,
    0–19): a long generation on a shared CPU then yields to the speech work that holds up
    what the user hears next (``handle.cpu_nice``); 0: the same priority."""


class WorkerState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    CRASHED = "crashed"
    """Dead, restart pending (backoff)."""


CrashWatcher = Callable[[str], None]
"""Called with the cause (``SIGSEGV``, ``hang``, ``exit:1``...) each time the worker dies."""


def exit_cause(exitcode: int | None) -> str:
    """``-11`` → ``SIGSEGV``; ``1`` → ``exit:1``; what the crash metric and logs say."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal:{-exitcode}"
    return f"exit:{exitcode}"


class _Process:
    """One child process: its pipe, a reader and a writer thread (the event loop never blocks)."""

    def __init__(
        self,
        factory: Callable[[], Any],
        name: str,
        options: WorkerOptions,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[_Process, tuple[Any, ...]], None],
        on_exit: Callable[[_Process], None],
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=child_main,
            args=(child_conn, factory, options.log_level, options.nice),
            name=f"superwhisper-worker:{name}",
            daemon=True,
        )
        self._child_conn = child_conn
        self._loop = loop
        self._on_message = on_message
        self._on_exit = on_exit
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.hung = False
        self.stopped_on_purpose = False
        """Killed by the supervisor after a failed load: its exit is no crash to count or restart."""
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> None:
        self.process.start()
        self._child_conn.close()
        threading.Thread(target=self._read, name=f"{self.process.name}-read", daemon=True).start()
        threading.Thread(target=self._write, name=f"{self.process.name}-write", daemon=True).start()

    def send(self, message: tuple[Any, ...]) -> None:
        self._outbox.put(message)

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as error:  # an answer that does not unpickle: that call fails
                _LOGGER.warning("%s: unreadable answer: %s", self.process.name, error)
                continue
            self._post(self._on_message, self, message)
        self.process.join()  # the pipe is closed: the process is gone or going
        self._outbox.put(None)
        self._post(self._exited)

    def _exited(self) -> None:
        self.exited.set()
        self._on_exit(self)

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                break
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the child is gone; the reader reports it
                break
            except Exception as error:  # an argument that does not pickle: fail that call
                if len(message) > 1 and isinstance(message[1], int):
                    self._post(self._on_message, self, ("error", message[1], EngineError(str(error)), {}))


@dataclass
class _Call:
    answers: asyncio.Queue[tuple[Any, ...]]
    process: _Process


class EngineWorker:
    """The service's side of an engine running in a supervised child process.

    ``calls`` names the engine's coroutine methods (awaited in the child, one
    result), ``streams`` its async-generator methods (items streamed back).
    Any other attribute is read from the shadow instance.
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        shadow: Any,
        *,
        calls: Iterable[str] = (),
        streams: Iterable[str] = (),
        options: WorkerOptions | None = None,
    ) -> None:
        self._factory = factory
        self._shadow = shadow
        self._calls = frozenset(calls)
        self._streams = frozenset(streams)
        self._options = options or WorkerOptions()
        self._process: _Process | None = None
        self._state = WorkerState.STOPPED
        self._ready = asyncio.Event()
        self._pending: dict[int, _Call] = {}
        self._next_id = 1
        self._watchers: list[CrashWatcher] = []
        self._restart: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closing = False
        self._load_answer: asyncio.Future[tuple[Any, ...]] | None = None
        self.crashes = 0
        self.restarts = 0
        self.crashes_in_a_row = 0
        self.last_crash = ""
        self.last_crash_at: float | None = None

    # -- what the chain and the service see -----------------------------------------

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") or attribute in ("_shadow", "_calls", "_streams"):
            raise AttributeError(attribute)
        if attribute in self._calls:
            return lambda *args, **kwargs: self._call(attribute, args, kwargs)
        if attribute in self._streams:
            return lambda *args, **kwargs: self._stream(attribute, args, kwargs)
        return getattr(self._shadow, attribute)

    @property
    def engine(self) -> Any:
        """The shadow instance (static attributes, mirrored state; never loaded)."""
        return self._shadow

    def watch_crashes(self, watcher: CrashWatcher) -> None:
        """Be told of every crash, also one between requests (the chain opens the circuit)."""
        self._watchers.append(watcher)

    def worker_status(self) -> dict[str, Any]:
        process = self._process
        return {
            "state": self._state.value,
            "pid": process.pid if process is not None and self._state is not WorkerState.CRASHED else None,
            "crashes": self.crashes,
            "restarts": self.restarts,
            "last_crash": self.last_crash,
            "last_crash_age_s": (
                round(time.monotonic() - self.last_crash_at, 1) if self.last_crash_at is not None else None
            ),
        }

    # -- lifecycle --------------------------------------------------------------------

    async def load(self) -> None:
        self._closing = False
        async with self._start_lock:
            if self._state is WorkerState.READY:
                return
            await self._spawn()

    async def close(self) -> None:
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        process = self._process
        if process is None:
            return
        if self._state is WorkerState.READY:
            process.send(("close",))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.exited.wait(), self._options.cancel_grace_s + 5.0)
        process.kill()
        await process.exited.wait()
        self._state = WorkerState.STOPPED
        self._process = None

    async def _spawn(self) -> None:
        """Start a child and load the engine in it; raises what the load raised."""
        loop = asyncio.get_running_loop()
        self._state = WorkerState.STARTING
        process = _Process(
            self._factory, self._shadow.name, self._options, loop, self._dispatch, self._exited
        )
        self._process = process
        self._load_answer = loop.create_future()
        await asyncio.to_thread(process.start)
        process.send(("load",))
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._load_answer), self._options.start_timeout_s)
        except TimeoutError as error:
            process.hung = True
            process.kill()
            raise EngineError(
                f"{self._shadow.name}: worker did not load in {self._options.start_timeout_s:g} s"
            ) from error
        if answer[0] == "crashed":
            raise EngineCrashed(self._shadow.name, answer[1])
        if answer[0] == "load_error":
            process.stopped_on_purpose = True
            process.kill()
            await process.exited.wait()
            self._state = WorkerState.STOPPED
            raise answer[1]
        self._mirror(answer[1])
        self._state = WorkerState.READY
        self._ready.set()
        _LOGGER.info("%s: worker ready (pid %s)", self._shadow.name, process.pid)

    def _dispatch(self, process: _Process, message: tuple[Any, ...]) -> None:
        if process is not self._process:
            return  # a message from a process already replaced
        kind = message[0]
        if kind in ("ready", "load_error"):
            if self._load_answer is not None and not self._load_answer.done():
                self._load_answer.set_result(message)
            return
        call = self._pending.get(message[1])
        if call is not None:
            call.answers.put_nowait(message)

    def _exited(self, process: _Process) -> None:
        if process is not self._process:
            return
        cause = "hang" if process.hung else exit_cause(process.process.exitcode)
        expected = (self._closing or process.stopped_on_purpose) and not process.hung
        self._ready.clear()
        if self._load_answer is not None and not self._load_answer.done():
            self._load_answer.set_result(("crashed", cause))
        if expected:
            self._state = WorkerState.STOPPED
        else:
            self._state = WorkerState.CRASHED
            self.crashes += 1
            self.crashes_in_a_row += 1
            self.last_crash = cause
            self.last_crash_at = time.monotonic()
            _LOGGER.error(
                "%s: worker pid %s %s; %d call(s) in flight fail over to the next level",
                self._shadow.name,
                process.pid,
                "hung and was killed" if cause == "hang" else f"died ({cause})",
                len(self._pending),
            )
            for watcher in self._watchers:
                try:
                    watcher(cause)
                except Exception:  # a watcher must not stop the supervisor
                    _LOGGER.exception("crash watcher failed")
        for call_id, call in list(self._pending.items()):
            if call.process is process:
                call.answers.put_nowait(("crashed", call_id, cause))
        if not expected and not self._closing:
            self._restart = asyncio.get_running_loop().create_task(
                self._restart_later(), name=f"restart {self._shadow.name}"
            )

    async def _restart_later(self) -> None:
        delay = min(
            self._options.restart_backoff_s * 2 ** max(0, self.crashes_in_a_row - 1),
            self._options.max_backoff_s,
        )
        _LOGGER.info("%s: restarting the worker in %.1f s", self._shadow.name, delay)
        await asyncio.sleep(delay)
        async with self._start_lock:
            if self._closing or self._state is WorkerState.READY:
                return
            try:
                await self._spawn()
            except Exception as error:  # a crash during load schedules the next try itself
                _LOGGER.warning("%s: restart failed: %s", self._shadow.name, error)
                return
            self.restarts += 1

    async def _wait_ready(self) -> _Process:
        """The live process; waits (within the caller's deadline) while a restart is pending."""
        if self._state is WorkerState.STOPPED:
            raise EngineError(f"{self._shadow.name} is not loaded")
        await self._ready.wait()
        assert self._process is not None
        return self._process

    # -- calls ------------------------------------------------------------------------

    def _open(self, process: _Process) -> tuple[int, _Call]:
        call_id = self._next_id
        self._next_id += 1
        call = _Call(asyncio.Queue(), process)
        self._pending[call_id] = call
        return call_id, call

    def _answer(self, message: tuple[Any, ...]) -> Any:
        kind = message[0]
        if kind == "crashed":
            raise EngineCrashed(self._shadow.name, message[2])
        if kind == "error":
            self._mirror(message[3])
            raise message[2]
        if kind == "cancelled":
            raise EngineError(f"{self._shadow.name}: call cancelled in the worker")
        return message

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        process = await self._wait_ready()
        call_id, call = self._open(process)
        finished = False
        try:
            process.send(("call", call_id, method, _tokens(args), _tokens(kwargs)))
            message = self._answer(await call.answers.get())
            finished = True
            self._mirror(message[3])
            self.crashes_in_a_row = 0
            return message[2]
        except BaseException:
            finished = finished or not call.answers.empty()
            raise
        finally:
            self._settle(call_id, call, finished)

    async def _stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        process = await self._wait_ready()
        call_id, call = self._open(process)
        finished = False
        try:
            process.send(("stream", call_id, method, _tokens(args), _tokens(kwargs)))
            while True:
                message = await call.answers.get()
                if message[0] == "item":
                    yield message[2]
                    continue
                if message[0] != "end":
                    finished = True
                    self._answer(message)
                finished = True
                self._mirror(message[2])
                self.crashes_in_a_row = 0
                return
        finally:
            self._settle(call_id, call, finished)

    def _settle(self, call_id: int, call: _Call, finished: bool) -> None:
        """A call left early (cancelled, closed stream): stop it in the child, watch it stops."""
        if finished:
            self._pending.pop(call_id, None)
            return
        call.process.send(("cancel", call_id))
        asyncio.get_running_loop().create_task(self._watch_cancel(call_id, call), name=f"cancel {call_id}")

    async def _watch_cancel(self, call_id: int, call: _Call) -> None:
        deadline = asyncio.get_running_loop().time() + self._options.cancel_grace_s
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                message = await asyncio.wait_for(call.answers.get(), max(remaining, 0.0))
                if message[0] != "item":
                    if message[0] in _STATE_AT:
                        self._mirror(message[_STATE_AT[message[0]]])
                    return
        except TimeoutError:
            if call.process is self._process and self._state is WorkerState.READY:
                _LOGGER.error(
                    "%s: a cancelled call did not stop within %g s: killing the worker",
                    self._shadow.name,
                    self._options.cancel_grace_s,
                )
                call.process.hung = True
                call.process.kill()
        finally:
            self._pending.pop(call_id, None)

    def _mirror(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            with contextlib.suppress(AttributeError):
                setattr(self._shadow, key, value)


def _tokens(value: Any) -> Any:
    """``threading.Event`` arguments become :class:`CancelToken` (an Event does not cross)."""
    if isinstance(value, threading.Event):
        return CancelToken()
    if isinstance(value, tuple):
        return tuple(_tokens(v) for v in value)
    if isinstance(value, dict):
        return {k: _tokens(v) for k, v in value.items()}
    return value


# --- the child ---------------------------------------------------------------------


def child_main(conn: Connection, factory: Callable[[], Any], log_level: str, nice: int = 0) -> None:
    """Entry point of a worker process."""
    faulthandler.enable()  # a native crash prints the Python stack to the journal first
    logging.basicConfig(level=log_level, format=f"%(levelname)s:%(name)s:worker {os.getpid()}: %(message)s")
    if nice:
        try:  # before the engine loads: the native thread pools it starts inherit the priority
            os.nice(nice)
        except OSError as error:
            _LOGGER.warning("worker keeps its CPU priority (nice %+d refused: %s)", nice, error)
    asyncio.run(_Child(conn, factory).serve())


def _simple(value: Any) -> bool:
    return isinstance(value, _SIMPLE) or (
        isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)
    )


def public_state(engine: Any) -> dict[str, Any]:
    """The engine's public scalar attributes and flat dataclasses (e.g. generation stats), copied."""
    values = getattr(engine, "__dict__", {})
    state: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("_"):
            continue
        if _simple(value):
            state[key] = value
        elif (
            dataclasses.is_dataclass(value)
            and not isinstance(value, type)
            and all(_simple(getattr(value, f.name)) for f in dataclasses.fields(value))
        ):
            state[key] = copy.copy(value)  # a copy: the engine mutates its own in place
    return state


class _Child:
    def __init__(self, conn: Connection, factory: Callable[[], Any]) -> None:
        self.conn = conn
        self.factory = factory
        self.engine: Any = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.sent_state: dict[str, Any] = {}
        self.inbox: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            os._exit(0)  # the server is gone: nothing left to serve
        except Exception as error:  # a result that does not pickle
            if len(message) > 1 and isinstance(message[1], int):
                self.conn.send(("error", message[1], EngineError(f"unpicklable answer: {error}"), {}))

    def state_delta(self) -> dict[str, Any]:
        state = public_state(self.engine)
        delta = {k: v for k, v in state.items() if self.sent_state.get(k, object()) != v}
        self.sent_state = state
        return delta

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            loop.call_soon_threadsafe(self.inbox.put_nowait, message)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.inbox.put_nowait, None)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), name="worker-read", daemon=True).start()
        while True:
            message = await self.inbox.get()
            if message is None:  # the server closed the pipe or died
                os._exit(0)
            kind = message[0]
            if kind == "load":
                await self._load()
            elif kind in ("call", "stream"):
                _, call_id, method, args, kwargs = message
                runner = self._call if kind == "call" else self._stream
                self.tasks[call_id] = loop.create_task(runner(call_id, method, args, kwargs))
            elif kind == "cancel":
                task = self.tasks.get(message[1])
                if task is not None:
                    task.cancel()
            elif kind == "close":
                for task in list(self.tasks.values()):
                    task.cancel()
                if self.tasks:
                    await asyncio.wait(list(self.tasks.values()))
                if self.engine is not None:
                    await self.engine.close()
                self.conn.close()
                return

    async def _load(self) -> None:
        try:
            self.engine = self.factory()
            await self.engine.load()
        except Exception as error:
            self.send(("load_error", _portable(error)))
            return
        self.send(("ready", self.state_delta()))

    def _arguments(self, args: Any, events: list[threading.Event]) -> Any:
        if isinstance(args, CancelToken):
            event = threading.Event()
            events.append(event)
            return event
        if isinstance(args, tuple):
            return tuple(self._arguments(a, events) for a in args)
        if isinstance(args, dict):
            return {k: self._arguments(v, events) for k, v in args.items()}
        return args

    async def _call(self, call_id: int, method: str, args: Any, kwargs: Any) -> None:
        events: list[threading.Event] = []
        try:
            result = await getattr(self.engine, method)(
                *self._arguments(args, events), **self._arguments(kwargs, events)
            )
        except asyncio.CancelledError:
            for event in events:
                event.set()
            self.send(("cancelled", call_id, self.state_delta()))
        except Exception as error:
            self.send(("error", call_id, _portable(error), self.state_delta()))
        else:
            self.send(("result", call_id, result, self.state_delta()))
        finally:
            self.tasks.pop(call_id, None)

    async def _stream(self, call_id: int, method: str, args: Any, kwargs: Any) -> None:
        events: list[threading.Event] = []
        stream = getattr(self.engine, method)(
            *self._arguments(args, events), **self._arguments(kwargs, events)
        )
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    self.send(("item", call_id, item))
        except asyncio.CancelledError:
            for event in events:
                event.set()
            self.send(("cancelled", call_id, self.state_delta()))
        except Exception as error:
            self.send(("error", call_id, _portable(error), self.state_delta()))
        else:
            self.send(("end", call_id, self.state_delta()))
        finally:
            self.tasks.pop(call_id, None)


def _portable(error: BaseException) -> BaseException:
    """The exception itself when it crosses the pipe intact, else an EngineError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return EngineError(f"{type(error).__name__}: {error}")
    return error


def worker_options(settings: Any) -> WorkerOptions | None:
    """The supervision settings of ``settings.server``; None when engines run in process."""
    server = settings.server
    if not server.engine_workers:
        return None
    return WorkerOptions(
        cancel_grace_s=server.worker_cancel_grace_s,
        restart_backoff_s=server.worker_restart_backoff_s,
        max_backoff_s=max(server.worker_restart_backoff_s, server.worker_max_backoff_s),
        log_level=settings.log_level,
    )


def supervised(
    workers: WorkerOptions | None,
    engine_class: Callable[..., Any],
    /,
    *args: Any,
    calls: Iterable[str] = (),
    streams: Iterable[str] = (),
    **kwargs: Any,
) -> Any:
    """``engine_class(*args, **kwargs)`` in a supervised worker, or in process when ``workers`` is None."""
    engine = engine_class(*args, **kwargs)
    if workers is None:
        return engine
    factory = functools.partial(engine_class, *args, **kwargs)
    return EngineWorker(factory, engine, calls=calls, streams=streams, options=workers)
