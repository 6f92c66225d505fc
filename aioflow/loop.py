"""The replay loop: a deterministic event loop that orchestrator coroutines run on.

The host loop (asyncio or uvloop) runs the worker. Each orchestrator instance gets its own
`ReplayLoop`, which is never "run" in the usual sense: the engine drives it one step at a time
with `run_until_idle()`, synchronously, between history events. While it runs, it is installed as
the running loop, so plain asyncio inside orchestrator code (`asyncio.sleep`, `gather`, `wait`,
`wait_for`, `timeout`, `TaskGroup`, `Event`, ...) works against it:

* Time is the orchestration's logical time, set by the engine from history, never the clock.
* `call_at`/`call_later` in the future become durable timers (via the `TimerScheduler` the engine
  supplies); that is how `asyncio.sleep`, `wait_for` and `timeout` become durable. A deadline
  that is already due runs as an ordinary callback and costs no history.
* Futures and tasks created here hash by creation order, so sets of them (`asyncio.wait`'s
  `done`/`pending`) iterate in the same order on every replay.
* Anything that would do real I/O raises `NonDeterministicOperationError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
from asyncio import events
from collections.abc import Callable
from typing import Any, Protocol, TypeVarTuple

from aioflow.errors import NonDeterministicOperationError

logger = logging.getLogger("aioflow.loop")

_Ts = TypeVarTuple("_Ts")


class TimerScheduler(Protocol):
    def schedule_timer(self, when: float, handle: "DurableTimerHandle") -> None: ...
    def cancel_timer(self, handle: "DurableTimerHandle") -> None: ...


class DeterministicFuture(asyncio.Future[Any]):
    """A Future whose hash is its creation order on its loop (deterministic set iteration)."""

    def __init__(self, *, loop: "ReplayLoop") -> None:
        self._aioflow_seq = next(loop._seq)
        super().__init__(loop=loop)

    def __hash__(self) -> int:
        return self._aioflow_seq


class DeterministicTask(asyncio.Task[Any]):
    """A Task whose hash is its creation order on its loop (deterministic set iteration)."""

    def __init__(self, coro: Any, *, loop: "ReplayLoop", name: str | None = None,
                 context: contextvars.Context | None = None) -> None:
        self._aioflow_seq = next(loop._seq)  # before __init__: it adds self to a WeakSet
        super().__init__(coro, loop=loop, name=name, context=context)

    def __hash__(self) -> int:
        return self._aioflow_seq


class DurableTimerHandle(asyncio.TimerHandle):
    """A `call_at` in the orchestration's future: fired by a durable timer from history."""

    __slots__ = ("timer_id",)

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...],
                 loop: "ReplayLoop", context: contextvars.Context | None) -> None:
        super().__init__(when, callback, args, loop, context)  # type: ignore[arg-type]
        self.timer_id: int | None = None

    def cancel(self) -> None:
        if not self._cancelled:  # type: ignore[attr-defined]
            super().cancel()
            loop = self._loop  # type: ignore[attr-defined]
            loop._scheduler.cancel_timer(self)


def _forbidden(what: str) -> Callable[..., Any]:
    def method(self: "ReplayLoop", *args: Any, **kwargs: Any) -> Any:
        raise NonDeterministicOperationError(what)
    method.__name__ = what.split("(")[0].replace("loop.", "")
    return method


