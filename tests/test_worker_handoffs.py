"""The worker's round-trip savings: a step keeps its activity tasks when it has free activity
slots, and committing results locks the instances they wake. These are optimisations only:
the outcome must be the same as through the queues, and work a worker cannot take stays
available to others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import aioflow
from aioflow.backend import Backend
from aioflow.testing.memory import MemoryBackend

app = aioflow.App()


@app.activity
async def double(x: int) -> int:
    return 2 * x


@app.activity
async def slow_double(x: int) -> int:
    await asyncio.sleep(0.05)
    return 2 * x


@app.orchestrator
async def chain(ctx: aioflow.OrchestrationContext, n: int) -> int:
    value = 1
    for _ in range(n):
        value = await ctx.call_activity(double, value)
    return value


@app.orchestrator
async def fan_out(ctx: aioflow.OrchestrationContext, n: int) -> int:
    results = await asyncio.gather(*(ctx.call_activity(slow_double, i) for i in range(n)))
    return sum(results)


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        store: Backend = MemoryBackend()
    else:
        store = aioflow.connect(f"sqlite:///{tmp_path / 'handoffs.db'}")
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_chain_keeps_its_activities_and_is_handed_its_next_steps(
    backend: Backend,
) -> None:
    worker = aioflow.Worker(app, backend, poll_interval=0.05, watchdog_seconds=0)
    client = aioflow.Client(backend)
    async with worker:
        iid = await client.start_new(chain, 20)
        status = await client.wait_for_completion(iid, timeout=10)
    assert status.output == 2**20, f"the chain must compute 2**20, got {status.output!r}"
    assert worker.stats["activities_kept"] == 20, (
        "each step's single activity fits in the free slots, so the worker must keep it "
        f"instead of queueing it: stats {dict(worker.stats)}"
    )
    assert worker.stats["activities_locked"] == 0, (
        f"no activity should have needed lock_activities: stats {dict(worker.stats)}"
    )
    assert worker.stats["handed_over"] >= 19, (
        "committing each result should lock the instance it wakes (the last step may race the "
        f"poll): stats {dict(worker.stats)}"
    )


@pytest.mark.asyncio
async def test_a_fan_out_wider_than_the_free_slots_goes_through_the_queue(
    backend: Backend,
) -> None:
    busy = aioflow.Worker(app, backend, max_concurrent_activities=4, poll_interval=0.05,
                          watchdog_seconds=0)
    helper = aioflow.Worker(app, backend, max_concurrent_activities=4, poll_interval=0.05,
                            watchdog_seconds=0)
    client = aioflow.Client(backend)
    async with busy, helper:
        iid = await client.start_new(fan_out, 12)
        status = await client.wait_for_completion(iid, timeout=10)
    assert status.output == 2 * sum(range(12)), f"wrong fan-in result {status.output!r}"
    assert busy.stats["activities_kept"] == helper.stats["activities_kept"] == 0, (
        "12 activities do not fit in 4 free slots: they must be queued, not kept"
    )
    assert busy.stats["activities"] + helper.stats["activities"] == 12
    assert busy.stats["activities"] > 0 and helper.stats["activities"] > 0, (
        "queued activities are shared between workers: "
        f"{busy.stats['activities']} vs {helper.stats['activities']}"
    )


@pytest.mark.asyncio
async def test_kept_activities_of_a_worker_that_vanished_are_run_by_another(
    backend: Backend,
) -> None:
    """A worker commits a step keeping its activity, then dies before running it: after the
    lease expires another worker runs it and the instance completes."""
    lease = 0.5
    doomed = aioflow.Worker(app, backend, lease_seconds=lease, poll_interval=0.05,
                            watchdog_seconds=0)
    client = aioflow.Client(backend)
    await doomed.start()
    started = asyncio.Event()
    original = doomed._start_activity

    def vanish(item: object) -> None:  # the step committed; the process "dies" here
        started.set()

    doomed._start_activity = vanish  # type: ignore[method-assign]
    iid = await client.start_new(chain, 1)
    await asyncio.wait_for(started.wait(), 5)
    await doomed.stop()
    doomed._start_activity = original  # type: ignore[method-assign]

    survivor = aioflow.Worker(app, backend, lease_seconds=lease, poll_interval=0.05,
                              watchdog_seconds=0)
    async with survivor:
        status = await client.wait_for_completion(iid, timeout=10)
    assert status.output == 2, f"the kept activity must run after its lease expired: {status}"
    assert survivor.stats["activities_locked"] == 1, (
        f"the survivor must have locked the abandoned task: {dict(survivor.stats)}"
    )
