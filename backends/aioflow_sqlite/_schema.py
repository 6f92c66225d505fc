"""The database schema, and the connection set-up that runs once per connection.

Tables (all prefixed ``aioflow_``, so the file may be shared with an application's own tables):

* ``aioflow_instances``: one row per instance (the `InstanceRecord` fields) plus the
  bookkeeping the backend needs: ``history_length``; ``ready_at``, the earliest ``visible_at``
  of the instance's unconsumed messages (NULL when its inbox is empty), so finding lockable
  instances reads one index instead of scanning inboxes; and the lease (``lock_token``,
  ``locked_by``, ``locked_until``; ``locked_until`` > now also holds back an abandoned instance
  for its ``retry_after``). An instance is lockable once ``max(ready_at, locked_until)`` has
  passed; that expression is indexed, so finding work never wades through locked instances.
* ``aioflow_history``: the append-only event list, clustered by (instance_id, seq).
* ``aioflow_messages``: every message ever delivered to an instance. A consumed message keeps
  its row (``consumed = 1``, payload dropped) so that re-sending its id is ignored for as long
  as the instance exists; the rows go when the instance is purged or replaced. ``seq`` (the
  rowid) records send order.
* ``aioflow_activities``: the activity queue; a row is deleted when its result is delivered.

A trigger keeps ``aioflow_instances.ready_at`` current when a message is inserted (INSERT OR
IGNORE fires it only when the message is new); writers that consume or delete messages
recompute it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from aioflow.errors import ConfigurationError

T = TypeVar("T")

SCHEMA_VERSION = 1

#: Oldest SQLite this backend runs on: it uses RETURNING (3.35) and row values (3.15).
MIN_SQLITE_VERSION = (3, 35, 0)

SCHEMA = """
CREATE TABLE IF NOT EXISTS aioflow_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS aioflow_instances (
    instance_id       TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    execution_id      TEXT NOT NULL,
    runtime_status    TEXT NOT NULL,
    created_time      REAL NOT NULL,
    last_updated_time REAL NOT NULL,
    input             BLOB,
    output            BLOB,
    custom_status     BLOB,
    failure           BLOB,
    history_length    INTEGER NOT NULL DEFAULT 0,
    ready_at          REAL,
    lock_token        TEXT,
    locked_by         TEXT,
    locked_until      REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS aioflow_instances_by_created
    ON aioflow_instances (created_time, instance_id);
CREATE INDEX IF NOT EXISTS aioflow_instances_by_status
    ON aioflow_instances (runtime_status, created_time, instance_id);
CREATE INDEX IF NOT EXISTS aioflow_instances_by_lockable_at
    ON aioflow_instances (max(ready_at, locked_until)) WHERE ready_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS aioflow_history (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS aioflow_messages (
    seq         INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    id          TEXT NOT NULL,
    data        BLOB,
    visible_at  REAL NOT NULL,
    consumed    INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS aioflow_messages_by_id
    ON aioflow_messages (instance_id, id);
CREATE INDEX IF NOT EXISTS aioflow_messages_inbox
    ON aioflow_messages (instance_id, visible_at) WHERE consumed = 0;

CREATE TRIGGER IF NOT EXISTS aioflow_messages_mark_ready AFTER INSERT ON aioflow_messages
BEGIN
    UPDATE aioflow_instances SET ready_at = NEW.visible_at
    WHERE instance_id = NEW.instance_id AND (ready_at IS NULL OR ready_at > NEW.visible_at);
END;

CREATE TABLE IF NOT EXISTS aioflow_activities (
    seq           INTEGER PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    instance_id   TEXT NOT NULL,
    data          BLOB NOT NULL,
    lock_token    TEXT,
    locked_until  REAL NOT NULL DEFAULT 0,
    dequeue_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS aioflow_activities_by_instance ON aioflow_activities (instance_id);
"""



def _split(script: str) -> list[str]:
    """Split a script into complete statements (a trigger body holds several semicolons)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    assert not current.strip(), "incomplete statement at the end of the schema"
    return statements


_SCHEMA_STATEMENTS = _split(SCHEMA)


def set_up_connection(
    conn: sqlite3.Connection, *, path: str, busy_timeout: float, synchronous: str
) -> None:
    """Configure a fresh connection (pragmas) and create the schema if it is missing.

    Runs on the connection's own thread. Several processes may do this at once on one file:
    the schema is created inside BEGIN IMMEDIATE, so one of them creates it and the others
    wait (up to `busy_timeout`) and find it there.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ConfigurationError(
            f"the SQLite backend needs SQLite >= "
            f"{'.'.join(map(str, MIN_SQLITE_VERSION))}, but Python's sqlite3 module is linked "
            f"against SQLite {sqlite3.sqlite_version}; use a newer Python build"
        )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    mode = _while_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0],
                         busy_timeout)
    if str(mode).lower() != "wal":
        raise ConfigurationError(
            f"cannot switch SQLite database {path!r} to WAL journal mode (it stays in "
            f"{mode!r} mode); the SQLite backend needs WAL, which works on local file "
            f"systems only (not on network shares)"
        )
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    _while_locked(lambda: _create_schema(conn, path), busy_timeout)


def _while_locked(step: Callable[[], T], busy_timeout: float) -> T:
    """Run `step`, retrying while SQLite answers "database is locked" at once.

    Two connections opening a brand-new file at the same moment can get SQLITE_BUSY from the
    switch to WAL (or the schema transaction) without SQLite waiting for the busy timeout: it
    refuses rather than risk a deadlock between them. Retrying after a short pause is safe,
    because both steps are idempotent; give up after `busy_timeout` seconds like a busy wait.
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _create_schema(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA_STATEMENTS:
            conn.execute(statement)
        row = conn.execute(
            "SELECT value FROM aioflow_meta WHERE key = 'schema_version'"
        ).fetchall()
        if not row:
            conn.execute(
                "INSERT INTO aioflow_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        elif row[0][0] != str(SCHEMA_VERSION):
            raise ConfigurationError(
                f"SQLite database {path!r} has aioflow schema version {row[0][0]}, but this "
                f"version of aioflow_sqlite uses version {SCHEMA_VERSION}; use a matching "
                f"aioflow version or a new database file"
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
