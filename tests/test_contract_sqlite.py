"""The SQLite backend: the shared backend contract, plus what only SQLite promises.

* the conformance suite (`BackendContractSuite`) on a fresh database file per test;
* several backend objects (and processes) on one file never lock the same instance twice;
* a transaction that fails midway, or whose process dies midway, leaves nothing written;
* `sqlite:` URL parsing and the errors for bad URLs and unopenable files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import os
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aioflow_sqlite
import aioflow_sqlite.backend as sqlite_backend_module
import pytest
import pytest_asyncio
from aioflow_sqlite import SqliteBackend, open_backend, parse_url

from aioflow.backend import (
    ActivityResult,
    ActivityTask,
    Backend,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    WorkKind,
)
from aioflow.errors import ConfigurationError
from aioflow.status import RuntimeStatus
from aioflow.testing.conformance import BackendContractSuite

# -- the shared contract ------------------------------------------------------------------------


class TestSqliteBackendContract(BackendContractSuite):
    @pytest_asyncio.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[Backend]:  # type: ignore[override]
        async with SqliteBackend(tmp_path / "contract.db") as store:
            yield store


def test_sqlite_backend_implements_the_protocol() -> None:
    store: Backend = SqliteBackend("unused.db")  # checked statically by mypy, too
    assert isinstance(store, Backend)


# -- helpers ------------------------------------------------------------------------------------


def record(instance_id: str, status: RuntimeStatus = RuntimeStatus.PENDING) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(instance_id, "Workflow", "exec-1", status, now, now, b"{}")


def message(instance_id: str, message_id: str, data: object = b"{}") -> Message:
    return Message(message_id, instance_id, data)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    async with SqliteBackend(tmp_path / "aioflow.db") as store:
        yield store


# -- several backends (processes) on one file ---------------------------------------------------


async def test_two_backends_on_one_file_never_lock_the_same_instance(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SqliteBackend(path) as a, SqliteBackend(path) as b:
        for n in range(200):
            await a.create_instance(record(f"i-{n}"), message(f"i-{n}", f"start-{n}"))

        locked: dict[str, list[str]] = {"a": [], "b": []}

        async def drain(name: str, store: SqliteBackend) -> None:
            while True:
                items = await store.lock_orchestrations(name, max_items=3, lease_seconds=60)
                if not items:
                    return
                locked[name] += [item.instance.instance_id for item in items]
                # Leave the write lock free for a moment, as a real worker does while it runs
                # the step: SQLite's busy handler is not fair, a tight loop could starve b.
                await asyncio.sleep(0.001)

        await asyncio.gather(drain("a", a), drain("b", b))

        everything = locked["a"] + locked["b"]
        assert sorted(everything) == sorted(f"i-{n}" for n in range(200)), (
            "every instance must be locked exactly once across both backends"
        )
        assert not set(locked["a"]) & set(locked["b"])


async def test_lease_fencing_holds_across_backends(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SqliteBackend(path) as a, SqliteBackend(path) as b:
        await a.create_instance(record("inst"), message("inst", "start"))
        (stale,) = await a.lock_orchestrations("a", max_items=1, lease_seconds=0.2)
        assert await b.lock_orchestrations("b", max_items=1, lease_seconds=60) == []
        await asyncio.sleep(0.3)
        (fresh,) = await b.lock_orchestrations("b", max_items=1, lease_seconds=60)
        assert fresh.lock_token != stale.lock_token

        row = dataclasses.replace(stale.instance, runtime_status=RuntimeStatus.COMPLETED)
        late = OrchestrationCompletion(
            "inst", stale.lock_token, row, [b"stale"], consumed=["start"]
        )
        assert await a.complete_orchestrations([late]) == [False]
        assert await b.get_history("inst") == []
        ok = OrchestrationCompletion("inst", fresh.lock_token, fresh.instance, [b"h"],
                                     consumed=["start"])
        assert await b.complete_orchestrations([ok]) == [True]
        assert await a.get_history("inst") == [b"h"], "a sees b's committed writes"


_LOCKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from aioflow_sqlite import SqliteBackend

    async def main(path, worker):
        locked = []
        async with SqliteBackend(path) as store:
            idle = 0
            while idle < 3:
                items = await store.lock_orchestrations(worker, max_items=2, lease_seconds=60)
                if not items:
                    idle += 1
                    await asyncio.sleep(0.02)
                    continue
                idle = 0
                locked += [i.instance.instance_id for i in items]
        print(json.dumps(locked))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.slow
async def test_worker_processes_never_lock_the_same_instance(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    async with SqliteBackend(path) as store:
        for n in range(300):
            await store.create_instance(record(f"i-{n}"), message(f"i-{n}", f"start-{n}"))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LOCKER, path, f"w{k}", stdout=asyncio.subprocess.PIPE
        )
        for k in range(3)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    assert all(p.returncode == 0 for p in procs)
    everything = [i for out, _ in outputs for i in json.loads(out)]
    assert sorted(everything) == sorted(f"i-{n}" for n in range(300)), (
        "each instance must be locked by exactly one process"
    )


# -- crash safety ---------------------------------------------------------------------------------


async def test_completion_failing_midway_writes_nothing(backend: SqliteBackend) -> None:
    await backend.create_instance(record("other"), message("other", "other-start"))
    await backend.create_instance(record("inst"), message("inst", "start"))
    items = await backend.lock_orchestrations("w", max_items=10, lease_seconds=60)
    by_id = {i.instance.instance_id: i for i in items}

    good = OrchestrationCompletion(
        "other", by_id["other"].lock_token,
        dataclasses.replace(by_id["other"].instance, runtime_status=RuntimeStatus.RUNNING),
        new_history=[b"other-h"], consumed=["other-start"],
    )
    bad = OrchestrationCompletion(
        "inst", by_id["inst"].lock_token,
        dataclasses.replace(by_id["inst"].instance, runtime_status=RuntimeStatus.COMPLETED),
        new_history=[b"h1", b"h2"],
        consumed=["start"],
        activities=[ActivityTask("task-1", "inst", b"{}")],
        # Not bytes: binding it fails after the row, history and consumption were written.
        messages=[message("other", "m-ok"), message("other", "m-bad", object())],
    )
    with pytest.raises(sqlite3.Error):
        await backend.complete_orchestrations([good, bad])

    for instance_id in ("inst", "other"):
        assert await backend.get_history(instance_id) == [], "history must be rolled back"
        row = await backend.get_instance(instance_id)
        assert row is not None and row.runtime_status is RuntimeStatus.PENDING
    assert await backend.lock_activities("w", max_items=10, lease_seconds=60) == []
    # The leases are still held, and the messages are still there: the step can be retried.
    retry = dataclasses.replace(bad, messages=[message("other", "m-ok")])
    assert await backend.complete_orchestrations([good, retry]) == [True, True]
    (item,) = await backend.lock_orchestrations("w", max_items=10, lease_seconds=60)
    assert [m.id for m in item.messages] == ["m-ok"]
    assert await backend.get_history("inst") == [b"h1", b"h2"]


async def test_activity_completion_failing_midway_writes_nothing(backend: SqliteBackend) -> None:
    await backend.create_instance(record("inst"), message("inst", "start"))
    (item,) = await backend.lock_orchestrations("w", max_items=1, lease_seconds=60)
    tasks = [ActivityTask("t1", "inst", b"{}"), ActivityTask("t2", "inst", b"{}")]
    done = OrchestrationCompletion("inst", item.lock_token, item.instance, consumed=["start"],
                                   activities=tasks)
    assert await backend.complete_orchestrations([done]) == [True]
    work = await backend.lock_activities("w", max_items=10, lease_seconds=60)

    results = [
        ActivityResult("t1", work[0].lock_token, message("inst", "r1")),
        ActivityResult("t2", work[1].lock_token, message("inst", "r2", ["not", "bytes"])),
    ]
    with pytest.raises(sqlite3.Error):
        await backend.complete_activities(results)
    assert await backend.lock_orchestrations("w", max_items=1, lease_seconds=60) == []
    assert await backend.renew_activity_lease("t1", work[0].lock_token, 60) is True, (
        "the first task must not have been deleted"
    )


_CRASHER = textwrap.dedent(
    """
    import asyncio, os, sqlite3, sys
    from aioflow.backend import OrchestrationCompletion, Message
    from aioflow_sqlite import SqliteBackend

    class Boom:
        pass

    # Binding a Boom kills the process in the middle of the transaction, after the row,
    # history and message consumption were written but before COMMIT.
    sqlite3.register_adapter(Boom, lambda _: os._exit(17))

    async def main(path):
        store = SqliteBackend(path)
        (item,) = await store.lock_orchestrations("w", max_items=1, lease_seconds=0.5)
        print(item.lock_token, flush=True)
        done = OrchestrationCompletion(
            "inst", item.lock_token, item.instance, new_history=[b"h1", b"h2"],
            consumed=[m.id for m in item.messages],
            messages=[Message("out-1", "inst", b"{}"), Message("out-2", "inst", Boom())],
        )
        await store.complete_orchestrations([done])

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.slow
async def test_process_killed_inside_a_completion_leaves_nothing_written(tmp_path: Path) -> None:
    path = str(tmp_path / "crash.db")
    async with SqliteBackend(path) as store:
        await store.create_instance(record("inst"), message("inst", "start"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHER, path, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 17, stderr.decode()

    async with SqliteBackend(path) as store:
        assert await store.get_history("inst") == []
        await asyncio.sleep(0.6)  # the dead worker's lease expires
        (item,) = await store.lock_orchestrations("w2", max_items=1, lease_seconds=60)
        assert [m.id for m in item.messages] == ["start"], (
            "the killed transaction must neither consume nor send messages"
        )
        assert item.history_length == 0


async def test_backends_opening_one_new_file_at_the_same_moment_all_succeed(
    tmp_path: Path,
) -> None:
    """Connections racing to switch a brand-new file to WAL can get "database is locked" at
    once (SQLite refuses rather than wait, to avoid a deadlock); opening retries instead of
    failing the worker or client that lost the race."""
    for n in range(60):
        stores = [SqliteBackend(tmp_path / f"race-{n}.db") for _ in range(4)]
        try:
            await asyncio.gather(*(store.get_instance("x") for store in stores))
        finally:
            for store in stores:
                await store.close()


def test_opening_retries_a_step_sqlite_refused_as_locked_and_nothing_else() -> None:
    from aioflow_sqlite._schema import _while_locked

    answers: list[object] = [sqlite3.OperationalError("database is locked"),
                             sqlite3.OperationalError("database is locked"), "done"]

    def step() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert _while_locked(step, busy_timeout=5.0) == "done", "a locked answer is retried"

    def broken() -> None:
        raise sqlite3.OperationalError("no such table: nowhere")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _while_locked(broken, busy_timeout=5.0)

    def always_locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _while_locked(always_locked, busy_timeout=0.2)
    assert time.monotonic() - started < 2.0, "retrying stops after the busy timeout"


async def test_committed_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    async with SqliteBackend(path) as store:
        await store.create_instance(record("inst"), message("inst", "start"))
        (item,) = await store.lock_orchestrations("w", max_items=1, lease_seconds=60)
        done = OrchestrationCompletion("inst", item.lock_token, item.instance, [b"h"],
                                       consumed=["start"])
        assert await store.complete_orchestrations([done]) == [True]
    async with SqliteBackend(path, synchronous="FULL") as store:
        assert await store.get_history("inst") == [b"h"]
        await store.send_messages([message("inst", "start")])
        assert await store.lock_orchestrations("w", max_items=1, lease_seconds=60) == [], (
            "consumed message ids are remembered across restarts"
        )


# -- connection handling ---------------------------------------------------------------------------


async def test_opens_lazily_once_and_refuses_use_after_close(tmp_path: Path) -> None:
    path = tmp_path / "lazy.db"
    store = open_backend(f"sqlite:///{path}")
    assert not path.exists(), "open_backend must not touch the file"
    rows = await asyncio.gather(*(store.get_instance("x") for _ in range(5)))
    assert rows == [None] * 5 and path.exists()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await store.get_instance("x")


async def test_fallback_without_aiosqlite_private_execute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend_module, "_one_hop_runner", lambda db: None)
    async with SqliteBackend(tmp_path / "fallback.db") as store:
        await store.create_instance(record("inst"), message("inst", "start"))
        items = await asyncio.gather(
            store.lock_orchestrations("a", max_items=1, lease_seconds=60),
            store.lock_orchestrations("b", max_items=1, lease_seconds=60),
        )
        assert sorted(len(i) for i in items) == [0, 1]
        (item,) = items[0] or items[1]
        done = OrchestrationCompletion("inst", item.lock_token, item.instance, [b"h"],
                                       consumed=["start"])
        assert await store.complete_orchestrations([done]) == [True]
        assert await store.get_history("inst") == [b"h"]
        assert store._executor is not None


async def test_unopenable_file_is_a_configuration_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "x.db"
    with pytest.raises(ConfigurationError, match="no-such-dir"):
        await SqliteBackend(missing).get_instance("x")

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database, not at all" * 100)
    with pytest.raises(ConfigurationError, match=r"garbage\.db"):
        async with SqliteBackend(garbage):
            pass


# -- wake-ups -------------------------------------------------------------------------------------


async def test_wait_for_work_wakes_on_local_writes(backend: SqliteBackend) -> None:
    await backend.wait_for_work(WorkKind.ORCHESTRATION, 0)  # clear the initial state
    waiter = asyncio.create_task(backend.wait_for_work(WorkKind.ORCHESTRATION, 30))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await backend.create_instance(record("inst"), message("inst", "start"))
    await asyncio.wait_for(waiter, 2)

    (item,) = await backend.lock_orchestrations("w", max_items=1, lease_seconds=60)
    waiter = asyncio.create_task(backend.wait_for_work(WorkKind.ACTIVITY, 30))
    done = OrchestrationCompletion("inst", item.lock_token, item.instance, consumed=["start"],
                                   activities=[ActivityTask("t", "inst", b"{}")])
    await backend.complete_orchestrations([done])
    await asyncio.wait_for(waiter, 2)


async def test_wait_for_work_wakes_when_a_local_delayed_message_becomes_visible(
    backend: SqliteBackend,
) -> None:
    await backend.create_instance(record("inst"), message("inst", "start"))
    await backend.wait_for_work(WorkKind.ORCHESTRATION, 0)
    due = time.time() + 0.3
    await backend.send_messages([Message("timer", "inst", b"{}", visible_at=due)])
    await backend.wait_for_work(WorkKind.ORCHESTRATION, 30)
    assert time.time() >= due
    assert time.time() < due + 1.0, "must wake at the timer, not at the 30 s poll interval"


# -- URLs -----------------------------------------------------------------------------------------


def test_url_relative_and_absolute_paths() -> None:
    assert parse_url("sqlite:///data/aioflow.db") == ("data/aioflow.db", {})
    assert parse_url("sqlite:////var/lib/aioflow.db") == ("/var/lib/aioflow.db", {})
    assert parse_url("sqlite:///my%20dir/x.db") == ("my dir/x.db", {})
    store = open_backend("sqlite:///data/aioflow.db")
    assert store.path == os.path.abspath("data/aioflow.db")


def test_url_parameters() -> None:
    _, options = parse_url("sqlite:////tmp/x.db?synchronous=full&busy_timeout=2.5")
    assert options == {"synchronous": "FULL", "busy_timeout": 2.5}
    store = open_backend("sqlite:////tmp/x.db?synchronous=EXTRA&busy_timeout=10")
    assert (store.synchronous, store.busy_timeout) == ("EXTRA", 10.0)


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("sqlite:///:memory:", ["in-memory", "memory://"]),
        ("sqlite:///x.db?journal=wal", ["'journal'", "busy_timeout", "synchronous"]),
        ("sqlite:///x.db?synchronous=OFF", ["synchronous", "NORMAL, FULL, EXTRA"]),
        ("sqlite:///x.db?busy_timeout=soon", ["busy_timeout", "'soon'"]),
        ("sqlite:///x.db?busy_timeout=-1", ["busy_timeout"]),
        ("sqlite:///x.db?busy_timeout=1&busy_timeout=2", ["twice"]),
        ("sqlite://host/x.db", ["host", "sqlite:///relative"]),
        ("sqlite://", ["names no database file"]),
        ("sqlite:///", ["names no database file"]),
        ("postgres:///x.db", ["scheme"]),
        ("sqlite:///x.db#frag", ["fragment"]),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        open_backend(url)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ConfigurationError, match="in-memory"):
        SqliteBackend(":memory:")
    with pytest.raises(ConfigurationError, match="synchronous"):
        SqliteBackend("x.db", synchronous="sometimes")
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SqliteBackend("x.db", busy_timeout=-1)


