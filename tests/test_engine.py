"""The replay engine on its own: hand-written histories in, decisions out.

No backend, no worker, no wall clock: each test drives an `OrchestrationExecutor` directly with
`load` (replaying stored history) and `activate` (new events), the way the worker does, and
checks the `Decision` it returns. Times are arbitrary fixed epoch seconds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import aioflow
from aioflow import NonDeterminismError, NonDeterministicOperationError, RuntimeStatus
from aioflow.engine import Decision, OrchestrationExecutor, failure_from_exception
from aioflow.events import (
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
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
    decode_event,
    encode_event,
)
from aioflow.loop import DeterministicFuture, DurableTimerHandle, ReplayLoop

T0 = 1_700_000_000.0
EXEC = "exec-1"
IID = "inst-1"

app = aioflow.App()

#: Observations orchestrators under test append to (cleared by an autouse fixture).
seen: list[Any] = []


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    seen.clear()


# -- orchestrators under test -------------------------------------------------------------------


@app.orchestrator
async def two_steps(ctx: aioflow.OrchestrationContext, name: str) -> list[str]:
    seen.append(("top", ctx.is_replaying))
    first = await ctx.call_activity("greet", name)
    seen.append(("middle", ctx.is_replaying))
    second = await ctx.call_activity("greet", first)
    seen.append(("end", ctx.is_replaying))
    return [first, second]


@app.orchestrator
async def timer_then_activity(ctx: aioflow.OrchestrationContext) -> str:
    await asyncio.sleep(10)
    return await ctx.call_activity("greet", "after the timer")


@app.orchestrator
async def fan_out_and_report_order(ctx: aioflow.OrchestrationContext, n: int) -> list[int]:
    """Waits for n activities with asyncio.wait and reports the order `done` iterates in."""
    tasks = [ctx.call_activity("work", i) for i in range(n)]
    done, _ = await asyncio.wait(tasks)
    order = [task.result() for task in done]
    await ctx.call_activity("record", order)
    return order


@app.orchestrator
async def zero_timeouts(ctx: aioflow.OrchestrationContext) -> list[str]:
    outcomes = []
    await asyncio.sleep(0)
    await asyncio.sleep(-5)
    await ctx.create_timer(ctx.current_utc_datetime)  # "now" is not in the future
    try:
        await asyncio.wait_for(ctx.call_activity("slow"), 0)
    except TimeoutError:
        outcomes.append("wait_for(0) timed out")
    try:
        async with asyncio.timeout(-1):
            await ctx.call_activity("slow")
    except TimeoutError:
        outcomes.append("timeout(-1) timed out")
    try:
        await ctx.wait_for_external_event("never", timeout=0)
    except TimeoutError:
        outcomes.append("event wait with timeout=0 timed out")
    return outcomes


@app.orchestrator
async def wait_for_go(ctx: aioflow.OrchestrationContext) -> Any:
    return await ctx.wait_for_external_event("go")


@app.orchestrator
async def cleanup_in_finally(ctx: aioflow.OrchestrationContext) -> None:
    try:
        await ctx.call_activity("long")
    finally:
        seen.append(("finally", ctx.is_replaying))


@app.orchestrator
async def sub_child(ctx: aioflow.OrchestrationContext, x: int) -> int:
    return x * 10


@app.orchestrator
async def loop_once(ctx: aioflow.OrchestrationContext, n: int) -> int:
    if n >= 1:
        return n
    await ctx.call_activity("greet", "gen 0")
    ctx.continue_as_new(n + 1)
    return -1


@app.orchestrator
async def returns_unserialisable(ctx: aioflow.OrchestrationContext) -> object:
    return object()


@app.orchestrator
async def sets_custom_status(ctx: aioflow.OrchestrationContext) -> None:
    ctx.set_custom_status({"stage": 1})
    await ctx.wait_for_external_event("go")


# -- helpers ------------------------------------------------------------------------------------


def started(name: str, input: Any = None, **parent: Any) -> ExecutionStarted:
    return ExecutionStarted(ts=T0, name=name, execution_id=EXEC, input=input, **parent)


def done(task_id: int, result: Any, execution_id: str = EXEC) -> TaskCompleted:
    return TaskCompleted(ts=T0, task_id=task_id, execution_id=execution_id, result=result)


def executor(orchestrator_app: aioflow.App = app) -> OrchestrationExecutor:
    return OrchestrationExecutor(orchestrator_app, IID)


def record(feeds: Sequence[Sequence[HistoryEvent]], *, name: str, input: Any = None,
           step: float = 1.0) -> tuple[list[HistoryEvent], list[Decision]]:
    """Run a fresh executor through activations (the first delivers the start) and return
    the history it wrote and its decisions."""
    ex = executor()
    history: list[HistoryEvent] = []
    decisions = []
    batches: list[list[HistoryEvent]] = [[started(name, input)], *map(list, feeds)]
    try:
        for n, events in enumerate(batches):
            decision = ex.activate(T0 + n * step, events)
            history.extend(decision.new_events)
            decisions.append(decision)
    finally:
        ex.close()
    return history, decisions


def kinds(events: list[HistoryEvent]) -> list[str]:
    return [e.kind for e in events]


def _commands(decision: Decision) -> list[HistoryEvent]:
    return [e for e in decision.new_events if isinstance(e, (TaskScheduled, TimerCreated,
                                                             SubOrchestrationCreated))]


# == first execution ===========================================================================


def test_the_first_activation_schedules_the_first_activity() -> None:
    ex = executor()
    decision = ex.activate(T0, [started("two_steps", "Ada")])
    assert kinds(decision.new_events) == ["OrchestratorStarted", "ExecutionStarted",
                                          "TaskScheduled"], (
        "an activation records OrchestratorStarted, the events it consumed, then the commands")
    [scheduled] = decision.activities
    assert (scheduled.task_id, scheduled.name, scheduled.input) == (0, "greet", "Ada"), (
        "the first command is task 0 with the activity's name and input")
    assert decision.runtime_status is RuntimeStatus.RUNNING
    assert not decision.is_finished
    ex.close()


def test_results_drive_the_orchestrator_to_completion() -> None:
    history, decisions = record([[done(0, "Hi Ada")], [done(1, "Hi Hi Ada")]],
                                name="two_steps", input="Ada")
    assert [a.input for d in decisions for a in d.activities] == ["Ada", "Hi Ada"], (
        "each result feeds the next activity")
    final = decisions[-1]
    assert final.runtime_status is RuntimeStatus.COMPLETED
    assert final.output == ["Hi Ada", "Hi Hi Ada"]
    assert kinds(history)[-1] == "ExecutionCompleted"
    assert [e for e in seen if e[1]] == [], "nothing is replayed on a first execution"


def test_a_timer_records_when_it_fires_and_advances_the_orchestration_time() -> None:
    ex = executor()
    first = ex.activate(T0, [started("timer_then_activity")])
    [timer] = first.timers
    assert timer.fire_at == T0 + 10, "asyncio.sleep(10) becomes a durable timer at now + 10"
    second = ex.activate(T0 + 10.5, [TimerFired(ts=T0 + 10, task_id=timer.task_id,
                                                execution_id=EXEC, fire_at=T0 + 10)])
    assert [a.name for a in second.activities] == ["greet"], (
        "once the timer fired, the orchestrator continues")
    assert ex.ctx.current_utc_datetime.timestamp() == T0 + 10.5, (
        "the orchestration time is the OrchestratorStarted time of the current activation")
    ex.close()


# == replay ====================================================================================


def test_replaying_a_recorded_history_sends_nothing_again() -> None:
    history, _ = record([[done(0, "Hi Ada")]], name="two_steps", input="Ada")
    seen.clear()
    ex = executor()
    ex.load(history)
    assert ex.replay_error is None
    assert ex.is_replaying is False, "is_replaying is only True while load() runs"
    assert seen == [("top", True), ("middle", True)], (
        "the orchestrator re-runs from the top with ctx.is_replaying True during load")
    decision = ex.activate(T0 + 5, [done(1, "Hi Hi Ada")])
    assert _commands(decision) == [], (
        "commands already in history must not be recorded or sent again after a replay")
    assert decision.runtime_status is RuntimeStatus.COMPLETED
    assert decision.output == ["Hi Ada", "Hi Hi Ada"]
    assert seen[-1] == ("end", False), "steps after the replayed history are not replaying"
    ex.close()


def test_replaying_a_whole_history_reaches_the_same_end() -> None:
    history, decisions = record([[done(0, "a")], [done(1, "b")]], name="two_steps", input="x")
    assert decisions[-1].runtime_status is RuntimeStatus.COMPLETED
    # Through the wire format, as a backend stores it.
    stored = [decode_event(encode_event(e)) for e in history]
    ex = executor()
    ex.load(stored)
    assert ex.replay_error is None
    assert ex.runtime_status is RuntimeStatus.COMPLETED
    assert ex.is_finished
    ex.close()


def test_replay_with_a_renamed_activity_names_the_step_and_both_commands() -> None:
    history = [OrchestratorStarted(ts=T0), started("two_steps", "Ada"),
               TaskScheduled(ts=T0, task_id=0, name="charge_card", input="Ada")]
    ex = executor()
    ex.load(history)
    error = ex.replay_error
    assert isinstance(error, NonDeterminismError), (
        f"a replayed step that differs from history must be a NonDeterminismError; "
        f"got {error!r}")
    message = str(error)
    assert "step 0" in message, message
    assert "call_activity('charge_card')" in message, f"must name the recorded command: {message}"
    assert "call_activity('greet')" in message, f"must name what the code does now: {message}"
    decision = ex.activate(T0 + 1, [])
    assert decision.runtime_status is RuntimeStatus.FAILED, (
        "an instance whose history no longer matches its code fails")
    assert decision.failure is not None
    assert decision.failure.error_type == "NonDeterminismError"
    assert "charge_card" in decision.failure.message and "greet" in decision.failure.message
    assert decision.activities == [], "nothing is sent from a replay that went wrong"
    ex.close()


def test_replay_with_a_timer_where_an_activity_was_is_non_deterministic() -> None:
    history = [OrchestratorStarted(ts=T0), started("timer_then_activity"),
               TaskScheduled(ts=T0, task_id=0, name="greet", input="after the timer")]
    ex = executor()
    ex.load(history)
    error = ex.replay_error
    assert isinstance(error, NonDeterminismError), repr(error)
    assert "call_activity('greet')" in str(error) and "durable timer" in str(error), (
        f"the message must name the recorded activity and the timer the code now creates: "
        f"{error}")
    ex.close()


def test_replay_with_a_recorded_step_the_code_no_longer_makes_is_non_deterministic() -> None:
    history = [OrchestratorStarted(ts=T0), started("wait_for_go"),
               TaskScheduled(ts=T0, task_id=0, name="greet", input="x")]
    ex = executor()
    ex.load(history)
    assert isinstance(ex.replay_error, NonDeterminismError)
    assert "nothing at that point" in str(ex.replay_error), str(ex.replay_error)
    ex.close()


def test_asyncio_wait_done_set_iterates_in_the_same_order_on_replay() -> None:
    n = 40
    results = [[done(i, i) for i in reversed(range(n))]]
    history, decisions = record(results, name="fan_out_and_report_order", input=n)
    [record_call] = decisions[-1].activities
    first_order = record_call.input
    assert sorted(first_order) == list(range(n))
    for _ in range(3):
        ex = executor()
        ex.load(history)
        assert ex.replay_error is None, (
            f"iterating asyncio.wait's done set must give the same order on replay; "
            f"{ex.replay_error}")
        decision = ex.activate(T0 + 9, [done(n, None)])
        assert decision.output == first_order, (
            "the order user code sees when iterating a set of tasks must be the same on every "
            "replay (tasks and futures on the replay loop hash by creation order)")
        ex.close()


def test_futures_on_the_replay_loop_hash_by_creation_order() -> None:
    ex = executor()
    futures = [ex.loop.create_future() for _ in range(5)]
    assert all(isinstance(f, DeterministicFuture) for f in futures)
    assert [hash(f) for f in futures] == list(range(5))
    ex.close()


# == what arrives ==============================================================================


def test_a_duplicate_result_is_dropped_not_appended() -> None:
    ex = executor()
    ex.activate(T0, [started("two_steps", "Ada")])
    first = ex.activate(T0 + 1, [done(0, "Hi Ada"), done(0, "Hi Ada")])
    assert kinds(first.new_events).count("TaskCompleted") == 1, (
        "two copies of one result in one batch: only the first enters history")
    again = ex.activate(T0 + 2, [done(0, "Hi Ada (re-delivered)")])
    assert kinds(again.new_events) == ["OrchestratorStarted"], (
        "a result re-delivered later for a task that already has one is dropped")
    assert _commands(again) == []
    final = ex.activate(T0 + 3, [done(1, "Hi Hi Ada")])
    assert final.output == ["Hi Ada", "Hi Hi Ada"], "the duplicate changed nothing"
    ex.close()


def test_results_for_an_old_execution_are_dropped() -> None:
    ex = executor()
    ex.activate(T0, [started("two_steps", "Ada")])
    stale = ex.activate(T0 + 1, [done(0, "from the old execution", execution_id="exec-0")])
    assert kinds(stale.new_events) == ["OrchestratorStarted"], (
        "a result addressed to a previous execution (before continue_as_new) must be dropped")
    assert stale.runtime_status is RuntimeStatus.RUNNING
    current = ex.activate(T0 + 2, [done(0, "Hi Ada")])
    assert [a.input for a in current.activities] == ["Hi Ada"], (
        "the current execution's result for the same task id is still accepted")
    ex.close()


def test_a_result_for_a_task_nobody_scheduled_is_dropped() -> None:
    ex = executor()
    ex.activate(T0, [started("two_steps", "Ada")])
    decision = ex.activate(T0 + 1, [done(7, "unexpected")])
    assert kinds(decision.new_events) == ["OrchestratorStarted"]
    ex.close()


def test_a_zero_or_past_timeout_creates_no_timer() -> None:
    _, decisions = record([], name="zero_timeouts")
    [decision] = decisions
    assert decision.timers == [] and "TimerCreated" not in kinds(decision.new_events), (
        "asyncio.sleep(0), sleep(-5), create_timer(now), wait_for(..., 0), timeout(-1) and "
        "wait_for_external_event(timeout=0) must not cost a durable timer")
    assert decision.runtime_status is RuntimeStatus.COMPLETED, decision.failure
    assert decision.output == ["wait_for(0) timed out", "timeout(-1) timed out",
                               "event wait with timeout=0 timed out"]
    assert decision.activities == [], (
        "an activity cancelled in the same step it was scheduled in is never sent")


def test_events_that_arrive_before_the_start_are_held_until_it() -> None:
    ex = executor()
    early = ex.activate(T0, [EventRaised(ts=T0, name="go", input="early")])
    assert early.runtime_status is RuntimeStatus.PENDING, "no start yet: nothing runs"
    decision = ex.activate(T0 + 1, [started("wait_for_go")])
    assert decision.runtime_status is RuntimeStatus.COMPLETED, (
        "the held event is delivered right after the start")
    assert decision.output == "early"
    ex.close()


def test_an_event_before_the_start_in_one_batch_is_held_too() -> None:
    ex = executor()
    decision = ex.activate(T0, [EventRaised(ts=T0, name="GO", input=1), started("wait_for_go")])
    assert decision.output == 1, "held, then delivered (names are case-insensitive)"
    ex.close()


def test_suspend_holds_events_until_resume() -> None:
    ex = executor()
    ex.activate(T0, [started("wait_for_go")])
    suspended = ex.activate(T0 + 1, [ExecutionSuspended(ts=T0 + 1)])
    assert suspended.runtime_status is RuntimeStatus.SUSPENDED
    held = ex.activate(T0 + 2, [EventRaised(ts=T0 + 2, name="go", input="x")])
    assert held.runtime_status is RuntimeStatus.SUSPENDED, "a suspended instance does not run"
    resumed = ex.activate(T0 + 3, [ExecutionResumed(ts=T0 + 3)])
    assert resumed.runtime_status is RuntimeStatus.COMPLETED and resumed.output == "x", (
        "resume delivers what was held")
    ex.close()


# == endings ===================================================================================


def test_terminate_ends_the_instance_and_runs_finally_blocks() -> None:
    ex = executor()
    ex.activate(T0, [started("cleanup_in_finally")])
    decision = ex.activate(T0 + 1, [ExecutionTerminated(ts=T0 + 1, reason="stop")])
    assert decision.runtime_status is RuntimeStatus.TERMINATED
    assert decision.output == "stop", "a terminated instance's output is the reason"
    assert [e[0] for e in seen] == ["finally"], "terminating cancels the orchestrator's tasks"
    assert kinds(decision.new_events)[-1] == "ExecutionCompleted"


def test_close_runs_finally_blocks_at_once_and_silently() -> None:
    ex = executor()
    ex.activate(T0, [started("cleanup_in_finally")])
    assert seen == []
    ex.close()
    assert seen == [("finally", True)], (
        "close() (cache eviction) must cancel the orchestrator's tasks then and there, with "
        "the replay-safe logger silenced, not leave them to the garbage collector")
    ex.close()  # idempotent
    assert len(seen) == 1


def test_an_unserialisable_output_fails_the_instance() -> None:
    _, [decision] = record([], name="returns_unserialisable")
    assert decision.runtime_status is RuntimeStatus.FAILED
    assert decision.failure is not None and decision.failure.error_type == "SerializationError"
    assert "returns_unserialisable" in decision.failure.message


def test_an_unknown_orchestrator_fails_the_instance_naming_it() -> None:
    _, [decision] = record([], name="nobody_registered_this")
    assert decision.runtime_status is RuntimeStatus.FAILED
    assert decision.failure is not None
    assert decision.failure.error_type == "UnknownFunctionError"
    assert "nobody_registered_this" in decision.failure.message


def test_an_activity_failure_arrives_as_task_failed_error() -> None:
    ex = executor()
    ex.activate(T0, [started("two_steps", "Ada")])
    decision = ex.activate(T0 + 1, [TaskFailed(ts=T0, task_id=0, execution_id=EXEC,
                                               error_type="KeyError", message="'x'",
                                               stack_trace="Traceback ...")])
    assert decision.runtime_status is RuntimeStatus.FAILED
    assert decision.failure is not None
    assert decision.failure.error_type == "TaskFailedError"
    assert "KeyError" in decision.failure.message and "greet" in decision.failure.message
    ex.close()


def test_a_child_reports_its_result_to_its_parent() -> None:
    ex = executor()
    decision = ex.activate(T0, [started("sub_child", 4, parent_instance_id="parent",
                                        parent_execution_id="parent-exec", parent_task_id=3)])
    assert decision.runtime_status is RuntimeStatus.COMPLETED
    [(target, reply)] = decision.outbound
    assert target == "parent"
    assert isinstance(reply, SubOrchestrationCompleted)
    assert (reply.task_id, reply.execution_id, reply.result) == (3, "parent-exec", 40)


def test_a_parent_receives_its_childs_result() -> None:
    parent_app = aioflow.App()

    @parent_app.orchestrator
    async def parent(ctx: aioflow.OrchestrationContext) -> int:
        return await ctx.call_sub_orchestrator("sub_child", 4)

    ex = OrchestrationExecutor(parent_app, IID)
    first = ex.activate(T0, [started("parent")])
    [child] = first.sub_orchestrations
    assert (child.name, child.instance_id, child.input) == ("sub_child", f"{IID}:0", 4), (
        "without an explicit id the child's id is derived from the parent and the step")
    final = ex.activate(T0 + 1, [SubOrchestrationCompleted(ts=T0, task_id=0, execution_id=EXEC,
                                                           result=40)])
    assert final.output == 40
    ex.close()


def test_continue_as_new_carries_unreceived_events() -> None:
    ex = executor()
    ex.activate(T0, [started("loop_once", 0)])
    decision = ex.activate(T0 + 1, [EventRaised(ts=T0, name="later", input="keep me"),
                                    done(0, "hi")])
    assert decision.continue_as_new, "continue_as_new ends this execution"
    assert decision.runtime_status is RuntimeStatus.CONTINUED_AS_NEW
    assert decision.new_input == 1
    assert [(e.name, e.input) for e in decision.carried_events] == [("later", "keep me")], (
        "events raised but not yet received go to the next execution")
    [end] = [e for e in decision.new_events if isinstance(e, ExecutionCompleted)]
    assert end.status == "ContinuedAsNew"


def test_custom_status_is_part_of_the_decision() -> None:
    ex = executor()
    decision = ex.activate(T0, [started("sets_custom_status")])
    assert decision.custom_status_changed and decision.custom_status == {"stage": 1}
    ex.close()


def test_failure_details_of_an_exception_group_show_the_real_cause() -> None:
    try:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("missing")])
    except ExceptionGroup as group:
        details = failure_from_exception(group)
    assert details.error_type == "KeyError", "a single wrapped error is reported as itself"
    assert "missing" in details.message
    try:
        raise ExceptionGroup("many", [KeyError("a"), ValueError("b")])
    except ExceptionGroup as group:
        details = failure_from_exception(group)
    assert "KeyError" in details.message and "ValueError" in details.message, details


# == the replay loop ===========================================================================


class _NoTimers:
    def schedule_timer(self, when: float, handle: Any) -> None:
        raise AssertionError("no durable timer expected")

    def cancel_timer(self, handle: Any) -> None:
        pass


def _forbidden_calls() -> list[tuple[str, Callable[[ReplayLoop], Any]]]:
    a, b = socket.socketpair()
    a.close()
    b.close()
    return [
        ("run_in_executor", lambda loop: loop.run_in_executor(None, print)),
        ("create_connection", lambda loop: loop.create_connection(asyncio.Protocol, "h", 1)),
        ("create_server", lambda loop: loop.create_server(asyncio.Protocol, "h", 1)),
        ("getaddrinfo", lambda loop: loop.getaddrinfo("localhost", 80)),
        ("subprocess_exec", lambda loop: loop.subprocess_exec(asyncio.SubprocessProtocol, "x")),
        ("add_reader", lambda loop: loop.add_reader(0, print)),
        ("sock_recv", lambda loop: loop.sock_recv(a, 1)),
        ("call_soon_threadsafe", lambda loop: loop.call_soon_threadsafe(print)),
        ("run_until_complete", lambda loop: loop.run_until_complete(None)),
    ]


@pytest.mark.parametrize("name, call", _forbidden_calls(), ids=[n for n, _ in _forbidden_calls()])
def test_the_replay_loop_refuses_io(name: str, call: Callable[[ReplayLoop], Any]) -> None:
    loop = ReplayLoop(_NoTimers())
    with pytest.raises(NonDeterministicOperationError,
                       match="orchestrators must be deterministic") as raised:
        result = call(loop)
        if asyncio.iscoroutine(result):  # pragma: no cover - all of them raise on the call
            result.close()
    assert "activity" in str(raised.value), "the message says where I/O belongs"
    loop.close()


def test_the_replay_loop_offers_what_asyncio_and_libraries_probe() -> None:
    loop = ReplayLoop(_NoTimers(), now=T0)
    assert loop.time() == T0, "the loop's time is the orchestration's time"
    assert not loop.is_running() and not loop.get_debug()
    assert loop.get_task_factory() is None

    async def answer() -> int:
        await asyncio.sleep(0)  # a plain yield: no durable timer
        return 42

    task = loop.create_task(answer(), name="probe", eager_start=True)  # 3.13 keyword accepted
    handle = loop.call_later(0, lambda: None)
    assert not isinstance(handle, DurableTimerHandle), "a due callback costs no durable timer"
    loop.run_until_idle()
    assert task.result() == 42
    loop.close()
    assert loop.is_closed()
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(print)


def test_an_orchestrator_doing_io_fails_with_a_clear_message() -> None:
    io_app = aioflow.App()

    @io_app.orchestrator
    async def reads_a_socket(ctx: aioflow.OrchestrationContext) -> None:
        await asyncio.open_connection("127.0.0.1", 9)

    ex = OrchestrationExecutor(io_app, IID)
    decision = ex.activate(T0, [started("reads_a_socket")])
    assert decision.runtime_status is RuntimeStatus.FAILED
    assert decision.failure is not None
    assert decision.failure.error_type == "NonDeterministicOperationError"
    assert "orchestrators must be deterministic" in decision.failure.message


def test_durable_operations_outside_orchestrator_code_are_refused() -> None:
    ex = executor()
    ex.activate(T0, [started("wait_for_go")])
    with pytest.raises(RuntimeError, match="only be started from orchestrator code"):
        ex.ctx.call_activity("greet", "x")
    ex.close()
    with pytest.raises(asyncio.CancelledError):  # a closed (evicted/finished) orchestration
        ex.ctx.call_activity("greet", "x")
