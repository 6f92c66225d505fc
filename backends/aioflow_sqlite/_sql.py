"""The backend's operations as plain synchronous functions over one `sqlite3.Connection`.

Each function is one whole unit of work: the async `SqliteBackend` ships it to the connection's
thread in a single hop. Write operations run inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (see
`write_transaction`): the write lock is taken up front, so concurrent writers in other processes
queue on the busy timeout instead of failing with SQLITE_BUSY on lock upgrade, and a
select-then-update (locking work items, checking a fencing token) cannot race with them. Any
exception rolls the whole transaction back.

The connection is in autocommit mode (``isolation_level=None``): the sqlite3 module opens no
implicit transactions, so a lone SELECT outside `write_transaction` is its own read transaction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from sqlite3 import Connection
from typing import Any, TypeVar

from aioflow.backend import (
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    InstanceQuery,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    decode_continuation,
    encode_continuation,
)
from aioflow.errors import InstanceExistsError
from aioflow.status import RuntimeStatus

T = TypeVar("T")

TERMINAL_STATUSES: tuple[str, ...] = tuple(
    s.value for s in RuntimeStatus if s.is_terminal
)


def write_transaction(conn: Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(conn, *args)`` inside BEGIN IMMEDIATE; commit on return, roll back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


# -- rows ----------------------------------------------------------------------------------

_RECORD_COLUMNS = (
    "instance_id, name, execution_id, runtime_status, created_time, last_updated_time, "
    "input, output, custom_status, failure"
)


def _record(row: Sequence[Any]) -> InstanceRecord:
    return InstanceRecord(
        instance_id=row[0],
        name=row[1],
        execution_id=row[2],
        runtime_status=RuntimeStatus(row[3]),
        created_time=row[4],
        last_updated_time=row[5],
        input=row[6],
        output=row[7],
        custom_status=row[8],
        failure=row[9],
    )


def _status(value: RuntimeStatus | str) -> str:
    return RuntimeStatus(value).value


_INSERT_INSTANCE = (
    f"INSERT INTO aioflow_instances ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_INSERT_MESSAGE = (
    "INSERT OR IGNORE INTO aioflow_messages (instance_id, id, data, visible_at) VALUES (?, ?, ?, ?)"
)

_INSERT_ACTIVITY = (
    "INSERT OR IGNORE INTO aioflow_activities (id, instance_id, data) VALUES (?, ?, ?)"
)
# A task the completing worker keeps (ActivityLock): stored as if it had locked it once.
_INSERT_LOCKED_ACTIVITY = (
    "INSERT OR IGNORE INTO aioflow_activities "
    "(id, instance_id, data, lock_token, locked_until, dequeue_count) VALUES (?, ?, ?, ?, ?, 1)"
)

_RECOMPUTE_READY = (
    "UPDATE aioflow_instances SET ready_at = (SELECT MIN(visible_at) FROM aioflow_messages "
    "WHERE instance_id = ?1 AND consumed = 0) WHERE instance_id = ?1"
)


def _instance_params(record: InstanceRecord) -> tuple[Any, ...]:
    return (
        record.instance_id,
        record.name,
        record.execution_id,
        _status(record.runtime_status),
        record.created_time,
        record.last_updated_time,
        record.input,
        record.output,
        record.custom_status,
        record.failure,
    )


def _message_params(m: Message) -> tuple[Any, ...]:
    return (m.instance_id, m.id, m.data, m.visible_at)


def _activity_params(t: ActivityTask) -> tuple[Any, ...]:
    return (t.id, t.instance_id, t.data)


def _recompute_ready(conn: Connection, instance_id: str) -> None:
    """Set the instance's ``ready_at`` from its inbox (after messages were consumed/deleted)."""
    conn.execute(_RECOMPUTE_READY, (instance_id,))


def _discard_instance(conn: Connection, instance_id: str) -> None:
    """Delete everything stored for one instance (row, history, inbox and memory, tasks)."""
    params = (instance_id,)
    conn.execute("DELETE FROM aioflow_instances WHERE instance_id = ?", params)
    conn.execute("DELETE FROM aioflow_history WHERE instance_id = ?", params)
    conn.execute("DELETE FROM aioflow_messages WHERE instance_id = ?", params)
    conn.execute("DELETE FROM aioflow_activities WHERE instance_id = ?", params)


