"""The in-memory backend: the conformance suite, plus what only the memory backend offers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from aioflow.backend import (
    Backend,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    OrchestrationWorkItem,
    WorkKind,
)
from aioflow.errors import ConfigurationError
from aioflow.status import RuntimeStatus
from aioflow.testing.conformance import BackendContractSuite
from aioflow.testing.memory import MemoryBackend, open_backend


class TestMemoryBackendContract(BackendContractSuite):
    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        async with MemoryBackend() as store:
            yield store


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(instance_id: str) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        name="Workflow",
        execution_id="exec-1",
        runtime_status=RuntimeStatus.PENDING,
        created_time=1_000.0,
        last_updated_time=1_000.0,
    )


def consume(item: OrchestrationWorkItem, message_ids: list[str]) -> OrchestrationCompletion:
    """A completion that only consumes `message_ids` and releases the instance."""
    return OrchestrationCompletion(
        instance_id=item.instance.instance_id,
        lock_token=item.lock_token,
        instance=item.instance,
        consumed=message_ids,
    )


def test_memory_backend_satisfies_the_protocol() -> None:
    assert isinstance(MemoryBackend(), Backend)


async def test_next_visible_at_follows_delayed_messages_and_leases() -> None:
    clock = FakeClock(1_000.0)
    store = MemoryBackend(clock=clock)
    assert store.next_visible_at() is None, "an empty backend has nothing coming"

    await store.create_instance(record("inst-1"), Message("start", "inst-1", b"{}"))
    assert store.next_visible_at() is None, "work available now is not 'in the future'"

    await store.send_messages([Message("orphan-timer", "ghost", b"{}", visible_at=1_005.0)])
    assert store.next_visible_at() is None, (
        "a delayed message for an id without a row never makes work available"
    )

    [item] = await store.lock_orchestrations("w", max_items=1, lease_seconds=30.0)
    assert store.next_visible_at() == 1_030.0, "the lease expiry hands the start out again"

    await store.send_messages([Message("timer", "inst-1", b"{}", visible_at=1_010.0)])
    await store.abandon_orchestration("inst-1", item.lock_token, retry_after=20.0)
    assert store.next_visible_at() == 1_020.0, "abandon's retry_after now bounds the instance"

    clock.now = 1_020.0
    [item] = await store.lock_orchestrations("w", max_items=1, lease_seconds=30.0)
    assert [m.id for m in item.messages] == ["start", "timer"]
    assert (await store.complete_orchestrations([consume(item, ["start"])])) == [True]
    assert store.next_visible_at() is None, "the timer is already visible: nothing in the future"

    clock.now = 1_021.0
    [item] = await store.lock_orchestrations("w", max_items=1, lease_seconds=30.0)
    assert (await store.complete_orchestrations([consume(item, ["timer"])])) == [True]
    await store.send_messages([Message("later", "inst-1", b"{}", visible_at=1_500.0)])
    assert store.next_visible_at() == 1_500.0, "a delayed message of a free instance"


async def test_wait_for_work_wakes_on_new_work_and_at_a_delayed_message() -> None:
    store = MemoryBackend()
    await store.create_instance(record("inst-1"), Message("start", "inst-1", b"{}"))
    [item] = await store.lock_orchestrations("w", max_items=1, lease_seconds=30.0)
    assert (await store.complete_orchestrations([consume(item, ["start"])])) == [True]

    waiter = asyncio.create_task(store.wait_for_work(WorkKind.ORCHESTRATION, 30.0))
    await asyncio.sleep(0.01)
    assert not waiter.done(), "no work yet: wait_for_work must still be waiting"
    await store.send_messages([Message("event", "inst-1", b"{}")])
    await asyncio.wait_for(waiter, 1.0)

    [item] = await store.lock_orchestrations("w", max_items=1, lease_seconds=30.0)
    assert (await store.complete_orchestrations([consume(item, ["event"])])) == [True]
    await store.send_messages([Message("timer", "inst-1", b"{}", visible_at=time.time() + 0.2)])
    began = time.monotonic()
    await store.wait_for_work(WorkKind.ORCHESTRATION, 30.0)
    assert 0.1 <= time.monotonic() - began < 1.0, (
        "wait_for_work must return when the delayed message becomes visible, not at timeout"
    )


async def test_completions_in_one_call_are_checked_one_after_another() -> None:
    store = MemoryBackend()
    await store.create_instance(record("inst-1"), Message("start", "inst-1", b"{}"))
    [item] = await store.lock_orchestrations("w", max_items=1, lease_seconds=30.0)
    first = consume(item, ["start"])
    second = OrchestrationCompletion(
        instance_id="inst-1", lock_token=item.lock_token, instance=item.instance,
        new_history=[b"second"],
    )
    assert await store.complete_orchestrations([first, second]) == [True, False], (
        "the first completion released the lock, so the second one's token is no longer current"
    )
    assert await store.get_history("inst-1") == []


def test_open_backend_shares_named_backends_and_isolates_anonymous_ones() -> None:
    name = f"tests-{uuid.uuid4().hex}"
    assert open_backend(f"memory://{name}") is open_backend(f"memory://{name}"), (
        "the same name must give the same in-process backend"
    )
    assert open_backend(f"memory://{name}") is not open_backend(f"memory://{name}-other")
    assert open_backend("memory://") is not open_backend("memory://"), (
        "memory:// without a name must give a fresh backend every time"
    )


async def test_named_backend_keeps_its_state_after_close() -> None:
    url = f"memory://tests-{uuid.uuid4().hex}"
    async with open_backend(url) as store:
        await store.create_instance(record("kept"), Message("start", "kept", b"{}"))
    assert await open_backend(url).get_instance("kept") is not None


@pytest.mark.parametrize(
    "url", ["sqlite:///x.db", "memory:/", "memory", "memory:///", "memory://a/b", "memory://x?y=1"]
)
def test_open_backend_rejects_other_urls_with_a_clear_message(url: str) -> None:
    with pytest.raises(ConfigurationError, match="memory://") as raised:
        open_backend(url)
    assert repr(url) in str(raised.value), "the error must quote the URL it was given"
