"""`SqliteBackend`: the aioflow backend protocol on one SQLite database file.

What is guaranteed
------------------

* Every write operation is one SQLite transaction, opened with ``BEGIN IMMEDIATE``: it takes the
  database's write lock before it reads anything, so the read-check-write steps inside it
  (checking a fencing token, picking unlocked instances) cannot race with writers in this or
  any other process. A transaction either commits completely or not at all; an exception
  anywhere inside it (a bad payload, a full disk) rolls it back. `complete_orchestrations` and
  `complete_activities` commit all the items of one call in one transaction.
* Several processes may share one database file (on a local file system: WAL mode does not
  work over network shares). A writer that finds the write lock taken waits up to
  ``busy_timeout`` seconds, then fails with ``sqlite3.OperationalError: database is locked``.
  Readers never wait for writers (WAL).
* Durability depends on ``synchronous``. The default, ``"NORMAL"``, with WAL: a committed
  transaction survives the process crashing or being killed at any point (that is what the
  crash tests exercise); on power loss or an OS crash the last few transactions before the
  failure may be rolled back (never corrupted: the database stays consistent). With
  ``synchronous="FULL"`` (or ``"EXTRA"``) every commit is also fsynced before it returns, so it
  survives power loss too, at the cost of one fsync per commit.

How it talks to SQLite
----------------------

One aiosqlite connection per backend object. aiosqlite owns a thread that executes queued
calls one at a time; each hop to it and back costs ~70-150 µs on a 2-core machine, far more
than the SQL itself. So every backend operation is written as one plain synchronous function
(`aioflow_sqlite._sql`) that does all its statements, and is shipped to the connection's thread
in ONE hop (see `_one_hop_runner`). Because the thread runs those functions strictly one after
another, operations from this process are serialized without an asyncio lock, and a read never
sees half of one of this process's transactions.

Cancelling a call does not cancel its transaction: once queued it runs to the end (commit or
rollback) on the connection thread. A cancelled `lock_orchestrations` / `lock_activities` may
thus lock work nobody received; it is handed out again when the lease expires.

Lease expiry uses ``time.time()``: processes sharing a file must have reasonably synchronized
clocks (they are on one machine).

Storage grows with use in one way to know about: the ids of consumed messages are kept (the
payload is dropped) for as long as their instance exists, as the idempotence contract requires;
an eternal orchestration (continue-as-new forever) accumulates them until it is purged.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar

import aiosqlite

from aioflow.backend import (
    ActivityResult,
    ActivityWorkItem,
    InstanceQuery,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    PurgeResult,
    WorkKind,
)
from aioflow.errors import ConfigurationError

from . import _sql
from ._schema import set_up_connection

__all__ = ["SYNCHRONOUS_MODES", "SqliteBackend"]

T = TypeVar("T")

#: Accepted values of ``synchronous`` (SQLite's PRAGMA synchronous). OFF is not offered: it
#: can lose committed transactions to an OS crash, which a durable-execution store must not.
SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")

_Runner = Callable[..., Awaitable[Any]]

#: How many future wake-up times (delayed messages written by this process) we remember.
_MAX_DUE = 10_000


def _one_hop_runner(db: aiosqlite.Connection) -> Callable[..., Awaitable[Any]] | None:
    """aiosqlite's way to run an arbitrary callable on its connection thread, or None.

    ONE-HOP HELPER, the only place that touches aiosqlite internals. Every public aiosqlite
    method (execute, executemany, commit, fetch...) queues exactly one sqlite3 call, so a
    transaction of N statements would cost N + 2 thread hops. All of them are built on the
    private ``Connection._execute(fn, *args)``, which queues ``fn(*args)`` on the connection's
    thread and returns its result: one hop for a whole transaction. aiosqlite has no public
    equivalent (checked up to 0.22.1), so we use it, and when a release drops or renames it,
    `SqliteBackend` falls back to its own single worker thread over the same sqlite3 connection
    (still one hop per transaction; see `SqliteBackend._open`).
    """
    execute = getattr(db, "_execute", None)
    return execute if callable(execute) else None


def _connection_class(
    setup: Callable[[sqlite3.Connection], None], opened: list[sqlite3.Connection]
) -> type[sqlite3.Connection]:
    """A sqlite3.Connection subclass (passed as ``factory=``) that configures itself.

    It runs `setup` (pragmas, schema) on the connection's thread as part of connecting, and
    hands the raw connection out through `opened`, so the backend gets the sqlite3 object
    without reaching into aiosqlite for it.
    """

    class _Connection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            try:
                setup(self)
            except BaseException:
                self.close()
                raise
            opened.append(self)

    return _Connection


class SqliteBackend:
    """The aioflow backend protocol on a SQLite file (see the module docstring for guarantees).

    ``path`` is the database file (created with its schema on first use; its directory must
    exist). ``busy_timeout`` (seconds) is how long a write waits for another process's write
    lock. ``synchronous`` is ``"NORMAL"`` (durable against process crashes), ``"FULL"`` or
    ``"EXTRA"`` (also durable against power loss).

    The connection opens lazily on the first call (or on ``async with``); close the backend
    with ``await backend.close()`` or by leaving ``async with``. Use one backend object per
    process (and event loop); any number of processes may open the same file.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0,
        synchronous: str = "NORMAL",
    ) -> None:
        raw = os.fspath(path)
        if raw in ("", ":memory:") or raw.startswith("file::memory:"):
            raise ConfigurationError(
                f"SqliteBackend needs a database file, not {raw!r}: an in-memory SQLite "
                f"database lives in one connection, so other workers and processes could not "
                f"share it and nothing would survive a restart. Use the in-memory backend "
                f"(memory://) for tests, or a file path"
            )
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"invalid synchronous mode {synchronous!r} for the SQLite backend; valid "
                f"values: {', '.join(SYNCHRONOUS_MODES)}"
            )
        if not isinstance(busy_timeout, (int, float)) or busy_timeout < 0:
            raise ConfigurationError(
                f"invalid busy_timeout {busy_timeout!r}: give the seconds a write may wait "
                f"for another process's lock, a number >= 0"
            )
        self.path: str = os.path.abspath(raw)
        self.busy_timeout: float = float(busy_timeout)
        self.synchronous: str = mode
        self._db: aiosqlite.Connection | None = None
        self._hop: _Runner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._events = {kind: asyncio.Event() for kind in WorkKind}
        self._due: list[float] = []  # heap of visible_at of delayed messages we wrote

    def __repr__(self) -> str:
        return f"SqliteBackend({self.path!r}, synchronous={self.synchronous!r})"

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> _Runner:
        """Open the connection once (concurrent first calls wait for the same open)."""
        async with self._open_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._hop is not None:
                return self._hop
            opened: list[sqlite3.Connection] = []
            setup = partial(
                set_up_connection, path=self.path, busy_timeout=self.busy_timeout,
                synchronous=self.synchronous,
            )
            connecting = aiosqlite.connect(
                self.path,
                isolation_level=None,  # autocommit: we issue BEGIN IMMEDIATE/COMMIT
                check_same_thread=False,  # for the fallback thread; access is serialized
                timeout=self.busy_timeout,
                factory=_connection_class(setup, opened),
            )
            try:
                db = await connecting
            except sqlite3.Error as exc:
                # aiosqlite stops its thread after a failed connect without waiting for it;
                # wait here, or the thread may report to an event loop that is gone by then.
                thread = getattr(connecting, "_thread", None)
                if thread is not None:
                    await asyncio.to_thread(thread.join, 5.0)
                raise ConfigurationError(
                    f"cannot open SQLite database {self.path!r}: {exc} (check that the "
                    f"directory exists and is writable, and that the file is an SQLite "
                    f"database)"
                ) from exc
            conn = opened[0]
            execute = _one_hop_runner(db)
            if execute is not None:

                def hop(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
                    return execute(fn, conn, *args)

            else:  # aiosqlite without _execute: our own single thread, still one hop
                executor = ThreadPoolExecutor(1, thread_name_prefix="aioflow-sqlite")
                self._executor = executor

                def hop(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
                    loop = asyncio.get_running_loop()
                    return loop.run_in_executor(executor, partial(fn, conn, *args))

            self._db = db
            self._hop = hop
            return hop

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on the connection's thread: one hop."""
        hop = self._hop
        if hop is None:
            hop = await self._open()
        return await hop(fn, *args)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Close the connection after the operations already queued have finished.

        Idempotent. The backend cannot be used afterwards.
        """
        async with self._open_lock:
            if self._closed:
                return
            self._closed = True
            self._hop = None
            db, self._db = self._db, None
            executor, self._executor = self._executor, None
            if executor is not None:  # let queued work finish, then stop the thread
                await asyncio.get_running_loop().run_in_executor(executor, lambda: None)
                executor.shutdown(wait=False)
            if db is not None:
                await db.close()

    # -- wake-ups --------------------------------------------------------------------------

    def _wake(self, kind: WorkKind) -> None:
        self._events[kind].set()

    def _wake_at(self, when: float) -> None:
        """Remember that orchestration work becomes visible at `when` (epoch seconds)."""
        if len(self._due) >= _MAX_DUE:  # keep the earliest half; later ones fall to polling
            self._due = heapq.nsmallest(_MAX_DUE // 2, self._due)
        heapq.heappush(self._due, when)

    def _wake_for_messages(self, messages: Iterable[Message]) -> None:
        now = time.time()
        visible_now = False
        for m in messages:
            if m.visible_at <= now:
                visible_now = True
            else:
                self._wake_at(m.visible_at)
        if visible_now:
            self._wake(WorkKind.ORCHESTRATION)

    async def wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        """Return when work of `kind` may be available, or after `timeout` seconds.

        Wakes at once when this process wrote such work (messages, activity tasks, released
        or abandoned instances) since the last call, and when a delayed message this process
        wrote becomes visible. Work written by other processes is only noticed by polling:
        the caller's `timeout` is its polling interval. Spurious returns happen.
        """
        kind = WorkKind(kind)
        event = self._events[kind]
        if not event.is_set():
            delay = max(0.0, timeout)
            due = self._due
            if kind is WorkKind.ORCHESTRATION and due:
                now = time.time()
                if due[0] <= now:
                    while due and due[0] <= now:
                        heapq.heappop(due)
                    return
                # Wake just after the message becomes visible, never just before it.
                delay = min(delay, due[0] - now + 0.002)
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await event.wait()
                except TimeoutError:
                    pass
            if kind is WorkKind.ORCHESTRATION:
                now = time.time()
                while due and due[0] <= now:
                    heapq.heappop(due)
        event.clear()

    # -- instances -------------------------------------------------------------------------

    async def create_instance(self, record: InstanceRecord, start: Message) -> None:
        """Create `record` and put `start` in its inbox, in one transaction.

        Raises `InstanceExistsError` if a live instance has the id (nothing is written then).
        A terminal instance with the id is replaced: its row, history, inbox (and the memory
        of its consumed message ids) and pending activity tasks are deleted first.
        """
        if start.instance_id != record.instance_id:
            raise ValueError(
                f"start message is addressed to {start.instance_id!r}, but the instance "
                f"being created is {record.instance_id!r}"
            )
        await self._call(_sql.create_instance, record, start)
        self._wake_for_messages((start,))

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        return await self._call(_sql.get_instance, instance_id)

    async def get_history(self, instance_id: str) -> list[bytes]:
        """The instance's stored history events, oldest first ([] if unknown)."""
        return await self._call(_sql.get_history, instance_id)

    async def query_instances(
        self, query: InstanceQuery, *, page_size: int = 100, continuation: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page of matching instances, ordered by (created_time, instance_id).

        The continuation token is opaque (it encodes the last row's sort key), so paging is
        stable while instances are added or deleted: no row is returned twice, and rows that
        existed for the whole scan are not skipped. Raises ValueError for a malformed token.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size!r}")
        if continuation is not None:
            _sql.decode_continuation(continuation)  # fail early, in the caller's thread
        return await self._call(_sql.query_instances, query, page_size, continuation)

    async def purge_instances(
        self, *, instance_id: str | None = None, query: InstanceQuery | None = None
    ) -> PurgeResult:
        """Delete terminal instances (row, history, inbox, pending activity tasks).

        With `instance_id`, that one instance if it is terminal; with `query`, every terminal
        instance matching it; with both, that instance if it also matches the query. Live
        instances are never purged. Purging an id that has no instance also drops any
        messages sent to that id (they could never be delivered).
        """
        if instance_id is None and query is None:
            raise TypeError("purge_instances needs instance_id or query (or both)")
        count = await self._call(_sql.purge_instances, instance_id, query)
        return PurgeResult(deleted_instance_count=count)

    # -- messages --------------------------------------------------------------------------

    async def send_messages(self, messages: Sequence[Message]) -> None:
        """Put messages in inboxes in one transaction; ids the instance already had (pending
        or consumed) are ignored. A message to an id with no instance waits for one to be
        created with that id (or for a purge of that id)."""
        if not messages:
            return
        await self._call(_sql.send_messages, messages)
        self._wake_for_messages(messages)

    # -- orchestration work items ----------------------------------------------------------

    async def lock_orchestrations(
        self, worker_id: str, *, max_items: int, lease_seconds: float, max_messages: int = 1000
    ) -> list[OrchestrationWorkItem]:
        """Lock up to `max_items` instances that have visible messages and no live lease.

        Instances whose messages became visible earliest come first. Each item holds the
        instance's visible messages in send order (at most `max_messages`) and a fresh
        `lock_token`, valid until taken over after `lease_seconds`. An idle poll only reads;
        it does not take the database write lock.
        """
        return await self._call(
            _sql.lock_orchestrations, worker_id, max_items, lease_seconds, max_messages
        )

    async def complete_orchestrations(
        self, completions: Sequence[OrchestrationCompletion]
    ) -> list[bool]:
        """Commit all completions in one transaction; one flag per completion.

        A completion whose token is no longer current writes nothing and gets False; the
        others commit. If any statement fails (e.g. a payload that is not bytes), the whole
        call is rolled back and the exception propagates: nothing of any completion is
        written and the leases are still held. A completion whose token is still current
        commits even if its lease expired (nobody took it over, so nobody else ran the step).
        """
        if not completions:
            return []
        outcome = await self._call(_sql.complete_orchestrations, completions)
        activities = False
        for ok, c in zip(outcome.committed, completions, strict=True):
            if ok:
                self._wake_for_messages(c.messages)
                self._wake_for_messages(n.start for n in c.new_instances)
                activities = activities or bool(c.activities and c.activity_lock is None)
        if activities:
            self._wake(WorkKind.ACTIVITY)
        if outcome.work_ready:
            self._wake(WorkKind.ORCHESTRATION)
        return outcome.committed

    async def abandon_orchestration(
        self, instance_id: str, lock_token: str, *, retry_after: float = 0.0
    ) -> None:
        """Release the lock without committing; the messages become lockable again after
        `retry_after` seconds. A stale token is ignored."""
        if await self._call(_sql.abandon_orchestration, instance_id, lock_token, retry_after):
            if retry_after > 0:
                self._wake_at(time.time() + retry_after)
            else:
                self._wake(WorkKind.ORCHESTRATION)

    async def renew_orchestration_lease(
        self, instance_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to now + `lease_seconds`; False if the token is no longer current."""
        return await self._call(
            _sql.renew_orchestration_lease, instance_id, lock_token, lease_seconds
        )

    # -- activity work items ---------------------------------------------------------------

    async def lock_activities(
        self, worker_id: str, *, max_items: int, lease_seconds: float
    ) -> list[ActivityWorkItem]:
        """Lock up to `max_items` tasks, oldest first, including ones whose lease expired
        (their `dequeue_count` then exceeds 1)."""
        return await self._call(_sql.lock_activities, max_items, lease_seconds)

    async def complete_activities(
        self, results: Sequence[ActivityResult], *, lock: OrchestrationLock | None = None
    ) -> list[OrchestrationWorkItem]:
        """In one transaction: delete each task (if still there, whoever holds it) and
        deliver each result message (ignored if its id was already delivered). With `lock`,
        the same transaction locks the lockable instances among those the results went to
        (in the order of `results`, at most `lock.max_items`) and returns them."""
        if not results:
            return []
        if lock is not None and (lock.lease_seconds <= 0 or lock.max_messages < 1):
            raise ValueError(f"invalid {lock!r}: lease_seconds must be positive and "
                             f"max_messages at least 1")
        items = await self._call(_sql.complete_activities, results, lock)
        taken = {item.instance.instance_id for item in items}
        self._wake_for_messages(r.message for r in results
                                if r.message.instance_id not in taken)
        return items

    async def abandon_activity(self, task_id: str, lock_token: str) -> None:
        """Make a locked task available again now. A stale token is ignored."""
        if await self._call(_sql.abandon_activity, task_id, lock_token):
            self._wake(WorkKind.ACTIVITY)

    async def renew_activity_lease(
        self, task_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to now + `lease_seconds`; False if the token is no longer current
        (the task was taken over, abandoned or completed)."""
        return await self._call(_sql.renew_activity_lease, task_id, lock_token, lease_seconds)
