"""Crash recovery and concurrency: the conformance tests that run whole workflows on a backend.

The correctness contract (DESIGN.md) promises that no step of a crash, before, during or after
any write, may lose a message or an event raised by a client, double-complete an instance or
leave it stuck, and that many workers in many processes may share one backend. These suites
prove it for a backend, end to end, through the real `Worker` and `Client`:

* `FaultInjectionSuite` runs one workflow that makes every kind of write (`crash_app`'s
  `fault_workflow`) and fails each of its writes in turn, once before the write reaches the
  backend and once after the backend applied it (`aioflow.testing.faults.FaultyBackend`). The
  workflow must still complete with the output of an uninterrupted run, exactly once.
* `MultiProcessSuite` runs worker child processes (`_worker_main`) sharing one backend by URL:
  first to show that they share the work and finish every instance exactly once, then while a
  seeded "chaos monkey" kills workers with SIGKILL at random moments.

"Exactly once" is checked on what the backend stored: each instance is Completed with the right
output, and its history holds one ExecutionStarted, one ExecutionCompleted (the last event), one
result per scheduled task and no result twice. Activities themselves may run more than once
(at-least-once); that is allowed and not checked.

Subclass a suite and provide its fixture, as for `BackendContractSuite`::

    class TestMyBackendFaults(FaultInjectionSuite):
        @pytest_asyncio.fixture
        async def backend(self, tmp_path):       # a fresh, empty backend per test
            store = await open_my_backend(tmp_path)
            yield store
            await store.close()

    class TestMyBackendProcesses(MultiProcessSuite):
        @pytest.fixture
        def backend_url(self, tmp_path):         # a fresh, empty store other processes can open
            return f"mybackend://{tmp_path}/store"
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from aioflow.backend import Backend
from aioflow.client import Client
from aioflow.connect import ENV_VAR, connect
from aioflow.entities import EntityId
from aioflow.errors import InstanceExistsError, InstanceNotRunningError
from aioflow.events import (
    EntityOperationSent,
    ExecutionCompleted,
    ExecutionStarted,
    HistoryEvent,
    SubOrchestrationCompleted,
    SubOrchestrationCreated,
    SubOrchestrationFailed,
    TaskCompleted,
    TaskFailed,
    TaskScheduled,
    TimerCreated,
    TimerFired,
)
from aioflow.status import OrchestrationStatus, RuntimeStatus
from aioflow.testing.conformance import crash_app
from aioflow.testing.faults import FaultMode, FaultyBackend, InjectedFault
from aioflow.testing.memory import MemoryBackend
from aioflow.worker import Worker

__all__ = ["FaultInjectionSuite", "MultiProcessSuite", "history_problems"]

_COMMANDS = (TaskScheduled, TimerCreated, SubOrchestrationCreated)
_RESULTS = (TaskCompleted, TaskFailed, TimerFired, SubOrchestrationCompleted,
            SubOrchestrationFailed)


# -- what "exactly once" means, on a stored history ------------------------------------------------


def history_problems(instance_id: str, history: list[HistoryEvent]) -> list[str]:
    """What is wrong with the history of a finished instance, as readable sentences.

    A finished instance's (last execution's) history has exactly one ExecutionStarted, exactly
    one ExecutionCompleted as its last event, every command (activity, timer, sub-orchestration)
    once under its task id, and exactly one result for each of them, none for a task that was
    never scheduled. (The workflows these suites run await every command they issue, so an
    unanswered command means a lost message.)
    """
    problems: list[str] = []
    starts = [e for e in history if isinstance(e, ExecutionStarted)]
    if len(starts) != 1:
        problems.append(f"{instance_id}: {len(starts)} ExecutionStarted events, expected 1")
    ends = [e for e in history if isinstance(e, ExecutionCompleted)]
    if len(ends) != 1:
        problems.append(f"{instance_id}: {len(ends)} ExecutionCompleted events, expected exactly "
                        f"1 (statuses {[e.status for e in ends]})")
    elif history[-1] is not ends[0]:
        later = [e.kind for e in history[history.index(ends[0]) + 1:]]
        problems.append(f"{instance_id}: events after ExecutionCompleted: {later}")
    commands = collections.Counter(e.task_id for e in history if isinstance(e, _COMMANDS))
    # Entity calls and lock requests are answered like activities; signals and unlocks are not.
    sent = [e for e in history if isinstance(e, EntityOperationSent)]
    commands.update(e.task_id for e in sent if e.op_kind in ("call", "lock"))
    one_way = collections.Counter(e.task_id for e in sent if e.op_kind not in ("call", "lock"))
    for task_id, n in sorted(one_way.items()):
        if n > 1 or task_id in commands:
            problems.append(f"{instance_id}: entity message {task_id} was sent more than once")
    results = collections.Counter(e.task_id for e in history if isinstance(e, _RESULTS))
    for task_id, n in sorted(commands.items()):
        if n > 1:
            problems.append(f"{instance_id}: task {task_id} was scheduled {n} times")
    for task_id, n in sorted(results.items()):
        if n > 1:
            problems.append(f"{instance_id}: {n} results for task {task_id} (a duplicate "
                            f"completion entered history)")
        if task_id not in commands:
            problems.append(f"{instance_id}: a result for task {task_id}, which was never "
                            f"scheduled")
    unanswered = sorted(set(commands) - set(results))
    if unanswered:
        problems.append(f"{instance_id}: tasks {unanswered} were scheduled but never answered "
                        f"(a lost message)")
    return problems


def _completed_problems(status: OrchestrationStatus, name: str, spec: Any,
                        history: list[HistoryEvent]) -> list[str]:
    """What is wrong with a `crash_app` instance that should have completed, exactly once,
    with ``output["result"] == expected_result(name, spec)``."""
    iid = status.instance_id
    if status.runtime_status is not RuntimeStatus.COMPLETED:
        return [f"{iid}: status {status.runtime_status.value}, expected Completed "
                f"(failure: {status.failure_details})"]
    problems = history_problems(iid, history)
    expected = crash_app.expected_result(name, spec)
    output = status.output
    if not isinstance(output, dict) or output.get("result") != expected:
        problems.append(f"{iid}: output {output!r}, expected result {expected!r}")
    return problems


def _commands(history: Iterable[HistoryEvent]) -> list[tuple[str, int, str]]:
    return [(e.kind, e.task_id, getattr(e, "name", "")) for e in history
            if isinstance(e, _COMMANDS)]


def _children(history: Iterable[HistoryEvent]) -> list[SubOrchestrationCreated]:
    return [e for e in history if isinstance(e, SubOrchestrationCreated)]


async def _all_instances(client: Client) -> dict[str, OrchestrationStatus]:
    return {s.instance_id: s async for s in client.iter_instances(page_size=100)}


# -- fault injection ------------------------------------------------------------------------------


class _SupervisedWorker:
    """One worker kept alive: if any of its dispatch loops dies, that is recorded as a crash
    and a fresh worker takes over (as a process supervisor would restart a crashed worker)."""

    def __init__(self, make: Callable[[], Worker]) -> None:
        self._make = make
        self.worker: Worker | None = None
        self.crashes: list[str] = []
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _SupervisedWorker:
        self.worker = self._make()
        await self.worker.start()
        self._watch = asyncio.create_task(self._supervise())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            assert self.worker is not None
            loops: list[asyncio.Task[None]] = list(getattr(self.worker, "_tasks", []))
            dead = [t for t in loops if t.done()]
            if not dead:
                continue
            for task in dead:
                error = None if task.cancelled() else task.exception()
                self.crashes.append(f"the worker's {task.get_name()!r} loop died: {error!r}")
            try:
                await self.worker.stop()
            except Exception as exc:
                self.crashes.append(f"stopping the crashed worker failed: {exc!r}")
            self.worker = self._make()
            await self.worker.start()


@dataclass
class _Run:
    """What one run of the fault workload did."""

    instance_id: str
    approval: Any
    status: OrchestrationStatus | None = None
    crashes: list[str] = field(default_factory=list)
    client_retries: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_reference: dict[str, Any] = {}


class FaultInjectionSuite:
    """Every write of a workflow fails in turn, before or after it is applied; the workflow must
    still complete, with the same output as an uninterrupted run, exactly once.

    Provide an async fixture named ``backend`` yielding a fresh, empty backend per test (it is
    wrapped in a `FaultyBackend`). The workload is `crash_app.fault_workflow`: a chain of three
    activities, a fan-out of five, a 0.1 s durable timer, a sub-orchestration and an external
    event the client raises. `test_clean_run_makes_every_kind_of_write` checks that a clean run
    makes every kind of write. `test_recovers_from_each_failed_write` (once per mode) first
    counts the writes of a clean run on the backend under test, then fails each of them in turn
    (write #1, #2, ... up to the last write of the clean run), one run of the workflow each, so
    every write is failed whatever number of writes the backend makes, and nothing is skipped.
    Those runs share the test's backend, each with its own instance id; every run is checked,
    and the test fails with a report of every write whose failure was not recovered from.

    While a case runs, one worker (lease `lease_seconds`) is kept running and restarted if it
    crashes (a crash also fails the case: a worker must survive backend errors). The client
    retries a call that failed with `InjectedFault`, as a real caller would; a retried
    `raise_event` whose first attempt was applied delivers the event twice, which the workload
    tolerates (it waits for one event).

    A worker releases work (`abandon_orchestration`, `abandon_activity`) only after an error or
    on shutdown, so a clean run never makes those writes; two more tests provoke them and fail
    them, before and after: `test_recovers_when_releasing_an_orchestration_fails` (a cold worker
    cannot read the history, releases the instance, and that release fails too) and
    `test_recovers_when_releasing_an_activity_fails` (a worker stopped mid-activity releases
    the task).
    """

    pytestmark = pytest.mark.asyncio

    #: Lease of the worker's work items: how long a lost lock blocks recovery.
    lease_seconds: ClassVar[float] = 0.5
    #: Idle polling interval of the worker.
    poll_interval: ClassVar[float] = 0.05
    #: Upper bound on one run, fault and recovery included.
    case_timeout: ClassVar[float] = 20.0
    #: The workflow's input.
    seed: ClassVar[int] = 5

    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        """Override me: yield a fresh, empty backend and close it afterwards."""
        raise NotImplementedError(
            f"{type(self).__name__} must define an async fixture named 'backend' that yields an "
            f"open, empty aioflow backend (and closes it afterwards); see FaultInjectionSuite")
        yield  # pragma: no cover

    # -- the tests -----------------------------------------------------------------------------

    async def test_clean_run_makes_every_kind_of_write(self, backend: Backend) -> None:
        faulty = FaultyBackend(backend)
        run = await self.run_workload(faulty)
        problems = run.problems + await self.check(faulty, run)
        assert not problems, self.report("the clean run (no fault) went wrong", faulty, run,
                                         problems)
        made = {w.method for w in faulty.writes}
        expected = {"create_instance", "send_messages", "complete_orchestrations",
                    "complete_activities"}
        assert expected <= made, (
            f"the workload should make every kind of write a client and worker make in a "
            f"clean run; missing {sorted(expected - made)} in {[str(w) for w in faulty.writes]}")

    @pytest.mark.parametrize("fault_mode", ["before", "after"])
    async def test_recovers_from_each_failed_write(
        self, backend: Backend, fault_mode: FaultMode
    ) -> None:
        # Count the writes of a clean run on this backend, so that every one of them is failed
        # in turn whatever number of writes the backend makes (no write index is guessed, so
        # none is missed and none is skipped).
        clean = FaultyBackend(backend)
        clean_run = await self.run_workload(clean, instance_id="fault-workflow-clean")
        problems = clean_run.problems + await self.check(clean, clean_run)
        assert not problems, self.report(
            "the clean run (no fault) that counts the writes went wrong", clean, clean_run,
            problems)
        assert clean.writes, "the clean run made no writes: there is nothing to fail"
        # The runs share the test's backend, each under its own instance id; the instances of
        # the earlier runs are expected in the backend, any other is a stray.
        earlier = set(await _all_instances(Client(backend)))
        failures: list[tuple[int, str, str]] = []  # (write number, first problem, report)
        for expected in clean.writes:
            k = expected.number
            faulty = FaultyBackend(backend, fail_at=k, mode=fault_mode)
            try:
                run = await self.run_workload(
                    faulty, instance_id=f"fault-workflow-{fault_mode}-{k:02d}")
                problems = run.problems + await self.check(faulty, run, earlier=earlier)
            except Exception as exc:  # not a finding `check` reports: name the write it broke at
                exc.add_note(f"while write #{k} of the clean run ({expected}) was failed "
                             f"{fault_mode} it was applied; writes not recovered from before: "
                             f"{[f'#{n}' for n, _, _ in failures] or 'none'}")
                raise
            if faulty.injected is None:
                problems.insert(0, (
                    f"write #{k} was never made: this run made {faulty.write_count} writes, "
                    f"the clean run {clean.write_count} (the writes of a run are not "
                    f"deterministic, so write #{k} of the clean run was not failed)"))
                what = f"write #{k} (clean run: {expected}) was to fail {fault_mode} it was applied"
            else:
                what = (f"write {faulty.injected} failed {fault_mode} it was applied "
                        f"(clean run: {expected})")
            earlier |= set(await _all_instances(Client(backend)))
            if problems:
                failures.append((k, problems[0], self.report(what, faulty, run, problems)))
        assert not failures, self.report_failures(fault_mode, clean, failures)

    @pytest.mark.parametrize("fault_mode", ["before", "after"])
    @pytest.mark.parametrize("method", ["lock_orchestrations", "lock_activities", "wait_for_work"])
    async def test_worker_survives_failing_polls(
        self, backend: Backend, method: str, fault_mode: FaultMode
    ) -> None:
        # The first three calls of one of the worker's polling methods fail. "after" a lock
        # means work was locked that the worker never saw: it must come back when the lease
        # expires. The worker's loops must survive, so a case where one dies fails.
        faulty = FaultyBackend(backend, counted=(method,), fail_at={1, 2, 3}, mode=fault_mode)
        run = await self.run_workload(faulty)
        problems = run.problems + await self.check(faulty, run)
        if len(faulty.faults) != 3:
            problems.append(f"only {len(faulty.faults)} of 3 faults were injected")
        assert not problems, self.report(f"the first three {method} calls failed {fault_mode}",
                                         faulty, run, problems)

    @pytest.mark.parametrize("fault_mode", ["before", "after"])
    async def test_recovers_when_releasing_an_orchestration_fails(
        self, backend: Backend, fault_mode: FaultMode
    ) -> None:
        # A first worker takes the workflow to its wait for the event, then stops: the next
        # worker has no cached copy and must read the history, which fails; it releases the
        # instance for a retry, and that release fails too.
        run = _Run(instance_id="fault-workflow", approval={"approved": True, "by": "client"})
        client = Client(backend)
        async with self.make_worker(backend):
            await self._start(client, run)
            await self._wait_until_waiting(client, run, time.monotonic() + self.case_timeout)
        faulty = FaultyBackend(backend, counted=("get_history", "abandon_orchestration"),
                               fail_at={1, 2}, mode=fault_mode)
        async with _SupervisedWorker(lambda: self.make_worker(faulty)) as supervisor:
            await client.raise_event(run.instance_id, crash_app.APPROVAL_EVENT, run.approval)
            try:
                await client.wait_for_completion(run.instance_id, timeout=self.case_timeout)
            except Exception as exc:
                run.problems.append(f"the run did not finish: {type(exc).__name__}: {exc}")
            run.crashes = supervisor.crashes
        problems = run.problems + await self.check(faulty, run)
        failed = [w.method for w in faulty.faults]
        if failed != ["get_history", "abandon_orchestration"]:
            problems.append(f"expected a failed get_history, then a failed release; the calls "
                            f"failed were {failed}")
        assert not problems, self.report(
            f"reading the history and releasing the instance failed {fault_mode}", faulty, run,
            problems)

    @pytest.mark.parametrize("fault_mode", ["before", "after"])
    async def test_recovers_when_releasing_an_activity_fails(
        self, backend: Backend, fault_mode: FaultMode
    ) -> None:
        # A worker is stopped while an activity runs: it cancels the activity and releases the
        # task for another worker, and that release fails.
        spec = {"start": 0, "length": 2, "sleep": 0.3}
        faulty = FaultyBackend(backend, counted=("abandon_activity",), fail_at=1,
                               mode=fault_mode)
        client = Client(backend)
        problems: list[str] = []
        first = self.make_worker(faulty, shutdown_timeout=0.01)
        await first.start()
        try:
            iid = await client.start_new(crash_app.chain_flow, spec, instance_id="slow-chain")
            deadline = time.monotonic() + self.case_timeout
            while not getattr(first, "_running_activities", None):
                assert time.monotonic() < deadline, "the activity never started"
                await asyncio.sleep(0.005)
        finally:
            await first.stop()
        async with _SupervisedWorker(lambda: self.make_worker(faulty)) as supervisor:
            try:
                status = await client.wait_for_completion(iid, timeout=self.case_timeout)
            except Exception as exc:
                problems.append(f"the run did not finish: {type(exc).__name__}: {exc}")
                status = None
            problems += [f"worker crash: {c}" for c in supervisor.crashes]
        if status is not None:
            problems += _completed_problems(
                status, "crash.chain", spec, await client.get_history(iid))
        if [w.method for w in faulty.faults] != ["abandon_activity"]:
            problems.append(f"expected the release of the activity to fail; the calls failed "
                            f"were {[str(w) for w in faulty.faults]}")
        leftovers = await backend.lock_activities("fault-probe", max_items=10, lease_seconds=60)
        if leftovers:
            problems.append(f"activity tasks left in the queue after the run: "
                            f"{[item.task.id for item in leftovers]}")
        assert not problems, "\n".join(
            [f"releasing an activity failed {fault_mode} it was applied:", *problems])

    # -- running the workload ------------------------------------------------------------------

    def make_worker(self, backend: Backend, **options: Any) -> Worker:
        """A worker for `crash_app.app`. One orchestration per batch keeps the order of the
        writes the same from run to run."""
        settings: dict[str, Any] = dict(
            lease_seconds=self.lease_seconds, poll_interval=self.poll_interval,
            max_concurrent_orchestrations=1, shutdown_timeout=1.0, watchdog_seconds=0)
        return Worker(crash_app.app, backend, **{**settings, **options})

    async def run_workload(self, faulty: FaultyBackend, *,
                           instance_id: str = "fault-workflow") -> _Run:
        """Start the workflow, raise its event when it waits, and wait for it to finish."""
        run = _Run(instance_id=instance_id, approval={"approved": True, "by": "client"})
        client = Client(faulty)
        deadline = time.monotonic() + self.case_timeout
        async with _SupervisedWorker(lambda: self.make_worker(faulty)) as supervisor:
            try:
                await self._start(client, run)
                await self._raise_when_waiting(client, run, deadline)
                run.status = await client.wait_for_completion(
                    run.instance_id, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # a stuck or lost instance: report it with the writes
                run.problems.append(f"the run did not finish: {type(exc).__name__}: {exc}")
            finally:
                run.crashes = supervisor.crashes
        return run

    async def _start(self, client: Client, run: _Run) -> None:
        failed_before = False
        while True:
            try:
                await client.start_new(crash_app.fault_workflow, self.seed,
                                       instance_id=run.instance_id)
                return
            except InjectedFault as fault:
                run.client_retries.append(f"start_new: {fault}")
                failed_before = True
            except InstanceExistsError:
                if not failed_before:
                    raise
                # The failed attempt was applied after all: the instance exists. That is what a
                # caller retrying with the same instance id learns, and it may carry on.
                run.client_retries.append("start_new: the failed attempt had created it")
                return

    @staticmethod
    async def _wait_until_waiting(client: Client, run: _Run, deadline: float) -> bool:
        """Wait until the workflow waits for its event (True) or has finished (False)."""
        while True:
            status = await client.get_status(run.instance_id)
            if status is not None and status.custom_status == crash_app.WAITING_FOR_APPROVAL:
                return True
            if status is not None and status.runtime_status.is_terminal:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the workflow never started waiting for its event (status "
                    f"{status.runtime_status.value if status else None}, custom status "
                    f"{status.custom_status if status else None!r})")
            await asyncio.sleep(0.01)

    async def _raise_when_waiting(self, client: Client, run: _Run, deadline: float) -> None:
        if not await self._wait_until_waiting(client, run, deadline):
            return  # checked later: it must not have finished without its event
        delivered = False
        while True:
            try:
                await client.raise_event(run.instance_id, crash_app.APPROVAL_EVENT, run.approval)
                return
            except InjectedFault as fault:
                run.client_retries.append(f"raise_event: {fault}")
                delivered = delivered or fault.applied
            except InstanceNotRunningError:
                if not delivered:
                    raise
                # The failed attempt delivered the event and the instance finished meanwhile.
                run.client_retries.append("raise_event: the failed attempt had delivered it")
                return

    # -- checking the outcome ------------------------------------------------------------------

    async def check(self, faulty: FaultyBackend, run: _Run, *,
                    earlier: Collection[str] = ()) -> list[str]:
        """Everything wrong with the backend's state after a run, compared with a clean run.

        `earlier` are the instances earlier runs left in the same backend: only those and the
        run's own instance and sub-orchestration may be there."""
        problems = [f"worker crash: {c}" for c in run.crashes]
        store = faulty.inner
        client = Client(store)
        status = await client.get_status(run.instance_id)
        expected = crash_app.expected_result(
            "crash.fault_workflow", {"seed": self.seed, "approval": run.approval})
        if status is None:
            return [*problems, f"{run.instance_id}: the instance is gone"]
        if status.runtime_status is not RuntimeStatus.COMPLETED:
            problems.append(
                f"{run.instance_id}: status {status.runtime_status.value}, expected Completed "
                f"(failure: {status.failure_details}, custom status {status.custom_status!r})")
        elif status.output != expected:
            problems.append(f"{run.instance_id}: output {status.output!r}, expected {expected!r}")
        reference = await _reference_histories(self.seed, run.approval)
        history = await client.get_history(run.instance_id)
        problems += history_problems(run.instance_id, history)
        if _commands(history) != _commands(reference["parent"]):
            problems.append(f"{run.instance_id}: commands {_commands(history)} differ from a "
                            f"clean run's {_commands(reference['parent'])}")
        instances = await _all_instances(client)
        children = [c.instance_id for c in _children(history)]
        stray = sorted(set(instances) - {*earlier, run.instance_id, *children})
        if stray:
            problems.append(f"instances in the backend that should not be there: {stray} "
                            f"(expected {sorted([run.instance_id, *children])}"
                            f"{' and those of earlier runs' if earlier else ''})")
        for child in children:
            child_status = instances.get(child)
            if child_status is None:
                problems.append(f"{child}: the sub-orchestration instance is missing")
                continue
            if child_status.runtime_status is not RuntimeStatus.COMPLETED:
                problems.append(f"{child}: status {child_status.runtime_status.value}, "
                                f"expected Completed")
            child_history = await client.get_history(child)
            problems += history_problems(child, child_history)
            if _commands(child_history) != _commands(reference["child"]):
                problems.append(f"{child}: commands {_commands(child_history)} differ from a "
                                f"clean run's {_commands(reference['child'])}")
        leftovers = await store.lock_activities("fault-probe", max_items=10, lease_seconds=60.0)
        if leftovers:
            problems.append(f"activity tasks left in the queue after the run: "
                            f"{[item.task.id for item in leftovers]}")
        return problems

    @staticmethod
    def report(what: str, faulty: FaultyBackend, run: _Run, problems: list[str]) -> str:
        lines = [f"{what}: {len(problems)} problem(s)", *(f"  - {p}" for p in problems)]
        if run.client_retries:
            lines.append(f"client retries: {run.client_retries}")
        lines.append("counted calls: " + "; ".join(str(w) for w in faulty.writes))
        return "\n".join(lines)

    @staticmethod
    def report_failures(fault_mode: FaultMode, clean: FaultyBackend,
                        failures: list[tuple[int, str, str]], detailed: int = 5) -> str:
        """The failure message of `test_recovers_from_each_failed_write`: which writes were not
        recovered from, then the full report of the first `detailed` of them (a run that went
        wrong may leave work behind that troubles later runs: the first failure is the one to
        look at first)."""
        numbers = ", ".join(f"#{k}" for k, _, _ in failures)
        lines = [
            f"{len(failures)} of the {clean.write_count} writes of a clean run were not "
            f"recovered from when they failed {fault_mode} they were applied: {numbers}",
            "clean run's writes: " + "; ".join(str(w) for w in clean.writes),
        ]
        for _, _, report in failures[:detailed]:
            lines += ["", report]
        if len(failures) > detailed:
            lines += ["", "and (first problem only):"]
            lines += [f"  - write #{k}: {first}" for k, first, _ in failures[detailed:]]
        return "\n".join(lines)


async def _reference_histories(seed: int, approval: Any) -> dict[str, list[HistoryEvent]]:
    """The histories of an uninterrupted run on the in-memory backend (computed once)."""
    key = repr((seed, approval))
    if key not in _reference:
        store = MemoryBackend()
        client = Client(store)
        async with Worker(crash_app.app, store, poll_interval=0.01, watchdog_seconds=0):
            iid = await client.start_new(crash_app.fault_workflow, seed, instance_id="reference")
            while True:
                status = await client.get_status(iid)
                assert status is not None
                if status.custom_status == crash_app.WAITING_FOR_APPROVAL:
                    break
                await asyncio.sleep(0.005)
            await client.raise_event(iid, crash_app.APPROVAL_EVENT, approval)
            await client.wait_for_completion(iid, timeout=10.0)
        parent = await client.get_history(iid)
        [child] = _children(parent)
        _reference[key] = {"parent": parent, "child": await client.get_history(child.instance_id)}
    return _reference[key]


# -- worker processes ----------------------------------------------------------------------------


class _WorkerProcesses:
    """Worker child processes (`_worker_main`) on one backend URL; each logs to its own file."""

    def __init__(self, url: str, log_dir: Path, args: list[str]) -> None:
        self.url = url
        self.log_dir = log_dir
        self.args = args
        self.alive: list[asyncio.subprocess.Process] = []
        self.started: list[asyncio.subprocess.Process] = []
        self.logs: dict[int, Path] = {}

    async def start(self) -> asyncio.subprocess.Process:
        log = self.log_dir / f"worker-{len(self.started):03d}.log"
        # The children import exactly what this process imported: its sys.path, and not the
        # current directory first (-P), which `python -m` would otherwise put in front.
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(log, "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "aioflow.testing.conformance._worker_main", self.url,
                *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=stderr, env=env)
        self.started.append(proc)
        self.alive.append(proc)
        self.logs[proc.pid] = log
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30.0)
        except TimeoutError:
            line = b""
        if not line.decode(errors="replace").startswith(crash_app.READY_LINE):
            await self.kill(proc)
            raise AssertionError(
                f"worker process {proc.pid} did not start (first line {line!r}); its log:\n"
                f"{self.tail(proc.pid)}")
        return proc

    async def kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGKILL: no clean-up runs in the child, exactly like a crash."""
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        await proc.wait()
        if proc in self.alive:
            self.alive.remove(proc)

    async def close(self) -> None:
        """Stop every child: SIGTERM, then SIGKILL what is still running after 10 s."""
        for proc in list(self.alive):
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self.alive:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in self.alive],
                               timeout=10.0)
        for proc in list(self.alive):
            await self.kill(proc)

    def crashed(self) -> list[str]:
        """Children that exited although nobody killed or stopped them."""
        return [f"worker {p.pid} exited with {p.returncode}:\n{self.tail(p.pid)}"
                for p in self.alive if p.returncode is not None]

    def tail(self, pid: int, lines: int = 25) -> str:
        path = self.logs.get(pid)
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def all_tails(self) -> str:
        return "\n".join(f"--- worker {pid} ---\n{self.tail(pid, 10)}" for pid in self.logs)


Workload = dict[str, tuple[str, dict[str, Any]]]


class MultiProcessSuite:
    """Worker processes sharing one backend, with and without being killed by SIGKILL.

    Provide a fixture named ``backend_url``: a URL of a fresh, empty store that
    `aioflow.connect` opens in this process and in child processes. The test process is the
    client; the workers are `python -m aioflow.testing.conformance._worker_main URL` children
    running `crash_app.app` with `lease_seconds` leases. Every child is stopped (SIGTERM, then
    SIGKILL) when a test ends, whatever happens.
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio, pytest.mark.slow]

    #: Worker processes running at any time.
    worker_count: ClassVar[int] = 3
    #: Lease of the child workers: how long a killed worker's work stays blocked.
    lease_seconds: ClassVar[float] = 1.0
    #: Instances started for the sharing test and for the chaos test.
    instance_count: ClassVar[int] = 60
    chaos_instance_count: ClassVar[int] = 40
    #: How long the chaos monkey kills workers, and the bounds of its pause between kills.
    chaos_seconds: ClassVar[float] = 8.0
    chaos_pause: ClassVar[tuple[float, float]] = (0.3, 1.0)
    #: Seed of the workload mix and of the chaos monkey's choices.
    seed: ClassVar[int] = 20240601
    #: Upper bound on waiting for every instance to finish.
    completion_timeout: ClassVar[float] = 60.0

    @pytest.fixture
    def backend_url(self) -> str:
        """Override me: return the URL of a fresh, empty store other processes can open."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a fixture named 'backend_url' returning the URL "
            f"of a fresh, empty backend that aioflow.connect can open from other processes")

    def worker_args(self) -> list[str]:
        """Command-line options of the worker children (see `_worker_main`).

        Small batches and few activity slots per worker make the workers take turns on the
        same instances (an idle worker picks up what a busy one cannot), so instances move
        between processes and cached copies go stale, as in a busy deployment.
        """
        return ["--lease", str(self.lease_seconds), "--poll", "0.05",
                "--max-orchestrations", "4", "--max-activities", "4", "--activity-batch", "2"]

    # -- the tests -----------------------------------------------------------------------------

    async def test_worker_processes_share_one_backend(
        self, backend_url: str, tmp_path: Path
    ) -> None:
        workload = self.workload(self.instance_count, random.Random(self.seed), sleep=0.01,
                                 delays=(0.2, 0.6))
        workers = _WorkerProcesses(backend_url, tmp_path, self.worker_args())
        backend = connect(backend_url)
        client = Client(backend)
        try:
            for _ in range(self.worker_count):
                await workers.start()
            for iid, (name, spec) in workload.items():
                await self.start(client, iid, name, spec)
            await self.wait_until_finished(client, workload, workers)
            problems = await self.check(client, workload)
            problems += [f"a worker process died: {c}" for c in workers.crashed()]
            assert not problems, self.report(problems, workers)
            pids = await self.activity_pids(client, workload)
            worker_pids = {p.pid for p in workers.started}
            assert pids <= worker_pids, (
                f"activities report pids {sorted(pids - worker_pids)} that are not worker "
                f"processes of this test ({sorted(worker_pids)})")
            assert len(pids) >= 2, (
                f"all activities ran in one process ({sorted(pids)}) although "
                f"{self.worker_count} workers shared the backend: the work was not spread")
        finally:
            await workers.close()
            await backend.close()

    async def test_workers_killed_with_sigkill_at_random_moments(
        self, backend_url: str, tmp_path: Path
    ) -> None:
        rng = random.Random(self.seed + 1)
        # Slow steps and long timers, started over most of the chaos: kills meet work in flight.
        workload = self.workload(self.chaos_instance_count, rng, sleep=0.3, delays=(1.0, 4.0))
        workers = _WorkerProcesses(backend_url, tmp_path, self.worker_args())
        backend = connect(backend_url)
        client = Client(backend)
        kills: list[tuple[float, int, int]] = []  # (at, pid, instances running)
        try:
            for _ in range(self.worker_count):
                await workers.start()
            began = time.monotonic()
            starting = asyncio.create_task(self._start_gradually(client, workload))
            while time.monotonic() - began < self.chaos_seconds:
                await asyncio.sleep(rng.uniform(*self.chaos_pause))
                victim = rng.choice(workers.alive)
                running = await self.count_running(client)
                await workers.kill(victim)
                kills.append((round(time.monotonic() - began, 2), victim.pid, running))
                await workers.start()
            await starting
            # Last, every worker dies at once, mid-work; clean workers must finish the job.
            for proc in list(workers.alive):
                running = await self.count_running(client)
                await workers.kill(proc)
                kills.append((round(time.monotonic() - began, 2), proc.pid, running))
            for _ in range(self.worker_count):
                await workers.start()
            await self.wait_until_finished(client, workload, workers)
            problems = await self.check(client, workload)
            problems += [f"a worker process died: {c}" for c in workers.crashed()]
            assert not problems, self.report(problems, workers, kills)
            assert any(running for _, _, running in kills), (
                f"no worker was killed while instances were running, so the test proved "
                f"nothing; kills (time, pid, running instances): {kills}")
        finally:
            await workers.close()
            await backend.close()

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def workload(count: int, rng: random.Random, *, sleep: float,
                 delays: tuple[float, float]) -> Workload:
        """`count` instances of the multi-process flows: id -> (orchestrator name, input)."""
        kinds = ["chain", "fan_out", "timer", "parent", "event", "loop", "entity"]
        weights = [4, 4, 2, 1, 1, 1, 2]
        out: Workload = {}
        for i in range(count):
            kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choices(kinds, weights)[0]
            iid = f"{kind}-{i:03d}"
            spec: dict[str, Any]
            if kind == "chain":
                spec = {"start": i * 100, "length": rng.randint(3, 8), "sleep": sleep}
            elif kind == "fan_out":
                spec = {"width": rng.randint(4, 8), "sleep": sleep}
            elif kind == "timer":
                spec = {"start": i * 100, "delay": round(rng.uniform(*delays), 2)}
            elif kind == "parent":
                spec = {"start": i * 100, "sleep": sleep}
            elif kind == "event":  # the client raises GO_EVENT with `bump` (see `start`)
                spec = {"start": i * 100, "bump": rng.randint(1, 9), "sleep": sleep}
            elif kind == "entity":
                spec = {"n": rng.randint(1, 9)}
            else:
                spec = {"value": i * 100, "rounds": rng.randint(2, 4), "sleep": sleep}
            out[iid] = (f"crash.{kind}", spec)
        return out

    async def _start_gradually(self, client: Client, workload: Workload) -> None:
        """Start the instances over the first 3/4 of the chaos, so kills meet work in flight
        all along."""
        pause = self.chaos_seconds * 0.75 / max(1, len(workload))
        for iid, (name, spec) in workload.items():
            await self.start(client, iid, name, spec)
            await asyncio.sleep(pause)

    @staticmethod
    async def start(client: Client, instance_id: str, name: str, spec: dict[str, Any]) -> None:
        """Start one instance; an `event_flow` also gets its event at once (it is buffered
        until the instance waits for it)."""
        await client.start_new(name, spec, instance_id=instance_id)
        if name == "crash.event":
            await client.raise_event(instance_id, crash_app.GO_EVENT, spec["bump"])

    @staticmethod
    async def count_running(client: Client) -> int:
        page = await client.query_instances(
            runtime_status=[RuntimeStatus.PENDING, RuntimeStatus.RUNNING], page_size=1000,
            show_input=False)
        return len(page.instances)

    async def wait_until_finished(self, client: Client, workload: Workload,
                                  workers: _WorkerProcesses) -> None:
        deadline = time.monotonic() + self.completion_timeout
        while True:
            statuses = await _all_instances(client)
            unfinished = sorted(iid for iid in workload
                                if iid not in statuses
                                or not statuses[iid].runtime_status.is_terminal)
            if not unfinished:
                return
            if time.monotonic() > deadline:
                detail = {iid: statuses[iid].runtime_status.value if iid in statuses else "missing"
                          for iid in unfinished[:20]}
                raise AssertionError(
                    f"{len(unfinished)} instance(s) still not finished after "
                    f"{self.completion_timeout} s (stuck or lost): {detail}\n"
                    f"{workers.all_tails()}")
            await asyncio.sleep(0.1)

    async def check(self, client: Client, workload: Workload) -> list[str]:
        """Every instance in the store is a started one or its child, Completed once, right."""
        problems: list[str] = []
        statuses = await _all_instances(client)
        expected_ids = set(workload)
        for iid, (name, spec) in workload.items():
            status = statuses.get(iid)
            if status is None:
                problems.append(f"{iid}: the instance is missing")
                continue
            history = await client.get_history(iid)
            problems += _completed_problems(status, name, spec, history)
            for child in _children(history):
                expected_ids.add(child.instance_id)
                child_status = statuses.get(child.instance_id)
                if child_status is None:
                    problems.append(f"{child.instance_id}: the sub-orchestration is missing")
                    continue
                problems += _completed_problems(child_status, child.name, child.input,
                                            await client.get_history(child.instance_id))
        extra = sorted(set(statuses) - expected_ids)
        if extra:
            problems.append(f"unexpected instances in the store: {extra}")
        problems += await self.entity_problems(client, workload)
        return problems

    @staticmethod
    async def entity_problems(client: Client, workload: Workload) -> list[str]:
        """The tallies the `crash.entity` flows changed hold exactly the sum of their work:
        each signal and each call applied once, and the locked moves kept left + right == 0."""
        sent = sum(int(spec["n"]) for name, spec in workload.values() if name == "crash.entity")
        if not sent:
            return []
        expected = {"total": sent, "left": -sent, "right": sent}
        found = {key: (await client.read_entity_state(EntityId(crash_app.TALLY, key))).state
                 for key in expected}
        if found != expected:
            return [f"entity tallies {found}, expected {expected}: an entity operation was "
                    f"lost or applied twice"]
        return []

    @staticmethod
    async def activity_pids(client: Client, workload: Workload) -> set[int]:
        pids: set[int] = set()
        for iid in workload:
            status = await client.get_status(iid)
            if status is not None and isinstance(status.output, dict):
                pids.update(status.output.get("pids", []))
        return pids

    @staticmethod
    def report(problems: list[str], workers: _WorkerProcesses,
               kills: list[tuple[float, int, int]] | None = None) -> str:
        lines = [f"{len(problems)} problem(s):", *(f"  - {p}" for p in problems[:40])]
        if kills is not None:
            lines.append(f"kills (seconds into the chaos, pid, instances running): {kills}")
        lines.append(workers.all_tails())
        return "\n".join(lines)