def _create(
    conn: Connection, record: InstanceRecord, start: Message, *, fail_if_live: bool
) -> str | None:
    """Create `record`, replacing a terminal instance of that id, and deliver `start`.

    If a live instance has the id, its row is left alone and its status is returned; `start`
    is then delivered to it unless `fail_if_live` (the caller raises instead). Returns None
    when the row was created.
    """
    rows = conn.execute(
        "SELECT runtime_status FROM aioflow_instances WHERE instance_id = ?", (record.instance_id,)
    ).fetchall()
    live_status: str | None = None
    if rows:
        if rows[0][0] in TERMINAL_STATUSES:
            _discard_instance(conn, record.instance_id)
        else:
            live_status = rows[0][0]
    if live_status is not None and fail_if_live:
        return live_status
    if live_status is None:
        conn.execute(_INSERT_INSTANCE, _instance_params(record))
    conn.execute(_INSERT_MESSAGE, _message_params(start))
    if live_status is None:
        # Messages sent before the instance existed may already wait in its inbox.
        _recompute_ready(conn, record.instance_id)
    return live_status


# -- instances -----------------------------------------------------------------------------


def create_instance(conn: Connection, record: InstanceRecord, start: Message) -> None:
    def body(conn: Connection) -> None:
        live = _create(conn, record, start, fail_if_live=True)
        if live is not None:
            raise InstanceExistsError(record.instance_id, live)

    write_transaction(conn, body)


def get_instance(conn: Connection, instance_id: str) -> InstanceRecord | None:
    rows = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM aioflow_instances WHERE instance_id = ?", (instance_id,)
    ).fetchall()
    return _record(rows[0]) if rows else None


def get_history(conn: Connection, instance_id: str) -> list[bytes]:
    rows = conn.execute(
        "SELECT data FROM aioflow_history WHERE instance_id = ? ORDER BY seq", (instance_id,)
    ).fetchall()
    return [r[0] for r in rows]


def _where(query: InstanceQuery, *, terminal_only: bool = False) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    statuses: set[str] | None = None
    if query.runtime_status is not None:
        statuses = {_status(s) for s in query.runtime_status}
    if terminal_only:
        statuses = set(TERMINAL_STATUSES) if statuses is None else statuses & set(
            TERMINAL_STATUSES
        )
    if statuses is not None:
        if not statuses:
            clauses.append("0")
        else:
            ordered = sorted(statuses)
            clauses.append(f"runtime_status IN ({', '.join('?' * len(ordered))})")
            params.extend(ordered)
    if query.created_from is not None:
        clauses.append("created_time >= ?")
        params.append(query.created_from)
    if query.created_to is not None:
        clauses.append("created_time < ?")
        params.append(query.created_to)
    if query.name is not None:
        clauses.append("name = ?")
        params.append(query.name)
    if query.instance_id_prefix:
        clauses.append("substr(instance_id, 1, ?) = ?")
        params.extend((len(query.instance_id_prefix), query.instance_id_prefix))
    return clauses, params


def query_instances(
    conn: Connection, query: InstanceQuery, page_size: int, continuation: str | None
) -> tuple[list[InstanceRecord], str | None]:
    clauses, params = _where(query)
    if continuation is not None:
        clauses.append("(created_time, instance_id) > (?, ?)")
        params.extend(decode_continuation(continuation))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM aioflow_instances {where} "
        f"ORDER BY created_time, instance_id LIMIT ?",
        (*params, page_size + 1),
    ).fetchall()
    records = [_record(r) for r in rows[:page_size]]
    token = None
    if len(rows) > page_size:
        last = records[-1]
        token = encode_continuation(last.created_time, last.instance_id)
    return records, token


def purge_instances(
    conn: Connection, instance_id: str | None, query: InstanceQuery | None
) -> int:
    def body(conn: Connection) -> int:
        clauses, params = _where(query or InstanceQuery(), terminal_only=True)
        if instance_id is not None:
            clauses.append("instance_id = ?")
            params.append(instance_id)
        ids = [
            r[0]
            for r in conn.execute(
                f"SELECT instance_id FROM aioflow_instances WHERE {' AND '.join(clauses)}", params
            ).fetchall()
        ]
        if instance_id is not None and not ids:
            exists = conn.execute(
                "SELECT 1 FROM aioflow_instances WHERE instance_id = ?", (instance_id,)
            ).fetchall()
            if not exists:
                # No instance: drop messages that were sent to the id but never had a home.
                conn.execute("DELETE FROM aioflow_messages WHERE instance_id = ?", (instance_id,))
        keys = [(i,) for i in ids]
        conn.executemany("DELETE FROM aioflow_instances WHERE instance_id = ?", keys)
        conn.executemany("DELETE FROM aioflow_history WHERE instance_id = ?", keys)
        conn.executemany("DELETE FROM aioflow_messages WHERE instance_id = ?", keys)
        conn.executemany("DELETE FROM aioflow_activities WHERE instance_id = ?", keys)
        return len(ids)

    return write_transaction(conn, body)