class ReplayLoop(asyncio.AbstractEventLoop):
    """An event loop driven step by step by the engine; see the module docstring."""

    def __init__(self, scheduler: TimerScheduler, *, now: float = 0.0) -> None:
        self._scheduler = scheduler
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._now = now
        self._seq = itertools.count()
        self._closed = False
        self._running = False
        self._debug = False
        self._task_factory: Any = None
        self._exception_handler: Any = None

    # -- driving ---------------------------------------------------------------------------
    def set_time(self, now: float) -> None:
        self._now = now

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Run ready callbacks until none are left (the coroutines are all blocked)."""
        if self._running:
            raise RuntimeError("ReplayLoop.run_until_idle() is not re-entrant")
        previous = events._get_running_loop()
        events._set_running_loop(self)
        self._running = True
        try:
            ready = self._ready
            steps = 0
            while ready:
                handle = ready.popleft()
                if not handle._cancelled:  # type: ignore[attr-defined]
                    handle._run()  # type: ignore[attr-defined]
                steps += 1
                if steps > max_steps:
                    raise RuntimeError(
                        "orchestrator kept scheduling callbacks without ever blocking on a "
                        "durable task; is there an endless loop of asyncio.sleep(0)?"
                    )
        finally:
            self._running = False
            events._set_running_loop(previous)

    def fire(self, handle: asyncio.TimerHandle) -> None:
        """Queue a timer handle whose durable timer fired (or that was already due)."""
        if not handle._cancelled:  # type: ignore[attr-defined]
            self._ready.append(handle)

    # -- the parts of the loop API asyncio and user code use -------------------------------
    def time(self) -> float:
        return self._now

    def call_soon(self, callback: Callable[[*_Ts], object], *args: *_Ts,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        self._check_closed()
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[[*_Ts], object], *args: *_Ts,
                   context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        return self.call_at(self._now + delay, callback, *args, context=context)

    def call_at(self, when: float, callback: Callable[[*_Ts], object], *args: *_Ts,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        self._check_closed()
        if when <= self._now:
            # Already due: no durable timer and no history event.
            handle = asyncio.TimerHandle(when, callback, args, self, context)
            self._ready.append(handle)
            return handle
        durable = DurableTimerHandle(when, callback, args, self, context)
        self._scheduler.schedule_timer(when, durable)
        return durable

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # DurableTimerHandle.cancel tells the scheduler itself

    def create_future(self) -> asyncio.Future[Any]:
        return DeterministicFuture(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None,
                    context: contextvars.Context | None = None,
                    **kwargs: Any) -> asyncio.Task[Any]:
        # `eager_start` (3.13+) and other future keywords are accepted and ignored: tasks here
        # always start on the next step, which is deterministic either way.
        self._check_closed()
        if self._task_factory is not None:
            if context is None:
                task = self._task_factory(self, coro)
            else:
                task = self._task_factory(self, coro, context=context)
            if name is not None:
                task.set_name(name)
            return task
        return DeterministicTask(coro, loop=self, name=name, context=context)

    def set_task_factory(self, factory: Any) -> None:
        self._task_factory = factory

    def get_task_factory(self) -> Any:
        return self._task_factory

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._ready.clear()
        self._closed = True

    def _check_closed(self) -> None:
        if self._closed:
            raise RuntimeError("this orchestration's replay loop is closed")

    def get_debug(self) -> bool:
        return self._debug

    def set_debug(self, enabled: bool) -> None:
        self._debug = enabled

    def get_exception_handler(self) -> Any:
        return self._exception_handler

    def set_exception_handler(self, handler: Any) -> None:
        self._exception_handler = handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        # Futures dropped unretrieved during replay are normal (a race's loser); keep quiet.
        logger.debug("orchestration loop: %s", context.get("message"),
                     exc_info=context.get("exception"))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if self._exception_handler is not None:
            self._exception_handler(self, context)
        else:
            self.default_exception_handler(context)

    async def shutdown_asyncgens(self) -> None:
        return None

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        return None

    # -- everything that would touch the outside world -------------------------------------
    # (`type: ignore[assignment]` below: mypy will not match Callable[..., Any] to the
    # base class's generic, TypeVarTuple signatures; the stubs take any arguments.)
    run_forever = _forbidden("loop.run_forever()")
    run_until_complete = _forbidden("loop.run_until_complete()")
    stop = _forbidden("loop.stop()")
    call_soon_threadsafe = _forbidden("loop.call_soon_threadsafe() (threads)")  # type: ignore[assignment]
    run_in_executor = _forbidden("loop.run_in_executor() (threads, asyncio.to_thread)")  # type: ignore[assignment]
    set_default_executor = _forbidden("loop.set_default_executor()")
    getaddrinfo = _forbidden("DNS lookup (loop.getaddrinfo)")
    getnameinfo = _forbidden("DNS lookup (loop.getnameinfo)")
    create_connection = _forbidden("opening a network connection")
    create_server = _forbidden("starting a server")
    create_unix_connection = _forbidden("opening a socket connection")
    create_unix_server = _forbidden("starting a server")
    create_datagram_endpoint = _forbidden("opening a UDP endpoint")
    connect_accepted_socket = _forbidden("using a socket")
    sendfile = _forbidden("sending a file")
    start_tls = _forbidden("starting TLS")
    connect_read_pipe = _forbidden("reading a pipe")
    connect_write_pipe = _forbidden("writing a pipe")
    subprocess_shell = _forbidden("starting a subprocess")
    subprocess_exec = _forbidden("starting a subprocess")
    add_reader = _forbidden("watching a file descriptor")  # type: ignore[assignment]
    remove_reader = _forbidden("watching a file descriptor")
    add_writer = _forbidden("watching a file descriptor")  # type: ignore[assignment]
    remove_writer = _forbidden("watching a file descriptor")
    sock_recv = _forbidden("socket I/O")
    sock_recv_into = _forbidden("socket I/O")
    sock_recvfrom = _forbidden("socket I/O")
    sock_recvfrom_into = _forbidden("socket I/O")
    sock_sendall = _forbidden("socket I/O")
    sock_sendto = _forbidden("socket I/O")
    sock_connect = _forbidden("socket I/O")
    sock_accept = _forbidden("socket I/O")
    sock_sendfile = _forbidden("socket I/O")
    add_signal_handler = _forbidden("installing a signal handler")  # type: ignore[assignment]
    remove_signal_handler = _forbidden("removing a signal handler")
