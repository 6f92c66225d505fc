"""Entities without a backend: the engine's entity commands and the entity batch runner.

The end-to-end behaviour is in the shared suite (`aioflow.testing.conformance.entities`, run on
every backend); these tests pin down the pieces in isolation: what an orchestration step sends
to entities, that replay matches entity commands strictly, that critical sections release their
locks however the orchestration ends, and how a batch of requests changes an entity.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import aioflow
from aioflow import EntityContext, EntityId, NonDeterminismError, RuntimeStatus
from aioflow.engine import OrchestrationExecutor
from aioflow.entities import run_entity_batch
from aioflow.events import (
    EntityOperationSent,
    EntityRequest,
    ExecutionStarted,
    ExecutionTerminated,
    HistoryEvent,
    OrchestratorStarted,
    TaskCompleted,
    TaskFailed,
)
from aioflow.serialization import dumps, loads

T0 = 1_700_000_000.0
EXEC = "exec-1"
IID = "orch-1"
app = aioflow.App()
COUNTER = EntityId("counter", "c")
OTHER = EntityId("counter", "a")


@app.entity(name="counter")
def counter(ctx: EntityContext) -> Any:
    value = ctx.get_state(lambda: 0)
    if ctx.operation_name == "add":
        ctx.set_state(value + ctx.get_input())
    elif ctx.operation_name == "get":
        return value
    elif ctx.operation_name == "fail":
        ctx.set_state(-1)
        raise KeyError("no")
    return None


@app.orchestrator
async def add_and_get(ctx: aioflow.OrchestrationContext) -> int:
    ctx.signal_entity(COUNTER, "add", 2)
    return int(await ctx.call_entity(COUNTER, "get"))


@app.orchestrator
async def locked_wait(ctx: aioflow.OrchestrationContext) -> None:
    async with ctx.lock_entities(COUNTER, OTHER):
        await ctx.wait_for_external_event("never")


def start(name: str) -> ExecutionStarted:
    return ExecutionStarted(ts=T0, name=name, execution_id=EXEC, input=None)


def reply(task_id: int, result: Any = None) -> TaskCompleted:
    return TaskCompleted(ts=T0, task_id=task_id, execution_id=EXEC, result=result)


def run(name: str, *feeds: list[HistoryEvent]) -> tuple[OrchestrationExecutor, list[Any]]:
    ex = OrchestrationExecutor(app, IID)
    decisions = [ex.activate(T0 + n, events) for n, events in enumerate([[start(name)], *feeds])]
    return ex, decisions


# == orchestration side ========================================================================


def test_signals_and_calls_become_entity_messages_in_the_order_sent() -> None:
    ex, [first] = run("add_and_get")
    sent = [(m.op_kind, m.entity_id, m.operation, m.input) for m in first.entity_messages]
    assert sent == [("signal", "@counter@c", "add", 2), ("call", "@counter@c", "get", None)], (
        f"a step sends its entity operations in program order: {sent}")
    assert [e.kind for e in first.new_events].count("EntityOperationSent") == 2, (
        "entity operations are commands recorded in history")
    done = ex.activate(T0 + 1, [reply(1, 2)])
    assert done.runtime_status is RuntimeStatus.COMPLETED and done.output == 2
    ex.close()


def test_replay_matches_entity_commands_and_sends_nothing_again() -> None:
    ex, decisions = run("add_and_get")
    history = decisions[0].new_events
    ex.close()
    replayed = OrchestrationExecutor(app, IID)
    replayed.load(history)
    assert replayed.replay_error is None
    decision = replayed.activate(T0 + 5, [reply(1, 7)])
    assert decision.entity_messages == [], "replayed entity commands must not be sent again"
    assert decision.output == 7
    replayed.close()


def test_replay_with_a_different_entity_operation_is_non_deterministic() -> None:
    history: list[HistoryEvent] = [
        OrchestratorStarted(ts=T0), start("add_and_get"),
        EntityOperationSent(ts=T0, task_id=0, entity_id="@counter@c", operation="subtract",
                            input=2, op_kind="signal")]
    ex = OrchestrationExecutor(app, IID)
    ex.load(history)
    error = ex.replay_error
    assert isinstance(error, NonDeterminismError), repr(error)
    assert "'subtract'" in str(error) and "'add'" in str(error), (
        f"the error names the recorded and the current entity operation: {error}")
    ex.close()


def test_a_critical_section_locks_in_sorted_order_one_at_a_time() -> None:
    ex, [first] = run("locked_wait")
    [lock_a] = first.entity_messages
    assert (lock_a.op_kind, lock_a.entity_id) == ("lock", "@counter@a"), (
        "locks are requested in sorted id order, starting with the smallest")
    granted = ex.activate(T0 + 2, [reply(lock_a.task_id)])
    [lock_c] = granted.entity_messages
    assert (lock_c.op_kind, lock_c.entity_id, lock_c.section) == \
        ("lock", "@counter@c", lock_a.section), "the next lock is asked for once one is granted"
    ex.close()


def test_terminating_inside_a_critical_section_releases_every_lock_sent() -> None:
    ex, [first] = run("locked_wait")
    [lock_a] = first.entity_messages
    granted = ex.activate(T0 + 1, [reply(lock_a.task_id)])
    [lock_c] = granted.entity_messages
    ended = ex.activate(T0 + 2, [ExecutionTerminated(ts=T0, reason="stop")])
    unlocks = sorted((m.op_kind, m.entity_id, m.section) for m in ended.entity_messages)
    assert unlocks == [("unlock", "@counter@a", lock_a.section),
                       ("unlock", "@counter@c", lock_c.section)], (
        "an execution that ends inside a critical section must unlock every entity it asked "
        f"to lock (granted or still queued): {unlocks}")
    ex.close()


def test_an_unknown_entity_name_fails_at_the_call() -> None:
    @app.orchestrator
    async def call_ghost(ctx: aioflow.OrchestrationContext) -> str:
        try:
            await ctx.call_entity(EntityId("ghost", "k"), "get")
        except aioflow.UnknownFunctionError as error:
            return str(error)
        return "no error"

    ex, [decision] = run("call_ghost")
    assert "no entity named 'ghost'" in decision.output, decision.output
    ex.close()


# == entity side ===============================================================================


def request(op: str, value: Any = None, *, kind: str = "call", sender: str | None = IID,
            task_id: int | None = 0, section: str | None = None) -> EntityRequest:
    return EntityRequest(ts=T0, operation=op, input=value, op_kind=kind, sender=sender,
                         sender_execution_id=EXEC, task_id=task_id, section=section)


def batch(requests: list[EntityRequest], state: Any = None, scheduler: bytes | None = None):
    encoded = None if state is None else dumps(state)
    return asyncio.run(run_entity_batch(app.get_entity("counter"), COUNTER, encoded, scheduler,
                                        requests, T0))


def test_a_batch_applies_operations_in_order_and_answers_each_call() -> None:
    result = batch([request("add", 1, kind="signal", task_id=None),
                    request("add", 2, task_id=5), request("get", task_id=6)], state=10)
    assert loads(result.state) == 13
    replies = [(target, type(e).__name__, e.task_id, getattr(e, "result", None))
               for target, e in result.replies]
    assert replies == [(IID, "TaskCompleted", 5, None), (IID, "TaskCompleted", 6, 13)]
    assert result.scheduler is None, "an unlocked entity with nothing queued stores no scheduler"


def test_a_failing_operation_rolls_back_and_answers_with_the_error() -> None:
    result = batch([request("fail", task_id=1), request("get", task_id=2)], state=4)
    assert loads(result.state) == 4
    failed = result.replies[0][1]
    assert isinstance(failed, TaskFailed) and failed.error_type == "KeyError"
    assert result.replies[1][1].result == 4  # type: ignore[attr-defined]


def test_a_lock_holds_back_other_senders_until_unlock() -> None:
    held = batch([request("", kind="lock", task_id=1, section="s1"),
                  request("add", 5, kind="signal", sender="someone-else", task_id=None),
                  request("add", 1, task_id=2)], state=0)
    assert loads(held.state) == 1, "only the holder's operation is applied while locked"
    meta = loads(held.scheduler)
    assert meta["lock"] == {"holder": IID, "section": "s1"} and len(meta["queue"]) == 1
    released = batch([request("", kind="unlock", task_id=None, section="s1")], state=1,
                     scheduler=held.scheduler)
    assert loads(released.state) == 6, "the queued operation runs once the lock is released"
    assert released.scheduler is None


def test_an_unlock_for_a_lock_still_queued_withdraws_the_request() -> None:
    held = batch([request("", kind="lock", sender="first", task_id=1, section="s1"),
                  request("", kind="lock", sender="second", task_id=1, section="s2")])
    after = batch([request("", kind="unlock", sender="second", task_id=None, section="s2"),
                   request("", kind="unlock", sender="first", task_id=None, section="s1")],
                  scheduler=held.scheduler)
    assert after.scheduler is None and after.replies == [], (
        "a withdrawn lock request must neither be granted later nor linger in the queue")


@pytest.mark.parametrize("bad", ["", "a|b", "x\n"])
def test_bad_entity_keys_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="entity key"):
        EntityId("counter", bad)