# -- messages ------------------------------------------------------------------------------


def send_messages(conn: Connection, messages: Sequence[Message]) -> None:
    params = [_message_params(m) for m in messages]
    write_transaction(conn, lambda c: c.executemany(_INSERT_MESSAGE, params))


# -- orchestration work items --------------------------------------------------------------

# "Lockable now": has a visible message, and no lease (or an expired one) and no retry delay.
# Written exactly as the expression index aioflow_instances_by_lockable_at, so SQLite uses it.
_LOCKABLE = "ready_at IS NOT NULL AND max(ready_at, locked_until) <= ?1"
_PEEK_ORCHESTRATION = f"SELECT 1 FROM aioflow_instances WHERE {_LOCKABLE} LIMIT 1"
_SELECT_LOCKABLE = (
    f"SELECT {_RECORD_COLUMNS}, history_length FROM aioflow_instances WHERE {_LOCKABLE} "
    f"ORDER BY max(ready_at, locked_until) LIMIT ?2"
)
_SELECT_VISIBLE = (
    "SELECT id, data, visible_at FROM aioflow_messages "
    "WHERE instance_id = ? AND consumed = 0 AND visible_at <= ? ORDER BY seq LIMIT ?"
)
_LOCK_INSTANCE = (
    "UPDATE aioflow_instances SET lock_token = ?, locked_by = ?, locked_until = ? "
    "WHERE instance_id = ?"
)


def new_token() -> str:
    """A fresh, unguessable lock token (128 random bits)."""
    return os.urandom(16).hex()


def lock_orchestrations(
    conn: Connection, worker_id: str, max_items: int, lease_seconds: float, max_messages: int
) -> list[OrchestrationWorkItem]:
    if max_items <= 0 or max_messages <= 0:
        return []
    # Cheap read first: an idle poll must not take the database's write lock.
    if not conn.execute(_PEEK_ORCHESTRATION, (time.time(),)).fetchall():
        return []

    def body(conn: Connection) -> list[OrchestrationWorkItem]:
        now = time.time()  # read again: BEGIN IMMEDIATE may have waited for the lock
        rows = conn.execute(_SELECT_LOCKABLE, (now, max_items)).fetchall()
        return _lock_rows(conn, rows, worker_id, now, lease_seconds, max_messages)

    return write_transaction(conn, body)


def _lock_rows(
    conn: Connection, rows: Sequence[Sequence[Any]], worker_id: str, now: float,
    lease_seconds: float, max_messages: int,
) -> list[OrchestrationWorkItem]:
    """Lock the lockable instance rows `rows` (record columns + history_length) for
    `worker_id`, inside the caller's write transaction; one work item each."""
    until = now + lease_seconds
    items: list[OrchestrationWorkItem] = []
    locks: list[tuple[str, str, float, str]] = []
    for row in rows:
        instance_id = row[0]
        messages = [
            Message(m[0], instance_id, m[1], m[2])
            for m in conn.execute(_SELECT_VISIBLE, (instance_id, now, max_messages))
        ]
        if not messages:  # ready_at was stale (cannot happen unless edited by hand)
            _recompute_ready(conn, instance_id)
            continue
        token = new_token()
        locks.append((token, worker_id, until, instance_id))
        items.append(OrchestrationWorkItem(_record(row), messages, row[10], token))
    if locks:
        conn.executemany(_LOCK_INSTANCE, locks)
    return items


_CHECK_TOKEN = (
    "SELECT history_length FROM aioflow_instances WHERE instance_id = ? AND lock_token = ?"
)
# The row update comes last, so that `ready_at` is recomputed after this step's consumption
# and its messages to itself, in the same statement.
_COMPLETE_INSTANCE = """
UPDATE aioflow_instances SET
    name = ?, execution_id = ?, runtime_status = ?, created_time = ?, last_updated_time = ?,
    input = ?, output = ?, custom_status = ?, failure = ?,
    history_length = ?,
    lock_token = CASE WHEN ? THEN NULL ELSE lock_token END,
    locked_by = CASE WHEN ? THEN NULL ELSE locked_by END,
    locked_until = CASE WHEN ? THEN 0 ELSE locked_until END,
    ready_at = (SELECT MIN(visible_at) FROM aioflow_messages
                WHERE aioflow_messages.instance_id = aioflow_instances.instance_id AND consumed = 0)
WHERE instance_id = ?
"""
_CONSUME = (
    "UPDATE aioflow_messages SET consumed = 1, data = NULL "
    "WHERE instance_id = ? AND id = ? AND consumed = 0"
)


