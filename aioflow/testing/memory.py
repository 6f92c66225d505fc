"""`MemoryBackend`: the backend protocol held in process memory, for tests and the test kit.

It implements `aioflow.backend.Backend` with exactly the documented semantics (it passes the
conformance suite in `aioflow.testing.conformance`), keeps everything in plain Python objects,
and adds two things a test needs and a real store cannot offer:

* an injectable clock (`MemoryBackend(clock=...)`): every "now" decision (message visibility,
  leases, abandon delays) reads `self.clock()`, so a test kit can skip time;
* `next_visible_at()`: when, by that clock, work would next become available on its own.

Atomicity comes from asyncio itself: no method awaits while it changes state, so each call is
applied whole before any other coroutine runs. The backend is therefore safe to share between
coroutines of one event loop, but not between threads. Nothing survives the process; named
backends (``memory://NAME``) survive `close()` and are shared within the process.

Lookups are linear scans over instances and tasks: fine for tests and examples, not a store for
production load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from aioflow.backend import (
    ActivityLock,
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    InstanceQuery,
    InstanceRecord,
    Message,
    NewInstance,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    PurgeResult,
    WorkKind,
    decode_continuation,
    encode_continuation,
)
from aioflow.errors import ConfigurationError, InstanceExistsError

__all__ = ["MemoryBackend", "open_backend"]

_SCHEME = "memory://"


@dataclass(slots=True)
class _Instance:
    """A stored instance: its row, history and orchestration lock.

    `locked_until` is when the instance may next be locked: the lease expiry while a worker holds
    it, the end of `retry_after` after an abandon, 0 when free. `lock_token` is the current token
    (None when released); it stays current after the lease expires until another worker locks.
    """

    record: InstanceRecord
    history: list[bytes] = field(default_factory=list)
    lock_token: str | None = None
    locked_until: float = 0.0


@dataclass(slots=True)
class _Inbox:
    """The messages waiting for one instance id, and every message id it ever accepted.

    An inbox exists independently of the instance row: messages for an id with no row are kept
    (and delivered once the row is created). `messages` maps id -> (send sequence, message) in
    send order; `seen` keeps consumed ids so that re-sends stay no-ops.
    """

    messages: dict[str, tuple[int, Message]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Task:
    """A queued activity task and its lease (`locked_until` 0 when free)."""

    task: ActivityTask
    lock_token: str | None = None
    locked_until: float = 0.0
    dequeue_count: int = 0


class MemoryBackend:
    """An in-process `aioflow.backend.Backend`.

    Guarantees, beyond the protocol's own:

    * Records are copied on the way in and on the way out: mutating an `InstanceRecord` you
      passed in or got back never changes what is stored.
    * Lock tokens are fresh `uuid4` hex strings.
    * A lock token stays current until the instance is released, abandoned, locked by another
      worker after the lease expired, replaced or purged. An expired lease nobody took over can
      therefore still commit and be renewed, exactly as the protocol words it.
    * Several completions in one `complete_orchestrations` call are applied in order, each one
      checked against the state its predecessors left (so two completions under the same token
      commit only while the first kept the lock).
    * `wait_for_work` returns at once when work of that kind is available, as soon as some is
      added or abandoned, and no later than `next_visible_at()` says it appears by itself
      (measured with `clock`, so with a fake clock that is an early, spurious return).
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock: Callable[[], float] = clock
        self._instances: dict[str, _Instance] = {}
        self._inboxes: dict[str, _Inbox] = {}
        self._tasks: dict[str, _Task] = {}
        self._sequence = itertools.count()
        self._waiters: dict[WorkKind, set[asyncio.Event]] = {kind: set() for kind in WorkKind}

    # -- instances -------------------------------------------------------------------------

    async def create_instance(self, record: InstanceRecord, start: Message) -> None:
        """Create `record` with `start` in its inbox, or raise `InstanceExistsError`.

        A live instance with the same id is left untouched; a terminal one is replaced, which
        discards its row, history, inbox (and remembered message ids) and lock. Messages already
        waiting for an id that has no row are kept and delivered before `start`.
        """
        _check_same_instance(record, start, "create_instance")
        existing = self._instances.get(record.instance_id)
        if existing is not None and not existing.record.runtime_status.is_terminal:
            raise InstanceExistsError(record.instance_id, existing.record.runtime_status.value)
        self._put_instance(record, start)
        self._notify(WorkKind.ORCHESTRATION)

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """A copy of the stored row, or None if there is no instance with that id."""
        instance = self._instances.get(instance_id)
        return None if instance is None else dataclasses.replace(instance.record)

    async def get_history(self, instance_id: str) -> list[bytes]:
        """The stored history events, oldest first ([] if the instance is unknown)."""
        instance = self._instances.get(instance_id)
        return [] if instance is None else list(instance.history)

    async def query_instances(
        self, query: InstanceQuery, *, page_size: int = 100, continuation: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page of matching rows ordered by (created_time, instance_id).

        The continuation token encodes the last row's sort key, so paging is stable while
        instances are added or purged: every instance that matches for the whole walk is returned
        exactly once. Raises ValueError for a page_size below 1 or a malformed token.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        after = None if continuation is None else decode_continuation(continuation)
        matches = sorted(
            (
                instance.record
                for instance in self._instances.values()
                if _matches(instance.record, query)
            ),
            key=_sort_key,
        )
        if after is not None:
            matches = [record for record in matches if _sort_key(record) > after]
        page = [dataclasses.replace(record) for record in matches[:page_size]]
        more = len(matches) > page_size
        return page, (encode_continuation(*_sort_key(page[-1])) if more else None)

    async def purge_instances(
        self, *, instance_id: str | None = None, query: InstanceQuery | None = None
    ) -> PurgeResult:
        """Delete terminal instances: row, history, inbox, remembered message ids, tasks.

        Give exactly one of `instance_id` and `query` (ValueError otherwise). Live instances are
        never purged, whatever the query says.
        """
        if (instance_id is None) == (query is None):
            raise ValueError("purge_instances needs exactly one of instance_id= or query=")
        if instance_id is not None:
            candidates = [instance_id] if instance_id in self._instances else []
        else:
            assert query is not None
            candidates = [
                iid for iid, inst in self._instances.items() if _matches(inst.record, query)
            ]
        purged = [
            iid for iid in candidates if self._instances[iid].record.runtime_status.is_terminal
        ]
        for iid in purged:
            self._discard_instance(iid)
            for task_id in [t.task.id for t in self._tasks.values() if t.task.instance_id == iid]:
                del self._tasks[task_id]
        return PurgeResult(deleted_instance_count=len(purged))

    # -- messages --------------------------------------------------------------------------

    async def send_messages(self, messages: Sequence[Message]) -> None:
        """Append messages to their inboxes in the given order; ids already sent are ignored."""
        if any([self._deliver(message) for message in messages]):
            self._notify(WorkKind.ORCHESTRATION)

    # -- orchestration work items ----------------------------------------------------------

    async def lock_orchestrations(
        self, worker_id: str, *, max_items: int, lease_seconds: float, max_messages: int = 1000
    ) -> list[OrchestrationWorkItem]:
        """Lock up to `max_items` instances that have visible messages and no current lease.

        Instances whose oldest visible message was sent first are handed out first. Each work
        item holds at most `max_messages` of its visible messages, oldest first.
        """
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        return self._lock_instances(self._instances, worker_id, max_items, lease_seconds,
                                    max_messages)

    def _lock_instances(self, candidates: Iterable[str], worker_id: str, max_items: int,
                        lease_seconds: float, max_messages: int) -> list[OrchestrationWorkItem]:
        """Lock up to `max_items` of the lockable instances among `candidates`."""
        now = self.clock()
        ready: list[tuple[int, str, list[Message]]] = []
        for instance_id in candidates:
            instance = self._instances.get(instance_id)
            if instance is None or instance.locked_until > now:
                continue
            visible = self._visible_messages(instance_id, now)
            if visible:
                ready.append((visible[0][0], instance_id, [m for _, m in visible]))
        ready.sort(key=lambda entry: entry[0])

        items = []
        for _, instance_id, messages in ready[: max(max_items, 0)]:
            instance = self._instances[instance_id]
            instance.lock_token = _new_token()
            instance.locked_until = now + lease_seconds
            items.append(
                OrchestrationWorkItem(
                    instance=dataclasses.replace(instance.record),
                    messages=messages[:max_messages],
                    history_length=len(instance.history),
                    lock_token=instance.lock_token,
                )
            )
        return items

    async def complete_orchestrations(
        self, completions: Sequence[OrchestrationCompletion]
    ) -> list[bool]:
        """Apply each completion whose lock token is current; one flag per completion.

        A completion is checked, then applied whole (history, consumption, row, new instances,
        messages, activity tasks, release), before the next is checked. A False flag means
        nothing of that completion was written. Malformed completions (a row or start message
        naming another instance) raise ValueError before anything is applied.
        """
        for completion in completions:
            _check_completion(completion)
        flags = []
        for completion in completions:
            instance = self._instances.get(completion.instance_id)
            if instance is None or not _holds(instance.lock_token, completion.lock_token):
                flags.append(False)
                continue
            self._apply(instance, completion)
            flags.append(True)
        if any(flags):
            self._notify(WorkKind.ORCHESTRATION)
            if any(c.activities and c.activity_lock is None
                   for c, ok in zip(completions, flags, strict=True) if ok):
                self._notify(WorkKind.ACTIVITY)
        return flags

    async def abandon_orchestration(
        self, instance_id: str, lock_token: str, *, retry_after: float = 0.0
    ) -> None:
        """Release the lock without committing; the instance is lockable again `retry_after`
        seconds from now. A token that is not current is ignored."""
        instance = self._instances.get(instance_id)
        if instance is None or not _holds(instance.lock_token, lock_token):
            return
        instance.lock_token = None
        instance.locked_until = self.clock() + retry_after if retry_after > 0 else 0.0
        self._notify(WorkKind.ORCHESTRATION)

    async def renew_orchestration_lease(
        self, instance_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to `lease_seconds` from now; False if the token is not current."""
        instance = self._instances.get(instance_id)
        if instance is None or not _holds(instance.lock_token, lock_token):
            return False
        instance.locked_until = self.clock() + lease_seconds
        return True

    # -- activity work items ---------------------------------------------------------------

    async def lock_activities(
        self, worker_id: str, *, max_items: int, lease_seconds: float
    ) -> list[ActivityWorkItem]:
        """Lock up to `max_items` tasks that are free or whose lease expired, oldest first."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        now = self.clock()
        items: list[ActivityWorkItem] = []
        for queued in self._tasks.values():
            if len(items) >= max_items:
                break
            if queued.locked_until > now:
                continue
            queued.lock_token = _new_token()
            queued.locked_until = now + lease_seconds
            queued.dequeue_count += 1
            items.append(ActivityWorkItem(queued.task, queued.lock_token, queued.dequeue_count))
        return items

    async def complete_activities(
        self, results: Sequence[ActivityResult], *, lock: OrchestrationLock | None = None
    ) -> list[OrchestrationWorkItem]:
        """Delete each result's task (if still queued, whoever holds it) and deliver its message
        (ignored if that message id was already delivered to the instance). With `lock`, lock
        the lockable instances among those the results went to and return them."""
        if lock is not None:
            _check_lock(lock)
        delivered: set[str] = set()
        for result in results:
            self._tasks.pop(result.task_id, None)
            if self._deliver(result.message):
                delivered.add(result.message.instance_id)
        items: list[OrchestrationWorkItem] = []
        if lock is not None and delivered:
            items = self._lock_instances(
                [i for i in dict.fromkeys(r.message.instance_id for r in results)
                 if i in delivered],
                lock.worker_id, lock.max_items, lock.lease_seconds, lock.max_messages)
        if len(items) < len(delivered):  # someone else may take the rest
            self._notify(WorkKind.ORCHESTRATION)
        return items

    async def abandon_activity(self, task_id: str, lock_token: str) -> None:
        """Make a locked task available again now. A token that is not current is ignored."""
        queued = self._tasks.get(task_id)
        if queued is None or not _holds(queued.lock_token, lock_token):
            return
        queued.lock_token = None
        queued.locked_until = 0.0
        self._notify(WorkKind.ACTIVITY)

    async def renew_activity_lease(
        self, task_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to `lease_seconds` from now; False if the token is not current."""
        queued = self._tasks.get(task_id)
        if queued is None or not _holds(queued.lock_token, lock_token):
            return False
        queued.locked_until = self.clock() + lease_seconds
        return True

    # -- lifecycle and wake-ups ------------------------------------------------------------

    async def wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        """Return when work of `kind` may be available, or after `timeout` seconds.

        Returns at once if such work is available now; otherwise when work of that kind is added
        or abandoned, when the earliest delayed message or lease expiry for that kind is due by
        `clock`, or after `timeout`, whichever comes first.
        """
        now = self.clock()
        if self._work_available(kind, now):
            await asyncio.sleep(0)
            return
        delay = timeout
        due = self._next_available_at(kind, now)
        if due is not None:
            delay = min(delay, due - now)
        if delay <= 0:
            await asyncio.sleep(0)
            return
        wake = asyncio.Event()
        self._waiters[kind].add(wake)
        try:
            await asyncio.wait_for(wake.wait(), delay)
        except TimeoutError:
            pass
        finally:
            self._waiters[kind].discard(wake)

    def next_visible_at(self) -> float | None:
        """The earliest future time (by `clock`) at which work becomes available on its own.

        That is a delayed message of an existing instance becoming visible, an abandon's
        `retry_after` ending, or a lease expiring on an instance with messages or on an activity
        task. None when nothing is pending in the future. Work that is available already does
        not count: this answers "how far may a time-skipping clock jump".
        """
        now = self.clock()
        times = [self._next_available_at(kind, now) for kind in WorkKind]
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def wake_waiters(self) -> None:
        """Wake every `wait_for_work` caller (a test kit calls this after moving its clock)."""
        for kind in WorkKind:
            self._notify(kind)

    async def close(self) -> None:
        """Does nothing: the state stays, so a named backend can be opened again."""

    async def __aenter__(self) -> MemoryBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals -------------------------------------------------------------------------

    def _put_instance(self, record: InstanceRecord, start: Message) -> None:
        """Create (or replace a terminal) instance and deliver its start message."""
        if record.instance_id in self._instances:
            self._discard_instance(record.instance_id)
        self._instances[record.instance_id] = _Instance(record=dataclasses.replace(record))
        self._deliver(start)

    def _discard_instance(self, instance_id: str) -> None:
        """Forget an instance's row, history, lock, inbox and remembered message ids."""
        self._instances.pop(instance_id, None)
        self._inboxes.pop(instance_id, None)

    def _deliver(self, message: Message) -> bool:
        """Append `message` to its inbox unless its id was seen there; True if appended."""
        inbox = self._inboxes.setdefault(message.instance_id, _Inbox())
        if message.id in inbox.seen:
            return False
        inbox.seen.add(message.id)
        inbox.messages[message.id] = (next(self._sequence), message)
        return True

    def _enqueue(self, task: ActivityTask, lock: ActivityLock | None = None) -> None:
        if task.id in self._tasks:
            return
        if lock is None:
            self._tasks[task.id] = _Task(task=task)
        else:
            self._tasks[task.id] = _Task(task=task, lock_token=lock.lock_token,
                                         locked_until=self.clock() + lock.lease_seconds,
                                         dequeue_count=1)

    def _apply(self, instance: _Instance, completion: OrchestrationCompletion) -> None:
        if completion.reset_history:
            instance.history.clear()
        instance.history.extend(completion.new_history)
        inbox = self._inboxes.get(completion.instance_id)
        if inbox is not None:
            for message_id in completion.consumed:
                inbox.messages.pop(message_id, None)
            if completion.reset_history:  # a new execution: forget the old one's consumed ids
                inbox.seen = set(inbox.messages)
        instance.record = dataclasses.replace(completion.instance)
        # New instances first, so that messages to them in this same step reach the new inbox.
        for new in completion.new_instances:
            self._start_new_instance(new)
        for message in completion.messages:
            self._deliver(message)
        for task in completion.activities:
            self._enqueue(task, completion.activity_lock)
        if completion.release and self._instances.get(completion.instance_id) is instance:
            instance.lock_token = None
            instance.locked_until = 0.0

    def _start_new_instance(self, new: NewInstance) -> None:
        existing = self._instances.get(new.record.instance_id)
        if existing is not None and not existing.record.runtime_status.is_terminal:
            self._deliver(new.start)
        else:
            self._put_instance(new.record, new.start)

    def _visible_messages(self, instance_id: str, now: float) -> list[tuple[int, Message]]:
        inbox = self._inboxes.get(instance_id)
        if inbox is None:
            return []
        return [entry for entry in inbox.messages.values() if entry[1].visible_at <= now]

    def _work_available(self, kind: WorkKind, now: float) -> bool:
        if kind is WorkKind.ACTIVITY:
            return any(queued.locked_until <= now for queued in self._tasks.values())
        for instance_id, instance in self._instances.items():
            if instance.locked_until > now:
                continue
            inbox = self._inboxes.get(instance_id)
            if inbox is not None and any(
                message.visible_at <= now for _, message in inbox.messages.values()
            ):
                return True
        return False

    def _next_available_at(self, kind: WorkKind, now: float) -> float | None:
        """The earliest time after `now` at which work of `kind` appears without any call."""
        times: list[float] = []
        if kind is WorkKind.ACTIVITY:
            times = [q.locked_until for q in self._tasks.values() if q.locked_until > now]
        else:
            for instance_id, instance in self._instances.items():
                inbox = self._inboxes.get(instance_id)
                if inbox is None or not inbox.messages:
                    continue
                first_visible = min(message.visible_at for _, message in inbox.messages.values())
                ready_at = max(instance.locked_until, first_visible)
                if ready_at > now:
                    times.append(ready_at)
        return min(times) if times else None

    def _notify(self, kind: WorkKind) -> None:
        for wake in self._waiters[kind]:
            wake.set()


# -- helpers ---------------------------------------------------------------------------------


def _check_lock(lock: OrchestrationLock) -> None:
    if lock.lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be positive, got {lock.lease_seconds}")
    if lock.max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {lock.max_messages}")


def _new_token() -> str:
    return uuid.uuid4().hex


def _holds(current: str | None, token: str) -> bool:
    return current is not None and current == token


def _check_same_instance(record: InstanceRecord, start: Message, what: str) -> None:
    if start.instance_id != record.instance_id:
        raise ValueError(
            f"{what}: the start message is addressed to {start.instance_id!r} but the record "
            f"is for {record.instance_id!r}; both must name the same instance"
        )


def _check_completion(completion: OrchestrationCompletion) -> None:
    if completion.instance.instance_id != completion.instance_id:
        raise ValueError(
            f"complete_orchestrations: the completion is for {completion.instance_id!r} but its "
            f"instance row is for {completion.instance.instance_id!r}"
        )
    for new in completion.new_instances:
        _check_same_instance(new.record, new.start, "complete_orchestrations (new instance)")


def _matches(record: InstanceRecord, query: InstanceQuery) -> bool:
    return (
        (query.runtime_status is None or record.runtime_status in query.runtime_status)
        and (query.created_from is None or record.created_time >= query.created_from)
        and (query.created_to is None or record.created_time < query.created_to)
        and (query.name is None or record.name == query.name)
        and (
            query.instance_id_prefix is None
            or record.instance_id.startswith(query.instance_id_prefix)
        )
    )


def _sort_key(record: InstanceRecord) -> tuple[float, str]:
    return (record.created_time, record.instance_id)


# -- URLs --------------------------------------------------------------------------------------

_named_backends: dict[str, MemoryBackend] = {}


def open_backend(url: str) -> MemoryBackend:
    """Open a memory backend from a URL.

    ``memory://`` gives a fresh, private backend on every call. ``memory://NAME`` gives the same
    backend for the same NAME for the life of the process (closing it keeps its state), so two
    parts of a test (a client and a worker, say) can share one store by URL alone.
    """
    if not url.lower().startswith(_SCHEME):
        raise ConfigurationError(
            f"not a memory backend URL: {url!r}; use 'memory://' for a fresh in-process "
            f"backend or 'memory://NAME' for one shared by name within this process"
        )
    name = url[len(_SCHEME):]
    if any(char in name for char in "/?#@:") or name != name.strip():
        raise ConfigurationError(
            f"bad memory backend URL {url!r}: the name after 'memory://' must be a plain word "
            f"(no '/', '?', '#', '@', ':' or surrounding spaces), e.g. 'memory://tests'"
        )
    if not name:
        return MemoryBackend()
    backend = _named_backends.get(name)
    if backend is None:
        backend = _named_backends[name] = MemoryBackend()
    return backend