def test_entry_point_resolves_to_open_backend() -> None:
    (entry,) = [
        e for e in importlib.metadata.entry_points(group="aioflow.backends") if e.name == "sqlite"
    ]
    assert entry.load() is aioflow_sqlite.open_backend


# -- eternal orchestrations stay bounded -------------------------------------------------------

_eternal = __import__("aioflow").App()


@_eternal.activity
async def _tick(n: int) -> int:
    return n + 1


@_eternal.orchestrator
async def _eternal_monitor(ctx, state):  # type: ignore[no-untyped-def]
    n = await ctx.call_activity(_tick, state["n"])
    await asyncio.sleep(0.001)  # a durable timer, as a monitor's polling interval
    if n >= state["rounds"]:
        return n
    ctx.continue_as_new({"n": n, "rounds": state["rounds"]})
    return None


@pytest.mark.asyncio
async def test_an_eternal_orchestration_does_not_grow_the_database(tmp_path: Path) -> None:
    """Every continue-as-new forgets the consumed messages of the execution before it, so a
    monitor that loops forever keeps a bounded inbox instead of one row per message ever
    received."""
    import aioflow

    path = tmp_path / "eternal.db"
    async with SqliteBackend(path) as store:
        worker = aioflow.Worker(_eternal, store, poll_interval=0.01, watchdog_seconds=0)
        client = aioflow.Client(store)
        async with worker:
            iid = await client.start_new(_eternal_monitor, {"n": 0, "rounds": 60})
            status = await client.wait_for_completion(iid, timeout=30)
        assert status.output == 60, f"the loop must run 60 rounds, got {status}"
    with sqlite3.connect(path) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM aioflow_messages").fetchone()
        (history,) = conn.execute("SELECT count(*) FROM aioflow_history").fetchone()
    assert rows <= 10, (
        f"after 60 executions the instance's inbox holds {rows} rows: consumed messages of "
        f"earlier executions must be deleted at continue-as-new (about 3 per round otherwise)"
    )
    assert history <= 20, f"only the last execution's history may remain, found {history} events"