@dataclass(slots=True)
class CompletionOutcome:
    """What `complete_orchestrations` committed, and whether to wake orchestration workers."""

    committed: list[bool]
    #: After commit, some instance is lockable right now (e.g. a released instance still has
    #: messages beyond the `max_messages` it was handed).
    work_ready: bool = False


def _complete_one(conn: Connection, c: OrchestrationCompletion) -> bool:
    """Apply one completion inside the caller's transaction; False if its lease was lost."""
    instance_id = c.instance_id
    rows = conn.execute(_CHECK_TOKEN, (instance_id, c.lock_token)).fetchall()
    if not rows:
        return False  # lease lost (taken over, or instance replaced/purged): no writes
    length = 0 if c.reset_history else rows[0][0]
    if c.reset_history:
        conn.execute("DELETE FROM aioflow_history WHERE instance_id = ?", (instance_id,))
    if c.new_history:
        conn.executemany(
            "INSERT INTO aioflow_history (instance_id, seq, data) VALUES (?, ?, ?)",
            [(instance_id, length + i, data) for i, data in enumerate(c.new_history)],
        )
        length += len(c.new_history)
    if c.consumed:
        conn.executemany(_CONSUME, [(instance_id, mid) for mid in c.consumed])
    if c.reset_history:
        # A new execution starts: the consumed ids of the old one need no remembering (the
        # runtime drops any late copy as stale), so an eternal orchestration's inbox stays
        # bounded instead of growing by every message it ever received.
        conn.execute(
            "DELETE FROM aioflow_messages WHERE instance_id = ? AND consumed = 1", (instance_id,)
        )
    # New instances before messages: replacing a terminal instance clears its inbox, which
    # must not swallow a message this same step sends to it.
    for new in c.new_instances:
        _create(conn, new.record, new.start, fail_if_live=False)
    if c.messages:
        conn.executemany(_INSERT_MESSAGE, [_message_params(m) for m in c.messages])
    if c.activities:
        lock = c.activity_lock
        if lock is None:
            conn.executemany(_INSERT_ACTIVITY, [_activity_params(t) for t in c.activities])
        else:
            until = time.time() + lock.lease_seconds
            conn.executemany(
                _INSERT_LOCKED_ACTIVITY,
                [(t.id, t.instance_id, t.data, lock.lock_token, until) for t in c.activities],
            )
    r = c.instance
    release = c.release
    conn.execute(
        _COMPLETE_INSTANCE,
        (
            r.name, r.execution_id, _status(r.runtime_status), r.created_time,
            r.last_updated_time, r.input, r.output, r.custom_status, r.failure,
            length, release, release, release, instance_id,
        ),
    )
    return True


def complete_orchestrations(
    conn: Connection, completions: Sequence[OrchestrationCompletion]
) -> CompletionOutcome:
    def body(conn: Connection) -> CompletionOutcome:
        committed = [_complete_one(conn, c) for c in completions]
        released = any(ok and c.release for ok, c in zip(committed, completions, strict=True))
        # One cheap probe for the whole batch instead of reading back every instance's row.
        ready = released and bool(conn.execute(_PEEK_ORCHESTRATION, (time.time(),)).fetchall())
        return CompletionOutcome(committed, ready)

    return write_transaction(conn, body)


def abandon_orchestration(
    conn: Connection, instance_id: str, lock_token: str, retry_after: float
) -> bool:
    hold_until = time.time() + retry_after if retry_after > 0 else 0.0

    def body(conn: Connection) -> bool:
        cur = conn.execute(
            "UPDATE aioflow_instances SET lock_token = NULL, locked_by = NULL, locked_until = ? "
            "WHERE instance_id = ? AND lock_token = ?",
            (hold_until, instance_id, lock_token),
        )
        return cur.rowcount > 0

    return write_transaction(conn, body)


