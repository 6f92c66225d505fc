"""The replay engine: pure, synchronous, no I/O.

`OrchestrationExecutor` holds one instance in memory: its orchestrator coroutine suspended on a
`ReplayLoop`, the tasks it is waiting for, and how far through history it has got. The runtime
feeds it history once (`load`, replaying) and then only new events (`activate`), and gets back a
`Decision`: the history events to append, the work to send out, and the instance's new status.
A cached executor therefore never replays; a cold one replays its history exactly once.

Replay matching is strict: each scheduling command gets the next sequence number (`task_id`),
and each TaskScheduled / TimerCreated / SubOrchestrationCreated event in history must meet a
command of the same kind, name and number issued by the code at that point, or the replay fails
with `NonDeterminismError` naming the step and both commands.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioflow.app import App, function_name
from aioflow.context import OrchestrationContext
from aioflow.entities import EntityId, as_entity_id
from aioflow.errors import (
    EntityLockError,
    NonDeterminismError,
    NonDeterministicOperationError,
    SerializationError,
    TaskFailedError,
    UnknownFunctionError,
)
from aioflow.events import (
    EntityOperationSent,
    EventRaised,
    ExecutionCompleted,
    ExecutionResumed,
    ExecutionStarted,
    ExecutionSuspended,
    ExecutionTerminated,
    HistoryEvent,
    OrchestratorStarted,
    SubOrchestrationCompleted,
    SubOrchestrationCreated,
    SubOrchestrationFailed,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
)
from aioflow.loop import DurableTimerHandle, ReplayLoop
from aioflow.retry import RetryPolicy
from aioflow.serialization import from_json_value, to_json_value
from aioflow.status import FailureDetails, RuntimeStatus

__all__ = ["Decision", "OrchestrationExecutor", "failure_from_exception"]

logger = logging.getLogger("aioflow.engine")

_COMMAND_EVENTS = (TaskScheduled, TimerCreated, SubOrchestrationCreated, EntityOperationSent)
_RESULT_EVENTS = (TaskCompleted, TaskFailed, TimerFired, SubOrchestrationCompleted,
                  SubOrchestrationFailed)
_UNSET: Any = object()


@dataclass(slots=True)
class Decision:
    """What one activation decided. The runtime commits it atomically.

    `new_events` are appended to history in order. `activities`, `timers` and
    `sub_orchestrations` are the commands among them that need messages sent; `outbound` are
    events for other instances (a parent's result). `entity_messages` are operations, locks and
    unlocks for entities, in the order sent (when the instance ends holding locks, unlocks with
    `task_id` -1 that are not part of history release them). When `continue_as_new` is set,
    the runtime starts a fresh execution with that input and re-sends `carried_events` to it.
    """

    new_events: list[HistoryEvent]
    activities: list[TaskScheduled] = field(default_factory=list)
    timers: list[TimerCreated] = field(default_factory=list)
    sub_orchestrations: list[SubOrchestrationCreated] = field(default_factory=list)
    entity_messages: list[EntityOperationSent] = field(default_factory=list)
    outbound: list[tuple[str, HistoryEvent]] = field(default_factory=list)
    runtime_status: RuntimeStatus = RuntimeStatus.RUNNING
    output: Any = None
    failure: FailureDetails | None = None
    custom_status: Any = _UNSET
    continue_as_new: bool = False
    new_input: Any = None
    carried_events: list[EventRaised] = field(default_factory=list)

    @property
    def custom_status_changed(self) -> bool:
        return self.custom_status is not _UNSET

    @property
    def is_finished(self) -> bool:
        return self.runtime_status.is_terminal or self.continue_as_new


@dataclass(slots=True)
class _Pending:
    kind: str  # "activity" | "timer" | "sub-orchestration" | "entity operation"
    name: str
    future: asyncio.Future[Any] | None = None
    handle: DurableTimerHandle | None = None


def failure_from_exception(exc: BaseException) -> FailureDetails:
    """Failure details that show the real cause (ExceptionGroups are unwrapped)."""
    trace = "".join(traceback.format_exception(exc))
    if isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        if len(leaves) == 1:
            leaf = leaves[0]
            return FailureDetails(_type_name(leaf), _message(leaf), trace)
        message = "; ".join(f"{_type_name(e)}: {_message(e)}" for e in leaves)
        return FailureDetails(_type_name(leaves[0]), f"{len(leaves)} errors: {message}", trace)
    if isinstance(exc, RuntimeError) and (
        "attached to a different loop" in str(exc) or "got bad yield" in str(exc)
    ):
        wrapped = NonDeterministicOperationError(
            f"awaiting something that is not durable ({exc})")
        return FailureDetails(type(wrapped).__name__, str(wrapped), trace)
    return FailureDetails(_type_name(exc), _message(exc), trace)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _type_name(exc: BaseException) -> str:
    if isinstance(exc, TaskFailedError):
        return "TaskFailedError"
    return type(exc).__name__


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class OrchestrationExecutor:
    """One orchestration instance, alive in memory between activations. Not thread-safe."""

    def __init__(self, app: App, instance_id: str) -> None:
        self.app = app
        self.instance_id = instance_id
        self.name = ""
        self.execution_id = ""
        self.parent_instance_id: str | None = None
        self.parent_execution_id: str | None = None
        self.parent_task_id: int | None = None
        self.now = 0.0
        self.is_replaying = False
        #: How many history events this executor has applied (== events stored, when in sync).
        self.history_length = 0
        self.runtime_status = RuntimeStatus.PENDING
        self.loop = ReplayLoop(self)
        self.ctx = OrchestrationContext(self)
        # The orchestrator's main task (a cancelled placeholder future if it could not start).
        self._main: asyncio.Future[Any] | None = None
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._received: set[int] = set()
        self._unconfirmed: dict[int, HistoryEvent] = {}
        self._waiters: dict[str, list[asyncio.Future[Any]]] = {}
        self._buffered: list[EventRaised] = []
        self._prestart: list[HistoryEvent] = []
        self._suspended: list[HistoryEvent] | None = None
        self._completion: ExecutionCompleted | None = None
        self._completion_recorded = False
        self._custom_status: Any = _UNSET
        self._continue_input: Any = _UNSET
        self._outbound: list[tuple[str, HistoryEvent]] = []
        self._fatal: BaseException | None = None
        self._closing = False
        #: The critical section the orchestrator is in: (section id, entity instance ids).
        self._section: tuple[str, frozenset[str]] | None = None
        #: Entity locks requested (sent or committed) and not yet unlocked, per section.
        self._locks_out: dict[str, set[str]] = {}

    # == driving ==========================================================================
    def load(self, history: list[HistoryEvent]) -> None:
        """Replay stored history (once, for a cold instance)."""
        self.is_replaying = True
        try:
            for event in history:
                self.history_length += 1
                if self._fatal is None:
                    self._apply(event)
        except NonDeterminismError as exc:
            self._fatal = exc
        finally:
            self.is_replaying = False
        self._outbound.clear()  # replies sent during replay were sent when first decided

    def activate(self, now: float, events: list[HistoryEvent]) -> Decision:
        """Deliver newly arrived events and decide what to commit.

        Events that must not enter history (duplicates, results for a previous execution or for
        a cancelled task) are dropped; the decision's `new_events` only hold what was applied.
        """
        self.is_replaying = False
        new: list[HistoryEvent] = []
        start = OrchestratorStarted(ts=now)
        self._record(start, new)
        if self._fatal is None:
            try:
                for event in events:
                    if self._accept(event):
                        self._record(event, new)
                commands = [e for e in self._unconfirmed.values()]
                self._unconfirmed.clear()
                for command in commands:
                    self._record(command, new, apply=False)  # confirmed by being recorded
            except NonDeterminismError as exc:
                self._fatal = exc
        else:
            new.extend(events)
            self.history_length += len(events)
            commands = []
        if self._fatal is not None and self._completion is None:
            self._complete_failed(self._fatal)
            commands = []
        decision = Decision(new_events=new)
        for command in commands:
            if isinstance(command, TaskScheduled):
                decision.activities.append(command)
            elif isinstance(command, TimerCreated):
                decision.timers.append(command)
            elif isinstance(command, SubOrchestrationCreated):
                decision.sub_orchestrations.append(command)
            elif isinstance(command, EntityOperationSent):
                decision.entity_messages.append(command)
                self._track_lock(command)
        decision.runtime_status = self.runtime_status
        if self._custom_status is not _UNSET:
            decision.custom_status = self._custom_status
        completion = self._completion
        if completion is not None and not self._completion_recorded:
            self._completion_recorded = True
            self._record(completion, new, apply=False)
            decision.output = completion.result
            if completion.error_type:
                decision.failure = FailureDetails(completion.error_type, completion.message,
                                                  completion.stack_trace)
            if completion.status == RuntimeStatus.CONTINUED_AS_NEW.value:
                decision.continue_as_new = True
                decision.new_input = completion.result
                decision.carried_events = list(self._buffered)
                decision.output = None
            self._notify_parent(completion)
            decision.entity_messages.extend(self._release_all_locks())
        decision.outbound = self._outbound
        self._outbound = []
        return decision

    def close(self) -> None:
        """Cancel every task of the orchestrator on purpose and close its loop.

        Called when an instance is evicted from the cache or has finished, so that suspended
        coroutines are not left for the garbage collector to finalise at a random time.
        """
        if self.loop.is_closed():
            return
        self._closing = True
        self.is_replaying = True  # silence the replay-safe logger during teardown
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        try:
            self.loop.run_until_idle(max_steps=100_000)
        except Exception:  # teardown must not fail the worker
            logger.debug("error while cancelling orchestrator tasks", exc_info=True)
        for task in tasks:
            if not task.done():
                try:
                    task.get_coro().close()  # type: ignore[union-attr]
                except BaseException:
                    logger.debug("orchestrator coroutine ignored its closing", exc_info=True)
        self.loop.close()

    @property
    def is_finished(self) -> bool:
        return self._completion is not None

    @property
    def replay_error(self) -> BaseException | None:
        """The NonDeterminismError met while replaying, if any."""
        return self._fatal

    # == applying events ===================================================================
    def _record(self, event: HistoryEvent, new: list[HistoryEvent], *, apply: bool = True) -> None:
        self.history_length += 1
        new.append(event)
        if apply:
            self._apply(event)

    def _accept(self, event: HistoryEvent) -> bool:
        """Whether a newly arrived event enters history."""
        if self._completion is not None:
            return False
        kind = type(event)
        if kind is ExecutionStarted:
            assert isinstance(event, ExecutionStarted)
            if self._main is None and self.runtime_status is RuntimeStatus.PENDING:
                return True
            self._reject_second_start(event)
            return False
        if kind in _RESULT_EVENTS:
            task_id: int = event.task_id  # type: ignore[attr-defined]
            if event.execution_id != self.execution_id:  # type: ignore[attr-defined]
                return False
            if task_id not in self._pending or task_id in self._received:
                return False
            self._received.add(task_id)
        return True

    def _apply(self, event: HistoryEvent) -> None:
        kind = type(event)
        if kind is OrchestratorStarted:
            self.now = event.ts
            self.loop.set_time(event.ts)
            return
        if kind in _COMMAND_EVENTS:
            self._confirm(event)
            if kind is EntityOperationSent:
                self._track_lock(event)  # type: ignore[arg-type]
            return
        if kind is ExecutionCompleted:
            self._completion_recorded = True
            return
        if kind is ExecutionStarted:
            assert isinstance(event, ExecutionStarted)
            self._start(event)
        elif kind is ExecutionTerminated:
            assert isinstance(event, ExecutionTerminated)
            self._terminate(event.reason)
        elif self._main is None:
            self._prestart.append(event)  # arrived before the start message; deliver after it
            return
        elif kind is ExecutionSuspended:
            if self._suspended is None:
                self._suspended = []
                self.runtime_status = RuntimeStatus.SUSPENDED
            return
        elif kind is ExecutionResumed:
            if self._suspended is not None:
                held, self._suspended = self._suspended, None
                self.runtime_status = RuntimeStatus.RUNNING
                for e in held:
                    self._deliver(e)
        elif self._suspended is not None:
            self._suspended.append(event)
            return
        else:
            self._deliver(event)
        self._run()

    def _deliver(self, event: HistoryEvent) -> None:
        if isinstance(event, EventRaised):
            self._deliver_event(event)
            return
        task_id = event.task_id  # type: ignore[attr-defined]
        self._received.add(task_id)
        pending = self._pending.pop(task_id, None)
        if pending is None:
            return  # cancelled meanwhile
        if isinstance(event, TimerFired):
            if pending.handle is not None:
                self.loop.fire(pending.handle)
            elif pending.future is not None and not pending.future.done():
                pending.future.set_result(None)
            return
        future = pending.future
        if future is None or future.done():
            return
        if isinstance(event, (TaskCompleted, SubOrchestrationCompleted)):
            try:
                value = from_json_value(event.result, self._output_type(pending))
            except Exception as exc:  # a result that does not fit the annotation
                future.set_exception(SerializationError(
                    f"the result of {pending.kind} {pending.name!r} does not fit its return "
                    f"annotation: {exc}"))
                return
            future.set_result(value)
        elif isinstance(event, (TaskFailed, SubOrchestrationFailed)):
            future.set_exception(TaskFailedError(
                pending.name, event.error_type, event.message, event.stack_trace,
                kind=pending.kind))

    def _output_type(self, pending: _Pending) -> Any:
        if pending.kind == "entity operation":
            return None
        table = self.app.activities if pending.kind == "activity" else self.app.orchestrators
        reg = table.get(pending.name)
        return reg.output_type if reg is not None else None

    def _deliver_event(self, event: EventRaised) -> None:
        waiters = self._waiters.get(event.name.casefold())
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(event.input)
                return
        self._buffered.append(event)

    def _run(self) -> None:
        self.loop.run_until_idle()
        main = self._main
        if main is not None and main.done() and self._completion is None:
            self._complete_from(main)

    # == lifecycle =========================================================================
    def _start(self, event: ExecutionStarted) -> None:
        self.name = event.name
        self.execution_id = event.execution_id
        self.parent_instance_id = event.parent_instance_id
        self.parent_execution_id = event.parent_execution_id
        self.parent_task_id = event.parent_task_id
        self.runtime_status = RuntimeStatus.RUNNING
        if not self.now:
            self.now = event.ts
            self.loop.set_time(event.ts)
        try:
            reg = self.app.get_orchestrator(event.name)
            value = from_json_value(event.input, reg.input_type)
            coro = reg.fn(self.ctx, value) if reg.takes_input else reg.fn(self.ctx)
        except Exception as exc:
            self._main = self.loop.create_future()  # a placeholder so later events are handled
            self._main.cancel()
            self._complete_failed(exc)
            return
        self._main = self.loop.create_task(coro, name=f"orchestration {self.instance_id}")
        held, self._prestart = self._prestart, []
        self._run()
        for e in held:
            if self._completion is None:
                self._apply(e)

    def _terminate(self, reason: str) -> None:
        if self._completion is not None:
            return
        self.runtime_status = RuntimeStatus.TERMINATED
        self._completion = ExecutionCompleted(
            ts=self.now, status=RuntimeStatus.TERMINATED.value, result=reason)
        self._unconfirmed.clear()
        self.close()

    def _complete_from(self, main: asyncio.Future[Any]) -> None:
        if main.cancelled():
            self._complete_failed(asyncio.CancelledError(
                "the orchestrator's main task was cancelled"))
            return
        exc = main.exception()
        if exc is not None:
            self._complete_failed(exc)
            return
        if self._continue_input is not _UNSET:
            self.runtime_status = RuntimeStatus.CONTINUED_AS_NEW
            self._completion = ExecutionCompleted(
                ts=self.now, status=RuntimeStatus.CONTINUED_AS_NEW.value,
                result=self._continue_input)
        else:
            try:
                result = to_json_value(main.result(), what=f"the output of orchestrator "
                                                           f"{self.name!r}")
            except SerializationError as err:
                self._complete_failed(err)
                return
            self.runtime_status = RuntimeStatus.COMPLETED
            self._completion = ExecutionCompleted(
                ts=self.now, status=RuntimeStatus.COMPLETED.value, result=result)
        self.close()

    def _complete_failed(self, exc: BaseException) -> None:
        details = failure_from_exception(exc)
        self.runtime_status = RuntimeStatus.FAILED
        self._completion = ExecutionCompleted(
            ts=self.now, status=RuntimeStatus.FAILED.value, error_type=details.error_type,
            message=details.message, stack_trace=details.stack_trace)
        self._unconfirmed.clear()
        self.close()

    def _notify_parent(self, completion: ExecutionCompleted) -> None:
        if self.parent_instance_id is None or self.parent_task_id is None:
            return
        if completion.status == RuntimeStatus.CONTINUED_AS_NEW.value:
            return  # the new execution inherits the parent and will answer it
        common = dict(ts=self.now, task_id=self.parent_task_id,
                      execution_id=self.parent_execution_id or "")
        reply: HistoryEvent
        if completion.status == RuntimeStatus.COMPLETED.value:
            reply = SubOrchestrationCompleted(result=completion.result, **common)  # type: ignore[arg-type]
        elif completion.status == RuntimeStatus.TERMINATED.value:
            reply = SubOrchestrationFailed(
                error_type="Terminated", message=f"terminated: {completion.result}",
                **common)  # type: ignore[arg-type]
        else:
            reply = SubOrchestrationFailed(
                error_type=completion.error_type, message=completion.message,
                stack_trace=completion.stack_trace, **common)  # type: ignore[arg-type]
        self._outbound.append((self.parent_instance_id, reply))

    def _reject_second_start(self, event: ExecutionStarted) -> None:
        parent = event.parent_instance_id
        if parent is None or event.parent_task_id is None:
            return
        if (parent, event.parent_task_id) == (self.parent_instance_id, self.parent_task_id):
            return  # our own start message, re-delivered
        self._outbound.append((parent, SubOrchestrationFailed(
            ts=self.now, task_id=event.parent_task_id,
            execution_id=event.parent_execution_id or "", error_type="InstanceExistsError",
            message=f"cannot start sub-orchestration {event.name!r}: instance id "
                    f"{self.instance_id!r} is already in use by a live instance")))

    # == commands (called by OrchestrationContext, inside the replay loop) ===================
    def _check_can_schedule(self) -> None:
        if self._closing or self._completion is not None:
            raise asyncio.CancelledError("the orchestration has finished")
        if not self.loop.is_running():
            raise RuntimeError(
                "durable operations can only be started from orchestrator code while it runs "
                "(inside the orchestrator function and the tasks it creates)")

    def _issue(self, event: HistoryEvent, pending: _Pending) -> int:
        task_id: int = event.task_id  # type: ignore[attr-defined]
        self._unconfirmed[task_id] = event
        self._pending[task_id] = pending
        return task_id

    def _new_id(self) -> int:
        task_id = self._next_id
        self._next_id += 1
        return task_id

    def _confirm(self, event: HistoryEvent) -> None:
        task_id = event.task_id  # type: ignore[attr-defined]
        issued = self._unconfirmed.pop(task_id, None)
        if issued is None or type(issued) is not type(event) or _command_name(issued) != \
                _command_name(event):
            raise NonDeterminismError(
                self.instance_id, task_id, _describe(event),
                _describe(issued) if issued is not None else
                "nothing at that point (the code no longer schedules it, or waits elsewhere)")

    def _watch(self, future: asyncio.Future[Any], task_id: int) -> None:
        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                self._forget(task_id)
        future.add_done_callback(done)

    def _forget(self, task_id: int) -> None:
        """A command's awaiter was cancelled: ignore its result; if not yet committed, drop it."""
        self._pending.pop(task_id, None)
        self._unconfirmed.pop(task_id, None)

    def call_activity(self, fn_or_name: Any, input: Any,
                      retry: RetryPolicy | None) -> asyncio.Future[Any]:
        name = function_name(fn_or_name)
        payload = to_json_value(input, what=f"the input of activity {name!r}")
        self._check_can_schedule()

        def attempt() -> asyncio.Future[Any]:
            task_id = self._new_id()
            future = self.loop.create_future()
            self._issue(TaskScheduled(ts=self.now, task_id=task_id, name=name, input=payload),
                        _Pending("activity", name, future))
            self._watch(future, task_id)
            return future

        if retry is None:
            return attempt()
        return self.loop.create_task(self._with_retry(attempt, retry))

    def call_sub_orchestrator(self, fn_or_name: Any, input: Any, instance_id: str | None,
                              retry: RetryPolicy | None) -> asyncio.Future[Any]:
        name = function_name(fn_or_name)
        payload = to_json_value(input, what=f"the input of sub-orchestration {name!r}")
        if instance_id is not None and not instance_id:
            raise ValueError("instance_id must not be empty")
        self._check_can_schedule()

        def attempt() -> asyncio.Future[Any]:
            task_id = self._new_id()
            child_id = instance_id or f"{self.instance_id}:{task_id}"
            future = self.loop.create_future()
            self._issue(SubOrchestrationCreated(ts=self.now, task_id=task_id, name=name,
                                                instance_id=child_id, input=payload),
                        _Pending("sub-orchestration", name, future))
            self._watch(future, task_id)
            return future

        if retry is None:
            return attempt()
        return self.loop.create_task(self._with_retry(attempt, retry))

    async def _with_retry(self, attempt: Callable[[], asyncio.Future[Any]],
                          policy: RetryPolicy) -> Any:
        first_scheduled = self.now
        number = 1
        while True:
            try:
                return await attempt()
            except TaskFailedError as error:
                if number >= policy.max_number_of_attempts:
                    raise
                if policy.handle is not None and not policy.handle(error):
                    raise
                delay = policy.delay_after(number)
                limit = policy.timeout_seconds
                if limit is not None and self.now + delay - first_scheduled > limit:
                    raise
                await self.create_timer(self.now + delay)
                number += 1

    def create_timer(self, fire_at: float) -> asyncio.Future[None]:
        self._check_can_schedule()
        future: asyncio.Future[None] = self.loop.create_future()
        if fire_at <= self.now:
            future.set_result(None)
            return future
        task_id = self._new_id()
        self._issue(TimerCreated(ts=self.now, task_id=task_id, fire_at=fire_at),
                    _Pending("timer", "timer", future))
        self._watch(future, task_id)
        return future

    # TimerScheduler protocol, used by ReplayLoop.call_at (asyncio.sleep, wait_for, timeout)
    def schedule_timer(self, when: float, handle: DurableTimerHandle) -> None:
        self._check_can_schedule()
        task_id = self._new_id()
        handle.timer_id = task_id
        self._issue(TimerCreated(ts=self.now, task_id=task_id, fire_at=when),
                    _Pending("timer", "timer", handle=handle))

    def cancel_timer(self, handle: DurableTimerHandle) -> None:
        if handle.timer_id is not None:
            self._forget(handle.timer_id)

    def wait_for_event(self, name: str, timeout: float | None) -> asyncio.Future[Any]:
        if not isinstance(name, str) or not name:
            raise ValueError("wait_for_external_event needs a non-empty event name")
        self._check_can_schedule()
        key = name.casefold()
        future = self.loop.create_future()
        for i, event in enumerate(self._buffered):
            if event.name.casefold() == key:
                del self._buffered[i]
                future.set_result(event.input)
                break
        else:
            waiters = self._waiters.setdefault(key, [])
            waiters.append(future)

            def forget(f: asyncio.Future[Any]) -> None:
                # B023: `for`'s `else` runs once, so `waiters` is never rebound under `forget`.
                if f.cancelled() and f in waiters:  # noqa: B023
                    waiters.remove(f)  # noqa: B023
            future.add_done_callback(forget)
        if timeout is None:
            return future
        return self.loop.create_task(asyncio.wait_for(future, timeout))

    def task_any(self, awaitables: list[Any]) -> asyncio.Future[Any]:
        if not awaitables:
            raise ValueError("task_any needs at least one awaitable")
        futures = [asyncio.ensure_future(a, loop=self.loop) for a in awaitables]

        async def race() -> Any:
            done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
            winner = next(f for f in futures if f in done)
            for f in futures:
                if f is not winner:
                    f.cancel()
            return winner

        return self.loop.create_task(race())

    # -- entities -------------------------------------------------------------------------
    def _entity(self, entity_id: Any, operation: str) -> EntityId:
        eid = as_entity_id(entity_id)
        if not isinstance(operation, str):
            raise TypeError(f"an entity operation name must be a string, got {operation!r}")
        if eid.name not in self.app.entities:
            known = ", ".join(sorted(self.app.entities)) or "none"
            raise UnknownFunctionError(
                f"cannot send operation {operation!r} to entity {eid}: no entity named "
                f"{eid.name!r} is registered (registered entities: {known}); register it with "
                f"@app.entity")
        return eid

    def _entity_operation(self, entity_id: Any, operation: str,
                          input: Any) -> tuple[EntityId, Any]:
        """Check an operation for an entity and its input, before anything is scheduled."""
        eid = self._entity(entity_id, operation)
        if not operation:
            raise ValueError("an entity operation name must not be empty")
        payload = to_json_value(input, what=f"the input of operation {operation!r} of entity "
                                            f"{eid}")
        self._check_can_schedule()
        return eid, payload

    def call_entity(self, entity_id: Any, operation: str, input: Any) -> asyncio.Future[Any]:
        eid, payload = self._entity_operation(entity_id, operation, input)
        section = self._section
        if section is not None and eid.instance_id not in section[1]:
            raise EntityLockError(
                f"cannot call entity {eid} inside a critical section that does not lock it "
                f"(it locks {', '.join(sorted(section[1]))}): waiting on an unlocked entity "
                f"while holding locks could deadlock; lock it too, or call it outside the "
                f"`async with ctx.lock_entities(...)` block (signal_entity is allowed)")
        future = self._entity_command(eid.instance_id, operation, payload, "call")
        assert future is not None
        return future

    def signal_entity(self, entity_id: Any, operation: str, input: Any) -> None:
        eid, payload = self._entity_operation(entity_id, operation, input)
        self._entity_command(eid.instance_id, operation, payload, "signal")

    def lock_entities(self, entity_ids: tuple[Any, ...]) -> CriticalSection:
        if not entity_ids:
            raise ValueError("lock_entities needs at least one entity id")
        ids = sorted({self._entity(e, "lock").instance_id for e in entity_ids})
        return CriticalSection(self, ids)

    def _entity_command(self, entity_iid: str, operation: str, payload: Any, op_kind: str,
                        section: str | None = None) -> asyncio.Future[Any] | None:
        """Issue a message to an entity; calls and locks return the future of the reply."""
        task_id = self._new_id()
        event = EntityOperationSent(ts=self.now, task_id=task_id, entity_id=entity_iid,
                                    operation=operation, input=payload, op_kind=op_kind,
                                    section=section)
        if op_kind in ("signal", "unlock"):
            self._unconfirmed[task_id] = event  # fire and forget: no reply to wait for
            return None
        future = self.loop.create_future()
        what = f"lock of {entity_iid}" if op_kind == "lock" else f"{operation} on {entity_iid}"
        self._issue(event, _Pending("entity operation", what, future))
        self._watch(future, task_id)
        return future

    def _track_lock(self, event: EntityOperationSent) -> None:
        if event.section is None:
            return
        if event.op_kind == "lock":
            self._locks_out.setdefault(event.section, set()).add(event.entity_id)
        elif event.op_kind == "unlock":
            held = self._locks_out.get(event.section)
            if held is not None:
                held.discard(event.entity_id)
                if not held:
                    del self._locks_out[event.section]

    def _release_all_locks(self) -> list[EntityOperationSent]:
        """Unlocks for every lock still out when the execution ends (however it ends)."""
        out = [EntityOperationSent(ts=self.now, task_id=-1, entity_id=iid, operation="",
                                   op_kind="unlock", section=section)
               for section, held in sorted(self._locks_out.items()) for iid in sorted(held)]
        self._locks_out.clear()
        return out

    def request_continue_as_new(self, input: Any) -> None:
        self._continue_input = to_json_value(input, what="the continue_as_new input")

    def set_custom_status(self, value: Any) -> None:
        self._custom_status = to_json_value(value, what="the custom status")


class CriticalSection:
    """`async with ctx.lock_entities(a, b):` holds entities a and b for the block.

    Locks are requested one at a time in sorted id order (so no two sections can deadlock); the
    block starts once all are granted. On exit (or if acquiring fails or is cancelled) every
    requested lock is released; if the orchestration ends inside the block, its end releases them.
    """

    def __init__(self, executor: OrchestrationExecutor, entity_iids: list[str]) -> None:
        self._ex = executor
        self._ids = entity_iids
        self._section: str | None = None
        self._requested: list[str] = []

    @property
    def entity_ids(self) -> list[EntityId]:
        return [EntityId.parse(i) for i in self._ids]

    async def __aenter__(self) -> CriticalSection:
        ex = self._ex
        if self._section is not None:
            raise EntityLockError("this critical section was already entered; call "
                                  "ctx.lock_entities(...) again for a new one")
        if ex._section is not None:
            raise EntityLockError(
                f"critical sections cannot be nested: this orchestration already holds "
                f"{', '.join(sorted(ex._section[1]))}; lock every entity you need in one "
                f"ctx.lock_entities(...) call")
        ex._check_can_schedule()
        section = f"{ex.execution_id}.{ex._next_id}"
        self._section = section
        ex._section = (section, frozenset(self._ids))
        try:
            for iid in self._ids:
                future = ex._entity_command(iid, "", None, "lock", section)
                self._requested.append(iid)
                assert future is not None
                await future
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._release()

    def _release(self) -> None:
        ex = self._ex
        if ex._section is not None and ex._section[0] == self._section:
            ex._section = None
        requested, self._requested = self._requested, []
        if ex._closing or ex._completion is not None:
            return  # the end of the execution releases whatever is still out
        for iid in requested:
            ex._entity_command(iid, "", None, "unlock", self._section)


def _command_name(event: HistoryEvent) -> str:
    if isinstance(event, EntityOperationSent):
        return f"{event.op_kind} {event.entity_id} {event.operation}"
    return getattr(event, "name", "")


def _describe(event: HistoryEvent | None) -> str:
    if isinstance(event, TaskScheduled):
        return f"call_activity({event.name!r}) as step {event.task_id}"
    if isinstance(event, SubOrchestrationCreated):
        return f"call_sub_orchestrator({event.name!r}) as step {event.task_id}"
    if isinstance(event, TimerCreated):
        return f"a durable timer as step {event.task_id}"
    if isinstance(event, EntityOperationSent):
        if event.op_kind in ("lock", "unlock"):
            return f"{event.op_kind} of entity {event.entity_id} as step {event.task_id}"
        return (f"{event.op_kind}_entity({event.entity_id!r}, {event.operation!r}) as step "
                f"{event.task_id}")
    return repr(event)


