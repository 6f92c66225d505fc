"""`BackendContractSuite`: the behaviour every `aioflow.backend.Backend` must show.

The suite is a pytest test class meant to be subclassed. A subclass provides exactly one thing,
an async fixture named ``backend`` that yields an open backend with no instances, messages or
activity tasks in it, and closes it afterwards. The suite itself knows nothing about any
particular backend: it drives the public protocol only, with opaque payload bytes, and it uses
real time (short leases and delays, real sleeping) because that is the only clock every backend
has. A slow remote store can stretch the timings by overriding `short_lease`, `short_delay` and
`clock_slack` on its subclass.

Every test checks one promise of the contract and its assertion messages say which promise
broke, so a failing test is a to-do item for the backend author, not a puzzle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import ClassVar

import pytest
import pytest_asyncio

from aioflow.backend import (
    ActivityLock,
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    Backend,
    InstanceQuery,
    InstanceRecord,
    Message,
    NewInstance,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    WorkKind,
)
from aioflow.errors import InstanceExistsError
from aioflow.status import RuntimeStatus

__all__ = ["BackendContractSuite"]

#: An arbitrary fixed epoch for rows whose `created_time` the tests choose (queries, paging).
T0 = 1_700_000_000.0
#: Statuses an instance can be in and still run again; its id cannot be reused.
LIVE_STATUSES = (
    RuntimeStatus.PENDING,
    RuntimeStatus.RUNNING,
    RuntimeStatus.SUSPENDED,
    RuntimeStatus.CONTINUED_AS_NEW,
)
#: Statuses after which an instance never runs again; its id may be reused.
TERMINAL_STATUSES = (RuntimeStatus.COMPLETED, RuntimeStatus.FAILED, RuntimeStatus.TERMINATED)
#: A lease long enough that it never expires during a test.
LONG_LEASE = 60.0


# -- record builders ----------------------------------------------------------------------------


def make_record(
    instance_id: str,
    *,
    name: str = "Workflow",
    status: RuntimeStatus = RuntimeStatus.PENDING,
    created_time: float | None = None,
    execution_id: str = "exec-1",
    input: bytes | None = b'{"input":1}',
) -> InstanceRecord:
    """An instance row; `created_time` defaults to now."""
    created = time.time() if created_time is None else created_time
    return InstanceRecord(
        instance_id=instance_id,
        name=name,
        execution_id=execution_id,
        runtime_status=status,
        created_time=created,
        last_updated_time=created,
        input=input,
    )


def make_message(
    instance_id: str,
    data: bytes = b'{"e":1}',
    *,
    message_id: str | None = None,
    visible_at: float = 0.0,
) -> Message:
    """A message with a fresh unique id unless `message_id` is given."""
    return Message(
        id=message_id or f"msg-{uuid.uuid4().hex}",
        instance_id=instance_id,
        data=data,
        visible_at=visible_at,
    )


def make_task(instance_id: str, data: bytes = b'{"activity":"Add"}') -> ActivityTask:
    """An activity task with a fresh unique id."""
    return ActivityTask(id=f"task-{uuid.uuid4().hex}", instance_id=instance_id, data=data)


def completion_for(
    item: OrchestrationWorkItem,
    *,
    status: RuntimeStatus = RuntimeStatus.RUNNING,
    new_history: Sequence[bytes] = (),
    consumed: Sequence[str] | None = None,
    **fields: object,
) -> OrchestrationCompletion:
    """A completion of `item` under its lock token.

    By default it consumes every message of the work item and sets the row's status to `status`;
    other `OrchestrationCompletion` fields can be passed as keywords.
    """
    row = dataclasses.replace(
        item.instance, runtime_status=status, last_updated_time=time.time()
    )
    return OrchestrationCompletion(
        instance_id=item.instance.instance_id,
        lock_token=item.lock_token,
        instance=row,
        new_history=list(new_history),
        consumed=[m.id for m in item.messages] if consumed is None else list(consumed),
        **fields,  # type: ignore[arg-type]
    )


def ids(messages: Iterable[Message]) -> list[str]:
    return [m.id for m in messages]


def describe_items(items: Iterable[OrchestrationWorkItem]) -> list[tuple[str, list[str]]]:
    """(instance id, message ids) per work item: readable in an assertion message."""
    return [(item.instance.instance_id, ids(item.messages)) for item in items]


def assert_same_record(actual: InstanceRecord | None, expected: InstanceRecord, what: str) -> None:
    """Compare rows field by field; times only to the millisecond (stores may round them)."""
    assert actual is not None, f"{what}: the instance row is missing"
    for field in dataclasses.fields(InstanceRecord):
        got, want = getattr(actual, field.name), getattr(expected, field.name)
        if field.name in ("created_time", "last_updated_time"):
            assert got == pytest.approx(want, abs=1e-3), (
                f"{what}: {field.name} is {got!r}, expected {want!r}"
            )
        else:
            assert got == want, f"{what}: {field.name} is {got!r}, expected {want!r}"


# -- the suite ----------------------------------------------------------------------------------


class BackendContractSuite:
    """The conformance tests of the backend protocol; subclass it to test a backend.

    Provide an async fixture named ``backend`` that yields an open backend holding no instances,
    messages or activity tasks, and closes it when the test is done. Nothing else is needed:
    every test drives the backend through the `aioflow.backend.Backend` protocol only.

    Timings use the real clock. Override `short_lease` (a lease the tests wait out),
    `short_delay` (how far in the future delayed messages and retries are) and `clock_slack`
    (extra waiting on top of those) for a backend that needs longer.
    """

    pytestmark = pytest.mark.asyncio

    short_lease: ClassVar[float] = 0.3
    short_delay: ClassVar[float] = 0.4
    clock_slack: ClassVar[float] = 0.15

    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        """Override me: yield an open, empty backend and close it afterwards."""
        raise NotImplementedError(
            f"{type(self).__name__} must define an async fixture named 'backend' that yields an "
            f"open, empty aioflow backend (and closes it afterwards); see BackendContractSuite"
        )
        yield  # pragma: no cover - makes this an async generator like the overrides

    # -- helpers --------------------------------------------------------------------------------

    async def wait_out(self, seconds: float) -> None:
        """Sleep until `seconds` from now have certainly passed for the backend too."""
        await asyncio.sleep(seconds + self.clock_slack)

    @staticmethod
    async def start(backend: Backend, instance_id: str, **record_fields: object) -> Message:
        """Create an instance (row built by `make_record`) and return its start message."""
        start = make_message(instance_id, b'{"event":"ExecutionStarted"}')
        await backend.create_instance(make_record(instance_id, **record_fields), start)  # type: ignore[arg-type]
        return start

    @staticmethod
    async def lock_one(
        backend: Backend,
        instance_id: str,
        *,
        worker_id: str = "worker-a",
        lease_seconds: float = LONG_LEASE,
        what: str,
    ) -> OrchestrationWorkItem:
        """Lock work and insist that it is exactly `instance_id`."""
        items = await backend.lock_orchestrations(
            worker_id, max_items=10, lease_seconds=lease_seconds
        )
        assert [item.instance.instance_id for item in items] == [instance_id], (
            f"{what}: expected lock_orchestrations to hand out exactly instance "
            f"{instance_id!r}, got {describe_items(items)}"
        )
        return items[0]

    @staticmethod
    async def assert_no_orchestration_work(backend: Backend, what: str) -> None:
        items = await backend.lock_orchestrations(
            "worker-probe", max_items=10, lease_seconds=LONG_LEASE
        )
        assert items == [], (
            f"{what}: expected no lockable instance, but lock_orchestrations handed out "
            f"{describe_items(items)}"
        )

    async def start_settled(
        self,
        backend: Backend,
        instance_id: str,
        status: RuntimeStatus,
        *,
        history: Sequence[bytes] = (b'{"h":"started"}',),
        **record_fields: object,
    ) -> InstanceRecord:
        """Create an instance and run one step that consumes its start and sets `status`.

        Needs a backend with no other lockable work; returns the row as stored.
        """
        await self.start(backend, instance_id, **record_fields)
        item = await self.lock_one(backend, instance_id, what=f"settling {instance_id!r}")
        done = completion_for(item, status=status, new_history=history)
        assert await backend.complete_orchestrations([done]) == [True], (
            f"completing a step of {instance_id!r} under its fresh lock token must succeed"
        )
        return done.instance

    # -- instances ------------------------------------------------------------------------------

    async def test_create_instance_then_get_instance_returns_the_row(
        self, backend: Backend
    ) -> None:
        record = make_record("inst-1", name="Greeter", input=b'{"who":"ada"}')
        start = make_message("inst-1", b'{"event":"ExecutionStarted"}')
        await backend.create_instance(record, start)

        assert_same_record(
            await backend.get_instance("inst-1"), record, "get_instance after create_instance"
        )
        item = await self.lock_one(backend, "inst-1", what="after create_instance")
        assert item.messages == [start], (
            "create_instance must put the start message in the new instance's inbox"
        )
        assert item.history_length == 0, "a new instance has no stored history"

    async def test_unknown_instance_has_no_row_and_empty_history(self, backend: Backend) -> None:
        assert await backend.get_instance("nobody") is None, (
            "get_instance of an id never created must return None"
        )
        assert await backend.get_history("nobody") == [], (
            "get_history of an id never created must return [] (not raise)"
        )

    @pytest.mark.parametrize("status", LIVE_STATUSES, ids=lambda s: s.value)
    async def test_create_instance_rejects_the_id_of_a_live_instance(
        self, backend: Backend, status: RuntimeStatus
    ) -> None:
        row = await self.start_settled(backend, "inst-1", status, execution_id="exec-1")

        with pytest.raises(InstanceExistsError) as raised:
            await backend.create_instance(
                make_record("inst-1", execution_id="exec-2"), make_message("inst-1")
            )
        assert raised.value.instance_id == "inst-1", "InstanceExistsError must name the id"
        assert raised.value.runtime_status == status.value, (
            "InstanceExistsError must carry the live instance's status value"
        )
        assert_same_record(
            await backend.get_instance("inst-1"), row, "a rejected create_instance must not "
            "touch the live instance's row"
        )
        await self.assert_no_orchestration_work(
            backend, "a rejected create_instance must not deliver its start message"
        )

    @pytest.mark.parametrize("status", TERMINAL_STATUSES, ids=lambda s: s.value)
    async def test_create_instance_replaces_a_terminal_instance(
        self, backend: Backend, status: RuntimeStatus
    ) -> None:
        await self.start_settled(backend, "inst-1", status, execution_id="exec-1")
        late = make_message("inst-1", b'{"late":"event"}')
        await backend.send_messages([late])

        new_row = make_record("inst-1", name="Reborn", execution_id="exec-2")
        new_start = make_message("inst-1", b'{"event":"ExecutionStarted","n":2}')
        await backend.create_instance(new_row, new_start)

        assert_same_record(
            await backend.get_instance("inst-1"), new_row,
            f"create_instance over a {status.value} instance must replace its row",
        )
        assert await backend.get_history("inst-1") == [], (
            f"create_instance over a {status.value} instance must discard its old history"
        )
        item = await self.lock_one(backend, "inst-1", what="after replacing a terminal instance")
        assert item.messages == [new_start], (
            "the replaced instance's old inbox must be discarded: only the new start message "
            f"may be delivered, got {ids(item.messages)} (old message was {late.id!r})"
        )
        assert item.history_length == 0, "the replacing instance starts with no history"

    async def test_replacing_a_terminal_instance_fences_out_its_old_lease(
        self, backend: Backend
    ) -> None:
        await self.start_settled(backend, "inst-1", RuntimeStatus.COMPLETED)
        await backend.send_messages([make_message("inst-1", b'{"late":"event"}')])
        draining = await self.lock_one(backend, "inst-1", what="draining a late message")

        new_row = make_record("inst-1", execution_id="exec-2")
        new_start = make_message("inst-1")
        await backend.create_instance(new_row, new_start)

        stale = completion_for(
            draining, status=RuntimeStatus.COMPLETED, new_history=[b'{"h":"old"}']
        )
        assert await backend.complete_orchestrations([stale]) == [False], (
            "a lock token of the replaced (discarded) instance must not commit into the new one"
        )
        assert_same_record(
            await backend.get_instance("inst-1"), new_row,
            "the replacing instance's row must survive the old worker's commit attempt",
        )
        assert await backend.get_history("inst-1") == [], (
            "the old worker's history must not land in the replacing instance"
        )
        item = await self.lock_one(backend, "inst-1", worker_id="worker-b",
                                   what="the replacing instance is not locked by the old lease")
        assert item.messages == [new_start]

    async def test_stored_rows_are_not_aliased_to_callers_objects(self, backend: Backend) -> None:
        record = make_record("inst-1", name="Original")
        await backend.create_instance(record, make_message("inst-1"))
        record.name = "mutated by caller after create"

        fetched = await backend.get_instance("inst-1")
        assert fetched is not None and fetched.name == "Original", (
            "mutating the record passed to create_instance must not change the stored row"
        )
        fetched.name = "mutated by caller after get"
        again = await backend.get_instance("inst-1")
        assert again is not None and again.name == "Original", (
            "mutating a record returned by get_instance must not change the stored row"
        )

    # -- locking orchestrations -----------------------------------------------------------------

    async def test_lock_returns_inbox_messages_in_send_order(self, backend: Backend) -> None:
        start = await self.start(backend, "inst-1")
        first = make_message("inst-1", b'{"n":1}')
        second = make_message("inst-1", b'{"n":2}')
        await backend.send_messages([first, second])
        third = make_message("inst-1", b'{"n":3}')
        await backend.send_messages([third])

        item = await self.lock_one(backend, "inst-1", what="an instance with four messages")
        assert item.messages == [start, first, second, third], (
            "lock_orchestrations must return the instance's visible messages, whole and "
            f"oldest first (in send order); got {ids(item.messages)}, expected "
            f"{ids([start, first, second, third])}"
        )
        assert item.instance.instance_id == "inst-1" and item.lock_token, (
            "a work item carries the instance row and a non-empty lock token"
        )

    async def test_lock_skips_instances_without_visible_messages(self, backend: Backend) -> None:
        await self.start_settled(backend, "quiet", RuntimeStatus.RUNNING)
        await self.assert_no_orchestration_work(
            backend, "an instance whose inbox is empty must not be locked"
        )

    async def test_lock_honours_max_items_and_max_messages(self, backend: Backend) -> None:
        for n in range(3):
            await self.start(backend, f"inst-{n}")
        batch = await backend.lock_orchestrations(
            "worker-a", max_items=2, lease_seconds=LONG_LEASE
        )
        assert len(batch) == 2, f"max_items=2 must lock at most 2, got {describe_items(batch)}"
        rest = await backend.lock_orchestrations(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        )
        assert len(rest) == 1, (
            f"the third instance must still be lockable, got {describe_items(rest)}"
        )
        assert {i.instance.instance_id for i in batch + rest} == {"inst-0", "inst-1", "inst-2"}

        start = await self.start(backend, "many")
        extra = [make_message("many", f'{{"n":{n}}}'.encode()) for n in range(3)]
        await backend.send_messages(extra)
        item = (
            await backend.lock_orchestrations(
                "worker-c", max_items=1, lease_seconds=LONG_LEASE, max_messages=2
            )
        )[0]
        assert item.messages == [start, extra[0]], (
            "max_messages=2 must hand out the two oldest messages, got "
            f"{ids(item.messages)}"
        )
        assert await backend.complete_orchestrations([completion_for(item)]) == [True]
        item = await self.lock_one(backend, "many", what="the messages beyond max_messages")
        assert item.messages == extra[1:], (
            f"messages beyond max_messages must stay in the inbox, got {ids(item.messages)}"
        )

    async def test_locked_instance_is_not_handed_to_a_second_worker(
        self, backend: Backend
    ) -> None:
        await self.start(backend, "inst-1")
        await self.lock_one(backend, "inst-1", worker_id="worker-a", what="first lock")

        await backend.send_messages([make_message("inst-1", b'{"more":"work"}')])
        await self.assert_no_orchestration_work(
            backend, "an instance locked under an unexpired lease must not be handed to another "
            "worker, even when new messages arrive for it"
        )

    async def test_expired_lease_is_taken_over_with_a_new_token(self, backend: Backend) -> None:
        start = await self.start(backend, "inst-1")
        first = await self.lock_one(
            backend, "inst-1", worker_id="worker-a", lease_seconds=self.short_lease,
            what="first lock",
        )
        await self.wait_out(self.short_lease)

        second = await self.lock_one(
            backend, "inst-1", worker_id="worker-b", what="after the first lease expired"
        )
        assert second.lock_token != first.lock_token, (
            "a takeover after lease expiry must issue a fresh lock token"
        )
        assert second.messages == [start], (
            "the new owner must receive the messages the expired owner never consumed"
        )

    async def test_stale_worker_cannot_commit_anything(self, backend: Backend) -> None:
        start = await self.start(backend, "inst-1")
        stale_item = await self.lock_one(
            backend, "inst-1", worker_id="worker-a", lease_seconds=self.short_lease,
            what="first lock",
        )
        await self.wait_out(self.short_lease)
        new_item = await self.lock_one(backend, "inst-1", worker_id="worker-b", what="takeover")

        stale = completion_for(
            stale_item,
            status=RuntimeStatus.COMPLETED,
            new_history=[b'{"h":"stale"}'],
            messages=[make_message("inst-1", b'{"timer":"fired"}')],
            activities=[make_task("inst-1")],
            new_instances=[NewInstance(make_record("child"), make_message("child"))],
        )
        assert await backend.complete_orchestrations([stale]) == [False], (
            "complete_orchestrations must return False for a lock token that was taken over"
        )
        assert await backend.get_history("inst-1") == [], (
            "fencing: a stale completion must not append history"
        )
        row = await backend.get_instance("inst-1")
        assert row is not None and row.runtime_status == RuntimeStatus.PENDING, (
            "fencing: a stale completion must not update the instance row"
        )
        assert await backend.get_instance("child") is None, (
            "fencing: a stale completion must not create new instances"
        )
        assert await backend.lock_activities(
            "worker-probe", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "fencing: a stale completion must not enqueue activity tasks"

        await backend.abandon_orchestration("inst-1", new_item.lock_token)
        item = await self.lock_one(backend, "inst-1", worker_id="worker-c", what="after abandon")
        assert item.messages == [start], (
            "fencing: a stale completion must neither consume messages nor send new ones; "
            f"inbox is now {ids(item.messages)}"
        )

    async def test_stale_token_cannot_abandon_or_renew(self, backend: Backend) -> None:
        await self.start(backend, "inst-1")
        stale_item = await self.lock_one(
            backend, "inst-1", worker_id="worker-a", lease_seconds=self.short_lease,
            what="first lock",
        )
        await self.wait_out(self.short_lease)
        current = await self.lock_one(backend, "inst-1", worker_id="worker-b", what="takeover")

        await backend.abandon_orchestration("inst-1", stale_item.lock_token)
        await self.assert_no_orchestration_work(
            backend, "abandon_orchestration with a stale token must be ignored (the new owner "
            "keeps its lock)"
        )
        assert await backend.renew_orchestration_lease(
            "inst-1", stale_item.lock_token, LONG_LEASE
        ) is False, "renew_orchestration_lease with a stale token must return False"
        assert await backend.renew_orchestration_lease(
            "inst-1", current.lock_token, LONG_LEASE
        ) is True, "renew_orchestration_lease with the current token must return True"

    async def test_renewed_lease_is_not_taken_over(self, backend: Backend) -> None:
        await self.start(backend, "inst-1")
        item = await self.lock_one(
            backend, "inst-1", lease_seconds=self.short_lease, what="first lock"
        )
        assert await backend.renew_orchestration_lease(
            "inst-1", item.lock_token, LONG_LEASE
        ) is True, "renew_orchestration_lease with the current token must return True"
        await self.wait_out(self.short_lease)
        await self.assert_no_orchestration_work(
            backend, "a renewed lease must hold past the original lease's expiry"
        )
        assert await backend.complete_orchestrations([completion_for(item)]) == [True], (
            "the holder of a renewed lease must still be able to commit"
        )

    async def test_abandon_makes_the_messages_lockable_again(self, backend: Backend) -> None:
        start = await self.start(backend, "inst-1")
        first = await self.lock_one(backend, "inst-1", what="first lock")
        await backend.abandon_orchestration("inst-1", first.lock_token)

        again = await self.lock_one(
            backend, "inst-1", worker_id="worker-b", what="right after abandon (retry_after=0)"
        )
        assert again.messages == [start], "abandon must keep the messages in the inbox"
        assert again.lock_token != first.lock_token, "a new lock must have a new token"

    async def test_abandon_with_retry_after_delays_the_next_lock(self, backend: Backend) -> None:
        start = await self.start(backend, "inst-1")
        first = await self.lock_one(backend, "inst-1", what="first lock")
        await backend.abandon_orchestration(
            "inst-1", first.lock_token, retry_after=self.short_delay
        )
        await self.assert_no_orchestration_work(
            backend, "after abandon with retry_after, the instance must not be lockable before "
            "retry_after seconds have passed"
        )
        await self.wait_out(self.short_delay)
        again = await self.lock_one(backend, "inst-1", what="after retry_after passed")
        assert again.messages == [start], "abandon must keep the messages in the inbox"

    # -- completing orchestrations --------------------------------------------------------------

    async def test_completion_applies_every_part(self, backend: Backend) -> None:
        await self.start_settled(backend, "other", RuntimeStatus.RUNNING)
        start = await self.start(backend, "inst-1")
        unconsumed = make_message("inst-1", b'{"event":"not yet"}')
        await backend.send_messages([unconsumed])
        item = await self.lock_one(backend, "inst-1", what="the instance to complete")
        assert item.messages == [start, unconsumed]

        to_other = make_message("other", b'{"event":"hello other"}')
        tasks = [make_task("inst-1", b'{"n":1}'), make_task("inst-1", b'{"n":2}')]
        child_row = make_record("child", name="Child", execution_id="child-exec")
        child_start = make_message("child", b'{"event":"ExecutionStarted","child":true}')
        history = [b'{"h":1}', b'{"h":2}', b'{"h":3}']
        done = completion_for(
            item,
            status=RuntimeStatus.RUNNING,
            new_history=history,
            consumed=[start.id],
            messages=[to_other],
            activities=tasks,
            new_instances=[NewInstance(child_row, child_start)],
        )
        done.instance.custom_status = b'{"progress":50}'
        assert await backend.complete_orchestrations([done]) == [True], (
            "a completion under the current lock token must succeed"
        )

        assert await backend.get_history("inst-1") == history, (
            "new_history must be appended in the given order"
        )
        assert_same_record(
            await backend.get_instance("inst-1"), done.instance,
            "the completion's instance row must be stored",
        )
        assert_same_record(
            await backend.get_instance("child"), child_row, "a NewInstance must create its row"
        )
        items = await backend.lock_orchestrations(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        )
        by_id = {i.instance.instance_id: i for i in items}
        assert sorted(by_id) == ["child", "inst-1", "other"], (
            "after the completion, inst-1 (released, with an unconsumed message), 'other' "
            "(outbound message) and 'child' (new instance) must all be lockable; got "
            f"{describe_items(items)}"
        )
        assert by_id["inst-1"].messages == [unconsumed], (
            "consumed messages must be deleted and unconsumed ones kept; inbox is "
            f"{ids(by_id['inst-1'].messages)}"
        )
        assert by_id["inst-1"].history_length == 3, (
            "history_length must count the stored history events"
        )
        assert by_id["other"].messages == [to_other], "outbound messages must be delivered"
        assert by_id["child"].messages == [child_start], (
            "a NewInstance's start message must be delivered"
        )
        locked = await backend.lock_activities(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        )
        assert sorted((w.task.id, w.task.data) for w in locked) == sorted(
            (t.id, t.data) for t in tasks
        ), "the completion's activity tasks must be enqueued"

    async def test_history_is_appended_after_the_stored_history(self, backend: Backend) -> None:
        await self.start(backend, "inst-1")
        item = await self.lock_one(backend, "inst-1", what="first step")
        step1 = completion_for(item, new_history=[b'{"h":1}', b'{"h":2}'])
        assert await backend.complete_orchestrations([step1]) == [True]

        await backend.send_messages([make_message("inst-1")])
        item = await self.lock_one(backend, "inst-1", what="second step")
        assert item.history_length == 2, "history_length must count the stored history events"
        step2 = completion_for(item, new_history=[b'{"h":3}'])
        assert await backend.complete_orchestrations([step2]) == [True]
        assert await backend.get_history("inst-1") == [b'{"h":1}', b'{"h":2}', b'{"h":3}'], (
            "each step's new_history must be appended after the history already stored"
        )

    async def test_reset_history_replaces_the_stored_history(self, backend: Backend) -> None:
        await self.start_settled(
            backend, "inst-1", RuntimeStatus.RUNNING, history=[b'{"h":"old-1"}', b'{"h":"old-2"}']
        )
        await backend.send_messages([make_message("inst-1", b'{"continue":"as new"}')])
        item = await self.lock_one(backend, "inst-1", what="continue-as-new step")
        fresh = completion_for(
            item, new_history=[b'{"h":"new-1"}'], reset_history=True,
        )
        fresh.instance.execution_id = "exec-2"
        assert await backend.complete_orchestrations([fresh]) == [True]
        assert await backend.get_history("inst-1") == [b'{"h":"new-1"}'], (
            "reset_history=True must delete the stored history before appending new_history"
        )
        row = await backend.get_instance("inst-1")
        assert row is not None and row.execution_id == "exec-2", (
            "the row update must be applied along with reset_history"
        )

    async def test_completion_without_release_keeps_the_lock(self, backend: Backend) -> None:
        await self.start(backend, "inst-1")
        item = await self.lock_one(backend, "inst-1", what="first lock")
        held = completion_for(item, new_history=[b'{"h":1}'], release=False)
        assert await backend.complete_orchestrations([held]) == [True]

        late = make_message("inst-1", b'{"event":"late"}')
        await backend.send_messages([late])
        await self.assert_no_orchestration_work(
            backend, "after a completion with release=False the instance must stay locked"
        )
        follow_up = completion_for(
            item, new_history=[b'{"h":2}'], consumed=[late.id], release=True
        )
        assert await backend.complete_orchestrations([follow_up]) == [True], (
            "after release=False the same lock token must stay current and commit again"
        )
        assert await backend.get_history("inst-1") == [b'{"h":1}', b'{"h":2}']
        await self.assert_no_orchestration_work(
            backend, "the instance was released with an empty inbox"
        )

    async def test_completions_in_one_call_get_one_flag_each(self, backend: Backend) -> None:
        await self.start(backend, "stale")
        lost = await self.lock_one(
            backend, "stale", worker_id="worker-a", lease_seconds=self.short_lease,
            what="lock that will be lost",
        )
        await self.wait_out(self.short_lease)
        taken = await self.lock_one(backend, "stale", worker_id="worker-b", what="takeover")
        await self.start(backend, "good")
        held = await self.lock_one(backend, "good", worker_id="worker-a", what="good lock")

        flags = await backend.complete_orchestrations([
            completion_for(lost, new_history=[b'{"h":"lost"}']),
            completion_for(held, new_history=[b'{"h":"kept"}']),
        ])
        assert flags == [False, True], (
            f"expected one flag per completion, [False (lease lost), True], got {flags}"
        )
        assert await backend.get_history("good") == [b'{"h":"kept"}'], (
            "the completion whose lease was held must be written even when another in the "
            "same call is stale"
        )
        assert await backend.get_history("stale") == [], (
            "the stale completion must write nothing"
        )
        assert await backend.complete_orchestrations(
            [completion_for(taken, new_history=[b'{"h":"new owner"}'])]
        ) == [True], "the new owner of 'stale' must still hold its lock"

    # -- messages -------------------------------------------------------------------------------

    async def test_duplicate_message_id_is_delivered_once(self, backend: Backend) -> None:
        await self.start_settled(backend, "inst-1", RuntimeStatus.RUNNING)
        event = make_message("inst-1", b'{"event":"once"}', message_id="evt-1")
        await backend.send_messages([event])
        await backend.send_messages([dataclasses.replace(event, data=b'{"event":"twice"}')])

        item = await self.lock_one(backend, "inst-1", what="after sending one id twice")
        assert item.messages == [event], (
            "send_messages must ignore a message whose id is already in the inbox; got "
            f"{[(m.id, m.data) for m in item.messages]}"
        )

    async def test_duplicate_message_id_is_ignored_after_it_was_consumed(
        self, backend: Backend
    ) -> None:
        await self.start_settled(backend, "inst-1", RuntimeStatus.RUNNING)
        event = make_message("inst-1", b'{"event":"once"}', message_id="evt-1")
        await backend.send_messages([event])
        item = await self.lock_one(backend, "inst-1", what="the first delivery")
        assert await backend.complete_orchestrations([completion_for(item)]) == [True]

        await backend.send_messages([event])
        await self.assert_no_orchestration_work(
            backend, "re-sending a message id that was already consumed must be a no-op"
        )

    async def test_message_for_an_absent_instance_waits_for_its_row(
        self, backend: Backend
    ) -> None:
        early = make_message("later", b'{"event":"early"}')
        await backend.send_messages([early])
        await self.assert_no_orchestration_work(
            backend, "an instance id without a row must never be locked"
        )
        start = await self.start(backend, "later")
        item = await self.lock_one(backend, "later", what="after the row was created")
        assert item.messages == [early, start], (
            "a message sent before the instance existed must be kept and delivered (in send "
            f"order) once the row exists; got {ids(item.messages)}"
        )

    async def test_delayed_message_is_invisible_until_visible_at(self, backend: Backend) -> None:
        await self.start_settled(backend, "inst-1", RuntimeStatus.RUNNING)
        timer = make_message(
            "inst-1", b'{"timer":"fired"}', visible_at=time.time() + self.short_delay
        )
        now = make_message("inst-1", b'{"event":"now"}')
        await backend.send_messages([timer, now])

        item = await self.lock_one(backend, "inst-1", what="with one visible, one delayed")
        assert item.messages == [now], (
            "a message whose visible_at is in the future must not be handed out; got "
            f"{ids(item.messages)}, expected only {now.id!r}"
        )
        assert await backend.complete_orchestrations([completion_for(item)]) == [True]
        await self.assert_no_orchestration_work(
            backend, "only a delayed message is left, and it is not visible yet"
        )

        await self.wait_out(self.short_delay)
        item = await self.lock_one(backend, "inst-1", what="after visible_at passed")
        assert item.messages == [timer], "the delayed message must be handed out once visible"

    # -- sub-orchestrations (NewInstance) -------------------------------------------------------

    async def lock_parent(self, backend: Backend) -> OrchestrationWorkItem:
        """Start and lock an instance named 'parent' (no other work may be lockable)."""
        await self.start(backend, "parent")
        return await self.lock_one(backend, "parent", what="the parent step")

    @staticmethod
    async def commit_new_instance(
        backend: Backend, parent: OrchestrationWorkItem, new: NewInstance
    ) -> None:
        done = completion_for(parent, new_instances=[new])
        assert await backend.complete_orchestrations([done]) == [True], (
            "the parent's step creating a sub-orchestration must commit"
        )

    async def test_new_instance_creates_an_absent_instance(self, backend: Backend) -> None:
        child_row = make_record("child", name="Child")
        child_start = make_message("child")
        parent = await self.lock_parent(backend)
        await self.commit_new_instance(backend, parent, NewInstance(child_row, child_start))

        assert_same_record(
            await backend.get_instance("child"), child_row, "NewInstance for an absent id"
        )
        item = await self.lock_one(backend, "child", what="the new child")
        assert item.messages == [child_start], "the child's start message must be delivered"

    async def test_new_instance_replaces_a_terminal_instance(self, backend: Backend) -> None:
        await self.start_settled(backend, "child", RuntimeStatus.FAILED, execution_id="old")
        parent = await self.lock_parent(backend)
        await backend.send_messages([make_message("child", b'{"late":"event"}')])

        child_row = make_record("child", name="Child", execution_id="new")
        child_start = make_message("child")
        await self.commit_new_instance(backend, parent, NewInstance(child_row, child_start))

        assert_same_record(
            await backend.get_instance("child"), child_row,
            "NewInstance over a terminal instance must replace its row",
        )
        assert await backend.get_history("child") == [], (
            "NewInstance over a terminal instance must discard its history"
        )
        item = await self.lock_one(backend, "child", what="the replaced child")
        assert item.messages == [child_start], (
            "NewInstance over a terminal instance must discard its old inbox; got "
            f"{ids(item.messages)}"
        )

    async def test_new_instance_for_a_live_instance_only_delivers_start(
        self, backend: Backend
    ) -> None:
        live_row = await self.start_settled(
            backend, "child", RuntimeStatus.RUNNING, execution_id="live"
        )
        child_start = make_message("child")
        parent = await self.lock_parent(backend)
        await self.commit_new_instance(
            backend, parent, NewInstance(make_record("child", execution_id="intruder"), child_start)
        )

        assert_same_record(
            await backend.get_instance("child"), live_row,
            "NewInstance for a live instance must leave its row alone",
        )
        assert await backend.get_history("child") == [b'{"h":"started"}'], (
            "NewInstance for a live instance must leave its history alone"
        )
        item = await self.lock_one(backend, "child", what="the live child")
        assert item.messages == [child_start], (
            "NewInstance for a live instance must still deliver its start message (the runtime "
            "answers the caller with a failure)"
        )

    async def test_messages_to_a_new_instance_in_the_same_step_follow_its_start_in_order(
        self, backend: Backend
    ) -> None:
        """Durable entities rely on this: a step's first message to an entity is the start
        message of a NewInstance (creating the entity if absent) and the rest are ordinary
        messages, which must arrive after it, in order, whether the entity existed or not."""
        for existing in (False, True):
            target = f"entity-{existing}"
            if existing:
                await self.start_settled(backend, target, RuntimeStatus.RUNNING)
            first = make_message(target, b'{"op":1}')
            rest = [make_message(target, b'{"op":%d}' % n) for n in (2, 3)]
            await self.start(backend, f"parent-{existing}")
            parent = await self.lock_one(backend, f"parent-{existing}", what="the sender")
            done = completion_for(parent, new_instances=[NewInstance(
                make_record(target, execution_id="e"), first)], messages=rest)
            assert await backend.complete_orchestrations([done]) == [True]
            item = await self.lock_one(backend, target, what=f"the target (existed: {existing})")
            assert item.messages == [first, *rest], (
                f"messages a step sends to an instance it creates (or finds live: {existing}) "
                f"must follow the NewInstance start message in the order sent; got "
                f"{ids(item.messages)}"
            )
            assert await backend.complete_orchestrations(
                [completion_for(item, consumed=ids(item.messages))]) == [True]

    # -- activities -----------------------------------------------------------------------------

    async def enqueue_activity(self, backend: Backend, instance_id: str = "inst-1") -> ActivityTask:
        """Start `instance_id` and run a step that schedules one activity task."""
        await self.start(backend, instance_id)
        item = await self.lock_one(backend, instance_id, what="the step scheduling an activity")
        task = make_task(instance_id)
        assert await backend.complete_orchestrations(
            [completion_for(item, activities=[task])]
        ) == [True]
        return task

    @staticmethod
    async def lock_task(
        backend: Backend, worker_id: str, lease_seconds: float, what: str
    ) -> ActivityWorkItem:
        items = await backend.lock_activities(
            worker_id, max_items=10, lease_seconds=lease_seconds
        )
        assert len(items) == 1, (
            f"{what}: expected exactly one activity task, got {[i.task.id for i in items]}"
        )
        return items[0]

    async def test_activity_lease_expiry_redelivers_the_task(self, backend: Backend) -> None:
        task = await self.enqueue_activity(backend)
        first = await self.lock_task(backend, "worker-a", self.short_lease, "first lock")
        assert first.task == task, "lock_activities must hand out the enqueued task unchanged"
        assert first.dequeue_count == 1, "the first hand-out has dequeue_count 1"

        assert await backend.lock_activities(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "a task locked under an unexpired lease must not be handed out again"

        await self.wait_out(self.short_lease)
        second = await self.lock_task(backend, "worker-b", LONG_LEASE, "after lease expiry")
        assert second.task == task, "the expired task must be handed out again (at least once)"
        assert second.dequeue_count == 2, (
            f"dequeue_count must count hand-outs: expected 2, got {second.dequeue_count}"
        )
        assert second.lock_token != first.lock_token, "a re-delivery must have a new lock token"

    async def test_complete_activities_deletes_the_task_and_delivers_the_result(
        self, backend: Backend
    ) -> None:
        task = await self.enqueue_activity(backend)
        work = await self.lock_task(backend, "worker-a", LONG_LEASE, "first lock")
        result = make_message("inst-1", b'{"result":42}')
        await backend.complete_activities([ActivityResult(task.id, work.lock_token, result)])

        item = await self.lock_one(backend, "inst-1", what="the activity's result")
        assert item.messages == [result], "complete_activities must deliver the result message"
        await backend.abandon_orchestration("inst-1", item.lock_token)
        await backend.abandon_activity(task.id, work.lock_token)
        assert await backend.lock_activities(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "complete_activities must delete the task (abandoning it after must not revive it)"

    async def test_complete_activities_is_idempotent(self, backend: Backend) -> None:
        task = await self.enqueue_activity(backend)
        slow = await self.lock_task(backend, "worker-a", self.short_lease, "first lock")
        await self.wait_out(self.short_lease)
        fast = await self.lock_task(backend, "worker-b", LONG_LEASE, "re-delivery")

        result = make_message("inst-1", b'{"result":"fast"}', message_id="result-1")
        await backend.complete_activities([ActivityResult(task.id, fast.lock_token, result)])
        late = dataclasses.replace(result, data=b'{"result":"slow"}')
        await backend.complete_activities([ActivityResult(task.id, slow.lock_token, late)])
        await backend.complete_activities([ActivityResult(task.id, fast.lock_token, result)])

        item = await self.lock_one(backend, "inst-1", what="the activity's result")
        assert item.messages == [result], (
            "a result for a task already completed (by another worker, or repeated) must be "
            f"ignored; got {[(m.id, m.data) for m in item.messages]}"
        )
        assert await backend.complete_orchestrations([completion_for(item)]) == [True]

        await backend.complete_activities([ActivityResult(task.id, fast.lock_token, result)])
        await self.assert_no_orchestration_work(
            backend, "a repeated result must be ignored even after its message was consumed"
        )

    async def test_abandon_activity_makes_it_available_now(self, backend: Backend) -> None:
        task = await self.enqueue_activity(backend)
        first = await self.lock_task(backend, "worker-a", LONG_LEASE, "first lock")
        await backend.abandon_activity(task.id, first.lock_token)

        second = await self.lock_task(backend, "worker-b", LONG_LEASE, "after abandon")
        assert second.task == task and second.dequeue_count == 2, (
            "an abandoned task must be handed out again at once, with dequeue_count 2"
        )
        await backend.abandon_activity(task.id, first.lock_token)
        assert await backend.lock_activities(
            "worker-c", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "abandon_activity with a stale token must be ignored"

    async def test_renew_activity_lease(self, backend: Backend) -> None:
        task = await self.enqueue_activity(backend)
        work = await self.lock_task(backend, "worker-a", self.short_lease, "first lock")
        assert await backend.renew_activity_lease(task.id, work.lock_token, LONG_LEASE) is True, (
            "renew_activity_lease with the current token must return True"
        )
        await self.wait_out(self.short_lease)
        assert await backend.lock_activities(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "a renewed activity lease must hold past the original expiry"
        assert await backend.renew_activity_lease(task.id, "not-a-token", LONG_LEASE) is False, (
            "renew_activity_lease with a token that is not current must return False"
        )

    async def test_renew_activity_lease_after_takeover_fails(self, backend: Backend) -> None:
        task = await self.enqueue_activity(backend)
        stale = await self.lock_task(backend, "worker-a", self.short_lease, "first lock")
        await self.wait_out(self.short_lease)
        await self.lock_task(backend, "worker-b", LONG_LEASE, "takeover")
        assert await backend.renew_activity_lease(task.id, stale.lock_token, LONG_LEASE) is False, (
            "renew_activity_lease must return False once another worker took the task over"
        )

    async def test_lock_activities_honours_max_items(self, backend: Backend) -> None:
        await self.start(backend, "inst-1")
        item = await self.lock_one(backend, "inst-1", what="scheduling three activities")
        tasks = [make_task("inst-1") for _ in range(3)]
        assert await backend.complete_orchestrations(
            [completion_for(item, activities=tasks)]
        ) == [True]
        batch = await backend.lock_activities("worker-a", max_items=2, lease_seconds=LONG_LEASE)
        rest = await backend.lock_activities("worker-b", max_items=10, lease_seconds=LONG_LEASE)
        assert (len(batch), len(rest)) == (2, 1), (
            f"max_items=2 must lock 2 of 3 tasks and leave 1; got {len(batch)} then {len(rest)}"
        )
        assert {w.task.id for w in batch + rest} == {t.id for t in tasks}

    # -- local hand-offs ------------------------------------------------------------------------

    async def test_activity_lock_stores_the_tasks_locked_by_the_completing_worker(
        self, backend: Backend
    ) -> None:
        await self.start(backend, "inst-1")
        item = await self.lock_one(backend, "inst-1", what="a step keeping its activities")
        tasks = [make_task("inst-1") for _ in range(2)]
        kept = ActivityLock("kept-token", self.short_lease)
        assert await backend.complete_orchestrations(
            [completion_for(item, activities=tasks, activity_lock=kept)]
        ) == [True]
        assert await backend.lock_activities(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        ) == [], (
            "tasks committed with an ActivityLock are held by the completing worker: "
            "lock_activities must not hand them out while that lease lasts"
        )
        assert await backend.renew_activity_lease(tasks[0].id, "kept-token", LONG_LEASE), (
            "renew_activity_lease must accept the ActivityLock's token"
        )
        await backend.abandon_activity(tasks[0].id, "kept-token")
        again = await self.lock_task(backend, "worker-b", LONG_LEASE, "after abandon")
        assert again.task == tasks[0] and again.dequeue_count == 2, (
            "abandon_activity with the ActivityLock's token must release the task, and its "
            f"next hand-out counts as the second (got dequeue_count {again.dequeue_count})"
        )
        await self.wait_out(self.short_lease)
        expired = await self.lock_task(backend, "worker-c", LONG_LEASE, "after lease expiry")
        assert expired.task == tasks[1] and expired.dequeue_count == 2, (
            "a kept task whose lease expired must be handed out again (its holder may have "
            f"died), with dequeue_count 2; got {expired.task.id} / {expired.dequeue_count}"
        )

    async def test_complete_activities_accepts_the_activity_lock_token(
        self, backend: Backend
    ) -> None:
        await self.start(backend, "inst-1")
        item = await self.lock_one(backend, "inst-1", what="a step keeping its activity")
        task = make_task("inst-1")
        assert await backend.complete_orchestrations(
            [completion_for(item, activities=[task],
                            activity_lock=ActivityLock("kept-token", LONG_LEASE))]
        ) == [True]
        result = make_message("inst-1", b'{"result":1}')
        await backend.complete_activities([ActivityResult(task.id, "kept-token", result)])
        woken = await self.lock_one(backend, "inst-1", what="the kept activity's result")
        assert woken.messages == [result], "the kept task's result must be delivered"
        await backend.abandon_activity(task.id, "kept-token")
        assert await backend.lock_activities(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "complete_activities must delete a kept task like any other"

    async def test_complete_activities_may_lock_the_instances_it_wakes(
        self, backend: Backend
    ) -> None:
        task = await self.enqueue_activity(backend, "inst-1")
        await self.start(backend, "bystander")
        work = await self.lock_task(backend, "worker-a", LONG_LEASE, "the activity")
        result = make_message("inst-1", b'{"result":7}')
        lock = OrchestrationLock("worker-a", max_items=10, lease_seconds=LONG_LEASE)
        items = list(await backend.complete_activities(
            [ActivityResult(task.id, work.lock_token, result)], lock=lock
        ) or [])
        assert [i.instance.instance_id for i in items] in ([], ["inst-1"]), (
            "complete_activities(lock=...) may lock only instances its results went to; got "
            f"{describe_items(items)}"
        )
        rest = await backend.lock_orchestrations(
            "worker-b", max_items=10, lease_seconds=LONG_LEASE
        )
        handed = items + rest
        assert sorted(i.instance.instance_id for i in handed) == ["bystander", "inst-1"], (
            "every lockable instance must be handed out exactly once, by complete_activities "
            f"or by lock_orchestrations; got {describe_items(handed)}"
        )
        woken = next(i for i in handed if i.instance.instance_id == "inst-1")
        assert woken.messages == [result], "the woken instance's item must hold the result"
        assert await backend.complete_orchestrations([completion_for(woken)]) == [True], (
            "a work item returned by complete_activities must be committable under its token"
        )

    async def test_complete_activities_does_not_lock_a_locked_instance(
        self, backend: Backend
    ) -> None:
        task = await self.enqueue_activity(backend, "inst-1")
        work = await self.lock_task(backend, "worker-a", LONG_LEASE, "the activity")
        await backend.send_messages([make_message("inst-1", b'{"event":"x"}')])
        holder = await self.lock_one(backend, "inst-1", what="another worker's step")
        lock = OrchestrationLock("worker-a", max_items=10, lease_seconds=LONG_LEASE)
        items = list(await backend.complete_activities(
            [ActivityResult(task.id, work.lock_token, make_message("inst-1"))], lock=lock
        ) or [])
        assert items == [], (
            "complete_activities(lock=...) must not lock an instance another worker holds; "
            f"got {describe_items(items)}"
        )
        assert await backend.complete_orchestrations([completion_for(holder)]) == [True], (
            "the holder's lease must be untouched by complete_activities"
        )

    # -- queries --------------------------------------------------------------------------------

    async def make_population(self, backend: Backend) -> None:
        """Four instances with distinct status, name, id prefix and created_time."""
        await self.start_settled(backend, "order-1", RuntimeStatus.PENDING,
                                 name="Order", created_time=T0)
        await self.start_settled(backend, "order-2", RuntimeStatus.RUNNING,
                                 name="Order", created_time=T0 + 10)
        await self.start_settled(backend, "refund-1", RuntimeStatus.COMPLETED,
                                 name="Refund", created_time=T0 + 20)
        await self.start_settled(backend, "refund-2", RuntimeStatus.FAILED,
                                 name="Refund", created_time=T0 + 30)

    @staticmethod
    async def query_ids(backend: Backend, query: InstanceQuery) -> list[str]:
        page, continuation = await backend.query_instances(query, page_size=100)
        assert continuation is None, "a page holding every match must have no continuation"
        return [r.instance_id for r in page]

    async def test_query_without_filters_returns_all_in_created_order(
        self, backend: Backend
    ) -> None:
        await self.make_population(backend)
        assert await self.query_ids(backend, InstanceQuery()) == [
            "order-1", "order-2", "refund-1", "refund-2"
        ], "an empty query must match every instance, ordered by created_time"

    async def test_query_filters_by_runtime_status(self, backend: Backend) -> None:
        await self.make_population(backend)
        query = InstanceQuery(
            runtime_status=frozenset({RuntimeStatus.RUNNING, RuntimeStatus.FAILED})
        )
        assert await self.query_ids(backend, query) == ["order-2", "refund-2"], (
            "runtime_status must match any of the given statuses"
        )

    async def test_query_filters_by_created_time_range(self, backend: Backend) -> None:
        await self.make_population(backend)
        assert await self.query_ids(
            backend, InstanceQuery(created_from=T0 + 10, created_to=T0 + 30)
        ) == ["order-2", "refund-1"], "created_from is inclusive and created_to exclusive"
        assert await self.query_ids(backend, InstanceQuery(created_from=T0 + 20)) == [
            "refund-1", "refund-2"
        ], "created_from alone is an inclusive lower bound"
        assert await self.query_ids(backend, InstanceQuery(created_to=T0 + 10)) == [
            "order-1"
        ], "created_to alone is an exclusive upper bound"

    async def test_query_filters_by_name(self, backend: Backend) -> None:
        await self.make_population(backend)
        assert await self.query_ids(backend, InstanceQuery(name="Refund")) == [
            "refund-1", "refund-2"
        ], "name must match the orchestration name exactly"
        assert await self.query_ids(backend, InstanceQuery(name="Ref")) == [], (
            "name is an exact match, not a prefix"
        )

    async def test_query_filters_by_instance_id_prefix(self, backend: Backend) -> None:
        await self.make_population(backend)
        assert await self.query_ids(backend, InstanceQuery(instance_id_prefix="order-")) == [
            "order-1", "order-2"
        ], "instance_id_prefix must match ids that start with it"
        assert await self.query_ids(
            backend, InstanceQuery(instance_id_prefix="order-", name="Order",
                                   runtime_status=frozenset({RuntimeStatus.PENDING}))
        ) == ["order-1"], "filters must combine with AND"

    async def test_query_pages_through_continuation_tokens(self, backend: Backend) -> None:
        created = {"e": T0 + 3, "b": T0 + 1, "d": T0 + 2, "a": T0 + 1, "c": T0}
        for instance_id, created_time in created.items():
            await self.start_settled(
                backend, instance_id, RuntimeStatus.RUNNING, created_time=created_time
            )
        expected = ["c", "a", "b", "d", "e"]

        seen: list[str] = []
        continuation: str | None = None
        for _ in range(10):
            page, continuation = await backend.query_instances(
                InstanceQuery(), page_size=2, continuation=continuation
            )
            assert len(page) <= 2, f"page_size=2 must bound a page, got {len(page)} rows"
            seen += [r.instance_id for r in page]
            if continuation is None:
                break
            assert isinstance(continuation, str), "a continuation token must be a str"
        assert continuation is None, "paging never ended: the continuation token never became None"
        assert seen == expected, (
            "paging must return every instance exactly once, ordered by (created_time, "
            f"instance_id); got {seen}, expected {expected}"
        )

    # -- purge ----------------------------------------------------------------------------------

    async def test_purge_by_id_deletes_only_a_terminal_instance(self, backend: Backend) -> None:
        live_row = await self.start_settled(backend, "live", RuntimeStatus.RUNNING)
        await self.start_settled(backend, "done", RuntimeStatus.COMPLETED)

        result = await backend.purge_instances(instance_id="live")
        assert result.deleted_instance_count == 0, "a live instance must never be purged"
        assert_same_record(await backend.get_instance("live"), live_row,
                           "purge_instances must leave a live instance alone")
        assert await backend.get_history("live") == [b'{"h":"started"}']

        result = await backend.purge_instances(instance_id="done")
        assert result.deleted_instance_count == 1, "purging a terminal instance deletes it"
        assert await backend.get_instance("done") is None, "a purged instance has no row"

        result = await backend.purge_instances(instance_id="never-existed")
        assert result.deleted_instance_count == 0, "purging an unknown id deletes nothing"

    async def test_purged_instance_loses_history_inbox_and_tasks(self, backend: Backend) -> None:
        await self.start(backend, "done")
        item = await self.lock_one(backend, "done", what="the final step")
        final = completion_for(
            item,
            status=RuntimeStatus.TERMINATED,
            new_history=[b'{"h":1}', b'{"h":2}'],
            activities=[make_task("done")],
        )
        assert await backend.complete_orchestrations([final]) == [True]
        await backend.send_messages([make_message("done", b'{"late":"event"}')])

        result = await backend.purge_instances(instance_id="done")
        assert result.deleted_instance_count == 1
        assert await backend.get_history("done") == [], "purge must delete the history"
        assert await backend.lock_activities(
            "worker-a", max_items=10, lease_seconds=LONG_LEASE
        ) == [], "purge must delete the instance's pending activity tasks"
        start = await self.start(backend, "done")
        item = await self.lock_one(backend, "done", what="an instance re-created after purge")
        assert item.messages == [start], (
            f"purge must delete the instance's inbox; got {ids(item.messages)}"
        )

    async def test_purge_by_query_deletes_matching_terminal_instances(
        self, backend: Backend
    ) -> None:
        await self.start_settled(backend, "a-done", RuntimeStatus.COMPLETED, name="A")
        await self.start_settled(backend, "a-failed", RuntimeStatus.FAILED, name="A")
        await self.start_settled(backend, "a-running", RuntimeStatus.RUNNING, name="A")
        await self.start_settled(backend, "b-done", RuntimeStatus.COMPLETED, name="B")

        result = await backend.purge_instances(query=InstanceQuery(name="A"))
        assert result.deleted_instance_count == 2, (
            f"expected the 2 terminal instances named 'A' to be purged, got "
            f"{result.deleted_instance_count}"
        )
        remaining = await self.query_ids(backend, InstanceQuery())
        assert remaining == ["a-running", "b-done"], (
            "purge by query must delete only terminal instances matching the query; "
            f"remaining: {remaining}"
        )
        result = await backend.purge_instances(
            query=InstanceQuery(runtime_status=frozenset({RuntimeStatus.RUNNING}))
        )
        assert result.deleted_instance_count == 0, (
            "a query that selects live instances must still purge none of them"
        )
        assert await backend.get_instance("a-running") is not None

    # -- wake-ups -------------------------------------------------------------------------------

    @pytest.mark.parametrize("kind", list(WorkKind), ids=lambda k: k.value)
    async def test_wait_for_work_returns_by_its_timeout(
        self, backend: Backend, kind: WorkKind
    ) -> None:
        began = time.monotonic()
        await asyncio.wait_for(backend.wait_for_work(kind, 0.2), timeout=5.0)
        assert time.monotonic() - began < 2.0, (
            "wait_for_work must return once its timeout has passed, even with no work"
        )