def renew_orchestration_lease(
    conn: Connection, instance_id: str, lock_token: str, lease_seconds: float
) -> bool:
    def body(conn: Connection) -> bool:
        cur = conn.execute(
            "UPDATE aioflow_instances SET locked_until = ? "
            "WHERE instance_id = ? AND lock_token = ?",
            (time.time() + lease_seconds, instance_id, lock_token),
        )
        return cur.rowcount > 0

    return write_transaction(conn, body)


# -- activity work items -------------------------------------------------------------------

# Scanning in seq (rowid) order hands out the oldest task first, including one whose lease
# expired; the rows skipped are the locked ones at the head of the queue, as many as there are
# activities in flight.
_PEEK_ACTIVITY = "SELECT 1 FROM aioflow_activities WHERE locked_until <= ? LIMIT 1"
_SELECT_ACTIVITIES = (
    "SELECT seq, id, instance_id, data, dequeue_count FROM aioflow_activities "
    "WHERE locked_until <= ? ORDER BY seq LIMIT ?"
)


def lock_activities(
    conn: Connection, max_items: int, lease_seconds: float
) -> list[ActivityWorkItem]:
    if max_items <= 0:
        return []
    if not conn.execute(_PEEK_ACTIVITY, (time.time(),)).fetchall():
        return []

    def body(conn: Connection) -> list[ActivityWorkItem]:
        now = time.time()
        until = now + lease_seconds
        items: list[ActivityWorkItem] = []
        locks: list[tuple[str, float, int]] = []
        for seq, task_id, instance_id, data, count in conn.execute(
            _SELECT_ACTIVITIES, (now, max_items)
        ).fetchall():
            token = new_token()
            locks.append((token, until, seq))
            items.append(
                ActivityWorkItem(ActivityTask(task_id, instance_id, data), token, count + 1)
            )
        conn.executemany(
            "UPDATE aioflow_activities SET lock_token = ?, locked_until = ?, "
            "dequeue_count = dequeue_count + 1 WHERE seq = ?",
            locks,
        )
        return items

    return write_transaction(conn, body)


_SELECT_LOCKABLE_ONE = (
    f"SELECT {_RECORD_COLUMNS}, history_length FROM aioflow_instances "
    f"WHERE instance_id = ?2 AND ready_at IS NOT NULL AND max(ready_at, locked_until) <= ?1"
)


def complete_activities(
    conn: Connection, results: Sequence[ActivityResult], lock: OrchestrationLock | None
) -> list[OrchestrationWorkItem]:
    deletes = [(r.task_id,) for r in results]
    messages = [_message_params(r.message) for r in results]
    targets = list(dict.fromkeys(r.message.instance_id for r in results))

    def body(conn: Connection) -> list[OrchestrationWorkItem]:
        conn.executemany("DELETE FROM aioflow_activities WHERE id = ?", deletes)
        conn.executemany(_INSERT_MESSAGE, messages)
        if lock is None or lock.max_items <= 0:
            return []
        now = time.time()
        rows = []
        for instance_id in targets:
            rows.extend(conn.execute(_SELECT_LOCKABLE_ONE, (now, instance_id)).fetchall())
            if len(rows) >= lock.max_items:
                break
        return _lock_rows(conn, rows, lock.worker_id, now, lock.lease_seconds, lock.max_messages)

    return write_transaction(conn, body)


def abandon_activity(conn: Connection, task_id: str, lock_token: str) -> bool:
    def body(conn: Connection) -> bool:
        cur = conn.execute(
            "UPDATE aioflow_activities SET lock_token = NULL, locked_until = 0 "
            "WHERE id = ? AND lock_token = ?",
            (task_id, lock_token),
        )
        return cur.rowcount > 0

    return write_transaction(conn, body)


def renew_activity_lease(
    conn: Connection, task_id: str, lock_token: str, lease_seconds: float
) -> bool:
    def body(conn: Connection) -> bool:
        cur = conn.execute(
            "UPDATE aioflow_activities SET locked_until = ? WHERE id = ? AND lock_token = ?",
            (time.time() + lease_seconds, task_id, lock_token),
        )
        return cur.rowcount > 0

    return write_transaction(conn, body)


__all__ = [
    "CompletionOutcome",
    "abandon_activity",
    "abandon_orchestration",
    "complete_activities",
    "complete_orchestrations",
    "create_instance",
    "get_history",
    "get_instance",
    "lock_activities",
    "lock_orchestrations",
    "purge_instances",
    "query_instances",
    "renew_activity_lease",
    "renew_orchestration_lease",
    "send_messages",
    "write_transaction",
]
