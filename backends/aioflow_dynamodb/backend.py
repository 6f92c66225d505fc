"""`DynamoDBBackend`: the aioflow backend protocol on DynamoDB (state) and SQS (wake-ups).

Design
------

DynamoDB is the only source of truth. Every instance is one partition of one table (layout in
`aioflow_dynamodb._codec`). SQS carries *hints* only: small messages naming an instance (or an
activity task) that may have work. A worker receives hints, then decides everything from
DynamoDB with conditional writes, so a lost, duplicated, late or early hint can delay work but
never corrupt it. These mechanisms make sure every step is atomic and no work is stranded:

* **Fenced commit.** An orchestration step commits with ONE TransactWriteItems whose row update
  is conditional on the lock token: the row, one history item, the consumed-message markers,
  the outbound messages and the activity tasks (conditional puts by id, so a re-sent id keeps
  the stored one). Its hints are written on the row in the same transaction and stay there
  until the next commit overwrites them.
* **Roll-forward for big steps.** A step that would exceed the transaction limits (100 actions,
  4 MB), creates sub-orchestrations or resets its history commits a small fenced transaction
  that records its *effects* on the row instead (offloaded to blob items when large). They are
  applied right after the commit, each idempotently, then cleared. Whoever finds a row with
  effects pending (the next locker, a create/purge, the sweeper) applies them first, so a step
  is never half-applied and no AWS limit is ever reached.
* **Outbox + sweeper.** Client writes (`create_instance`, `send_messages`) put an outbox item
  with their hints in their transaction and delete it once the hints are sent. Rows with hints
  or effects pending and outbox items are in the sparse ``sweep`` index; `sweep()` (run in the
  background by `wait_for_work` every `sweep_interval` seconds) re-sends / finishes any older
  than `sweep_grace` seconds, i.e. left behind by a process that died between its DynamoDB
  commit and its SQS send. `complete_activities` sends its hints before it deletes the task, so
  a crash in between re-runs the activity (whose repeated result is a no-op that hints again).
* **Lease hints.** A worker that locks an instance or a task keeps one hint invisible for the
  lease (or sends a delayed one); if the worker dies, the hint reappears when the lease expires
  and another worker takes over. A hint for an instance someone else holds flags its row
  (``wk``) and is deleted: the holder's releasing commit is conditional on the flag being
  absent, so a flagged holder learns of it, re-reads the inbox and re-hints. Unflagged releases
  (the common case) cost no extra read.

Timers of any length: a hint for a delayed message carries its due time; SQS delays it by up
to 15 minutes, and a receiver that gets it early hides it again until due (up to 11 hours per
hop). Payloads of any size: values above 64 KB are stored as blob parts of 350 KB.

Guarantees and limits
---------------------

* Idempotent sends, fencing, atomic completion and at-least-once activities as the protocol
  says. Lease expiry uses ``time.time()``: hosts need synchronized clocks (NTP).
* `query_instances` and `purge_instances(query=...)` read the ``by-created`` global secondary
  index, which is eventually consistent on AWS: an instance created a moment ago may be missing
  from a query for a moment (rows are then read with strong consistency).
* The ids of consumed messages are kept (a key-only item each) as idempotence requires, until
  the instance is purged or replaced or continues as new (a new execution forgets the ids its
  predecessors consumed, so eternal orchestrations stay bounded).
* Storage left behind until the instance is purged: the blob parts of a large payload field
  that a later step replaced, and of a large message once consumed.
* Replacing a terminal instance (create over it, or a sub-orchestration with its id) deletes
  its items and then writes the new row conditionally; two processes doing the same roll-forward
  at the very same moment could both clear the old items, the second possibly deleting messages
  the new instance received in between (a narrow race the sweeper's grace period makes unlikely).
* Lease calls on an activity task (`renew_activity_lease`, `abandon_activity`) must come from
  the process that locked it or committed it with an `ActivityLock` (as the worker does): the
  task's instance is found from the lock token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import botocore.exceptions  # type: ignore[import-untyped]

from aioflow.backend import (
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
from aioflow.errors import InstanceExistsError
from aioflow.status import RuntimeStatus

from . import _codec as c
from ._aws import (
    MAX_DELAY_SECONDS,
    MAX_VISIBILITY_SECONDS,
    Aws,
    backoff,
    cancellation_codes,
    error_code,
)

__all__ = ["DynamoDBBackend"]

logger = logging.getLogger("aioflow_dynamodb")

_LOCKED, _EMPTY, _BUSY, _ABSENT = "locked", "empty", "busy", "absent"
#: Transactions we build stay well below DynamoDB's 100 actions and 4 MB.
_TX_ACTIONS = 90
_TX_BYTES = 3 * 1024 * 1024
_SHARDS = 4
#: Seconds after which a locker applies a committed step's pending effects itself (their
#: committer normally has by then; applying twice is harmless but costs the writes twice).
_ROLL_FORWARD_AFTER = 2.0


@dataclasses.dataclass(slots=True)
class _Hint:
    instance_id: str
    task_id: str | None
    receipt: str


@dataclasses.dataclass(slots=True)
class _Send:
    """A hint to send: to the activity queue when `task_id` is set, else the orchestration one."""

    instance_id: str
    task_id: str | None = None
    due: float = 0.0


class DynamoDBBackend:
    """The aioflow backend protocol on DynamoDB + SQS (see the module docstring).

    Nothing is contacted until first use (or ``async with``); then the table
    ``{table_prefix}-aioflow`` and the queues ``{queue_prefix}-aioflow-orchestrations`` and
    ``{queue_prefix}-aioflow-activities`` are checked, and created unless ``create=False``.
    An unreachable endpoint, missing credentials or a missing table/queue raise
    `aioflow.errors.ConfigurationError` then, naming the endpoint and region.
    """

    def __init__(
        self, *, region: str, table_prefix: str, queue_prefix: str,
        endpoint_url: str | None = None, sqs_endpoint_url: str | None = None,
        create: bool = True, connect_timeout: float = 3.0, sweep_interval: float = 10.0,
        sweep_grace: float = 10.0,
    ) -> None:
        self.region = region
        self.table = f"{table_prefix}-aioflow"
        self.queue_names = {
            WorkKind.ORCHESTRATION: f"{queue_prefix}-aioflow-orchestrations",
            WorkKind.ACTIVITY: f"{queue_prefix}-aioflow-activities",
        }
        self.create = create
        self.sweep_interval = sweep_interval
        self.sweep_grace = sweep_grace
        self._aws = Aws(region=region, endpoint_url=endpoint_url,
                        sqs_endpoint_url=sqs_endpoint_url, connect_timeout=connect_timeout)
        self._urls: dict[WorkKind, str] = {}
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False
        self._buffer: dict[WorkKind, list[_Hint]] = {k: [] for k in WorkKind}
        self._events = {k: asyncio.Event() for k in WorkKind}
        self._due: list[tuple[float, str]] = []  # local delayed messages: (visible_at, instance)
        self._held: dict[str, tuple[str, int, int]] = {}  # token -> (instance, epoch, length)
        # token -> (ids handed out and not consumed yet, whether visible ones were left out)
        self._handed: dict[str, tuple[set[str], bool]] = {}
        self._kept: dict[str, str] = {}  # lock token -> receipt of the hint kept for its lease
        self._task_receipts: dict[str, str] = {}  # task id -> receipt of its kept hint
        self._task_tokens: dict[str, str] = {}  # ActivityLock token -> instance id
        self._applying: set[str] = set()  # ids of effects this process is applying
        self._order = 0
        self._last_sweep = time.monotonic()
        self._sweeper: asyncio.Task[int] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"DynamoDBBackend(table={self.table!r}, region={self.region!r})"

    @property
    def calls(self) -> dict[str, int]:
        """API calls made so far, by ``"dynamodb.Operation"`` / ``"sqs.Operation"``."""
        return dict(self._aws.calls)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _open(self) -> None:
        if self._opened:
            return
        async with self._open_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._opened:
                return
            await self._aws.open()
            try:
                await self._aws.ensure_table(self.table, create=self.create)
                for kind, name in self.queue_names.items():
                    self._urls[kind] = await self._aws.ensure_queue(name, create=self.create)
            except BaseException:
                await self._aws.close()
                raise
            self._opened = True

    async def close(self) -> None:
        """Give back unused hints, stop background work and close the clients. Idempotent."""
        async with self._open_lock:
            if self._closed:
                return
            self._closed = True
            for task in list(self._background) + ([self._sweeper] if self._sweeper else []):
                task.cancel()
            if self._opened:
                for kind, hints in self._buffer.items():
                    for hint in hints:
                        await self._quietly(self._set_visibility(kind, hint.receipt, 0))
                    hints.clear()
                await self._aws.close()

    async def _ddb(self, operation: str, **kwargs: Any) -> Any:
        if not self._opened:
            await self._open()
        return await self._aws.ddb(operation, TableName=self.table, **kwargs)

    async def _update_under_token(self, key: dict[str, Any], token: str, update: str,
                                  values: dict[str, Any] | None = None,
                                  **options: Any) -> dict[str, Any] | None:
        """`UpdateItem` on `key` only while its lock token is `token` (the fencing check of
        every release, renewal and abandon); None when the token is no longer current."""
        try:
            response: dict[str, Any] = await self._ddb(
                "UpdateItem", Key=key, UpdateExpression=update, ConditionExpression="lt = :t",
                ExpressionAttributeValues={":t": c.s(token), **(values or {})}, **options)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return None
        return response

    async def _sqs(self, operation: str, kind: WorkKind, **kwargs: Any) -> Any:
        if not self._opened:
            await self._open()
        return await self._aws.sqs(operation, QueueUrl=self._urls[kind], **kwargs)

    @staticmethod
    async def _quietly(call: Awaitable[Any]) -> None:
        try:
            await call
        except botocore.exceptions.ClientError as exc:
            logger.debug("ignored SQS/DynamoDB error: %s", exc)

    # -- instances -------------------------------------------------------------------------

    async def create_instance(self, record: InstanceRecord, start: Message) -> None:
        """Create `record` (and put `start` in its inbox) or raise `InstanceExistsError`.

        A terminal instance with the id is replaced (its history, inbox and tasks deleted
        first). The row, the start message and the outbox item with its hint are one
        transaction.
        """
        if start.instance_id != record.instance_id:
            raise ValueError(
                f"start message is addressed to {start.instance_id!r}, but the instance being "
                f"created is {record.instance_id!r}")
        sends = await self._put_instance(record, start, fail_if_live=True, outbox=True)
        await self._send_hints(sends)

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        row = await self._get_row(instance_id)
        return None if row is None else await self._decode_row(instance_id, row)

    async def get_history(self, instance_id: str) -> list[bytes]:
        """The stored history of the instance's current execution, oldest first."""
        row = await self._get_row(instance_id, projection="ep")
        if row is None:
            return []
        epoch = int(c.num(row, "ep"))
        events: list[bytes] = []
        for item in await self._query_all(
                KeyConditionExpression="pk = :p AND begins_with(sk, :h)",
                ExpressionAttributeValues={":p": c.s(c.instance_pk(instance_id)),
                                           ":h": c.s(c.history_prefix(epoch))}):
            events.extend(c.unframe(await self._value(instance_id, item, "e")))
        return events

    async def query_instances(
        self, query: InstanceQuery, *, page_size: int = 100, continuation: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page of matching instances ordered by (created_time, instance_id).

        Reads the ``by-created`` index (eventually consistent on AWS) and then each row with
        strong consistency. The continuation token encodes the last row's sort key.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size!r}")
        after = None if continuation is None else decode_continuation(continuation)
        rows: list[InstanceRecord] = []
        async for record in self._matching(query, after):
            rows.append(record)
            if len(rows) > page_size:
                break
        page = rows[:page_size]
        more = len(rows) > page_size
        if not more:
            return page, None
        return page, encode_continuation(page[-1].created_time, page[-1].instance_id)

    async def _matching(self, query: InstanceQuery, after: tuple[float, str] | None) -> Any:
        """Matching records in (created_time, instance_id) order, strictly after `after`."""
        if after is not None:
            condition, values = "ix = :i AND ck > :a", {":a": c.s(c.created_key(*after))}
        elif query.created_from is not None:
            condition = "ix = :i AND ck >= :a"
            values = {":a": c.s(f"{query.created_from:020.6f}#")}
        else:
            condition, values = "ix = :i", {}
        values[":i"] = c.s("I")
        upper = None if query.created_to is None else f"{query.created_to:020.6f}#"
        start_key = None
        while True:
            kwargs: dict[str, Any] = {
                "IndexName": "by-created", "KeyConditionExpression": condition,
                "ExpressionAttributeValues": values, "Limit": 100}
            if start_key:
                kwargs["ExclusiveStartKey"] = start_key
            response = await self._ddb("Query", **kwargs)
            keys = response.get("Items", [])
            if upper is not None:
                beyond = [k for k in keys if k["ck"]["S"] >= upper]
                keys = [k for k in keys if k["ck"]["S"] < upper]
            else:
                beyond = []
            rows = await self._batch_get([{"pk": k["pk"], "sk": k["sk"]} for k in keys])
            for key in keys:
                row = rows.get(key["pk"]["S"])
                if row is None or "nm" not in row:
                    continue
                instance_id = key["pk"]["S"][2:]
                record = await self._decode_row(instance_id, row)
                if _matches(record, query) and (
                        after is None or (record.created_time, instance_id) > after):
                    yield record
            start_key = response.get("LastEvaluatedKey")
            if beyond or not start_key:
                return

    async def purge_instances(
        self, *, instance_id: str | None = None, query: InstanceQuery | None = None
    ) -> PurgeResult:
        """Delete terminal instances (row, history, inbox, tasks, blobs); never live ones.

        With `instance_id`, that instance; with `query`, every match; with both, that instance
        if it also matches.
        """
        if instance_id is None and query is None:
            raise TypeError("purge_instances needs instance_id or query (or both)")
        if instance_id is not None:
            candidates = [instance_id]
        else:
            assert query is not None
            candidates = [r.instance_id async for r in self._matching(query, None)]
        count = 0
        for candidate in candidates:
            row = await self._get_row(candidate)
            if row is None:
                continue
            if "fxid" in row:
                await self._roll_forward(candidate, row)
                row = await self._get_row(candidate)
                if row is None:
                    continue
            record = await self._decode_row(candidate, row)
            if not record.runtime_status.is_terminal:
                continue
            if query is not None and not _matches(record, query):
                continue
            await self._clear_partition(candidate, keep_row=True)
            try:
                await self._ddb("DeleteItem", Key=c.row_key(candidate),
                                ConditionExpression="gen = :g",
                                ExpressionAttributeValues={":g": row["gen"]})
                count += 1
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
        return PurgeResult(deleted_instance_count=count)

    # -- messages --------------------------------------------------------------------------

    async def send_messages(self, messages: Sequence[Message]) -> None:
        """Deliver messages; ids already delivered (pending or consumed) are ignored.

        Each chunk of messages and an outbox item with their hints are one transaction, so a
        crash before the hints are sent is repaired by the sweeper.
        """
        unique: dict[tuple[str, str], Message] = {}
        for message in messages:
            c.check_bytes(message.data, "message data")
            unique.setdefault((message.instance_id, message.id), message)
        if not unique:
            return
        items = [await self._message_item(m) for m in unique.values()]
        pending = list(zip(items, unique.values(), strict=True))
        while pending:
            chunk = _take_chunk(pending, lambda entry: _item_size(entry[0]))
            await self._transact_with_outbox(
                [{"Put": {"TableName": self.table, "Item": item,
                          "ConditionExpression": "attribute_not_exists(pk)"}}
                 for item, _ in chunk], _hints_for_messages(m for _, m in chunk),
                drop_duplicates=True)
        self._note_local_due(unique.values())

    # -- orchestration work items ----------------------------------------------------------

    async def lock_orchestrations(
        self, worker_id: str, *, max_items: int, lease_seconds: float, max_messages: int = 1000
    ) -> list[OrchestrationWorkItem]:
        """Lock up to `max_items` instances named by hints (and by this process's due timers)
        that have visible messages and no live lease. Never waits for hints."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if max_items < 1:
            return []
        await self._open()
        candidates: dict[str, list[_Hint]] = {}
        now = time.time()
        while self._due and self._due[0][0] <= now:
            candidates.setdefault(heapq.heappop(self._due)[1], [])
        for hint in self._take_buffer(WorkKind.ORCHESTRATION):
            candidates.setdefault(hint.instance_id, []).append(hint)
        for _ in range(3):
            if len(candidates) >= max_items:
                break
            hints = await self._receive(WorkKind.ORCHESTRATION, 0)
            for hint in hints:
                candidates.setdefault(hint.instance_id, []).append(hint)
            if len(hints) < 10:
                break
        chosen = list(candidates.items())
        if len(chosen) > max_items:  # keep the rest for the next call
            for _, hints in chosen[max_items:]:
                self._buffer[WorkKind.ORCHESTRATION].extend(hints)
            chosen = chosen[:max_items]
        outcomes = await asyncio.gather(*(
            self._lock_candidate(iid, hints, lease_seconds, max_messages)
            for iid, hints in chosen))
        return [item for item in outcomes if item is not None]

    async def _lock_candidate(self, instance_id: str, hints: list[_Hint], lease: float,
                              max_messages: int) -> OrchestrationWorkItem | None:
        status, item, due, holder = await self._try_lock(instance_id, lease, max_messages)
        kind = WorkKind.ORCHESTRATION
        if status == _BUSY and holder is not None:
            # Another worker holds it: flag the row, and that worker re-reads the inbox when it
            # releases, so the hint can go. If it died, the hint it keeps for its lease (or
            # its delayed safety hint) brings the instance back.
            if not hints or await self._want(instance_id, holder):
                status, due = _ABSENT, None
            else:  # released or taken over meanwhile: look again
                status, item, due, holder = await self._try_lock(instance_id, lease,
                                                                 max_messages)
        extra = hints
        if status == _LOCKED:
            assert item is not None
            if hints:
                await self._keep_hint(instance_id, item.lock_token, hints[0].receipt, lease)
                extra = hints[1:]
            else:
                await self._send_hints([_Send(instance_id, due=time.time() + lease)])
        elif status in (_EMPTY, _BUSY) and due is not None:
            # Not lockable until `due`: messages not visible yet (clock skew, an abandon's
            # retry_after) or another worker's lease. Keep one hint hidden until then.
            if hints:
                await self._hide_until(kind, hints[0], due)
                extra = hints[1:]
            else:
                heapq.heappush(self._due, (due, instance_id))
        for hint in extra:
            await self._quietly(self._sqs("DeleteMessage", kind, ReceiptHandle=hint.receipt))
        return item

    async def _try_lock(
        self, instance_id: str, lease: float, max_messages: int, *, roll: bool = True
    ) -> tuple[str, OrchestrationWorkItem | None, float | None, str | None]:
        """Try to lock one instance. Returns (status, work item, earliest invisible message or
        the end of the lease that blocks it, the blocking lock token)."""
        now = time.time()
        token = uuid.uuid4().hex
        try:
            response = await self._ddb(
                "UpdateItem", Key=c.row_key(instance_id),
                UpdateExpression="SET lt = :t, lu = :u REMOVE wk",
                ConditionExpression="attribute_exists(nm) AND attribute_not_exists(fxid) AND "
                                    "(attribute_not_exists(lu) OR lu <= :now)",
                ExpressionAttributeValues={":t": c.s(token), ":u": c.n(now + lease),
                                           ":now": c.n(now)},
                ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            old = exc.response.get("Item")
            if not old or "nm" not in old:
                return _ABSENT, None, None, None
            if "fxid" in old:
                # Effects of a committed step are being applied. Its committer does that right
                # after the commit: help only when they look abandoned, else look again soon.
                if (roll and c.text(old, "fxid") not in self._applying
                        and c.num(old, "xa") < now - _ROLL_FORWARD_AFTER):
                    await self._roll_forward(instance_id, old)
                    return await self._try_lock(instance_id, lease, max_messages, roll=False)
                return _EMPTY, None, now + _ROLL_FORWARD_AFTER, None
            return _BUSY, None, c.num(old, "lu"), c.text(old, "lt")
        row = response["Attributes"]
        messages, due, truncated = await self._pending(instance_id, time.time(), max_messages)
        if not messages:
            if await self._unlock(instance_id, token):
                await self._send_hints([_Send(instance_id)])  # flagged while we looked
            return _EMPTY, None, due, None
        epoch, length = int(c.num(row, "ep")), int(c.num(row, "hl"))
        self._held[token] = (instance_id, epoch, length)
        self._handed[token] = ({m.id for m in messages}, truncated)
        record = await self._decode_row(instance_id, row)
        return _LOCKED, OrchestrationWorkItem(record, messages, length, token), due, None

    async def _unlock(self, instance_id: str, token: str) -> bool:
        """Release a lock that found nothing to do; True if a hint flagged the row meanwhile."""
        response = await self._update_under_token(
            c.row_key(instance_id), token, "REMOVE lt, lu, wk", ReturnValues="ALL_OLD")
        return response is not None and "wk" in response.get("Attributes", {})

    async def _want(self, instance_id: str, holder: str) -> bool:
        """Flag a row locked under `holder` as wanted (a hint came while it was held); False
        if `holder` no longer holds it."""
        try:
            await self._ddb("UpdateItem", Key=c.row_key(instance_id),
                            UpdateExpression="SET wk = :w", ConditionExpression="lt = :h",
                            ExpressionAttributeValues={":w": c.n(1), ":h": c.s(holder)})
            return True
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return False

    async def _pending(self, instance_id: str, now: float,
                       limit: int) -> tuple[list[Message], float | None, bool]:
        """Visible inbox messages in send order (at most `limit`), the earliest visible_at of
        the invisible ones (None if there are none), and whether visible ones were left out."""
        messages: list[Message] = []
        earliest: float | None = None
        truncated = False
        start_key = None
        while True:
            kwargs: dict[str, Any] = {
                "IndexName": "pending", "ConsistentRead": True,
                "KeyConditionExpression": "pk = :p",
                "ExpressionAttributeValues": {":p": c.s(c.instance_pk(instance_id))}}
            if start_key:
                kwargs["ExclusiveStartKey"] = start_key
            response = await self._ddb("Query", **kwargs)
            for item in response.get("Items", []):
                visible_at = c.num(item, "v")
                if visible_at > now:
                    earliest = visible_at if earliest is None else min(earliest, visible_at)
                elif len(messages) < limit:
                    data = await self._value(instance_id, item, "d")
                    messages.append(Message(item["sk"]["S"][2:], instance_id, data, visible_at))
                else:
                    truncated = True
            start_key = response.get("LastEvaluatedKey")
            if not start_key:
                return messages, earliest, truncated

    async def complete_orchestrations(
        self, completions: Sequence[OrchestrationCompletion]
    ) -> list[bool]:
        """Commit each completion (a fenced transaction, then its effects); one flag each.

        Completions under distinct tokens run concurrently; ones sharing a token run in order.
        """
        for completion in completions:
            _check_completion(completion)
        tokens = [completion.lock_token for completion in completions]
        if len(set(tokens)) == len(tokens):
            return list(await asyncio.gather(*(self._commit(x) for x in completions)))
        return [await self._commit(x) for x in completions]

    async def _commit(self, completion: OrchestrationCompletion) -> bool:
        iid, token = completion.instance_id, completion.lock_token
        held = self._held.get(token)
        if held is None or held[0] != iid:
            row = await self._get_row(iid, projection="lt, ep, hl")
            if row is None or c.text(row, "lt") != token:
                return False
            held = (iid, int(c.num(row, "ep")), int(c.num(row, "hl")))
        _, epoch, length = held
        new_epoch = epoch + 1 if completion.reset_history else epoch
        first = 0 if completion.reset_history else length
        new_length = first + len(completion.new_history)
        now = time.time()
        staged: list[str] = []  # blob ids written for this commit
        for message in completion.messages:
            c.check_bytes(message.data, "message data")
        for task in completion.activities:
            c.check_bytes(task.data, "activity task data")
        lock = completion.activity_lock
        if lock is not None:
            for task in completion.activities:
                self._task_tokens[lock.lock_token] = task.instance_id

        sets, values, removes = await self._record_update(iid, completion.instance, staged)
        sets += ["ep = :ep", "hl = :hl"]
        values[":ep"], values[":hl"] = c.n(new_epoch), c.n(new_length)
        if completion.release:
            removes += ["lt", "lu"]
        values[":t"] = c.s(token)
        actions: list[dict[str, Any]] = []
        if completion.new_history:
            framed = c.frame(c.check_bytes(e, "history event") for e in completion.new_history)
            history: c.Item = {"pk": c.s(c.instance_pk(iid)),
                               "sk": c.s(c.history_sk(new_epoch, first))}
            if len(framed) <= 300 * 1024:
                history["e"] = c.b(framed)
            else:
                ref = await self._put_blob(iid, framed)
                staged.append(ref)
                history["er"] = c.s(ref)
            actions.append({"Put": {"TableName": self.table, "Item": history}})

        # A small step puts its effects in the commit transaction itself and leaves its hints
        # on the row (cleared by its next commit, or re-sent by the sweeper if this process
        # dies before sending them). A big one (or one creating instances / dropping history)
        # records its effects on the row and rolls them forward after the commit.
        sends = (_hints_for_messages(completion.messages)
                 + [_Send(t.instance_id, t.id, due=(now + lock.lease_seconds) if lock else 0.0)
                    for t in completion.activities])
        inline = await self._inline_effects(completion, now, staged)
        fxid = uuid.uuid4().hex
        effects: dict[str, Any] | None = None
        shard = c.s(str(hash(iid) % _SHARDS))
        if inline is not None:
            actions += inline
            if sends:
                sets += ["hx = :hx", "hxid = :fxid", "xs = :xs", "xa = :xa"]
                values[":hx"] = c.b(c.dumps([[x.instance_id, x.task_id, x.due] for x in sends]))
                values[":fxid"], values[":xs"], values[":xa"] = c.s(fxid), shard, c.n(now)
            else:
                removes += ["hx", "hxid", "xs", "xa"]
        else:
            effects = {
                "c": list(completion.consumed),
                "m": [c.message_to_json(m) for m in completion.messages],
                "a": [c.task_to_json(t) for t in completion.activities],
                "al": None if lock is None else [lock.lock_token, lock.lease_seconds],
                "at": now,
                "n": [[c.record_to_json(n.record), c.message_to_json(n.start)]
                      for n in completion.new_instances],
                "de": epoch if completion.reset_history else None,
            }
            encoded = c.dumps(effects)
            sets += ["fxid = :fxid", "xs = :xs", "xa = :xa"]
            values[":fxid"], values[":xs"], values[":xa"] = c.s(fxid), shard, c.n(now)
            removes += ["hx", "hxid"]
            if len(encoded) <= c.INLINE_LIMIT:
                sets.append("fx = :fx")
                values[":fx"] = c.b(encoded)
                removes.append("fxr")
            else:
                ref = await self._put_blob(iid, encoded)
                staged.append(ref)
                sets.append("fxr = :fxr")
                values[":fxr"] = c.s(ref)
                removes.append("fx")
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        # A release also requires that no hint flagged the row while it was held (see
        # `_lock_candidate`); if one did, commit anyway and re-read the inbox after.
        row_update: dict[str, Any] = {
            "TableName": self.table, "Key": c.row_key(iid), "UpdateExpression": update,
            "ConditionExpression": "lt = :t AND attribute_not_exists(wk)"
                                   if completion.release else "lt = :t",
            "ExpressionAttributeValues": values}
        actions.insert(0, {"Update": row_update})
        wanted = False
        for _ in range(len(actions) + 1):
            codes = await self._transact(actions)
            if codes is None:
                break
            if codes and codes[0] == "ConditionalCheckFailed":
                if completion.release and not wanted:
                    row = await self._get_row(iid, projection="lt")
                    if row is not None and c.text(row, "lt") == token:  # flagged, still ours
                        wanted = True
                        row_update["ConditionExpression"] = "lt = :t"
                        row_update["UpdateExpression"] = update + (
                            ", wk" if removes else " REMOVE wk")
                        continue
                self._held.pop(token, None)  # the lease was lost
                self._handed.pop(token, None)
                self._kept.pop(token, None)
                for ref in staged:
                    await self._delete_blob(iid, ref)
                return False
            failed = {i for i, code in enumerate(codes) if code == "ConditionalCheckFailed"}
            if not failed:
                raise RuntimeError(f"transaction for {iid!r} cancelled: {codes}")
            # A message or task id that was already delivered/queued: keep the existing one.
            actions = [a for i, a in enumerate(actions) if i not in failed]
        if codes is not None:
            raise RuntimeError(f"transaction for {iid!r} kept being cancelled: {codes}")
        # Messages the step knows it left in the inbox (beyond max_messages, or handed out and
        # not consumed) need a hint after the release, as do ones flagged meanwhile.
        handed, truncated = self._handed.get(token, (set(), True))
        left = handed - set(completion.consumed)
        wanted = wanted or truncated or bool(left)
        if completion.release:
            self._held.pop(token, None)
            self._handed.pop(token, None)
        else:
            self._held[token] = (iid, new_epoch, new_length)
            self._handed[token] = (left, truncated)
        if effects is not None:
            await self._apply(iid, effects, fxid, encoded_ref=None)
            if completion.release:
                await self._after_release(iid, token, wanted)
        else:
            self._note_local_due(completion.messages)
            if completion.release:
                await asyncio.gather(self._send_hints(sends),
                                     self._after_release(iid, token, wanted))
            else:
                await self._send_hints(sends)
            if completion.activities and lock is None:
                self._events[WorkKind.ACTIVITY].set()
        return True

    async def _inline_effects(self, completion: OrchestrationCompletion, now: float,
                              staged: list[str]) -> list[dict[str, Any]] | None:
        """The step's effects as transaction actions, or None if they must be rolled forward
        (new instances, a history reset, or too many/too big for one transaction)."""
        if completion.new_instances or completion.reset_history:
            return None
        count = len(set(completion.consumed)) + len(completion.messages) + len(
            completion.activities)
        if count > _TX_ACTIONS - 2:
            return None
        size = sum(len(m.data) for m in completion.messages) + sum(
            len(t.data) for t in completion.activities) + sum(
            len(v) for v in (completion.instance.input, completion.instance.output,
                             completion.instance.custom_status, completion.instance.failure)
            if v is not None) + sum(len(e) for e in completion.new_history)
        if size > _TX_BYTES:
            return None
        iid = completion.instance_id
        pk = c.s(c.instance_pk(iid))
        actions: list[dict[str, Any]] = [
            {"Put": {"TableName": self.table, "Item": {"pk": pk, "sk": c.s("M#" + mid)}}}
            for mid in dict.fromkeys(completion.consumed)]
        seen = {(iid, mid) for mid in completion.consumed}
        for message in completion.messages:
            if (message.instance_id, message.id) in seen:
                continue
            seen.add((message.instance_id, message.id))
            item = await self._message_item(message)
            if "dr" in item:
                staged.append(item["dr"]["S"])
            actions.append({"Put": {"TableName": self.table, "Item": item,
                                    "ConditionExpression": "attribute_not_exists(pk)"}})
        lock = completion.activity_lock
        for task in dict((t.id, t) for t in completion.activities).values():
            item = await self._task_item(task, None if lock is None else [
                lock.lock_token, lock.lease_seconds], now)
            actions.append({"Put": {"TableName": self.table, "Item": item,
                                    "ConditionExpression": "attribute_not_exists(pk)"}})
        return actions

    async def _record_update(self, instance_id: str, record: InstanceRecord,
                             staged: list[str]) -> tuple[list[str], dict[str, Any], list[str]]:
        """SET clauses, values and REMOVE names that store `record` on its row."""
        sets, values, removes = [], {}, []
        for i, (name, value) in enumerate(c.record_attributes(record).items()):
            sets.append(f"{name} = :r{i}")
            values[f":r{i}"] = value
        for field in c.PAYLOAD_FIELDS:
            value = getattr(record, field)
            inline, ref = c.payload_attr(field), c.blob_ref_attr(field)
            if value is None:
                removes += [inline, ref]
            elif len(c.check_bytes(value, field)) <= c.INLINE_LIMIT:
                sets.append(f"{inline} = :{inline}")
                values[f":{inline}"] = c.b(value)
                removes.append(ref)
            else:
                blob = await self._put_blob(instance_id, bytes(value))
                staged.append(blob)
                sets.append(f"{ref} = :{ref}")
                values[f":{ref}"] = c.s(blob)
                removes.append(inline)
        return sets, values, removes

    async def _after_release(self, instance_id: str, token: str, wanted: bool) -> None:
        """After a release: if hints came while the instance was held (`wanted`), re-hint if
        messages are visible now; otherwise drop the hint kept for the lease."""
        receipt = self._kept.pop(token, None)
        kind = WorkKind.ORCHESTRATION
        messages = (await self._pending(instance_id, time.time(), 1))[0] if wanted else []
        if messages:
            if receipt is None or not await self._set_visibility(kind, receipt, 0):
                await self._send_hints([_Send(instance_id)])
            self._events[kind].set()
        elif receipt is not None:
            await self._quietly(self._sqs("DeleteMessage", kind, ReceiptHandle=receipt))

    async def abandon_orchestration(
        self, instance_id: str, lock_token: str, *, retry_after: float = 0.0
    ) -> None:
        """Release the lock without committing; lockable again after `retry_after` seconds.
        A stale token is ignored."""
        self._held.pop(lock_token, None)
        self._handed.pop(lock_token, None)
        until = time.time() + retry_after
        if retry_after > 0:
            released = await self._update_under_token(
                c.row_key(instance_id), lock_token, "REMOVE lt, wk SET lu = :u",
                {":u": c.n(until)})
        else:
            released = await self._update_under_token(
                c.row_key(instance_id), lock_token, "REMOVE lt, lu, wk")
        if released is None:
            return
        receipt = self._kept.pop(lock_token, None)
        kind = WorkKind.ORCHESTRATION
        if receipt is None or not await self._set_visibility(kind, receipt, retry_after):
            await self._send_hints([_Send(instance_id, due=until if retry_after > 0 else 0)])
        if retry_after > 0:
            heapq.heappush(self._due, (until, instance_id))
        else:
            self._events[kind].set()

    async def renew_orchestration_lease(
        self, instance_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to now + `lease_seconds`; False if the token is not current."""
        until = time.time() + lease_seconds
        if await self._update_under_token(c.row_key(instance_id), lock_token, "SET lu = :u",
                                          {":u": c.n(until)}) is None:
            return False
        receipt = self._kept.get(lock_token)
        if receipt is None or not await self._set_visibility(
                WorkKind.ORCHESTRATION, receipt, lease_seconds):
            await self._send_hints([_Send(instance_id, due=until)])
        return True

    # -- activity work items ---------------------------------------------------------------

    async def lock_activities(
        self, worker_id: str, *, max_items: int, lease_seconds: float
    ) -> list[ActivityWorkItem]:
        """Lock up to `max_items` tasks named by hints that are free or whose lease expired."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if max_items < 1:
            return []
        await self._open()
        candidates: dict[str, list[_Hint]] = {}
        for hint in self._take_buffer(WorkKind.ACTIVITY):
            candidates.setdefault(hint.task_id or "", []).append(hint)
        for _ in range(3):
            if len(candidates) >= max_items:
                break
            hints = await self._receive(WorkKind.ACTIVITY, 0)
            for hint in hints:
                candidates.setdefault(hint.task_id or "", []).append(hint)
            if len(hints) < 10:
                break
        chosen = list(candidates.values())
        if len(chosen) > max_items:
            for hints in chosen[max_items:]:
                self._buffer[WorkKind.ACTIVITY].extend(hints)
            chosen = chosen[:max_items]
        outcomes = await asyncio.gather(*(self._lock_task(hints, lease_seconds)
                                          for hints in chosen))
        return [item for item in outcomes if item is not None]

    async def _lock_task(self, hints: list[_Hint], lease: float) -> ActivityWorkItem | None:
        kind = WorkKind.ACTIVITY
        instance_id, task_id = hints[0].instance_id, hints[0].task_id or ""
        now = time.time()
        token = f"{uuid.uuid4().hex}.{instance_id}"
        extra = hints[1:]
        item = None
        try:
            response = await self._ddb(
                "UpdateItem", Key=c.task_key(instance_id, task_id),
                UpdateExpression="SET lt = :t, lu = :u, dc = if_not_exists(dc, :z) + :one",
                ConditionExpression="attribute_exists(pk) AND "
                                    "(attribute_not_exists(lu) OR lu <= :now)",
                ExpressionAttributeValues={":t": c.s(token), ":u": c.n(now + lease),
                                           ":now": c.n(now), ":z": c.n(0), ":one": c.n(1)},
                ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            old = exc.response.get("Item")
            if old:  # locked: this hint is the safety net for that lease, keep it hidden
                await self._hide_until(kind, hints[0], c.num(old, "lu"))
            else:
                extra = hints
        else:
            task_item = response["Attributes"]
            data = await self._value(instance_id, task_item, "d")
            await self._keep_task_hint(task_id, hints[0].receipt, lease)
            item = ActivityWorkItem(ActivityTask(task_id, instance_id, data), token,
                                    int(c.num(task_item, "dc", 1)))
        for hint in extra:
            await self._quietly(self._sqs("DeleteMessage", kind, ReceiptHandle=hint.receipt))
        return item

    async def complete_activities(
        self, results: Sequence[ActivityResult], *, lock: OrchestrationLock | None = None
    ) -> list[OrchestrationWorkItem]:
        """Deliver each result message (ignored if its id was delivered), hint its instance,
        then delete the task. With `lock`, lock the instances the results woke (up to
        `lock.max_items`) and return them.

        The task is deleted only after the hint is sent: a crash in between leaves the task,
        whose lease expiry re-runs it; the repeated result is a no-op that hints again.
        """
        if not results:
            return []
        if lock is not None and (lock.lease_seconds <= 0 or lock.max_messages < 1):
            raise ValueError(f"invalid {lock!r}: lease_seconds must be positive and "
                             f"max_messages at least 1")
        for result in results:
            c.check_bytes(result.message.data, "result message data")
        delivered = await asyncio.gather(*(self._deliver(r.message) for r in results))
        targets = list(dict.fromkeys(r.message.instance_id for r in results))
        woken = [r.message.instance_id for r, ok in zip(results, delivered, strict=True) if ok]
        items: list[OrchestrationWorkItem] = []
        if lock is not None:
            chosen = list(dict.fromkeys(woken))[:lock.max_items]
            outcomes = await asyncio.gather(*(
                self._try_lock(iid, lock.lease_seconds, lock.max_messages) for iid in chosen))
            items = [item for _, item, _, _ in outcomes if item is not None]
        mine = {item.instance.instance_id for item in items}
        assert lock is not None or not mine
        sends = [_Send(iid, due=time.time() + lock.lease_seconds) if iid in mine and lock
                 else _Send(iid) for iid in targets]
        await self._send_hints(sends)
        self._note_local_due(r.message for r in results)
        await self._batch_write([{"DeleteRequest": {"Key": c.task_key(
            r.message.instance_id, r.task_id)}} for r in results])
        for result in results:
            receipt = self._task_receipts.pop(result.task_id, None)
            if receipt is not None:
                await self._quietly(self._sqs("DeleteMessage", WorkKind.ACTIVITY,
                                              ReceiptHandle=receipt))
        return items

    async def abandon_activity(self, task_id: str, lock_token: str) -> None:
        """Make a locked task available again now. A stale token is ignored."""
        instance_id = self._task_instance(lock_token)
        if instance_id is None:
            return
        if await self._update_under_token(c.task_key(instance_id, task_id), lock_token,
                                          "REMOVE lt, lu") is None:
            return
        receipt = self._task_receipts.pop(task_id, None)
        if receipt is None or not await self._set_visibility(WorkKind.ACTIVITY, receipt, 0):
            await self._send_hints([_Send(instance_id, task_id)])
        self._events[WorkKind.ACTIVITY].set()

    async def renew_activity_lease(
        self, task_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to now + `lease_seconds`; False if the token is not current."""
        instance_id = self._task_instance(lock_token)
        if instance_id is None:
            return False
        until = time.time() + lease_seconds
        if await self._update_under_token(c.task_key(instance_id, task_id), lock_token,
                                          "SET lu = :u", {":u": c.n(until)}) is None:
            return False
        receipt = self._task_receipts.get(task_id)
        if receipt is None or not await self._set_visibility(
                WorkKind.ACTIVITY, receipt, lease_seconds):
            await self._send_hints([_Send(instance_id, task_id, due=until)])
        return True

    def _task_instance(self, token: str) -> str | None:
        head, dot, instance_id = token.partition(".")
        if dot and len(head) == 32:
            return instance_id
        return self._task_tokens.get(token)

    # -- wake-ups --------------------------------------------------------------------------

    async def wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        """Return when work of `kind` may be available, or after about `timeout` seconds.

        Returns at once if hints are buffered or this process wrote such work since the last
        call. Waits of a second or more are SQS long polls (at most 20 s each), which return
        as soon as a hint arrives from any process; shorter waits wait for this process's own
        writes and due timers only. Also starts the background sweeper every
        `sweep_interval` seconds.
        """
        kind = WorkKind(kind)
        event = self._events[kind]
        self._maybe_sweep()
        if self._buffer[kind] or event.is_set():
            event.clear()
            await asyncio.sleep(0)
            return
        wait = max(0.0, timeout)
        if kind is WorkKind.ORCHESTRATION and self._due:
            wait = min(wait, self._due[0][0] - time.time() + 0.002)
        if wait >= 1.0:
            hints = await self._receive(kind, min(20, int(wait)))
            self._buffer[kind].extend(hints)
        elif wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await event.wait()
        event.clear()

    def _maybe_sweep(self) -> None:
        if self._closed or (self._sweeper is not None and not self._sweeper.done()):
            return
        if time.monotonic() - self._last_sweep < self.sweep_interval:
            return
        self._last_sweep = time.monotonic()
        self._sweeper = asyncio.create_task(self._sweep_logged())

    async def _sweep_logged(self) -> int:
        try:
            return await self.sweep()
        except Exception:
            logger.exception("sweeping for lost wake-ups failed; will retry")
            return 0

    async def sweep(self, *, grace: float | None = None) -> int:
        """Finish work left behind by crashed processes: apply the pending effects of rows and
        send the hints of outbox items older than `grace` seconds (default `sweep_grace`).
        Returns how many it finished. Safe to run anywhere, any number of times."""
        cutoff = time.time() - (self.sweep_grace if grace is None else grace)
        done = 0
        for shard in range(_SHARDS):
            start_key = None
            while True:
                kwargs: dict[str, Any] = {
                    "IndexName": "sweep", "KeyConditionExpression": "xs = :s AND xa <= :a",
                    "ExpressionAttributeValues": {":s": c.s(str(shard)), ":a": c.n(cutoff)}}
                if start_key:
                    kwargs["ExclusiveStartKey"] = start_key
                response = await self._ddb("Query", **kwargs)
                for key in response.get("Items", []):
                    done += await self._sweep_one(key["pk"]["S"])
                start_key = response.get("LastEvaluatedKey")
                if not start_key:
                    break
        return done

    async def _sweep_one(self, pk: str) -> int:
        if pk.startswith("O#"):
            response = await self._ddb("GetItem", Key={"pk": c.s(pk), "sk": c.s("O")},
                                       ConsistentRead=True)
            item = response.get("Item")
            if not item:
                return 0
            await self._send_hints([_Send(i, t, d) for i, t, d in c.loads(item["h"]["B"])])
            await self._ddb("DeleteItem", Key={"pk": c.s(pk), "sk": c.s("O")})
            return 1
        instance_id = pk[2:]
        row = await self._get_row(instance_id)
        if row is None:
            return 0
        if "fxid" in row:
            await self._roll_forward(instance_id, row)
            return 1
        hxid = c.text(row, "hxid")
        if hxid is None:
            return 0
        await self._send_hints([_Send(i, t, d) for i, t, d in c.loads(row["hx"]["B"])])
        with contextlib.suppress(botocore.exceptions.ClientError):
            await self._ddb("UpdateItem", Key=c.row_key(instance_id),
                            UpdateExpression="REMOVE hx, hxid, xs, xa",
                            ConditionExpression="hxid = :h",
                            ExpressionAttributeValues={":h": c.s(hxid)})
        return 1

    # -- effects (roll-forward) ------------------------------------------------------------

    async def _roll_forward(self, instance_id: str, row: c.Item) -> None:
        """Apply the pending effects recorded on `row` (someone else's committed step)."""
        fxid = c.text(row, "fxid")
        if fxid is None:
            return
        if "fx" in row:
            encoded = bytes(row["fx"]["B"])
            ref = None
        else:
            ref = c.text(row, "fxr")
            if ref is None:
                return
            encoded = await self._get_blob(instance_id, ref)
        await self._apply(instance_id, c.loads(encoded), fxid, encoded_ref=ref)

    async def _apply(self, instance_id: str, effects: dict[str, Any], fxid: str, *,
                     encoded_ref: str | None) -> None:
        """Apply one step's effects (each part idempotent), send their hints, then clear them
        from the row (only if they are still the same effects)."""
        self._applying.add(fxid)
        try:
            await self._apply_effects(instance_id, effects, fxid, encoded_ref=encoded_ref)
        finally:
            self._applying.discard(fxid)

    async def _apply_effects(self, instance_id: str, effects: dict[str, Any], fxid: str, *,
                             encoded_ref: str | None) -> None:
        pk = c.s(c.instance_pk(instance_id))
        sends: list[_Send] = []
        # New instances first: creating one over a terminal instance clears its inbox, and
        # this step's messages to it must land in the new inbox.
        for record_json, start_json in effects["n"]:
            sends += await self._put_instance(c.record_from_json(record_json),
                                              c.message_from_json(start_json),
                                              fail_if_live=False, outbox=False)
        messages = [c.message_from_json(m) for m in effects["m"]]
        lock = effects["al"]
        at = float(effects["at"])
        tasks = [c.task_from_json(t) for t in effects["a"]]
        await asyncio.gather(
            self._batch_write([{"PutRequest": {"Item": {"pk": pk, "sk": c.s("M#" + mid)}}}
                               for mid in effects["c"]]),
            *(self._deliver(m) for m in messages),
            *(self._put_task(t, lock, at) for t in tasks),
            *([self._drop_old_history(instance_id)] if effects["de"] is not None else []))
        sends += _hints_for_messages(messages)
        sends += [_Send(t.instance_id, t.id, due=(at + float(lock[1])) if lock else 0.0)
                  for t in tasks]
        await self._send_hints(sends)
        self._note_local_due(messages)
        with contextlib.suppress(botocore.exceptions.ClientError):
            await self._ddb("UpdateItem", Key=c.row_key(instance_id),
                            UpdateExpression="REMOVE fx, fxr, fxid, xs, xa",
                            ConditionExpression="fxid = :f",
                            ExpressionAttributeValues={":f": c.s(fxid)})
        if encoded_ref is not None:
            await self._delete_blob(instance_id, encoded_ref)
        if tasks and lock is None:
            self._events[WorkKind.ACTIVITY].set()

    async def _drop_old_history(self, instance_id: str) -> None:
        row = await self._get_row(instance_id, projection="ep")
        if row is None:
            return
        old = await self._query_all(
            KeyConditionExpression="pk = :p AND sk BETWEEN :a AND :b",
            ExpressionAttributeValues={":p": c.s(c.instance_pk(instance_id)), ":a": c.s("H#"),
                                       ":b": c.s(c.history_prefix(int(c.num(row, "ep"))))},
            ProjectionExpression="pk, sk, er")
        # A new execution may forget the ids its predecessors consumed (the runtime drops late
        # copies of an old execution's messages): eternal orchestrations stay bounded.
        consumed = await self._query_all(
            KeyConditionExpression="pk = :p AND begins_with(sk, :m)",
            FilterExpression="attribute_not_exists(q)",
            ExpressionAttributeValues={":p": c.s(c.instance_pk(instance_id)), ":m": c.s("M#")},
            ProjectionExpression="pk, sk")
        for item in old:
            ref = c.text(item, "er")
            if ref is not None:
                await self._delete_blob(instance_id, ref)
        await self._batch_write([{"DeleteRequest": {"Key": {"pk": i["pk"], "sk": i["sk"]}}}
                                 for i in old + consumed])

    async def _put_instance(self, record: InstanceRecord, start: Message, *,
                            fail_if_live: bool, outbox: bool) -> list[_Send]:
        """Create `record` with `start` (replacing a terminal instance), or, for a live one,
        raise (`fail_if_live`) or only deliver `start`. Returns the hints to send (already
        in an outbox item when `outbox`)."""
        iid = record.instance_id
        c.check_bytes(start.data, "start message data")
        sends = [_Send(iid, due=start.visible_at)]
        for _attempt in range(5):
            row = await self._get_row(iid)
            if row is not None and "fxid" in row:
                await self._roll_forward(iid, row)
                row = await self._get_row(iid)
            if row is not None:
                status = row["st"]["S"]
                if not RuntimeStatus(status).is_terminal:
                    if fail_if_live:
                        raise InstanceExistsError(iid, status)
                    await self._deliver(start)
                    return sends
                await self._clear_partition(iid, keep_row=True)
                condition = "gen = :g"
                values: dict[str, Any] = {":g": row["gen"]}
                gen = int(c.num(row, "gen")) + 1
            else:
                condition, values, gen = "attribute_not_exists(pk)", {}, 1
            staged: list[str] = []
            item = await self._row_item(record, gen, staged)
            put_row: dict[str, Any] = {"TableName": self.table, "Item": item,
                                       "ConditionExpression": condition}
            if values:
                put_row["ExpressionAttributeValues"] = values
            start_item = await self._message_item(start)
            actions = [{"Put": put_row},
                       {"Put": {"TableName": self.table, "Item": start_item,
                                "ConditionExpression": "attribute_not_exists(pk)"}}]
            if outbox:
                actions.append({"Put": {"TableName": self.table,
                                        "Item": self._outbox_item(sends)}})
            codes = await self._transact(actions)
            if codes is None:
                if outbox:
                    await self._send_hints(sends, outbox_pk=actions[-1]["Put"]["Item"]["pk"])
                    return []
                return sends
            for ref in staged:
                await self._delete_blob(iid, ref)
            if len(codes) > 1 and codes[1] == "ConditionalCheckFailed" and codes[0] in (
                    "None", ""):
                # The start message id was already delivered: create the row without it.
                actions.pop(1)
                if await self._transact(actions) is None:
                    if outbox:
                        await self._send_hints(sends, outbox_pk=actions[-1]["Put"]["Item"]["pk"])
                        return []
                    return sends
            # The row changed under us (a concurrent create): look again.
        raise RuntimeError(f"could not create instance {iid!r}: it keeps changing concurrently")

    async def _row_item(self, record: InstanceRecord, gen: int, staged: list[str]) -> c.Item:
        iid = record.instance_id
        item: c.Item = {
            "pk": c.s(c.instance_pk(iid)), "sk": c.s("R"), **c.record_attributes(record),
            "gen": c.n(gen), "ep": c.n(0), "hl": c.n(0), "ix": c.s("I"),
            "ck": c.s(c.created_key(record.created_time, iid)),
        }
        for field in c.PAYLOAD_FIELDS:
            value = getattr(record, field)
            if value is None:
                continue
            if len(c.check_bytes(value, field)) <= c.INLINE_LIMIT:
                item[c.payload_attr(field)] = c.b(value)
            else:
                ref = await self._put_blob(iid, bytes(value))
                staged.append(ref)
                item[c.blob_ref_attr(field)] = c.s(ref)
        return item

    async def _message_item(self, message: Message) -> c.Item:
        item: c.Item = {**c.message_key(message.instance_id, message.id),
                        "q": c.s(self._next_order()), "v": c.n(message.visible_at)}
        data = c.check_bytes(message.data, "message data")
        if len(data) <= c.INLINE_LIMIT:
            item["d"] = c.b(data)
        else:
            item["dr"] = c.s(await self._put_blob(message.instance_id, data))
        return item

    async def _deliver(self, message: Message) -> bool:
        """Put one message in its inbox unless its id is there (pending or consumed)."""
        item = await self._message_item(message)
        try:
            await self._ddb("PutItem", Item=item,
                            ConditionExpression="attribute_not_exists(pk)")
            return True
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            if "dr" in item:
                await self._delete_blob(message.instance_id, item["dr"]["S"])
            return False

    async def _task_item(self, task: ActivityTask, lock: list[Any] | None,
                         at: float) -> c.Item:
        item: c.Item = {**c.task_key(task.instance_id, task.id), "dc": c.n(0)}
        if len(task.data) <= c.INLINE_LIMIT:
            item["d"] = c.b(task.data)
        else:
            item["dr"] = c.s(await self._put_blob(task.instance_id, task.data))
        if lock is not None:
            item.update({"lt": c.s(str(lock[0])), "lu": c.n(at + float(lock[1])),
                         "dc": c.n(1)})
        return item

    async def _put_task(self, task: ActivityTask, lock: list[Any] | None, at: float) -> None:
        item = await self._task_item(task, lock, at)
        try:
            await self._ddb("PutItem", Item=item, ConditionExpression="attribute_not_exists(pk)")
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            if "dr" in item:
                await self._delete_blob(task.instance_id, item["dr"]["S"])

    def _next_order(self) -> str:
        """A send-order key, increasing within this process (and roughly across processes)."""
        self._order = max(time.time_ns(), self._order + 1)
        return f"{self._order:020d}"

    # -- hints -----------------------------------------------------------------------------

    def _outbox_item(self, sends: list[_Send]) -> c.Item:
        key = "O#" + uuid.uuid4().hex
        return {"pk": c.s(key), "sk": c.s("O"),
                "h": c.b(c.dumps([[x.instance_id, x.task_id, x.due] for x in sends])),
                "xs": c.s(str(hash(key) % _SHARDS)), "xa": c.n(time.time())}

    async def _transact_with_outbox(self, actions: list[dict[str, Any]], sends: list[_Send],
                                    *, drop_duplicates: bool) -> None:
        outbox = self._outbox_item(sends)
        actions = [*actions, {"Put": {"TableName": self.table, "Item": outbox}}]
        for _ in range(len(actions) + 1):
            codes = await self._transact(actions)
            if codes is None:
                await self._send_hints(sends, outbox_pk=outbox["pk"])
                return
            failed = {i for i, code in enumerate(codes) if code == "ConditionalCheckFailed"}
            if not drop_duplicates or not failed or len(actions) - 1 in failed:
                raise RuntimeError(f"transaction cancelled: {codes}")
            actions = [a for i, a in enumerate(actions) if i not in failed]
        raise RuntimeError("transaction kept being cancelled")

    async def _send_hints(self, sends: Iterable[_Send], *,
                          outbox_pk: dict[str, str] | None = None) -> None:
        """Send hints (batches of 10 per queue); then delete the outbox item, if any."""
        now = time.time()
        by_kind: dict[WorkKind, list[dict[str, Any]]] = {k: [] for k in WorkKind}
        seen: set[tuple[str, str | None, float]] = set()
        for send in sends:
            due = send.due if send.due > now else 0.0
            key = (send.instance_id, send.task_id, due)
            if key in seen:
                continue
            seen.add(key)
            body: dict[str, Any] = {"i": send.instance_id}
            if send.task_id is not None:
                body["t"] = send.task_id
            if due:
                body["due"] = due
            kind = WorkKind.ACTIVITY if send.task_id is not None else WorkKind.ORCHESTRATION
            by_kind[kind].append({
                "Id": str(len(by_kind[kind])), "MessageBody": c.dumps(body).decode(),
                "DelaySeconds": min(MAX_DELAY_SECONDS, max(0, math.ceil(due - now)))})
        for kind, entries in by_kind.items():
            for i in range(0, len(entries), 10):
                batch = [dict(e, Id=str(j)) for j, e in enumerate(entries[i:i + 10])]
                response = await self._sqs("SendMessageBatch", kind, Entries=batch)
                if response.get("Failed"):
                    raise RuntimeError(f"SQS refused hints: {response['Failed']}")
            if entries:
                self._events[kind].set()
        if outbox_pk is not None:
            await self._ddb("DeleteItem", Key={"pk": outbox_pk, "sk": c.s("O")})

    async def _receive(self, kind: WorkKind, wait_seconds: int) -> list[_Hint]:
        response = await self._sqs("ReceiveMessage", kind, MaxNumberOfMessages=10,
                                   WaitTimeSeconds=wait_seconds, VisibilityTimeout=30)
        hints = []
        now = time.time()
        for raw in response.get("Messages", []):
            body = c.loads(raw["Body"].encode())
            hint = _Hint(body["i"], body.get("t"), raw["ReceiptHandle"])
            due = float(body.get("due", 0.0))
            if due > now + 0.001:
                if due - now > MAX_VISIBILITY_SECONDS:  # too far for one hop: send it on
                    await self._send_hints([_Send(hint.instance_id, hint.task_id, due)])
                    await self._quietly(self._sqs("DeleteMessage", kind,
                                                  ReceiptHandle=hint.receipt))
                else:
                    await self._set_visibility(kind, hint.receipt, due - now)
                continue
            hints.append(hint)
        return hints

    def _take_buffer(self, kind: WorkKind) -> list[_Hint]:
        hints, self._buffer[kind] = self._buffer[kind], []
        return hints

    async def _set_visibility(self, kind: WorkKind, receipt: str, seconds: float) -> bool:
        """Hide a received hint for `seconds` (rounded up); False if SQS no longer has it."""
        timeout = min(MAX_VISIBILITY_SECONDS, max(0, math.ceil(seconds)))
        try:
            await self._sqs("ChangeMessageVisibility", kind, ReceiptHandle=receipt,
                            VisibilityTimeout=timeout)
            return True
        except botocore.exceptions.ClientError as exc:
            logger.debug("hint visibility not changed: %s", exc)
            return False

    async def _hide_until(self, kind: WorkKind, hint: _Hint, when: float) -> None:
        remaining = when - time.time()
        if remaining > MAX_VISIBILITY_SECONDS:
            await self._send_hints([_Send(hint.instance_id, hint.task_id, when)])
            await self._quietly(self._sqs("DeleteMessage", kind, ReceiptHandle=hint.receipt))
        elif not await self._set_visibility(kind, hint.receipt, remaining + 0.5):
            await self._send_hints([_Send(hint.instance_id, hint.task_id, when + 0.5)])

    async def _keep_hint(self, instance_id: str, token: str, receipt: str,
                         lease: float) -> None:
        """Keep a received hint hidden for the lease: it comes back if the holder dies."""
        if await self._set_visibility(WorkKind.ORCHESTRATION, receipt, lease):
            self._kept[token] = receipt
        else:
            await self._send_hints([_Send(instance_id, due=time.time() + lease)])

    async def _keep_task_hint(self, task_id: str, receipt: str, lease: float) -> None:
        if await self._set_visibility(WorkKind.ACTIVITY, receipt, lease):
            self._task_receipts[task_id] = receipt

    def _note_local_due(self, messages: Iterable[Message]) -> None:
        """Remember delayed messages this process wrote: it locks them when due without
        waiting for their (whole-second) SQS hint."""
        now = time.time()
        for message in messages:
            if message.visible_at > now:
                heapq.heappush(self._due, (message.visible_at, message.instance_id))
        if len(self._due) > 10_000:
            self._due = heapq.nsmallest(5_000, self._due)

    # -- storage helpers -------------------------------------------------------------------

    async def _transact(self, actions: list[dict[str, Any]]) -> list[str] | None:
        """Run TransactWriteItems, retrying on conflicts; None on success, else the
        per-action cancellation codes.

        The client request token makes a retry of a transaction that was applied, but whose
        answer was lost (a timeout), return success instead of failing its own conditions.
        """
        request_token = uuid.uuid4().hex
        for attempt in range(8):
            try:
                await self._ddb_plain("TransactWriteItems", TransactItems=actions,
                                      ClientRequestToken=request_token)
                return None
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise
                codes = cancellation_codes(exc)
                if "ConditionalCheckFailed" in codes or not any(
                        code in ("TransactionConflict", "ThrottlingError") for code in codes):
                    return codes
                await backoff(attempt)
        return ["TransactionConflict"]

    async def _ddb_plain(self, operation: str, **kwargs: Any) -> Any:
        if not self._opened:
            await self._open()
        return await self._aws.ddb(operation, **kwargs)

    async def _get_row(self, instance_id: str, projection: str | None = None) -> c.Item | None:
        kwargs: dict[str, Any] = {"Key": c.row_key(instance_id), "ConsistentRead": True}
        if projection:
            kwargs["ProjectionExpression"] = projection + ", nm, fxid"
        response = await self._ddb("GetItem", **kwargs)
        item = response.get("Item")
        return item if item and "nm" in item else None

    async def _decode_row(self, instance_id: str, row: c.Item) -> InstanceRecord:
        payloads: dict[str, bytes | None] = {}
        for field in c.PAYLOAD_FIELDS:
            inline, ref = c.payload_attr(field), c.blob_ref_attr(field)
            if inline in row:
                payloads[field] = bytes(row[inline]["B"])
            elif ref in row:
                payloads[field] = await self._get_blob(instance_id, row[ref]["S"])
            else:
                payloads[field] = None
        return c.decode_record(instance_id, row, payloads)

    async def _value(self, instance_id: str, item: c.Item, name: str) -> bytes:
        """An item's binary value `name`, inline or from the blob its ``name + "r"`` names."""
        if name in item:
            return bytes(item[name]["B"])
        return await self._get_blob(instance_id, item[name + "r"]["S"])

    async def _put_blob(self, instance_id: str, data: bytes) -> str:
        blob = uuid.uuid4().hex
        pk = c.s(c.instance_pk(instance_id))
        parts = [data[i:i + c.BLOB_PART] for i in range(0, len(data), c.BLOB_PART)] or [b""]
        await self._batch_write([{"PutRequest": {"Item": {
            "pk": pk, "sk": c.s(f"B#{blob}#{n:05d}"), "b": c.b(part)}}}
            for n, part in enumerate(parts)])
        return blob

    async def _get_blob(self, instance_id: str, blob: str) -> bytes:
        items = await self._query_all(
            KeyConditionExpression="pk = :p AND begins_with(sk, :b)",
            ExpressionAttributeValues={":p": c.s(c.instance_pk(instance_id)),
                                       ":b": c.s(f"B#{blob}#")})
        return b"".join(bytes(i["b"]["B"]) for i in items)

    async def _delete_blob(self, instance_id: str, blob: str) -> None:
        items = await self._query_all(
            KeyConditionExpression="pk = :p AND begins_with(sk, :b)",
            ExpressionAttributeValues={":p": c.s(c.instance_pk(instance_id)),
                                       ":b": c.s(f"B#{blob}#")},
            ProjectionExpression="pk, sk")
        await self._batch_write([{"DeleteRequest": {"Key": i}} for i in items])

    async def _clear_partition(self, instance_id: str, *, keep_row: bool) -> None:
        """Delete every item of an instance's partition (but the row, if `keep_row`)."""
        items = await self._query_all(
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues={":p": c.s(c.instance_pk(instance_id))},
            ProjectionExpression="pk, sk")
        await self._batch_write([{"DeleteRequest": {"Key": i}} for i in items
                                 if not (keep_row and i["sk"]["S"] == "R")])

    async def _query_all(self, **kwargs: Any) -> list[c.Item]:
        items: list[c.Item] = []
        start_key = None
        while True:
            if start_key:
                kwargs["ExclusiveStartKey"] = start_key
            response = await self._ddb("Query", ConsistentRead=True, **kwargs)
            items.extend(response.get("Items", []))
            start_key = response.get("LastEvaluatedKey")
            if not start_key:
                return items

    async def _batch_get(self, keys: list[c.Item]) -> dict[str, c.Item]:
        """Rows by partition key (strongly consistent); missing ones are absent."""
        found: dict[str, c.Item] = {}
        for i in range(0, len(keys), 100):
            request: dict[str, Any] = {self.table: {"Keys": keys[i:i + 100],
                                                    "ConsistentRead": True}}
            for attempt in range(10):
                response = await self._ddb_plain("BatchGetItem", RequestItems=request)
                for item in response.get("Responses", {}).get(self.table, []):
                    found[item["pk"]["S"]] = item
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
                await backoff(attempt)
        return found

    async def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        """BatchWriteItem in chunks of 25, retrying unprocessed items (one request per key)."""
        unique: dict[tuple[str, str], dict[str, Any]] = {}
        for request in requests:
            body = request.get("PutRequest", {}).get("Item") or request["DeleteRequest"]["Key"]
            unique[(body["pk"]["S"], body["sk"]["S"])] = request
        requests = list(unique.values())
        chunks = [requests[i:i + 25] for i in range(0, len(requests), 25)]

        async def write(chunk: list[dict[str, Any]]) -> None:
            request: dict[str, Any] = {self.table: chunk}
            for attempt in range(10):
                response = await self._ddb_plain("BatchWriteItem", RequestItems=request)
                request = response.get("UnprocessedItems") or {}
                if not request:
                    return
                await backoff(attempt)
            raise RuntimeError("DynamoDB kept leaving batch writes unprocessed (throttling)")

        await asyncio.gather(*(write(chunk) for chunk in chunks))


# -- helpers ---------------------------------------------------------------------------------


def _hints_for_messages(messages: Iterable[Message]) -> list[_Send]:
    """One hint per target instance for visible messages, one per delayed message."""
    sends: dict[tuple[str, float], _Send] = {}
    now = time.time()
    for message in messages:
        due = message.visible_at if message.visible_at > now else 0.0
        sends.setdefault((message.instance_id, due), _Send(message.instance_id, due=due))
    return list(sends.values())


def _item_size(item: c.Item) -> int:
    total = 0
    for name, value in item.items():
        total += len(name)
        for v in value.values():
            total += len(v) if isinstance(v, (bytes, str)) else 8
    return total


def _take_chunk(pending: list[Any], size: Any) -> list[Any]:
    """Pop a prefix of `pending` that fits in one transaction (with room for an outbox)."""
    chunk: list[Any] = []
    total = 0
    while pending and len(chunk) < _TX_ACTIONS:
        item_size = size(pending[0])
        if chunk and total + item_size > _TX_BYTES:
            break
        chunk.append(pending.pop(0))
        total += item_size
    return chunk


def _check_completion(completion: OrchestrationCompletion) -> None:
    if completion.instance.instance_id != completion.instance_id:
        raise ValueError(
            f"complete_orchestrations: the completion is for {completion.instance_id!r} but "
            f"its instance row is for {completion.instance.instance_id!r}")
    for new in completion.new_instances:
        if not isinstance(new, NewInstance) or new.start.instance_id != new.record.instance_id:
            raise ValueError("complete_orchestrations: a new instance's start message must be "
                             "addressed to the new instance")


def _matches(record: InstanceRecord, query: InstanceQuery) -> bool:
    return (
        (query.runtime_status is None or record.runtime_status in query.runtime_status)
        and (query.created_from is None or record.created_time >= query.created_from)
        and (query.created_to is None or record.created_time < query.created_to)
        and (query.name is None or record.name == query.name)
        and (query.instance_id_prefix is None
             or record.instance_id.startswith(query.instance_id_prefix))
    )
