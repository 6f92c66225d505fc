"""Crash recovery on the in-memory backend: every write fails in turn, before and after it is
applied, and the workflow still completes exactly once with the right output."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest_asyncio

from aioflow import Client, RuntimeStatus, Worker
from aioflow.backend import Backend
from aioflow.events import TaskScheduled
from aioflow.testing.conformance import FaultInjectionSuite, crash_app
from aioflow.testing.faults import FaultyBackend
from aioflow.testing.memory import MemoryBackend


class TestMemoryBackendFaults(FaultInjectionSuite):
    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        async with MemoryBackend() as store:
            yield store


class _Gated(FaultyBackend):
    """Hands out orchestration work only `allowed` times: lets a test choose which of several
    workers takes each step of an instance."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.allowed = 0

    async def lock_orchestrations(self, worker_id: str, **kwargs: Any) -> list[Any]:
        if self.allowed <= 0:
            return []
        items = await self.inner.lock_orchestrations(worker_id, **kwargs)
        if items:
            self.allowed -= 1
        return items

    async def complete_activities(self, results: Any, *, lock: Any = None) -> list[Any]:
        # The worker may lock the woken instance while committing a result: gate that too.
        if lock is not None and self.allowed > 0:
            lock = dataclasses.replace(lock, max_items=min(lock.max_items, self.allowed))
        else:
            lock = None
        items = await super().complete_activities(results, lock=lock)
        self.allowed -= len(items)
        return items


async def _until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


async def test_a_worker_does_not_reuse_its_cached_copy_of_an_older_execution() -> None:
    """Worker A caches execution 1 of a continue-as-new loop; worker B continues it as new and
    takes execution 2 to the same history length. When A gets execution 2's next message, its
    cached copy is stale although the lengths match: A must replay, not drop the message."""
    store = MemoryBackend()
    a, b = _Gated(store), _Gated(store)
    client = Client(store)
    spec = {"value": 0, "rounds": 2}
    async with Worker(crash_app.app, a, poll_interval=0.01, watchdog_seconds=0), \
            Worker(crash_app.app, b, poll_interval=0.01, watchdog_seconds=0):
        iid = await client.start_new(crash_app.loop_flow, spec, instance_id="loop")
        record = await store.get_instance(iid)
        assert record is not None
        first_execution = record.execution_id

        def activity_scheduled(*, in_first_execution: bool) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                row = await store.get_instance(iid)
                history = await client.get_history(iid)
                return (row is not None
                        and (row.execution_id == first_execution) == in_first_execution
                        and any(isinstance(e, TaskScheduled) for e in history))
            return check

        a.allowed = 1  # A: execution 1 starts and schedules its activity (A caches it)
        await _until(activity_scheduled(in_first_execution=True),
                     "execution 1 scheduled its activity")
        b.allowed = 2  # B: execution 1 continues as new; execution 2 schedules its activity
        await _until(activity_scheduled(in_first_execution=False),
                     "execution 2 scheduled its activity")
        a.allowed = 100  # A gets execution 2's activity result
        status = await client.wait_for_completion(iid, timeout=5.0)
    assert status.runtime_status is RuntimeStatus.COMPLETED
    assert status.output["result"] == crash_app.expected_result("crash.loop", spec)
