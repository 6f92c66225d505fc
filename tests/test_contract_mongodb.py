"""The MongoDB backend: the shared backend contract, plus what only this backend promises.

Runs against FerretDB (built and started by `tests/servers/ferretdb.py`) or the server named by
``AIOFLOW_TEST_MONGODB_URI``; every test has its own database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aioflow_mongodb import INDEXES, MongoBackend, MongoUnavailableError, open_backend, split_uri
from pymongo import AsyncMongoClient
from servers.ferretdb import MongoServer, mongodb_database, mongodb_server  # noqa: F401

import aioflow
from aioflow.backend import (
    ActivityResult,
    ActivityTask,
    Backend,
    InstanceQuery,
    InstanceRecord,
    Message,
    NewInstance,
    OrchestrationCompletion,
)
from aioflow.client import Client
from aioflow.connect import connect
from aioflow.errors import ConfigurationError
from aioflow.status import RuntimeStatus
from aioflow.testing.conformance import BackendContractSuite
from aioflow.worker import Worker

# -- the shared contract ------------------------------------------------------------------------


class TestMongoBackendContract(BackendContractSuite):
    @pytest_asyncio.fixture
    async def backend(  # type: ignore[override]
        self, mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
    ) -> AsyncIterator[Backend]:
        async with MongoBackend(mongodb_server.url(mongodb_database)) as store:
            yield store


def test_mongo_backend_implements_the_protocol() -> None:
    store: Backend = MongoBackend("mongodb://127.0.0.1:1/unused")  # checked by mypy, too
    assert isinstance(store, Backend)


# -- helpers ------------------------------------------------------------------------------------


def record(instance_id: str, status: RuntimeStatus = RuntimeStatus.PENDING,
           input: bytes | None = b"{}") -> InstanceRecord:
    now = time.time()
    return InstanceRecord(instance_id, "Workflow", "exec-1", status, now, now, input)


def message(instance_id: str, message_id: str, data: bytes = b"{}") -> Message:
    return Message(message_id, instance_id, data)


@pytest_asyncio.fixture
async def backend(
    mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
) -> AsyncIterator[MongoBackend]:
    async with MongoBackend(mongodb_server.url(mongodb_database)) as store:
        yield store


# -- URLs and construction ----------------------------------------------------------------------


def test_the_database_comes_from_the_url_path_or_the_database_parameter() -> None:
    assert split_uri("mongodb://db1:27017,db2:27017/orders?replicaSet=rs0") == (
        "mongodb://db1:27017,db2:27017/orders?replicaSet=rs0", "orders", {})
    uri, database, options = split_uri(
        "mongodb://u:p@h/admin?database=orders&collection_prefix=wf_")
    assert (database, options) == ("orders", {"prefix": "wf_"})
    assert "database=" not in uri and "collection_prefix" not in uri, (
        "aioflow's own parameters must be removed before the URI reaches PyMongo")


def test_connect_selects_the_mongodb_backend_for_both_schemes() -> None:
    plain = connect("mongodb://127.0.0.1:27017/orders")
    srv = connect("mongodb+srv://cluster0.example.net/?database=orders")
    for store in (plain, srv):
        assert isinstance(store, MongoBackend), f"connect() gave {type(store).__name__}"
        assert store.database_name == "orders"
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="aioflow.backends")}
    assert names.get("mongodb") == "aioflow_mongodb:open_backend", (
        "the package must register the 'mongodb' scheme in the aioflow.backends entry points")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("mongodb://localhost:27017", "names no database"),
        ("mongodb://localhost:27017/", "names no database"),
        ("postgres://localhost/a", "scheme must be mongodb"),
        ("mongodb:///aioflow", "names no host"),
        ("mongodb://localhost/a?database=x&database=y", "given twice"),
        ("mongodb://localhost/a?bogusOption=1", "Unknown option"),
        ("mongodb://localhost/a?serverSelectionTimeoutMS=soon", "serverselectiontimeoutms"),
        ("mongodb://localhost/bad.name", "invalid MongoDB database name"),
        ("mongodb://localhost/a?collection_prefix=x.y", "invalid collection prefix"),
    ],
)
def test_bad_urls_are_rejected_at_once_saying_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_backend(url)
    assert complaint.lower() in str(caught.value).lower(), (
        f"the error for {url!r} should say {complaint!r}; it said: {caught.value}")


async def test_an_unreachable_server_fails_after_the_selection_timeout_naming_the_host() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_backend(f"mongodb://127.0.0.1:{port}/aioflow?serverSelectionTimeoutMS=300")
    began = time.monotonic()
    with pytest.raises(MongoUnavailableError) as caught:
        await asyncio.wait_for(store.get_instance("x"), timeout=10)
    elapsed = time.monotonic() - began
    await store.close()
    assert f"127.0.0.1:{port}" in str(caught.value), (
        f"the error must name the host it tried; it said: {caught.value}")
    assert elapsed < 5, f"it should give up after the 0.3 s selection timeout, took {elapsed:.1f}s"


async def test_an_existing_client_or_database_can_be_used_and_is_not_closed(
    mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_server.uri)
    try:
        by_client = MongoBackend(client, mongodb_database)
        await by_client.create_instance(record("shared"), message("shared", "start"))
        by_database = MongoBackend(client[mongodb_database])
        row = await by_database.get_instance("shared")
        assert row is not None and row.instance_id == "shared", (
            "a backend on the same database sees the first one's instance")
        await by_client.close()
        await by_database.close()
        assert await client[mongodb_database].command("ping"), "the app's client still works"
        with pytest.raises(ConfigurationError, match="needs a database name"):
            MongoBackend(client)
    finally:
        await client.close()


async def test_a_uri_with_aioflow_parameters_can_be_given_to_the_constructor(
    mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
) -> None:
    base = mongodb_server.uri.split("?", 1)[0].rstrip("/")
    store = MongoBackend(f"{base}/?database={mongodb_database}&collection_prefix=orders_")
    assert (store.database_name, store.prefix) == (mongodb_database, "orders_")
    try:
        await store.create_instance(record("p"), message("p", "start"))
        names = await store.database.list_collection_names()
        assert "orders_instances" in names, f"collections: {sorted(names)}"
    finally:
        await store.close()


async def test_the_indexes_listed_in_the_readme_are_created_on_first_use(
    backend: MongoBackend,
) -> None:
    await backend.get_instance("anything")
    for suffix, indexes in INDEXES.items():
        names = {i["name"] async for i in await backend.collection(suffix).list_indexes()}
        missing = {name for name, _ in indexes} - names
        assert not missing, f"collection {backend.prefix}{suffix} lacks indexes {missing}"


# -- ids are data, never operators --------------------------------------------------------------

STRANGE_IDS = ["$where", "$gt", "a.b", "$set.x", "{'$ne': None}", "a.$b", "..", "$"]


async def test_dollar_and_dotted_ids_are_plain_values(backend: MongoBackend) -> None:
    for n, iid in enumerate(STRANGE_IDS):
        await backend.create_instance(record(iid, input=f'{{"n":{n}}}'.encode()),
                                      message(iid, f"$start.{n}"))
    await backend.create_instance(record("plain"), message("plain", "start"))
    for n, iid in enumerate(STRANGE_IDS):
        row = await backend.get_instance(iid)
        assert row is not None and row.instance_id == iid and row.input == \
            f'{{"n":{n}}}'.encode(), f"get_instance({iid!r}) returned {row!r}"
    # A re-sent message with a $-id is still a duplicate of the first.
    await backend.send_messages([message("$where", "$start.0"), message("a.b", "$inc")])
    items = await backend.lock_orchestrations("w", max_items=100, lease_seconds=60)
    got = {item.instance.instance_id: [m.id for m in item.messages] for item in items}
    assert got["$where"] == ["$start.0"], f"the re-sent $-message was delivered again: {got}"
    assert got["a.b"] == ["$start.2", "$inc"]
    assert set(got) == {*STRANGE_IDS, "plain"}
    page, _ = await backend.query_instances(InstanceQuery(instance_id_prefix="$"))
    assert sorted(r.instance_id for r in page) == sorted(i for i in STRANGE_IDS if
                                                         i.startswith("$"))
    page, _ = await backend.query_instances(InstanceQuery(name="$gt"))
    assert page == [], "a name filter of '$gt' must match the literal name only"
    for item in items:
        done = OrchestrationCompletion(
            item.instance.instance_id, item.lock_token,
            dataclasses.replace(item.instance, runtime_status=RuntimeStatus.COMPLETED),
            [b"h"], consumed=[m.id for m in item.messages])
        assert await backend.complete_orchestrations([done]) == [True]
    assert (await backend.purge_instances(instance_id="$gt")).deleted_instance_count == 1
    assert await backend.get_instance("$gt") is None
    assert await backend.get_instance("$where") is not None, "purging '$gt' purged only it"
    with pytest.raises(TypeError, match="must be a str"):
        await backend.get_instance({"$ne": None})  # type: ignore[arg-type]


async def test_dollar_and_dotted_event_names_reach_the_orchestration(
    backend: MongoBackend,
) -> None:
    app = aioflow.App()

    @app.orchestrator(name="waits.for.$events")
    async def waits(ctx: aioflow.OrchestrationContext, names: list[str]) -> list[Any]:
        return [await ctx.wait_for_external_event(name) for name in names]

    names = ["$set", "a.b", "$inc.total", "ok"]
    client = Client(backend)
    async with Worker(app, backend, poll_interval=0.02):
        iid = await client.start_new(waits, names, instance_id="$events.1")
        for n, name in enumerate(names):
            await client.raise_event(iid, name, {"n": n, "$key": name})
        status = await client.wait_for_completion(iid, timeout=30)
    assert status.output == [{"n": n, "$key": name} for n, name in enumerate(names)]


# -- 16 MiB never surfaces ----------------------------------------------------------------------

BIG = 17 * 1024 * 1024  # over MongoDB's 16 MiB document limit on its own
LARGE = 3 * 1024 * 1024 // 2  # over the 1 MiB the backend keeps inline: stored in chunks too


def big(tag: bytes, size: int = BIG) -> bytes:
    return (tag * (size // len(tag) + 1))[:size]


async def test_payloads_over_16_mib_round_trip_everywhere(backend: MongoBackend) -> None:
    # (FerretDB stores binary data as base64 JSON, so every MiB costs time: one payload of
    # each kind is over 16 MiB, the others are over the inline limit, which takes the same path.)
    await backend.create_instance(record("huge", input=big(b"input")),
                                  message("huge", "start", big(b"start", LARGE)))
    assert (await backend.get_instance("huge")).input == big(b"input")  # type: ignore[union-attr]
    await backend.send_messages([message("huge", "event", big(b"event"))])
    (item,) = await backend.lock_orchestrations("w", max_items=1, lease_seconds=60)
    assert [m.data for m in item.messages] == [big(b"start", LARGE), big(b"event")]
    # One step: a huge history event, medium ones that add up to over 16 MiB on their own, a
    # large message, activity task, output and custom status.
    medium = [big(str(n).encode(), 950_000) for n in range(18)]
    task = ActivityTask("task-1", "huge", big(b"task", LARGE))
    row = dataclasses.replace(item.instance, runtime_status=RuntimeStatus.RUNNING,
                              output=big(b"output", LARGE), custom_status=big(b"custom", LARGE))
    step = OrchestrationCompletion(
        "huge", item.lock_token, row, [big(b"history"), *medium],
        consumed=["start", "event"], messages=[message("huge", "timer", big(b"timer", LARGE))],
        activities=[task], release=True)
    assert await backend.complete_orchestrations([step]) == [True]
    assert await backend.get_history("huge") == [big(b"history"), *medium]
    stored = await backend.get_instance("huge")
    assert stored is not None and stored.output == big(b"output", LARGE)
    assert stored.custom_status == big(b"custom", LARGE)
    (work,) = await backend.lock_activities("w", max_items=1, lease_seconds=60)
    assert work.task.data == big(b"task", LARGE)
    result = ActivityResult("task-1", work.lock_token,
                            message("huge", "result", big(b"result", LARGE)))
    await backend.complete_activities([result])
    (item,) = await backend.lock_orchestrations("w", max_items=1, lease_seconds=60)
    assert [m.data for m in item.messages] == [big(b"timer", LARGE), big(b"result", LARGE)]


# -- a commit whose writer dies after the commit point ------------------------------------------


class _DiesAfterTheCommitPoint(Exception):
    pass


async def test_a_commit_interrupted_after_its_commit_point_is_finished_by_another_worker(
    mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
) -> None:
    url = mongodb_server.url(mongodb_database)
    async with MongoBackend(url) as dying, MongoBackend(url) as other:
        await dying.create_instance(record("parent"), message("parent", "start"))
        (item,) = await dying.lock_orchestrations("dying", max_items=1, lease_seconds=0.5)
        child = NewInstance(record("child"), message("child", "child-start"))
        step = OrchestrationCompletion(
            "parent", item.lock_token,
            dataclasses.replace(item.instance, runtime_status=RuntimeStatus.RUNNING),
            [b"e1", b"e2"], consumed=["start"],
            messages=[message("parent", "timer")],
            activities=[ActivityTask("t1", "parent", b"{}")], new_instances=[child])

        async def die(iid: str, stored: dict[str, Any]) -> None:
            raise _DiesAfterTheCommitPoint

        dying._apply = die  # type: ignore[method-assign]
        with pytest.raises(_DiesAfterTheCommitPoint):
            await dying.complete_orchestrations([step])

        # Committed from the moment the record was written: readers see the whole step ...
        row = await other.get_instance("parent")
        assert row is not None and row.runtime_status is RuntimeStatus.RUNNING
        assert await other.get_history("parent") == [b"e1", b"e2"]
        # ... and nobody can lock the instance while the dead worker's lease lasts.
        assert await other.lock_orchestrations("other", max_items=5, lease_seconds=60) == []
        await asyncio.sleep(0.7)
        # After the lease, the next worker finishes the commit, then gets the new work.
        items = await other.lock_orchestrations("other", max_items=5, lease_seconds=60)
        got = {i.instance.instance_id: [m.id for m in i.messages] for i in items}
        assert got == {"parent": ["timer"], "child": ["child-start"]}, got
        assert items[0].history_length == 2 or items[1].history_length == 2
        (task,) = await other.lock_activities("other", max_items=5, lease_seconds=60)
        assert task.task.id == "t1"
        assert await other.get_history("parent") == [b"e1", b"e2"], "applied exactly once"


async def test_batches_of_hundreds_of_messages_and_tasks_in_one_call(
    backend: MongoBackend,
) -> None:
    # FerretDB 1.24 deadlocks on one write command of more than ~100 statements; the backend
    # must split its bulk writes (and MongoDB must not notice).
    async with asyncio.timeout(90):  # a deadlocked server fails the test, not hangs it
        await _hundreds(backend)


async def _hundreds(backend: MongoBackend) -> None:
    n = 260
    await backend.create_instance(record("wide"), message("wide", "start"))
    await backend.send_messages([message("wide", f"m{k}") for k in range(n)])
    (item,) = await backend.lock_orchestrations("w", max_items=1, lease_seconds=60)
    assert len(item.messages) == n + 1
    tasks = [ActivityTask(f"wide-task-{k}", "wide", b"{}") for k in range(n)]
    step = OrchestrationCompletion(
        "wide", item.lock_token, item.instance, [b"fan-out"],
        consumed=[m.id for m in item.messages], activities=tasks)
    assert await backend.complete_orchestrations([step]) == [True]
    work = await backend.lock_activities("w", max_items=1000, lease_seconds=60)
    assert sorted(w.task.id for w in work) == sorted(t.id for t in tasks)
    await backend.complete_activities([
        ActivityResult(w.task.id, w.lock_token, message("wide", f"r-{w.task.id}"))
        for w in work])
    assert await backend.lock_activities("w", max_items=1000, lease_seconds=60) == []
    (item,) = await backend.lock_orchestrations("w", max_items=1, lease_seconds=60)
    assert len(item.messages) == n, "every result arrived, and no consumed message came back"
