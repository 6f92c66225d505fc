"""`OrchestrationSuite`: every orchestration feature, end to end, on a real worker and client.

Where `BackendContractSuite` drives the backend protocol directly, this suite runs the whole
stack on a backend (an `aioflow.Worker` and an `aioflow.Client`, with the orchestrators and
activities of `aioflow.testing.conformance.apps`) and checks what a user sees. A backend proves
it runs aioflow correctly by subclassing it and providing one fixture::

    import pytest_asyncio
    from aioflow.testing.conformance import OrchestrationSuite

    class TestMyBackendOrchestrations(OrchestrationSuite):
        @pytest_asyncio.fixture
        async def backend(self, tmp_path):
            store = await open_my_backend(tmp_path)   # open and empty
            yield store
            await store.close()

Each test checks one feature and its assertion messages say what broke. Timers are short (a
fraction of a second, `timer_seconds`) and workers poll often (`poll_interval`), so the whole
class runs in seconds on the memory backend; a slow remote store may raise `completion_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aioflow import (
    Backend,
    Client,
    InstanceExistsError,
    InstanceNotFoundError,
    InstanceNotRunningError,
    OrchestrationTimeoutError,
    RuntimeStatus,
    SerializationError,
    UnknownFunctionError,
    Worker,
)
from aioflow.events import (
    ExecutionCompleted,
    ExecutionStarted,
    HistoryEvent,
    SubOrchestrationCreated,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
)
from aioflow.testing.conformance import apps
from aioflow.testing.conformance.entities import EntitySuite

__all__ = ["OrchestrationSuite"]


def _kinds(history: list[HistoryEvent]) -> list[str]:
    return [event.kind for event in history]


def _of(history: list[HistoryEvent], kind: type[HistoryEvent]) -> list[Any]:
    return [event for event in history if isinstance(event, kind)]


class OrchestrationSuite(EntitySuite):
    """End-to-end tests of every orchestration feature (and of durable entities, from
    `EntitySuite`); subclass it to run them on a backend.

    Provide an async fixture named ``backend`` that yields an open backend holding no instances,
    messages or activity tasks, and closes it when the test is done. The suite starts its own
    workers and clients on it (see `SuiteBase` for the knobs: `poll_interval`, `timer_seconds`,
    `completion_timeout`, `worker_options`).
    """

    # == patterns =================================================================================

    async def test_function_chaining_runs_activities_in_order(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.greet_cities, ["Tokyo", "Seattle", "London"])
        assert status.output == ["Hello Tokyo!", "Hello Seattle!", "Hello London!"], (
            "each activity result must come back to the orchestrator, in the order awaited")
        history = await client.get_history(status.instance_id)
        scheduled = [(e.task_id, e.input) for e in _of(history, TaskScheduled)]
        assert scheduled == [(0, "Tokyo"), (1, "Seattle"), (2, "London")], (
            f"a chain schedules one activity at a time with sequence numbers 0, 1, 2; history "
            f"has {scheduled}")

    async def test_fan_out_fan_in_with_task_all(self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.fan_out_task_all, 20)
        assert status.output == [2 * i for i in range(20)], (
            "ctx.task_all must return every result in the order the tasks were given")

    async def test_fan_out_fan_in_with_asyncio_gather(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.fan_out_gather, 200)
        assert status.output == [2 * i for i in range(200)], (
            "asyncio.gather over 200 activities must return every result in order")
        history = await client.get_history(status.instance_id)
        assert len(_of(history, TaskScheduled)) == 200, "each activity is scheduled exactly once"
        assert sorted(e.task_id for e in _of(history, TaskCompleted)) == list(range(200)), (
            "each activity result is recorded exactly once")

    @pytest.mark.parametrize("how", ["wait", "task_any"])
    async def test_a_race_cancels_the_loser_and_ignores_its_late_result(
            self, worker: Worker, client: Client, how: str) -> None:
        slow_gate, after_gate = apps.new_gate("slow"), apps.new_gate("after")
        iid = await client.start_new(
            apps.race, {"how": how, "slow_gate": slow_gate, "after_gate": after_gate})
        await self.wait_for_custom_status(client, iid, "raced")
        await self.wait_for_gate(after_gate)
        apps.open_gate(slow_gate)  # the loser finishes now, while the orchestration still runs
        await self.wait_until(lambda: apps.gate_passed(slow_gate), "the losing activity returned")
        apps.open_gate(after_gate)
        status = await self.completed(client, iid)
        race_api = "asyncio.wait(FIRST_COMPLETED)" if how == "wait" else "ctx.task_any"
        assert status.output == {"winner": "Hello fast!", "loser_cancelled": True,
                                 "after": f"{after_gate} opened"}, (
            f"{race_api}: the fast activity must win, the blocked one must be cancelled, and "
            f"the loser's late result must not disturb what the orchestrator awaits next")
        history = await client.get_history(iid)
        loser_results = [e for e in _of(history, TaskCompleted) if e.task_id == 0]
        assert loser_results == [], (
            "the cancelled loser's late result must be dropped, not recorded in history")

    async def test_asyncio_sleep_and_create_timer_are_durable_timers(
            self, worker: Worker, client: Client) -> None:
        seconds = self.timer_seconds
        status = await self.run(client, apps.timers, seconds)
        t0, t1, t2 = (datetime.fromisoformat(t) for t in status.output)
        assert t1 - t0 >= timedelta(seconds=seconds), (
            f"asyncio.sleep({seconds}) must advance ctx.current_utc_datetime by at least "
            f"{seconds} s; it went {t0} -> {t1}")
        assert t2 - t1 >= timedelta(seconds=seconds), (
            f"ctx.create_timer(now + {seconds} s) must advance ctx.current_utc_datetime by at "
            f"least {seconds} s; it went {t1} -> {t2}")
        history = await client.get_history(status.instance_id)
        created, fired = _of(history, TimerCreated), _of(history, TimerFired)
        assert len(created) == 2 and len(fired) == 2, (
            f"asyncio.sleep and create_timer must each record TimerCreated and TimerFired; "
            f"history: {_kinds(history)}")
        for timer in created:
            # (abs: create_timer takes a datetime, which has microsecond resolution)
            assert timer.fire_at - timer.ts == pytest.approx(seconds, abs=1e-5), (
                f"a durable timer fires `seconds` after the orchestration time it was created "
                f"at; got {timer.fire_at - timer.ts}")

    @pytest.mark.parametrize("how", ["wait_for", "timeout"])
    async def test_a_durable_timeout_cancels_a_blocked_activity(
            self, worker: Worker, client: Client, how: str) -> None:
        gate = apps.new_gate()
        iid = await client.start_new(
            apps.timeout_activity, {"how": how, "seconds": self.timer_seconds, "gate": gate})
        status = await self.completed(client, iid)
        api = "asyncio.wait_for" if how == "wait_for" else "asyncio.timeout"
        assert status.output == {"timed_out": True, "error": "TimeoutError"}, (
            f"{api}({self.timer_seconds}) around an activity that never finishes must raise "
            f"TimeoutError in the orchestrator (the timeout is a durable timer)")
        history = await client.get_history(iid)
        assert len(_of(history, TimerFired)) == 1, (
            f"the timeout must be a durable timer that fired; history: {_kinds(history)}")

    @pytest.mark.parametrize("how", ["wait_for", "timeout"])
    async def test_a_durable_timeout_lets_a_fast_activity_finish(
            self, worker: Worker, client: Client, how: str) -> None:
        iid = await client.start_new(
            apps.timeout_activity, {"how": how, "seconds": 60.0, "gate": None})
        status = await self.completed(client, iid)
        api = "asyncio.wait_for" if how == "wait_for" else "asyncio.timeout"
        assert status.output == {"timed_out": False, "result": "Hello quick!"}, (
            f"{api}(60) around a fast activity must return its result without waiting for "
            f"the timer")
        history = await client.get_history(iid)
        assert _of(history, TimerFired) == [], "the cancelled timeout timer must not fire"

    async def test_cancelled_timers_do_not_hold_up_the_orchestration(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.cancelled_timers)
        assert status.output == {"result": "Hello before the timers!", "timer_cancelled": True,
                                 "sleep_cancelled": True}, (
            "cancelling a ctx.create_timer future or an asyncio.sleep task must cancel it and "
            "let the orchestration finish at once (not after an hour)")
        history = await client.get_history(status.instance_id)
        assert _of(history, TimerFired) == [], "a cancelled timer must never fire"

    async def test_task_group_collects_every_result(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.task_group, False)
        assert status.output == [0, 2, 4], "asyncio.TaskGroup members' results, in order"

    async def test_task_group_failure_reports_the_real_cause(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.task_group, True)
        status = await self.failed(client, iid)
        details = status.failure_details
        assert details is not None
        assert details.error_type == "TaskFailedError", (
            f"a TaskGroup whose member failed must report the member's error, not the "
            f"ExceptionGroup wrapper; got {details}")
        assert "a TaskGroup member failed" in details.message, (
            f"the failure message must show the activity's own message; got {details.message!r}")
        assert "PaymentDeclined" in details.message, (
            f"the failure message must name the activity's error type; got {details.message!r}")

    # == external events ==========================================================================

    async def test_raise_event_delivers_to_a_waiting_orchestration(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.wait_event, "approval")
        await self.wait_for_runtime_status(client, iid, RuntimeStatus.RUNNING)
        await client.raise_event(iid, "approval", {"by": "alice"})
        status = await self.completed(client, iid)
        assert status.output == {"by": "alice"}, "wait_for_external_event returns the event data"

    async def test_an_event_raised_before_the_wait_is_buffered(
            self, worker: Worker, client: Client) -> None:
        gate = apps.new_gate()
        iid = await client.start_new(apps.event_after_gate, gate)
        await self.wait_for_gate(gate)  # the orchestrator has not reached its wait yet
        await client.raise_event(iid, "approval", "early")
        apps.open_gate(gate)
        status = await self.completed(client, iid)
        assert status.output == "early", (
            "an event raised before the orchestrator waits for it must be kept and delivered "
            "when it does wait")

    async def test_events_with_the_same_name_arrive_in_the_order_raised(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.collect_events, {"name": "item", "count": 3})
        for value in ("first", "second", "third"):
            await client.raise_event(iid, "item", value)
        status = await self.completed(client, iid)
        assert status.output == ["first", "second", "third"], (
            "each event goes to exactly one wait, in the order the events were raised")

    async def test_raise_event_with_an_event_id_is_safe_to_retry(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.collect_events, {"name": "item", "count": 2})
        await client.raise_event(iid, "item", "first", event_id="req-1")
        await client.raise_event(iid, "item", "first again", event_id="req-1")  # a retry
        await client.raise_event(iid, "item", "second", event_id="req-2")
        status = await self.completed(client, iid)
        assert status.output == ["first", "second"], (
            "a second raise_event with the same event_id must deliver nothing; got "
            f"{status.output!r}")
        with pytest.raises(ValueError, match="event_id"):
            await client.raise_event(iid, "item", event_id="")

    async def test_event_names_are_case_insensitive(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.wait_event, "Approval")
        await client.raise_event(iid, "APPROVAL", "yes")
        status = await self.completed(client, iid)
        assert status.output == "yes", (
            "an event raised as 'APPROVAL' must satisfy wait_for_external_event('Approval')")

    async def test_waiting_for_an_event_with_a_timeout_raises_timeout_error(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(
            apps.wait_event_with_timeout, {"name": "never", "timeout": self.timer_seconds})
        status = await self.completed(client, iid)
        assert status.output == {"raised": "TimeoutError"}, (
            "wait_for_external_event(name, timeout=...) must raise TimeoutError when no event "
            "comes in time")

    async def test_an_approval_that_comes_in_time_beats_the_timer(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.approval, 3600.0)
        await self.wait_for_runtime_status(client, iid, RuntimeStatus.RUNNING)
        await client.raise_event(iid, "Approval", "manager")
        status = await self.completed(client, iid)
        assert status.output == {"outcome": "approved", "by": "manager",
                                 "timer_cancelled": True}, (
            "when the event comes first, task_any must return the event and cancel the timer")

    async def test_a_timer_beats_an_approval_that_never_comes(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.approval, self.timer_seconds)
        status = await self.completed(client, iid)
        assert status.output == {"outcome": "escalated", "event_cancelled": True}, (
            "when the timer fires first, task_any must return the timer and cancel the wait")

    # == failures and retries =====================================================================

    async def test_an_activity_failure_raises_task_failed_error_and_compensation_runs(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.compensate)
        assert status.output["steps"] == ["Hello reserve!", "Hello refund!", "Hello release!"], (
            "after a failed activity the except block (refund) and the finally block (release) "
            "must run their activities")
        caught = status.output["caught"]
        assert caught["error_type"] == "PaymentDeclined", (
            f"TaskFailedError.error_type must be the original exception's type name; got "
            f"{caught['error_type']!r}")
        assert caught["message"] == "card declined", "TaskFailedError.message is the original one"
        assert caught["task_name"] == "fail_with" and caught["kind"] == "activity"
        trace = caught["stack_trace"]
        assert "fail_with" in trace and "PaymentDeclined" in trace, (
            f"TaskFailedError.stack_trace must be the activity's traceback text; got {trace!r}")

    async def test_an_unhandled_activity_failure_fails_the_instance(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.unhandled_activity_failure, "out of stock")
        details = (await self.failed(client, iid)).failure_details
        assert details is not None
        assert details.error_type == "TaskFailedError", details
        assert "out of stock" in details.message and "PaymentDeclined" in details.message, (
            f"failure details must carry the activity's error type and message; got {details}")
        assert "unhandled_activity_failure" in details.stack_trace, (
            "the stack trace must show where the orchestrator awaited the failing activity")

    async def test_an_exception_in_orchestrator_code_fails_the_instance(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.orchestrator_raises, "bad state")
        details = (await self.failed(client, iid)).failure_details
        assert details is not None
        assert (details.error_type, details.message) == ("ValueError", "bad state"), details
        assert "orchestrator_raises" in details.stack_trace, (
            "the stack trace must show the orchestrator line that raised")
        history = await client.get_history(iid)
        [end] = _of(history, ExecutionCompleted)
        assert end.status == "Failed" and end.error_type == "ValueError", (
            "the failure must be recorded in history as ExecutionCompleted(Failed)")

    async def test_retry_policy_succeeds_on_the_third_attempt_with_backoff_timers(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("retry-ok")
        status = await self.run(client, apps.retrying,
                                {"key": key, "fail_times": 2, "max_attempts": 5})
        assert status.output == 3, "the activity fails twice, so attempt 3 succeeds"
        assert apps.call_count(key) == 3, "exactly three attempts must have run"
        history = await client.get_history(status.instance_id)
        assert _kinds(history).count("TaskScheduled") == 3, "each attempt is scheduled once"
        delays = [t.fire_at - t.ts for t in _of(history, TimerCreated)]
        assert delays == pytest.approx([0.05, 0.1]), (
            f"the waits between attempts are durable timers of first_retry_interval * "
            f"backoff_coefficient ** (n - 1): expected [0.05, 0.1], got {delays}")

    async def test_retry_policy_gives_up_after_max_attempts(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("retry-give-up")
        iid = await client.start_new(apps.retrying,
                                     {"key": key, "fail_times": 10, "max_attempts": 3})
        details = (await self.failed(client, iid)).failure_details
        assert details is not None
        assert apps.call_count(key) == 3, (
            f"max_number_of_attempts=3 must stop after 3 attempts; ran {apps.call_count(key)}")
        assert "attempt 3 failed" in details.message, (
            f"the instance fails with the last attempt's error; got {details}")

    async def test_retry_policy_handle_returning_false_stops_at_once(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("retry-never")
        iid = await client.start_new(
            apps.retrying, {"key": key, "fail_times": 10, "max_attempts": 5, "never_retry": True})
        await self.failed(client, iid)
        assert apps.call_count(key) == 1, (
            "RetryPolicy(handle=lambda e: False) must not retry at all")
        history = await client.get_history(iid)
        assert _of(history, TimerCreated) == [], "no retry means no backoff timer"

    # == sub-orchestrations =======================================================================

    async def test_a_sub_orchestration_returns_its_result(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.parent_of_greeter, ["Oslo", "Lima"])
        assert status.output == ["Hello Oslo!", "Hello Lima!"], (
            "call_sub_orchestrator must return the child's output")
        [created] = _of(await client.get_history(status.instance_id), SubOrchestrationCreated)
        child = await client.get_status(created.instance_id)
        assert child is not None and child.runtime_status is RuntimeStatus.COMPLETED, (
            "the child is a real instance of its own, Completed")

    async def test_a_failed_sub_orchestration_raises_task_failed_error(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.parent_catching_child_failure)
        assert status.output == {"error_type": "ValueError", "message": "the child broke",
                                 "kind": "sub-orchestration",
                                 "task_name": "orchestrator_raises"}, (
            "a failing child raises TaskFailedError in the parent with the child's error type "
            "and message")

    async def test_a_sub_orchestration_can_have_an_explicit_instance_id(
            self, worker: Worker, client: Client) -> None:
        child_id = self.unique("named-child")
        status = await self.run(client, apps.parent_with_named_child, child_id)
        assert status.output == {"instance_id": child_id,
                                 "parent_instance_id": status.instance_id}, (
            "the child runs under the given instance id and knows its parent")

    async def test_a_sub_orchestration_can_be_retried(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("child-retry")
        status = await self.run(client, apps.parent_retrying_child, key)
        assert status.output == 2, "the first child attempt fails, the second succeeds"
        children = [s async for s in client.iter_instances(
            instance_id_prefix=f"{status.instance_id}:")]
        outcomes = sorted(s.runtime_status.value for s in children)
        assert outcomes == ["Completed", "Failed"], (
            f"each retry of a sub-orchestration is a new child instance; got {outcomes}")

    # == continue-as-new and custom status ========================================================

    async def test_continue_as_new_loops_until_done(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.counter, {"value": 0, "stop": 5})
        assert status.output == 5, "five executions each add one, the sixth returns the count"

    async def test_continue_as_new_keeps_only_the_last_executions_history(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.counter, {"value": 0, "stop": 3})
        history = await client.get_history(status.instance_id)
        starts = _of(history, ExecutionStarted)
        assert len(starts) == 1 and starts[0].input == {"value": 3, "stop": 3}, (
            f"continue_as_new must reset history: only the last execution (input value 3) is "
            f"kept; history: {_kinds(history)}")
        assert _of(history, TaskScheduled) == [], "the last execution scheduled no activity"
        assert status.input == {"value": 3, "stop": 3}, "the instance input is the last one"

    async def test_continue_as_new_carries_over_events_not_yet_received(
            self, worker: Worker, client: Client) -> None:
        gate = apps.new_gate()
        iid = await client.start_new(apps.carry_over, {"generation": 0, "gate": gate})
        await self.wait_for_gate(gate)
        await client.raise_event(iid, "carried", "raised in generation 0")
        apps.open_gate(gate)
        status = await self.completed(client, iid)
        assert status.output == "raised in generation 0", (
            "an event raised before continue_as_new and not yet received must be delivered to "
            "the next execution")

    async def test_custom_status_is_visible_while_running(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.custom_status_reporter)
        running = await self.wait_for_custom_status(client, iid, {"stage": "waiting for go"})
        assert running.runtime_status is RuntimeStatus.RUNNING
        await client.raise_event(iid, "go")
        status = await self.completed(client, iid)
        assert status.custom_status == {"stage": "done"}, "the last custom status is kept"

    async def test_get_status_shows_history_and_hides_input_on_request(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.greet_cities, ["Oslo", "Lima"])
        await self.completed(client, iid)
        plain = await client.get_status(iid)
        assert plain is not None and plain.history is None, (
            "get_status leaves out the history unless show_history=True")
        assert plain.input == ["Oslo", "Lima"], "get_status shows the input by default"
        full = await client.get_status(iid, show_history=True, show_input=False)
        assert full is not None and full.input is None, "show_input=False leaves out the input"
        assert full.history is not None, "show_history=True must fill in the history"
        kinds = [event["kind"] for event in full.history]
        scheduled = [e["name"] for e in full.history if e["kind"] == "TaskScheduled"]
        assert "ExecutionStarted" in kinds and kinds[-1] == "ExecutionCompleted", kinds
        assert scheduled == ["hello", "hello"], (
            f"the history must list both activity calls in order, got {kinds}")
        assert await client.get_status("no-such-instance") is None, (
            "get_status of an unknown id returns None")

    async def test_wait_for_completion_times_out_naming_the_status(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.wait_event, "never")
        await self.wait_for_runtime_status(client, iid, RuntimeStatus.RUNNING)
        with pytest.raises(OrchestrationTimeoutError, match="still Running") as caught:
            await client.wait_for_completion(iid, timeout=0.2)
        assert isinstance(caught.value, TimeoutError), (
            "OrchestrationTimeoutError must also be a TimeoutError")
        with pytest.raises(InstanceNotFoundError):
            await client.wait_for_completion("no-such-instance", timeout=0.2)
        await client.terminate(iid, "test over")

    # == management: terminate, suspend/resume, purge, query =====================================

    async def test_terminate_ends_a_running_instance_with_the_reason_as_output(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.wait_event, "never")
        await self.wait_for_runtime_status(client, iid, RuntimeStatus.RUNNING)
        await client.terminate(iid, "no longer needed")
        status = await self.finished(client, iid)
        assert status.runtime_status is RuntimeStatus.TERMINATED, status
        assert status.output == "no longer needed", "a terminated instance's output is the reason"

    async def test_a_terminated_sub_orchestration_fails_its_parent(
            self, worker: Worker, client: Client) -> None:
        child_id = self.unique("doomed-child")
        parent = await client.start_new(apps.parent_of_waiter, child_id)
        await self.wait_until(
            lambda: _is_running(client, child_id), f"child {child_id!r} is running")
        await client.terminate(child_id, "operator said stop")
        child = await self.finished(client, child_id)
        assert child.runtime_status is RuntimeStatus.TERMINATED
        details = (await self.failed(client, parent)).failure_details
        assert details is not None
        assert "operator said stop" in details.message, (
            f"the parent's failure must say the child was terminated and why; got {details}")

    async def test_suspend_holds_events_until_resume(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.wait_event, "go")
        await self.wait_for_runtime_status(client, iid, RuntimeStatus.RUNNING)
        await client.suspend(iid, "maintenance")
        await self.wait_for_runtime_status(client, iid, RuntimeStatus.SUSPENDED)
        await client.raise_event(iid, "go", "after resume")
        await asyncio.sleep(3 * self.timer_seconds)
        held = await self.status_of(client, iid)
        assert held.runtime_status is RuntimeStatus.SUSPENDED, (
            f"an event raised while suspended must be held, not delivered; the instance is "
            f"{held.runtime_status.value} with output {held.output!r}")
        await client.resume(iid, "maintenance over")
        status = await self.completed(client, iid)
        assert status.output == "after resume", "the held event is delivered after resume"

    async def test_purge_instance_history_deletes_a_finished_instance_only(
            self, worker: Worker, client: Client) -> None:
        done = (await self.run(client, apps.echo_input, "x")).instance_id
        live = await client.start_new(apps.wait_event, "never")
        result = await client.purge_instance_history(done)
        assert result.deleted_instance_count == 1
        assert await client.get_status(done) is None, "a purged instance is gone"
        assert await client.get_history(done) == [], "its history is gone too"
        result = await client.purge_instance_history(live)
        assert result.deleted_instance_count == 0, "a live instance must not be purged"
        assert await client.get_status(live) is not None

    async def test_purge_instances_by_filter(self, worker: Worker, client: Client) -> None:
        prefix = self.unique("purge")
        for n in range(3):
            await self.run(client, apps.echo_input, n, instance_id=f"{prefix}-done-{n}")
        await client.start_new(apps.wait_event, "never", instance_id=f"{prefix}-live")
        other = (await self.run(client, apps.echo_input, "keep me")).instance_id
        result = await client.purge_instances(instance_id_prefix=prefix,
                                              runtime_status=[RuntimeStatus.COMPLETED])
        assert result.deleted_instance_count == 3, (
            f"the three completed instances with the prefix are purged; got {result}")
        left = sorted([s.instance_id async for s in client.iter_instances()])
        assert left == sorted([f"{prefix}-live", other]), (
            "the live instance and the instance outside the filter stay")

    async def test_query_instances_filters_by_status_name_prefix_and_created_time(
            self, worker: Worker, client: Client) -> None:
        before = datetime.now(UTC)
        echoes = [(await self.run(client, apps.echo_input, n, instance_id=f"qa-{n}")).instance_id
                  for n in range(3)]
        await asyncio.sleep(0.05)
        middle = datetime.now(UTC)
        await asyncio.sleep(0.05)
        greeter = (await self.run(client, apps.greet_cities, [], instance_id="qb-0")).instance_id
        waiting = await client.start_new(apps.wait_event, "never", instance_id="qb-1")
        await self.wait_for_runtime_status(client, waiting, RuntimeStatus.RUNNING)

        async def ids(**filters: Any) -> list[str]:
            page = await client.query_instances(**filters)
            assert page.continuation is None, "everything fits on one page here"
            return sorted(s.instance_id for s in page.instances)

        assert await ids(runtime_status="Completed") == sorted([*echoes, greeter])
        assert await ids(runtime_status=[RuntimeStatus.RUNNING]) == [waiting]
        assert await ids(name="echo_input") == echoes
        assert await ids(name=apps.greet_cities) == [greeter], "a function works as a name"
        assert await ids(instance_id_prefix="qb-") == [greeter, waiting]
        assert await ids(created_from=middle) == [greeter, waiting], "created_from is inclusive"
        assert await ids(created_from=before, created_to=middle) == echoes, (
            "created_to is exclusive")
        assert await ids(name="echo_input", runtime_status="Running") == [], (
            "filters combine with AND")

    async def test_query_instances_pages_with_a_continuation_token(
            self, worker: Worker, client: Client) -> None:
        expected = sorted([(await self.run(client, apps.echo_input, n)).instance_id
                           for n in range(5)])
        seen: list[str] = []
        continuation = None
        pages = 0
        while True:
            page = await client.query_instances(page_size=2, continuation=continuation)
            assert len(page.instances) <= 2, "a page never holds more than page_size instances"
            seen.extend(s.instance_id for s in page.instances)
            pages += 1
            continuation = page.continuation
            if continuation is None:
                break
            assert pages < 10, "paging must end"
        assert sorted(seen) == expected and len(seen) == 5, (
            f"walking the pages must return every instance exactly once; got {seen}")
        walked = [s.instance_id async for s in client.iter_instances(page_size=2)]
        assert sorted(walked) == expected and len(walked) == 5, (
            "iter_instances must walk every page")

    # == errors users see =========================================================================

    async def test_a_live_instance_id_cannot_be_reused_but_a_finished_one_can(
            self, worker: Worker, client: Client) -> None:
        iid = self.unique("reused")
        await client.start_new(apps.wait_event, "go", instance_id=iid)
        with pytest.raises(InstanceExistsError, match=iid):
            await client.start_new(apps.echo_input, "second", instance_id=iid)
        await client.raise_event(iid, "go", "first run")
        assert (await self.completed(client, iid)).output == "first run"
        status = await self.run(client, apps.echo_input, "second run", instance_id=iid)
        assert status.output == "second run", "a finished instance id may be started again"

    async def test_raise_event_to_an_unknown_or_finished_instance_fails(
            self, worker: Worker, client: Client) -> None:
        with pytest.raises(InstanceNotFoundError, match="no-such-instance"):
            await client.raise_event("no-such-instance", "go")
        done = (await self.run(client, apps.echo_input, 1)).instance_id
        with pytest.raises(InstanceNotRunningError, match="Completed"):
            await client.raise_event(done, "go")

    async def test_starting_an_unknown_orchestrator_fails_early_with_an_app(
            self, worker: Worker, client: Client) -> None:
        with pytest.raises(UnknownFunctionError, match="no_such_orchestrator"):
            await client.start_new("no_such_orchestrator")
        assert [s async for s in client.iter_instances()] == [], "nothing must be created"

    async def test_starting_an_unknown_orchestrator_without_an_app_fails_the_instance(
            self, worker: Worker, backend: Backend) -> None:
        client = Client(backend)  # no app: the worker is the first to notice
        iid = await client.start_new("no_such_orchestrator")
        details = (await self.failed(client, iid)).failure_details
        assert details is not None
        assert details.error_type == "UnknownFunctionError", details
        assert "no_such_orchestrator" in details.message, (
            f"the failure must name the missing orchestrator; got {details.message!r}")

    async def test_calling_an_unknown_activity_raises_task_failed_error_naming_it(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, apps.calls_unknown_activity, "no_such_activity")
        assert status.output["error_type"] == "UnknownFunctionError", status.output
        assert "no_such_activity" in status.output["message"], (
            f"the error must name the missing activity; got {status.output['message']!r}")

    async def test_a_non_serialisable_input_is_rejected_at_start_new(
            self, worker: Worker, client: Client) -> None:
        with pytest.raises(SerializationError, match="echo_input"):
            await client.start_new(apps.echo_input, object())
        assert [s async for s in client.iter_instances()] == [], "nothing must be created"

    # == payloads and activities ==================================================================

    async def test_typed_payloads_arrive_as_their_annotated_types(
            self, worker: Worker, client: Client) -> None:
        placed = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
        status = await self.run(client, apps.typed_order, apps.Order("o-1", 3, placed))
        seen = status.output
        assert seen["input"] == "Order" and seen["input_placed_at"] == "datetime", (
            f"an orchestrator annotated `order: Order` receives an Order dataclass with a "
            f"datetime field; got {seen}")
        assert seen["ship_date"] == "datetime", (
            f"an activity annotated `-> datetime` returns a datetime to the orchestrator; "
            f"got {seen}")
        assert datetime.fromisoformat(seen["ship_date_value"]) == placed + timedelta(days=2)
        if apps.HAS_PYDANTIC:
            assert (seen["receipt"], seen["receipt_paid_at"], seen["receipt_total"]) == (
                "Receipt", "datetime", 7.5), (
                f"an activity annotated `-> Receipt` (a pydantic model) returns a Receipt to the "
                f"orchestrator; got {seen}")

    async def test_sync_activities_run_in_threads_without_blocking_the_loop(
            self, worker: Worker, client: Client) -> None:
        gate = apps.new_gate("sync")
        iid = await client.start_new(apps.sync_activity, gate)
        await self.wait_for_gate(gate)
        other = await self.run(client, apps.greet_cities, ["meanwhile"])
        assert other.output == ["Hello meanwhile!"], (
            "while a plain `def` activity blocks, other work must go on")
        apps.open_gate(gate)
        status = await self.completed(client, iid)
        assert status.output["thread_ident"] != threading.get_ident(), (
            "a plain `def` activity must run in a worker thread, not on the event loop thread")

    # == determinism and replay ===================================================================

    async def test_new_uuid_and_random_are_the_same_on_replay(
            self, backend: Backend, client: Client) -> None:
        async with self.make_worker(backend) as first:
            iid = await client.start_new(apps.deterministic_values)
            await self.wait_for_custom_status(client, iid, "waiting for go")
        assert first.stats["steps"] >= 1
        async with self.make_worker(backend) as second:  # empty cache: it must replay
            await client.raise_event(iid, "go")
            status = await self.completed(client, iid)
        assert second.stats["replays"] >= 1, "the fresh worker must have replayed the history"
        out = status.output
        assert out["replaying_at_top"] is True and out["replaying_at_end"] is False, (
            "ctx.is_replaying is True while old steps re-run and False for new ones")
        [recorded] = [e.input for e in _of(await client.get_history(iid), TaskScheduled)
                      if e.name == "echo"]
        assert out["drawn"] == recorded, (
            f"ctx.new_uuid() and ctx.random() must return the same values on replay as on the "
            f"first run: first run recorded {recorded}, the replay drew {out['drawn']}")
        all_uuids = [*out["drawn"]["uuids"], *out["later"]["uuids"]]
        assert len(set(all_uuids)) == 3, "successive ctx.new_uuid() calls differ"
        assert all(str(uuid.UUID(u)) == u for u in all_uuids), "new_uuid returns UUID strings"
        assert all(0.0 <= r < 1.0 for r in [*out["drawn"]["randoms"], *out["later"]["randoms"]])

    async def test_the_replay_safe_logger_logs_each_line_once(
            self, backend: Backend, client: Client, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="aioflow.orchestration")
        async with self.make_worker(backend, cache_size=0) as worker:  # replay at every step
            status = await self.run(client, apps.logging_chain, 4)
        assert status.output == 4
        assert worker.stats["replays"] >= 4, "with cache_size=0 every step replays"
        iid = status.instance_id
        lines = [r.getMessage() for r in caplog.records if iid in r.getMessage()]
        expected = [f"logging_chain {iid} step {n}" for n in range(4)]
        expected.append(f"logging_chain {iid} done")
        assert lines == expected, (
            f"ctx.logger must stay silent while replaying, so each line is logged exactly once; "
            f"got {lines}")

    @pytest.mark.parametrize(
        "operation",
        ["open_connection", "to_thread", "run_in_executor", "subprocess", "getaddrinfo"])
    async def test_io_inside_an_orchestrator_fails_the_instance(
            self, worker: Worker, client: Client, operation: str) -> None:
        iid = await client.start_new(apps.does_io, operation)
        details = (await self.failed(client, iid)).failure_details
        assert details is not None
        assert "orchestrators must be deterministic" in details.message, (
            f"{operation} inside an orchestrator must fail the instance with a message saying "
            f"orchestrators must be deterministic; got {details}")
        assert details.error_type == "NonDeterministicOperationError", details

    async def test_awaiting_a_future_of_another_loop_fails_clearly(
            self, worker: Worker, client: Client) -> None:
        iid = await client.start_new(apps.awaits_foreign_future)
        details = (await self.failed(client, iid)).failure_details
        assert details is not None
        assert "different loop" in details.message, (
            f"the failure must say the future belongs to a different loop; got {details}")
        assert "orchestrators must be deterministic" in details.message, details

    # == workers and the instance cache ===========================================================

    async def test_a_restarted_worker_finishes_an_orchestration_by_replaying(
            self, backend: Backend, client: Client) -> None:
        async with self.make_worker(backend):
            iid = await client.start_new(apps.two_steps_with_pause, "Kyoto")
            await self.wait_for_custom_status(client, iid, "paused")
        async with self.make_worker(backend) as fresh:
            await client.raise_event(iid, "continue")
            status = await self.completed(client, iid)
        assert status.output == ["Hello Kyoto!", "Hello Kyoto again!"], (
            "a fresh worker must rebuild the orchestration from history and finish it")
        assert fresh.stats["replays"] >= 1, "the fresh worker had to replay the history"
        scheduled = [e.input for e in _of(await client.get_history(iid), TaskScheduled)]
        assert scheduled == ["Kyoto", "Kyoto again"], (
            f"replay must not schedule completed activities again; scheduled: {scheduled}")

    async def test_a_stopped_worker_can_be_started_again(
            self, backend: Backend, client: Client) -> None:
        worker = self.make_worker(backend)
        await worker.start()
        iid = await client.start_new(apps.two_steps_with_pause, "Nara")
        await self.wait_for_custom_status(client, iid, "paused")
        await worker.stop()
        await worker.start()
        try:
            await client.raise_event(iid, "continue")
            status = await self.completed(client, iid)
        finally:
            await worker.stop()
        assert status.output == ["Hello Nara!", "Hello Nara again!"], (
            "Worker.start() after stop() must run the worker again, not leave it stopped")

    async def test_a_tiny_cache_with_many_instances_still_gives_correct_results(
            self, backend: Backend, client: Client) -> None:
        async with self.make_worker(backend, cache_size=1) as worker:
            iids = [await client.start_new(apps.greet_cities, [f"city{n}", "b", "c"])
                    for n in range(20)]
            outputs = [(await self.completed(client, iid)).output for iid in iids]
        assert outputs == [[f"Hello city{n}!", "Hello b!", "Hello c!"] for n in range(20)], (
            "evicting instances from a small cache must not change any result")
        assert worker.stats["replays"] > 0, "with cache_size=1 some steps must have replayed"

    async def test_two_workers_share_one_backend_and_finish_each_instance_once(
            self, backend: Backend, client: Client) -> None:
        prefix = self.unique("shared")
        options = {"max_concurrent_orchestrations": 10, "activity_batch_size": 8}
        async with self.make_worker(backend, **options) as one, \
                self.make_worker(backend, **options) as two:
            iids = [await client.start_new(apps.counted_chain, f"{prefix}-{n}")
                    for n in range(50)]
            statuses = [await self.completed(client, iid) for iid in iids]
        assert [s.output for s in statuses] == [f"{prefix}-{n}" for n in range(50)]
        assert one.stats["steps"] > 0 and two.stats["steps"] > 0, (
            f"both workers should have run orchestration steps: {one.stats} / {two.stats}")
        for n, iid in enumerate(iids):
            history = await client.get_history(iid)
            assert _kinds(history).count("ExecutionCompleted") == 1, (
                f"instance {iid} must complete exactly once; history: {_kinds(history)}")
            assert sorted(e.task_id for e in _of(history, TaskScheduled)) == [0, 1, 2], (
                f"instance {iid} must schedule each step exactly once")
            assert len(_of(history, TaskCompleted)) == 3 and not _of(history, TaskFailed)
            counts = [apps.call_count(f"{prefix}-{n}/{step}") for step in range(3)]
            assert counts == [1, 1, 1], (
                f"with leases that never expire, each activity of {iid} runs exactly once; "
                f"ran {counts}")


async def _is_running(client: Client, instance_id: str) -> bool:
    status = await client.get_status(instance_id)
    return status is not None and status.runtime_status is RuntimeStatus.RUNNING
