"""`Worker`: runs orchestrations and activities from a backend.

The worker is the imperative shell around the pure engine. Two dispatch loops claim work in
batches: orchestration work items (an instance and its new messages, under a lease) and activity
tasks. Each orchestration batch is processed by the engine and committed with ONE
`complete_orchestrations` call; activity results are committed in batches as they finish.

Guarantees:
* An orchestration step is committed atomically with the messages it consumed, under the lease it
  was locked with; a worker that lost its lease cannot commit (the backend fences it) and simply
  drops its cached copy.
* Activities run at least once; a crash before their result is committed makes them run again,
  and duplicate results are ignored by task id.
* Recently active instances stay in a bounded LRU cache, so a step costs the new events only; a
  cache miss (cold start, or another worker moved the instance on) replays history once.
* Few round trips per step: a step's activity tasks are committed already locked by this
  worker when it has free activity slots (no `lock_activities` call), and committing activity
  results also locks the instances they wake (no `lock_orchestrations` call): on SQLite a
  sequential chain costs two transactions per step. Other workers still take over anything
  whose lease expires.
* Graceful shutdown: no new work is claimed; running activities get `shutdown_timeout` seconds to
  finish and have their results committed, and are otherwise released for another worker.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from aioflow.app import App
from aioflow.backend import (
    ActivityLock,
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    Backend,
    InstanceRecord,
    Message,
    NewInstance,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    WorkKind,
)
from aioflow.engine import Decision, OrchestrationExecutor
from aioflow.entities import (
    ENTITY_PREFIX,
    EntityId,
    is_entity_instance,
    run_entity_batch,
)
from aioflow.events import (
    EntityRequest,
    EventRaised,
    ExecutionStarted,
    HistoryEvent,
    TaskCompleted,
    TaskFailed,
    TimerFired,
    decode_event,
    encode_event,
)
from aioflow.ids import activity_task_id, child_execution_id, message_id, next_execution_id
from aioflow.serialization import dumps, from_json_value, loads, to_json_value
from aioflow.status import RuntimeStatus

__all__ = ["Worker"]

logger = logging.getLogger("aioflow.worker")


class Worker:
    """Runs the orchestrators and activities of `app` against `backend`.

    Use as `async with Worker(app, backend): ...` or `await worker.run()` (until cancelled).
    Any number of workers, in any number of processes, may share one backend.
    """

    def __init__(
        self,
        app: App,
        backend: Backend,
        *,
        max_concurrent_activities: int = 64,
        max_concurrent_orchestrations: int = 100,
        activity_batch_size: int = 64,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        cache_size: int = 1000,
        worker_id: str | None = None,
        thread_pool_size: int | None = None,
        shutdown_timeout: float = 30.0,
        watchdog_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_concurrent_activities < 1 or max_concurrent_orchestrations < 1:
            raise ValueError("concurrency limits must be at least 1")
        self.app = app
        self.backend = backend
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.max_concurrent_activities = max_concurrent_activities
        self.max_concurrent_orchestrations = max_concurrent_orchestrations
        self.activity_batch_size = activity_batch_size
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.cache_size = cache_size
        self.shutdown_timeout = shutdown_timeout
        self.watchdog_seconds = watchdog_seconds
        self.clock = clock
        self._thread_pool_size = thread_pool_size
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache: collections.OrderedDict[str, OrchestrationExecutor] = collections.OrderedDict()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running_activities: dict[str, tuple[ActivityWorkItem, asyncio.Task[None]]] = {}
        self._activity_slots: asyncio.Semaphore | None = None
        self._results: list[ActivityResult] = []
        self._results_ready = asyncio.Event()
        #: Orchestration work items locked and not yet committed or released (all sources).
        self._orchestrations_in_flight = 0
        #: Batches handed over by `complete_activities` (processed beside the main loop).
        self._handoffs: set[asyncio.Task[None]] = set()
        self._started = False
        self._busy: tuple[str, float, int] | None = None
        self._watchdog: threading.Thread | None = None
        #: Counters for observability and tests.
        self.stats = collections.Counter[str]()

    # == lifecycle =========================================================================
    async def __aenter__(self) -> "Worker":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the dispatch loops in the background."""
        if self._started:
            raise RuntimeError("this worker was already started")
        self._started = True
        # Fresh events: a worker may be started again after stop() (even on another loop).
        self._stopping = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._orchestrations_in_flight = 0
        self._activity_slots = asyncio.Semaphore(self.max_concurrent_activities)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._thread_pool_size or min(32, self.max_concurrent_activities),
            thread_name_prefix="aioflow-activity")
        self._tasks = [
            asyncio.create_task(self._orchestration_loop(), name="aioflow orchestrations"),
            asyncio.create_task(self._activity_loop(), name="aioflow activities"),
            asyncio.create_task(self._result_flusher(), name="aioflow activity results"),
            asyncio.create_task(self._lease_renewer(), name="aioflow leases"),
        ]
        if self.watchdog_seconds > 0:
            self._watchdog = threading.Thread(target=self._watch, args=(self._stopping,),
                                              name="aioflow watchdog", daemon=True)
            self._watchdog.start()

    async def run(self) -> None:
        """Run until cancelled, then shut down gracefully."""
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Graceful shutdown: stop claiming, let running activities finish or release them."""
        if not self._started:
            return
        self._stopping.set()
        self._results_ready.set()
        orchestrations, activities, flusher, renewer = self._tasks
        # The dispatch loops check `_stopping` between rounds, so an orchestration batch in
        # progress is committed rather than left locked until its lease expires.
        _, late = await asyncio.wait([orchestrations, activities],
                                     timeout=self.poll_interval + 5.0)
        for task in (*late, renewer):
            task.cancel()
        await asyncio.gather(orchestrations, activities, renewer, return_exceptions=True)
        # Steps handed over by the result flusher before we stopped: let them commit too.
        if self._handoffs:
            await asyncio.wait(set(self._handoffs), timeout=self.poll_interval + 5.0)
        running = [t for _, t in self._running_activities.values()]
        if running:
            await asyncio.wait(running, timeout=self.shutdown_timeout)
        for item, task in list(self._running_activities.values()):
            task.cancel()
            try:
                await self.backend.abandon_activity(item.task.id, item.lock_token)
            except Exception:
                logger.warning("could not release activity task %s", item.task.id, exc_info=True)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        # The flusher exits after its current flush (it does not lock instances while
        # stopping); cancelling it mid-call could lose instances it had just locked.
        _, late = await asyncio.wait([flusher], timeout=self.shutdown_timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await self._flush_results()
        except TimeoutError:
            logger.error("could not commit %d activity results before shutdown; their tasks "
                         "stay queued and run again when their leases expire",
                         len(self._results))
            self._results = []
        for task in list(self._handoffs):
            task.cancel()
        await asyncio.gather(*self._handoffs, return_exceptions=True)
        for executor in self._cache.values():
            executor.close()
        self._cache.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._started = False

    # == orchestrations ====================================================================
    async def _orchestration_loop(self) -> None:
        idle = 0.001
        while not self._stopping.is_set():
            free = self.max_concurrent_orchestrations - self._orchestrations_in_flight
            if free <= 0:  # hand-overs fill every slot
                await asyncio.sleep(0.001)
                continue
            try:
                items = await self.backend.lock_orchestrations(
                    self.worker_id, max_items=free, lease_seconds=self.lease_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("locking orchestration work items failed; retrying")
                await asyncio.sleep(min(self.poll_interval, 1.0))
                continue
            if not items:
                await self._wait_for_work(WorkKind.ORCHESTRATION, idle)
                idle = min(idle * 2, self.poll_interval)
                continue
            idle = 0.001
            self._orchestrations_in_flight += len(items)
            await self._run_batch(items)
            if len(items) < free:
                # A partial batch took all the work that was visible: polling again at once
                # would almost always find nothing (one wasted backend round trip per step).
                # Work written since (by this process) sets the backend's wake-up, so this
                # returns at once then; other processes' work is found by the short poll.
                await self._wait_for_work(WorkKind.ORCHESTRATION, idle)
            else:
                # Yield to the host loop between batches: with a backend whose calls complete
                # without suspending (the memory backend), this loop would otherwise never let
                # other coroutines run (other workers, the activity loop, the application).
                await asyncio.sleep(0)

    async def _wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        """`backend.wait_for_work`, but a failure (a remote long poll, say) only costs a nap:
        it must not end the dispatch loop, which would leave a worker that looks alive and
        does nothing."""
        try:
            await self.backend.wait_for_work(kind, timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("waiting for %s work failed; polling instead", kind.value)
            await asyncio.sleep(timeout)

    async def _run_batch(self, items: list[OrchestrationWorkItem]) -> None:
        """Process locked items; the caller counted them in flight when it got them, so that
        nothing can lock beyond the limit before this coroutine first runs."""
        try:
            await self._process_batch(items)
        finally:
            self._orchestrations_in_flight -= len(items)

    def _hand_over(self, items: list[OrchestrationWorkItem]) -> None:
        """Process instances that `complete_activities` locked for us, beside the main loop."""
        self._orchestrations_in_flight += len(items)
        task = asyncio.create_task(self._run_batch(items), name="aioflow hand-over")
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)

    async def _process_batch(self, items: list[OrchestrationWorkItem]) -> None:
        completions: list[OrchestrationCompletion] = []
        executors: list[OrchestrationExecutor | None] = []
        for item in items:
            try:
                completion, executor = await self._process(item)
            except asyncio.CancelledError:
                await self._abandon(item)
                raise
            except Exception:
                logger.exception("orchestration step for %s failed; releasing it for a retry",
                                 item.instance.instance_id)
                self._evict(item.instance.instance_id)
                await self._abandon(item, retry_after=1.0)
                continue
            completions.append(completion)
            executors.append(executor)
        if not completions:
            return
        self._keep_activities(completions)
        try:
            committed = await self.backend.complete_orchestrations(completions)
        except Exception:
            logger.exception("committing %d orchestration steps failed; they will be retried "
                             "when their leases expire", len(completions))
            for c in completions:
                self._evict(c.instance_id)
            return
        for completion, executor, ok in zip(completions, executors, committed, strict=True):
            iid = completion.instance_id
            lock = completion.activity_lock
            if ok and lock is not None:
                for task in completion.activities:
                    self._start_activity(ActivityWorkItem(task, lock.lock_token, 1))
            if not ok:
                self.stats["fenced"] += 1
                logger.info("lease on %s was lost to another worker; step discarded", iid)
                self._evict(iid)
            elif executor is None:
                self._evict(iid)
            else:
                self.stats["steps"] += 1
                self._cache[iid] = executor
                self._cache.move_to_end(iid)
                while len(self._cache) > self.cache_size:
                    _, old = self._cache.popitem(last=False)
                    old.close()

    def _keep_activities(self, completions: list[OrchestrationCompletion]) -> None:
        """Ask the backend to commit the new activity tasks already locked by this worker,
        for steps whose tasks all fit in the free activity slots (a big fan-out goes through
        the queue, where other workers can share it)."""
        if self._stopping.is_set():
            return
        free = self.max_concurrent_activities - len(self._running_activities)
        for completion in completions:
            n = len(completion.activities)
            if 0 < n <= free:
                completion.activity_lock = ActivityLock(os.urandom(16).hex(),
                                                        self.lease_seconds)
                free -= n

    async def _abandon(self, item: OrchestrationWorkItem, retry_after: float = 0.0) -> None:
        try:
            await self.backend.abandon_orchestration(
                item.instance.instance_id, item.lock_token, retry_after=retry_after)
        except Exception:
            logger.warning("could not release %s", item.instance.instance_id, exc_info=True)

    def _evict(self, instance_id: str) -> None:
        executor = self._cache.pop(instance_id, None)
        if executor is not None:
            executor.close()

    async def _process(
        self, item: OrchestrationWorkItem
    ) -> tuple[OrchestrationCompletion, OrchestrationExecutor | None]:
        record = item.instance
        iid = record.instance_id
        consumed = [m.id for m in item.messages]
        if record.runtime_status.is_terminal:
            # The instance is finished: nothing can receive these any more.
            self.stats["dropped_messages"] += len(consumed)
            return OrchestrationCompletion(iid, item.lock_token, record, consumed=consumed), None
        if is_entity_instance(iid):
            return await self._process_entity(item), None
        events = self._decode_messages(item.messages)
        executor = self._cache.pop(iid, None)
        # A cached copy is current only if it is at the stored history's end of the SAME
        # execution: after another worker ran a continue-as-new (or the id was reused), the new
        # execution's history can reach the same length, and the stale copy would drop its events.
        if executor is not None and (executor.history_length != item.history_length
                                     or executor.execution_id != record.execution_id
                                     or executor.is_finished):
            executor.close()
            executor = None
        if executor is None:
            executor = OrchestrationExecutor(self.app, iid)
            if item.history_length:
                raw = await self.backend.get_history(iid)
                self.stats["replays"] += 1
                self._guarded(iid, executor.load, [decode_event(b) for b in raw])
        decision: Decision = self._guarded(iid, executor.activate, self.clock(), events)
        completion = self._completion(item, executor, decision, consumed)
        keep = None if decision.is_finished else executor
        if keep is None:
            executor.close()
        return completion, keep

    async def _process_entity(self, item: OrchestrationWorkItem) -> OrchestrationCompletion:
        """Apply a batch of operations to an entity: one atomic commit of the new state, the
        consumed requests, the replies to callers and the entity's own signals."""
        record = item.instance
        iid = record.instance_id
        consumed = [m.id for m in item.messages]
        requests: list[EntityRequest] = []
        for event in self._decode_messages(item.messages):
            if isinstance(event, EntityRequest):
                requests.append(event)
            else:
                self.stats["dropped_messages"] += 1
                logger.warning("entity %s received a %s, which entities do not handle; dropped",
                               iid, event.kind)
        try:
            eid = EntityId.parse(iid)
        except ValueError:
            logger.error("instance %r looks like an entity but its id is malformed; dropping "
                         "its %d messages", iid, len(consumed))
            return OrchestrationCompletion(iid, item.lock_token, record, consumed=consumed)
        registered = self.app.entities.get(eid.name)
        unknown = "" if registered is not None else (
            f"no entity named {eid.name!r} is registered (registered entities: "
            f"{', '.join(sorted(self.app.entities)) or 'none'}); register it with @app.entity "
            f"on the App the worker runs")
        now = self.clock()
        result = await run_entity_batch(registered, eid, record.output, record.custom_status,
                                        requests, now, unknown_error=unknown)
        self.stats["entity_operations"] += result.applied
        row = InstanceRecord(
            instance_id=iid, name=record.name, execution_id=record.execution_id,
            runtime_status=RuntimeStatus.RUNNING, created_time=record.created_time,
            last_updated_time=now if result.applied else record.last_updated_time,
            output=result.state, custom_status=result.scheduler)
        completion = OrchestrationCompletion(iid, item.lock_token, row, consumed=consumed)
        for target, reply in result.replies:
            completion.messages.append(Message(
                id=message_id(target, getattr(reply, "execution_id", ""), f"entity-{iid}",
                              getattr(reply, "task_id", 0)),
                instance_id=target, data=encode_event(reply)))
        self._send_to_entities(completion, [
            (target.instance_id, Message(
                id=message_id(target.instance_id, "entity", f"from-{iid}", seq),
                instance_id=target.instance_id, data=encode_event(request)))
            for target, request, seq in result.signals], now)
        return completion

    @staticmethod
    def _send_to_entities(completion: OrchestrationCompletion,
                          sends: list[tuple[str, Message]], now: float) -> None:
        """Add messages for entities to a completion, creating the entities that do not exist:
        each entity's first message is the start message of a `NewInstance` (delivered to a live
        entity as an ordinary message), the rest follow it in order."""
        created: set[str] = set()
        for target, message in sends:
            if target in created:
                completion.messages.append(message)
                continue
            created.add(target)
            completion.new_instances.append(NewInstance(
                record=InstanceRecord(
                    instance_id=target, name=f"{ENTITY_PREFIX}{EntityId.parse(target).name}",
                    execution_id="entity",
                    runtime_status=RuntimeStatus.PENDING, created_time=now,
                    last_updated_time=now),
                start=message))

    def _guarded(self, instance_id: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run engine code, telling the watchdog which instance is on the CPU."""
        self._busy = (instance_id, time.monotonic(), threading.get_ident())
        try:
            return fn(*args)
        finally:
            self._busy = None

    def _decode_messages(self, messages: list[Message]) -> list[HistoryEvent]:
        events = []
        for m in messages:
            try:
                events.append(decode_event(m.data))
            except Exception:
                logger.error("dropping undecodable message %s for %s", m.id, m.instance_id,
                             exc_info=True)
        return events

    def _completion(self, item: OrchestrationWorkItem, executor: OrchestrationExecutor,
                    decision: Decision, consumed: list[str]) -> OrchestrationCompletion:
        record = item.instance
        iid = record.instance_id
        now = self.clock()
        exec_id = executor.execution_id or record.execution_id
        row = InstanceRecord(
            instance_id=iid, name=record.name, execution_id=record.execution_id,
            runtime_status=decision.runtime_status, created_time=record.created_time,
            last_updated_time=now, input=record.input, output=record.output,
            custom_status=record.custom_status, failure=record.failure)
        if decision.custom_status_changed:
            row.custom_status = dumps(decision.custom_status, what="the custom status")
        if decision.runtime_status.is_terminal:
            row.output = None if decision.output is None else dumps(decision.output)
            row.failure = (None if decision.failure is None
                           else dumps(decision.failure.to_json()))
        completion = OrchestrationCompletion(
            instance_id=iid, lock_token=item.lock_token, instance=row,
            new_history=[encode_event(e) for e in decision.new_events], consumed=consumed)
        for a in decision.activities:
            completion.activities.append(ActivityTask(
                id=activity_task_id(iid, exec_id, a.task_id), instance_id=iid,
                data=dumps({"name": a.name, "input": a.input, "task_id": a.task_id,
                            "execution_id": exec_id})))
        for t in decision.timers:
            fired = TimerFired(ts=t.fire_at, task_id=t.task_id, execution_id=exec_id,
                               fire_at=t.fire_at)
            completion.messages.append(Message(
                id=message_id(iid, exec_id, "timer", t.task_id), instance_id=iid,
                data=encode_event(fired), visible_at=t.fire_at))
        for s in decision.sub_orchestrations:
            child_exec = child_execution_id(iid, exec_id, s.task_id)
            start = ExecutionStarted(
                ts=now, name=s.name, execution_id=child_exec, input=s.input,
                parent_instance_id=iid, parent_execution_id=exec_id, parent_task_id=s.task_id)
            completion.new_instances.append(NewInstance(
                record=InstanceRecord(
                    instance_id=s.instance_id, name=s.name, execution_id=child_exec,
                    runtime_status=RuntimeStatus.PENDING, created_time=now,
                    last_updated_time=now, input=dumps(s.input)),
                start=Message(id=message_id(s.instance_id, child_exec, "start", 0),
                              instance_id=s.instance_id, data=encode_event(start))))
        entity_sends = []
        for op in decision.entity_messages:
            request = EntityRequest(
                ts=now, operation=op.operation, input=op.input, op_kind=op.op_kind, sender=iid,
                sender_execution_id=exec_id, section=op.section,
                task_id=op.task_id if op.op_kind in ("call", "lock") else None)
            if op.op_kind == "unlock":  # the same id however the section ends: sent once
                mid = message_id(op.entity_id, exec_id, f"unlock-{iid}-{op.section}", 0)
            else:
                mid = message_id(op.entity_id, exec_id, f"op-{iid}", op.task_id)
            entity_sends.append((op.entity_id, Message(id=mid, instance_id=op.entity_id,
                                                       data=encode_event(request))))
        self._send_to_entities(completion, entity_sends, now)
        for target, event in decision.outbound:
            completion.messages.append(Message(
                id=message_id(target, getattr(event, "execution_id", ""),
                              f"child-{iid}", getattr(event, "task_id", 0)),
                instance_id=target, data=encode_event(event)))
        if decision.continue_as_new:
            self._continue_as_new(completion, executor, decision, exec_id, now)
        return completion

    def _continue_as_new(self, completion: OrchestrationCompletion,
                         executor: OrchestrationExecutor, decision: Decision, exec_id: str,
                         now: float) -> None:
        iid = completion.instance_id
        new_exec = next_execution_id(iid, exec_id)
        completion.reset_history = True
        completion.new_history = []
        completion.instance.execution_id = new_exec
        completion.instance.input = dumps(decision.new_input)
        completion.instance.output = None
        completion.instance.failure = None
        start = ExecutionStarted(
            ts=now, name=executor.name, execution_id=new_exec, input=decision.new_input,
            parent_instance_id=executor.parent_instance_id,
            parent_execution_id=executor.parent_execution_id,
            parent_task_id=executor.parent_task_id)
        completion.messages.append(Message(
            id=message_id(iid, new_exec, "start", 0), instance_id=iid, data=encode_event(start)))
        for n, event in enumerate(decision.carried_events):
            carried = EventRaised(ts=event.ts, name=event.name, input=event.input)
            completion.messages.append(Message(
                id=message_id(iid, new_exec, "carried", n), instance_id=iid,
                data=encode_event(carried)))

    # == activities ========================================================================
    async def _activity_loop(self) -> None:
        slots = self._activity_slots
        assert slots is not None
        idle = 0.001
        while not self._stopping.is_set():
            await slots.acquire()
            slots.release()
            free = self.max_concurrent_activities - len(self._running_activities)
            if free <= 0:
                await asyncio.sleep(0.001)
                continue
            try:
                items = await self.backend.lock_activities(
                    self.worker_id, max_items=min(free, self.activity_batch_size),
                    lease_seconds=self.lease_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("locking activity tasks failed; retrying")
                await asyncio.sleep(min(self.poll_interval, 1.0))
                continue
            if not items:
                await self._wait_for_work(WorkKind.ACTIVITY, idle)
                idle = min(idle * 2, self.poll_interval)
                continue
            idle = 0.001
            for item in items:
                await slots.acquire()
                task = asyncio.create_task(self._run_activity(item))
                self._running_activities[item.task.id] = (item, task)
                self.stats["activities_locked"] += 1
            if len(items) < min(free, self.activity_batch_size):
                # All visible tasks were taken: wait for a wake-up instead of an empty poll.
                await self._wait_for_work(WorkKind.ACTIVITY, idle)

    def _start_activity(self, item: ActivityWorkItem) -> None:
        """Run a task this worker already holds (committed locked by its own step)."""
        if item.task.id in self._running_activities:
            return
        task = asyncio.create_task(self._run_activity(item, take_slot=True))
        self._running_activities[item.task.id] = (item, task)
        self.stats["activities_kept"] += 1

    async def _run_activity(self, item: ActivityWorkItem, *, take_slot: bool = False) -> None:
        assert self._activity_slots is not None
        if take_slot:
            try:
                await self._activity_slots.acquire()
            except BaseException:
                self._running_activities.pop(item.task.id, None)
                raise
        try:
            message = await self._execute_activity(item.task)
            self._results.append(ActivityResult(item.task.id, item.lock_token, message))
            self._results_ready.set()
            self.stats["activities"] += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            # Only an undecodable task gets here (the activity's own errors become results).
            # It stays locked until its lease expires, so it cannot spin a worker.
            self.stats["malformed_activity_tasks"] += 1
            logger.error("activity task %s of instance %r is malformed and cannot run; it is "
                         "handed out again when its lease expires", item.task.id,
                         item.task.instance_id, exc_info=True)
        finally:
            self._running_activities.pop(item.task.id, None)
            assert self._activity_slots is not None
            self._activity_slots.release()

    async def _execute_activity(self, task: ActivityTask) -> Message:
        spec = loads(task.data)
        name, task_id, exec_id = spec["name"], spec["task_id"], spec["execution_id"]
        iid = task.instance_id
        now = self.clock()
        mid = message_id(iid, exec_id, "result", task_id)
        try:
            reg = self.app.get_activity(name)
            value = from_json_value(spec.get("input"), reg.input_type)
            args = (value,) if reg.takes_input else ()
            if reg.is_async:
                result = await reg.fn(*args)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, _call, reg.fn, args)
            payload = to_json_value(result, what=f"the result of activity {name!r}")
            event: HistoryEvent = TaskCompleted(ts=self.clock(), task_id=task_id,
                                                execution_id=exec_id, result=payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            event = TaskFailed(
                ts=now, task_id=task_id, execution_id=exec_id, error_type=type(exc).__name__,
                message=str(exc) or type(exc).__name__,
                stack_trace="".join(traceback.format_exception(exc)))
        return Message(id=mid, instance_id=iid, data=encode_event(event))

    async def _result_flusher(self) -> None:
        while not self._stopping.is_set():
            await self._results_ready.wait()
            self._results_ready.clear()
            await self._flush_results()

    async def _flush_results(self) -> None:
        while self._results:
            batch, self._results = self._results, []
            lock = None
            free = self.max_concurrent_orchestrations - self._orchestrations_in_flight
            if free > 0 and not self._stopping.is_set():
                # Lock the instances these results wake in the same round trip.
                lock = OrchestrationLock(self.worker_id, free, self.lease_seconds)
            try:
                items = await self.backend.complete_activities(batch, lock=lock)
            except asyncio.CancelledError:
                self._results = batch + self._results
                raise
            except Exception:
                logger.exception("committing %d activity results failed; retrying", len(batch))
                self._results = batch + self._results
                await asyncio.sleep(0.5)
                continue
            if items:
                self.stats["handed_over"] += len(items)
                self._hand_over(list(items))

    async def _lease_renewer(self) -> None:
        """Keep leases of long-running activities alive."""
        period = max(self.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(period)
            for task_id, (item, _task) in list(self._running_activities.items()):
                try:
                    ok = await self.backend.renew_activity_lease(
                        task_id, item.lock_token, self.lease_seconds)
                except Exception:
                    logger.warning("renewing the lease of %s failed", task_id, exc_info=True)
                    continue
                if not ok:
                    logger.warning("activity task %s was taken over by another worker", task_id)

    # == watchdog ==========================================================================
    def _watch(self, stopping: asyncio.Event) -> None:
        reported: tuple[str, float, int] | None = None
        while not stopping.is_set():
            time.sleep(min(1.0, self.watchdog_seconds / 2))
            busy = self._busy
            if busy is None or busy is reported:
                continue
            instance_id, since, thread_id = busy
            if time.monotonic() - since >= self.watchdog_seconds:
                reported = busy
                frame = sys._current_frames().get(thread_id)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
                logger.error(
                    "orchestrator of instance %r has run for %.0f s without yielding: "
                    "orchestrator code must not block (no time.sleep, no busy loops, no blocking "
                    "I/O); the worker is stuck until it returns. Stack:\n%s",
                    instance_id, time.monotonic() - since, stack)
                self.stats["watchdog_reports"] += 1


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)
