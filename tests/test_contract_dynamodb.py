"""The DynamoDB + SQS backend: the shared backend contract, plus what only it promises.

Runs against real servers started by the test run on 127.0.0.1 (`servers.aws_local`): moto's
DynamoDB server (standing in for DynamoDB Local, whose licence this project cannot use) and
ElasticMQ for SQS. Every test gets its own table and queues (a unique prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import aioflow_dynamodb
import pytest
import pytest_asyncio
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from aioflow_dynamodb import DynamoDBBackend, open_backend, parse_url
from servers.aws_local import (  # noqa: F401 - aws_endpoints is a fixture
    AwsEndpoints,
    aws_endpoints,
    free_port,
    unique_prefix,
)

import aioflow
from aioflow.backend import (
    ActivityTask,
    ActivityWorkItem,
    Backend,
    InstanceRecord,
    Message,
    NewInstance,
    OrchestrationCompletion,
    OrchestrationWorkItem,
    WorkKind,
)
from aioflow.errors import ConfigurationError
from aioflow.status import RuntimeStatus
from aioflow.testing.conformance import BackendContractSuite


class TestDynamoDBBackendContract(BackendContractSuite):
    # SQS delays and visibility timeouts are whole seconds: leases and delays the tests wait
    # out are one second here.
    short_lease: ClassVar[float] = 1.0
    short_delay: ClassVar[float] = 1.0
    clock_slack: ClassVar[float] = 0.5

    @pytest_asyncio.fixture
    async def backend(self, aws_endpoints: AwsEndpoints  # noqa: F811
                      ) -> AsyncIterator[Backend]:  # type: ignore[override]
        async with DynamoDBBackend(**aws_endpoints.options()) as store:  # type: ignore[arg-type]
            yield store


def test_dynamodb_backend_implements_the_protocol() -> None:
    store: Backend = DynamoDBBackend(region="eu-west-1", table_prefix="x", queue_prefix="x")
    assert isinstance(store, Backend)


# -- helpers ------------------------------------------------------------------------------------


def record(instance_id: str, status: RuntimeStatus = RuntimeStatus.PENDING,
           input: bytes | None = b"{}") -> InstanceRecord:
    now = time.time()
    return InstanceRecord(instance_id, "Workflow", "exec-1", status, now, now, input)


def message(instance_id: str, message_id: str, data: bytes = b"{}",
            visible_at: float = 0.0) -> Message:
    return Message(message_id, instance_id, data, visible_at)


@pytest_asyncio.fixture
async def backend(aws_endpoints: AwsEndpoints) -> AsyncIterator[DynamoDBBackend]:  # noqa: F811
    async with DynamoDBBackend(**aws_endpoints.options()) as store:  # type: ignore[arg-type]
        yield store


@contextlib.asynccontextmanager
async def raw_clients(aws_endpoints: AwsEndpoints) -> AsyncIterator[tuple[Any, Any]]:  # noqa: F811
    """Plain aiobotocore clients, to look at what the backend stored and queued."""
    session = get_session()
    async with session.create_client(
            "dynamodb", region_name=aws_endpoints.region,
            endpoint_url=aws_endpoints.dynamodb_url) as ddb, session.create_client(
            "sqs", region_name=aws_endpoints.region, endpoint_url=aws_endpoints.sqs_url) as sqs:
        yield ddb, sqs


async def queue_counts(sqs: Any, store: DynamoDBBackend, kind: WorkKind) -> dict[str, int]:
    url = (await sqs.get_queue_url(QueueName=store.queue_names[kind]))["QueueUrl"]
    attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
    return {"visible": int(attrs["ApproximateNumberOfMessages"]),
            "in_flight": int(attrs["ApproximateNumberOfMessagesNotVisible"]),
            "delayed": int(attrs["ApproximateNumberOfMessagesDelayed"])}


async def lock_until(store: DynamoDBBackend, count: int, seconds: float = 10.0,
                     **kwargs: Any) -> list[OrchestrationWorkItem]:
    """Lock orchestrations until `count` are held (hints travel through SQS)."""
    items: list[OrchestrationWorkItem] = []
    deadline = time.monotonic() + seconds
    while len(items) < count and time.monotonic() < deadline:
        items += await store.lock_orchestrations(
            "w", max_items=kwargs.get("max_items", 100), lease_seconds=60)
        if len(items) < count:
            await asyncio.sleep(0.05)
    return items


# -- AWS limits never surface: big payloads, big steps, long timers -------------------------------


async def test_payloads_beyond_every_aws_limit_are_offloaded_and_read_back(
    backend: DynamoDBBackend, aws_endpoints: AwsEndpoints  # noqa: F811
) -> None:
    """Items hold 400 KB and SQS messages 256 KB: bigger inputs, outputs, history events,
    messages and task payloads are stored as blob parts and read back whole."""
    big_input = b'"' + b"i" * 900_000 + b'"'
    big_message = b'"' + b"m" * 1_200_000 + b'"'
    big_event = b'"' + b"h" * 700_000 + b'"'
    big_task = b'"' + b"t" * 450_000 + b'"'
    big_output = b'"' + b"o" * 500_000 + b'"'
    await backend.create_instance(record("big", input=big_input), message("big", "start"))
    await backend.send_messages([message("big", "huge-event", big_message)])
    (item,) = await lock_until(backend, 1)
    assert item.instance.input == big_input, "a 900 KB input must round-trip"
    assert [m.data for m in item.messages] == [b"{}", big_message], (
        "a 1.2 MB message must be delivered whole, in send order")
    row = dataclasses.replace(item.instance, runtime_status=RuntimeStatus.RUNNING,
                              output=big_output, custom_status=big_output)
    task = ActivityTask("big-task", "big", big_task)
    done = OrchestrationCompletion("big", item.lock_token, row, [b"{}", big_event],
                                   consumed=[m.id for m in item.messages], activities=[task])
    assert await backend.complete_orchestrations([done]) == [True]
    assert await backend.get_history("big") == [b"{}", big_event]
    stored = await backend.get_instance("big")
    assert stored is not None and stored.output == big_output
    assert stored.custom_status == big_output and stored.input == big_input
    work = []
    for _ in range(100):
        work = await backend.lock_activities("w", max_items=10, lease_seconds=60)
        if work:
            break
        await asyncio.sleep(0.05)
    assert [w.task for w in work] == [task], "a 450 KB activity payload must round-trip"

    async with raw_clients(aws_endpoints) as (ddb, _):
        paginator = ddb.get_paginator("query")
        keys = [i["sk"]["S"] async for page in paginator.paginate(
            TableName=backend.table, KeyConditionExpression="pk = :p",
            ProjectionExpression="sk", ExpressionAttributeValues={":p": {"S": "I#big"}})
            for i in page["Items"]]
    blobs = [k for k in keys if k.startswith("B#")]
    assert len(blobs) >= 8, f"the big values must be stored as blob parts, found {len(blobs)}"


async def test_a_completion_far_beyond_100_actions_commits_atomically(
    backend: DynamoDBBackend,
) -> None:
    """TransactWriteItems takes 100 actions: a step with 150 activity tasks, 120 messages and
    30 sub-orchestrations still commits whole (fenced), and a stale one writes nothing."""
    for n in range(3):
        await backend.create_instance(record(f"target-{n}", RuntimeStatus.RUNNING),
                                      message(f"target-{n}", f"target-start-{n}"))
    await backend.create_instance(record("wide"), message("wide", "start"))
    items = await lock_until(backend, 4)
    by_id = {i.instance.instance_id: i for i in items}
    for n in range(3):
        done = OrchestrationCompletion(
            f"target-{n}", by_id[f"target-{n}"].lock_token, by_id[f"target-{n}"].instance,
            consumed=[f"target-start-{n}"])
        assert await backend.complete_orchestrations([done]) == [True]
    wide = by_id["wide"]
    tasks = [ActivityTask(f"task-{n:03d}", "wide", b'{"n":%d}' % n) for n in range(150)]
    messages = [message(f"target-{n % 3}", f"out-{n:03d}") for n in range(120)]
    children = [NewInstance(record(f"child-{n:02d}"), message(f"child-{n:02d}", f"cs-{n}"))
                for n in range(30)]
    history = [b'{"h":%d}' % n for n in range(200)]

    stale = OrchestrationCompletion("wide", "not-the-token", wide.instance, history,
                                    consumed=["start"], activities=tasks, messages=messages,
                                    new_instances=children)
    assert await backend.complete_orchestrations([stale]) == [False]
    assert await backend.get_history("wide") == []
    assert await backend.get_instance("child-00") is None, "a stale step creates nothing"

    done = OrchestrationCompletion("wide", wide.lock_token, wide.instance, history,
                                   consumed=["start"], activities=tasks, messages=messages,
                                   new_instances=children)
    assert await backend.complete_orchestrations([done]) == [True]
    assert await backend.get_history("wide") == history
    assert all([await backend.get_instance(f"child-{n:02d}") is not None for n in range(30)])
    locked: list[ActivityWorkItem] = []
    deadline = time.monotonic() + 20
    while len(locked) < 150 and time.monotonic() < deadline:
        locked += await backend.lock_activities("w", max_items=50, lease_seconds=60)
    assert sorted(w.task.id for w in locked) == [t.id for t in tasks], (
        "every one of the 150 activity tasks must be queued exactly once")
    woken = await lock_until(backend, 33, seconds=20)
    targets = {i.instance.instance_id: i for i in woken}
    assert sorted(targets) == sorted([f"child-{n:02d}" for n in range(30)]
                                     + ["target-0", "target-1", "target-2"])
    assert sum(len(targets[f"target-{n}"].messages) for n in range(3)) == 120, (
        "all 120 outbound messages must be delivered")


async def test_a_timer_longer_than_sqs_maximum_delay_waits_in_hops(
    backend: DynamoDBBackend, aws_endpoints: AwsEndpoints  # noqa: F811
) -> None:
    """SQS delays a message 15 minutes at most. A 2-hour timer's hint is sent delayed by 15
    minutes carrying its due time; a hint that arrives before its due time is hidden again
    (up to 11 h a hop) or re-sent, never acted on early and never dropped."""
    await backend.create_instance(record("sleeper", RuntimeStatus.RUNNING),
                                  message("sleeper", "start"))
    (item,) = await lock_until(backend, 1)
    due = time.time() + 2 * 3600
    timer = message("sleeper", "timer-2h", b'{"timer":1}', visible_at=due)
    done = OrchestrationCompletion("sleeper", item.lock_token, item.instance,
                                   consumed=["start"], messages=[timer])
    assert await backend.complete_orchestrations([done]) == [True]
    async with raw_clients(aws_endpoints) as (_, sqs):
        counts = await queue_counts(sqs, backend, WorkKind.ORCHESTRATION)
        assert counts["delayed"] == 1, f"the timer's hint must wait in SQS as delayed: {counts}"
        assert await backend.lock_orchestrations("w", max_items=10, lease_seconds=60) == []

        # The hint arriving before its due time (as it does after 15 minutes) is hidden again.
        url = (await sqs.get_queue_url(QueueName=backend.queue_names[WorkKind.ORCHESTRATION])
               )["QueueUrl"]
        await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"i": "sleeper",
                                                                      "due": due}))
        assert await backend.lock_orchestrations("w", max_items=10, lease_seconds=60) == [], (
            "a hint received before its due time must not lock anything")
        counts = await queue_counts(sqs, backend, WorkKind.ORCHESTRATION)
        assert counts["in_flight"] == 1 and counts["visible"] == 0, (
            f"the early hint must be hidden until due, not deleted: {counts}")

        # A hint due in two days cannot be hidden that long: it is re-sent delayed again.
        far = time.time() + 2 * 86400
        await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"i": "sleeper",
                                                                      "due": far}))
        assert await backend.lock_orchestrations("w", max_items=10, lease_seconds=60) == []
        counts = await queue_counts(sqs, backend, WorkKind.ORCHESTRATION)
        assert counts["delayed"] == 2 and counts["visible"] == 0, (
            f"the far hint must be re-sent with a delay: {counts}")

        # The message itself is stored with its due time, waiting in DynamoDB.
        async with raw_clients(aws_endpoints) as (ddb, _):
            stored = (await ddb.get_item(TableName=backend.table, Key={
                "pk": {"S": "I#sleeper"}, "sk": {"S": "M#timer-2h"}}))["Item"]
        assert float(stored["v"]["N"]) == pytest.approx(due)


async def test_a_due_timer_hint_locks_the_instance(backend: DynamoDBBackend) -> None:
    await backend.create_instance(record("t", RuntimeStatus.RUNNING), message("t", "start"))
    (item,) = await lock_until(backend, 1)
    due = time.time() + 1.2
    done = OrchestrationCompletion("t", item.lock_token, item.instance, consumed=["start"],
                                   messages=[message("t", "timer", visible_at=due)])
    assert await backend.complete_orchestrations([done]) == [True]
    other = DynamoDBBackend(region=backend.region, table_prefix=backend.table[:-8],
                            queue_prefix=backend.queue_names[WorkKind.ACTIVITY][:-19],
                            endpoint_url=backend._aws.endpoint_url,
                            sqs_endpoint_url=backend._aws.sqs_endpoint_url)
    async with other:  # another process: it only knows the timer from its SQS hint
        assert await other.lock_orchestrations("w", max_items=5, lease_seconds=60) == []
        (woken,) = await lock_until(other, 1, seconds=10)
        assert time.time() >= due and [m.id for m in woken.messages] == ["timer"]


# -- lost wake-ups -----------------------------------------------------------------------------


class _LostHint(Exception):
    pass


async def _no_sqs(*args: object, **kwargs: object) -> None:
    raise _LostHint("the process died between its DynamoDB commit and its SQS send")


async def test_a_lost_wake_up_after_create_instance_is_recovered_by_the_sweeper(
    aws_endpoints: AwsEndpoints, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    options = aws_endpoints.options()
    async with DynamoDBBackend(**options) as crashing, \
            DynamoDBBackend(**options) as survivor:  # type: ignore[arg-type]
        monkeypatch.setattr(crashing, "_send_hints", _no_sqs)
        with pytest.raises(_LostHint):
            await crashing.create_instance(record("orphan"), message("orphan", "start"))
        assert await survivor.get_instance("orphan") is not None, "the row was committed"
        assert await survivor.lock_orchestrations("w", max_items=5, lease_seconds=60) == [], (
            "no hint was sent, so nothing can be found through SQS")
        assert await survivor.sweep(grace=0) == 1, "the sweeper must find the outbox item"
        (item,) = await lock_until(survivor, 1)
        assert item.instance.instance_id == "orphan" and [m.id for m in item.messages] == [
            "start"]


@pytest.mark.parametrize("path", ["in-transaction", "rolled-forward"])
async def test_a_step_whose_hints_were_never_sent_is_recovered_by_the_sweeper(
    aws_endpoints: AwsEndpoints, monkeypatch: pytest.MonkeyPatch, path: str  # noqa: F811
) -> None:
    """The worker commits its step, then dies before sending a single hint. A small step
    wrote its effects in the commit and its hints on the row; a step creating an instance
    recorded its effects for roll-forward and dies before applying any. Either way the
    sweeper finishes the job: the activity, the message and the child all arrive, once."""
    options = aws_endpoints.options()
    async with DynamoDBBackend(**options) as crashing, \
            DynamoDBBackend(**options) as survivor:  # type: ignore[arg-type]
        await crashing.create_instance(record("inst", RuntimeStatus.RUNNING),
                                       message("inst", "start"))
        await crashing.create_instance(record("peer", RuntimeStatus.RUNNING),
                                       message("peer", "peer-start"))
        items = await lock_until(crashing, 2)
        by_id = {i.instance.instance_id: i for i in items}
        peer = by_id["peer"]
        assert await crashing.complete_orchestrations([OrchestrationCompletion(
            "peer", peer.lock_token, peer.instance, consumed=["peer-start"])]) == [True]
        item = by_id["inst"]
        children = ([NewInstance(record("child"), message("child", "child-start"))]
                    if path == "rolled-forward" else [])
        monkeypatch.setattr(crashing, "_send_hints", _no_sqs)
        monkeypatch.setattr(crashing, "_apply", _no_sqs)
        step = OrchestrationCompletion(
            "inst", item.lock_token, item.instance, [b'{"h":1}'], consumed=["start"],
            messages=[message("peer", "hello")], activities=[ActivityTask("t1", "inst", b"1")],
            new_instances=children)
        with pytest.raises(_LostHint):
            await crashing.complete_orchestrations([step])
        assert await survivor.get_history("inst") == [b'{"h":1}'], "the step was committed"
        assert await survivor.lock_activities("w", max_items=5, lease_seconds=60) == []
        assert await survivor.lock_orchestrations("w", max_items=5, lease_seconds=60) == []
        assert await survivor.sweep(grace=0) == 1
        assert await survivor.sweep(grace=0) == 0, "recovered once, then cleared"
        work: list[ActivityWorkItem] = []
        for _ in range(50):
            work += await survivor.lock_activities("w", max_items=5, lease_seconds=60)
            if work:
                break
            await asyncio.sleep(0.05)
        assert [w.task.id for w in work] == ["t1"]
        woken = await lock_until(survivor, 1 + len(children))
        assert sorted((i.instance.instance_id, [m.id for m in i.messages]) for i in woken) == (
            [("child", ["child-start"])] if children else []) + [("peer", ["hello"])]
        assert await survivor.lock_orchestrations("w", max_items=5, lease_seconds=60) == [], (
            "the consumed start message of 'inst' must not come back")


async def test_a_worker_finishes_an_instance_whose_wake_up_was_lost(
    aws_endpoints: AwsEndpoints, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """End to end: a client's process dies after committing start_new but before its SQS
    send; a worker (whose backend sweeps every half second) still runs the instance."""
    prefix = unique_prefix()
    async with DynamoDBBackend(**aws_endpoints.options(prefix)) as client_side:  # type: ignore[arg-type]
        monkeypatch.setattr(client_side, "_send_hints", _no_sqs)
        client = aioflow.Client(client_side)
        with pytest.raises(_LostHint):
            await client.start_new(_echo_flow, "hello", instance_id="lost-start")
    store = aioflow.connect(aws_endpoints.url(prefix, sweep_interval="0.5", sweep_grace="0.5"))
    try:
        worker = aioflow.Worker(_sweep_app, store, poll_interval=0.05)
        async with worker:
            status = await aioflow.Client(store).wait_for_completion("lost-start", timeout=30)
        assert status.runtime_status is RuntimeStatus.COMPLETED and status.output == "hello!"
    finally:
        await store.close()


_sweep_app = aioflow.App()


@_sweep_app.activity
async def _exclaim(text: str) -> str:
    return text + "!"


@_sweep_app.orchestrator
async def _echo_flow(ctx: aioflow.OrchestrationContext, text: str) -> str:
    return await ctx.call_activity(_exclaim, text)  # type: ignore[no-any-return]


# -- wake-ups through SQS -------------------------------------------------------------------------


async def test_wait_for_work_long_polls_sqs_and_wakes_on_another_process_work(
    aws_endpoints: AwsEndpoints,  # noqa: F811
) -> None:
    options = aws_endpoints.options()
    async with DynamoDBBackend(**options) as waiter, \
            DynamoDBBackend(**options) as writer:  # type: ignore[arg-type]
        began = time.monotonic()
        waiting = asyncio.create_task(waiter.wait_for_work(WorkKind.ORCHESTRATION, 15))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "with no work, wait_for_work must keep waiting"
        await writer.create_instance(record("x"), message("x", "start"))
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - began < 5, "the long poll must return when the hint arrives"
        assert waiter.calls.get("sqs.ReceiveMessage", 0) >= 1
        (item,) = await waiter.lock_orchestrations("w", max_items=5, lease_seconds=60)
        assert item.instance.instance_id == "x", "the received hint is used by the next lock"


async def test_calls_are_counted_per_service_and_operation(backend: DynamoDBBackend) -> None:
    before = backend.calls
    await backend.create_instance(record("c"), message("c", "start"))
    after = backend.calls
    assert after.get("dynamodb.TransactWriteItems", 0) == before.get(
        "dynamodb.TransactWriteItems", 0) + 1
    assert after.get("sqs.SendMessageBatch", 0) == before.get("sqs.SendMessageBatch", 0) + 1


# -- bad configuration fails early and clearly --------------------------------------------------


async def test_an_unreachable_endpoint_fails_fast_naming_endpoint_and_region() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = DynamoDBBackend(region="eu-west-1", table_prefix="x", queue_prefix="x",
                            endpoint_url=dead, connect_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(ConfigurationError) as raised:
        await store.get_instance("anything")
    assert time.monotonic() - began < 20, "an unreachable endpoint must not hang"
    assert dead in str(raised.value) and "eu-west-1" in str(raised.value), str(raised.value)
    await store.close()


async def test_missing_credentials_fail_at_start_up_saying_what_is_missing(
    aws_endpoints: AwsEndpoints, monkeypatch: pytest.MonkeyPatch, tmp_path: Path  # noqa: F811
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = aioflow.connect(aws_endpoints.url())
    with pytest.raises(ConfigurationError) as raised:
        await store.get_instance("anything")
    text = str(raised.value)
    assert "no AWS credentials" in text and "AWS_ACCESS_KEY_ID" in text, text
    assert aws_endpoints.dynamodb_url in text and "eu-west-1" in text, text
    await store.close()


async def test_create_false_with_a_missing_table_names_it(
    aws_endpoints: AwsEndpoints,  # noqa: F811
) -> None:
    store = aioflow.connect(aws_endpoints.url("neverthere", create="false"))
    with pytest.raises(ConfigurationError, match="neverthere-aioflow"):
        await store.get_instance("anything")
    await store.close()


def test_url_parameters() -> None:
    options = parse_url("dynamodb://?region=eu-west-1&table_prefix=myapp&queue_prefix=q1"
                        "&endpoint_url=http://127.0.0.1:8000&create=false&sweep_interval=2")
    assert options == {"region": "eu-west-1", "table_prefix": "myapp", "queue_prefix": "q1",
                       "endpoint_url": "http://127.0.0.1:8000", "create": False,
                       "sweep_interval": 2.0}
    store = open_backend("dynamodb://?region=us-east-1&table_prefix=app")
    assert store.table == "app-aioflow"
    assert store.queue_names[WorkKind.ACTIVITY] == "app-aioflow-activities", (
        "queue_prefix defaults to table_prefix")


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("dynamodb://?table_prefix=x", ["lacks region"]),
        ("dynamodb://?region=eu-west-1", ["lacks table_prefix"]),
        ("dynamodb://?region=moon&table_prefix=x", ["region", "'moon'"]),
        ("dynamodb://?region=eu-west-1&table_prefix=a b", ["table_prefix"]),
        ("dynamodb://?region=eu-west-1&table_prefix=x&queue_prefix=a.b", ["queue_prefix"]),
        ("dynamodb://?region=eu-west-1&table_prefix=x&tabel=y", ["unknown parameter 'tabel'"]),
        ("dynamodb://?region=eu-west-1&table_prefix=x&create=maybe", ["create"]),
        ("dynamodb://?region=eu-west-1&table_prefix=x&endpoint_url=localhost:8000",
         ["endpoint_url", "http"]),
        ("dynamodb://?region=eu-west-1&table_prefix=x&sweep_grace=-1", ["sweep_grace"]),
        ("dynamodb://?region=eu-west-1&table_prefix=x&region=us-east-1", ["twice"]),
        ("dynamodb://host?region=eu-west-1&table_prefix=x", ["query string"]),
        ("sqs://?region=eu-west-1&table_prefix=x", ["scheme"]),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        open_backend(url)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)


def test_entry_point_and_connect_resolve_the_scheme() -> None:
    (entry,) = [e for e in importlib.metadata.entry_points(group="aioflow.backends")
                if e.name == "dynamodb"]
    assert entry.load() is aioflow_dynamodb.open_backend
    store = aioflow.connect("dynamodb://?region=eu-west-1&table_prefix=x")
    assert isinstance(store, DynamoDBBackend)


# -- eternal orchestrations stay bounded -------------------------------------------------------

_eternal = aioflow.App()


@_eternal.activity
async def _tick(n: int) -> int:
    return n + 1


@_eternal.orchestrator
async def _eternal_monitor(ctx: aioflow.OrchestrationContext, state: dict[str, int]) -> int | None:
    n = await ctx.call_activity(_tick, state["n"])
    if n >= state["rounds"]:
        return n  # type: ignore[no-any-return]
    ctx.continue_as_new({"n": n, "rounds": state["rounds"]})
    return None


async def test_an_eternal_orchestration_does_not_grow_its_partition(
    backend: DynamoDBBackend, aws_endpoints: AwsEndpoints  # noqa: F811
) -> None:
    """Each continue-as-new drops the previous execution's history and forgets the ids of the
    messages it consumed, so a loop that runs forever keeps a bounded number of items."""
    worker = aioflow.Worker(_eternal, backend, poll_interval=0.02, watchdog_seconds=0)
    async with worker:
        client = aioflow.Client(backend)
        iid = await client.start_new(_eternal_monitor, {"n": 0, "rounds": 25})
        status = await client.wait_for_completion(iid, timeout=60)
    assert status.output == 25, f"the loop must run 25 rounds, got {status}"
    async with raw_clients(aws_endpoints) as (ddb, _):
        paginator = ddb.get_paginator("query")
        keys = [i["sk"]["S"] async for page in paginator.paginate(
            TableName=backend.table, KeyConditionExpression="pk = :p",
            ProjectionExpression="sk", ExpressionAttributeValues={":p": {"S": f"I#{iid}"}})
            for i in page["Items"]]
    assert len(keys) <= 12, (
        f"after 25 executions the instance keeps {len(keys)} items: old histories and "
        f"consumed-message ids must be dropped at continue-as-new (3+ per round otherwise): "
        f"{sorted(keys)}")


async def test_a_message_arriving_while_another_worker_holds_the_instance_is_not_delayed(
    aws_endpoints: AwsEndpoints,  # noqa: F811
) -> None:
    """A worker that receives the hint of a message for an instance someone else holds flags
    the instance and drops the hint; the holder's release sees the flag and re-hints, so the
    message is handled right after the release, not when the (60 s) lease would have ended."""
    options = aws_endpoints.options()
    async with DynamoDBBackend(**options) as holder, \
            DynamoDBBackend(**options) as other:  # type: ignore[arg-type]
        await holder.create_instance(record("busy", RuntimeStatus.RUNNING),
                                     message("busy", "start"))
        (item,) = await lock_until(holder, 1)
        await other.send_messages([message("busy", "late")])
        flagged = False
        async with raw_clients(aws_endpoints) as (ddb, _):
            for _ in range(50):  # the hint arrives, finds the lock, flags the row
                assert await other.lock_orchestrations("o", max_items=5, lease_seconds=60) == []
                row = (await ddb.get_item(TableName=other.table, ConsistentRead=True, Key={
                    "pk": {"S": "I#busy"}, "sk": {"S": "R"}}))["Item"]
                if "wk" in row:
                    flagged = True
                    break
                await asyncio.sleep(0.05)
        assert flagged, "the hint for a held instance must flag its row"
        done = OrchestrationCompletion("busy", item.lock_token, item.instance,
                                       consumed=["start"])
        assert await holder.complete_orchestrations([done]) == [True]
        began = time.monotonic()
        (woken,) = await lock_until(other, 1, seconds=10)
        assert [m.id for m in woken.messages] == ["late"]
        assert time.monotonic() - began < 5, "the message must not wait for the lease to end"
