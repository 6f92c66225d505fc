"""`Client`: start, query, signal and manage orchestration instances."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from aioflow.app import App, function_name
from aioflow.backend import Backend, InstanceQuery, InstanceRecord, Message, PurgeResult
from aioflow.connect import connect
from aioflow.entities import (
    ENTITY_PREFIX,
    EntityId,
    EntityQueryPage,
    EntityState,
    as_entity_id,
    describe_scheduler,
    is_entity_instance,
)
from aioflow.errors import (
    InstanceExistsError,
    InstanceNotFoundError,
    InstanceNotRunningError,
    OrchestrationTimeoutError,
    UnknownFunctionError,
)
from aioflow.events import (
    EntityRequest,
    EventRaised,
    ExecutionResumed,
    ExecutionStarted,
    ExecutionSuspended,
    ExecutionTerminated,
    HistoryEvent,
    decode_event,
    encode_event,
    event_to_json,
)
from aioflow.ids import message_id
from aioflow.serialization import dumps, loads, to_json_value
from aioflow.status import FailureDetails, OrchestrationStatus, QueryPage, RuntimeStatus

__all__ = ["Client"]

_MAX_ID_LENGTH = 256
_KNOWN_ENTITIES_LIMIT = 10_000


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _ts(value: datetime | float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"{what} must be a datetime or epoch seconds, got {type(value).__name__}")


def _statuses(value: Any) -> frozenset[RuntimeStatus] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, RuntimeStatus)) else list(value)
    out = set()
    for item in items:
        try:
            out.add(item if isinstance(item, RuntimeStatus) else RuntimeStatus(item))
        except ValueError:
            try:
                out.add(RuntimeStatus[str(item).upper()])
            except KeyError:
                valid = ", ".join(s.value for s in RuntimeStatus)
                raise ValueError(f"unknown runtime status {item!r}; valid: {valid}") from None
    return frozenset(out)


def validate_instance_id(instance_id: Any) -> str:
    if not isinstance(instance_id, str) or not instance_id:
        raise ValueError(f"instance_id must be a non-empty string, got {instance_id!r}")
    if len(instance_id) > _MAX_ID_LENGTH:
        raise ValueError(f"instance_id is {len(instance_id)} characters long; the limit is "
                         f"{_MAX_ID_LENGTH}")
    if any(ord(c) < 32 for c in instance_id) or "|" in instance_id:
        raise ValueError(f"instance_id {instance_id!r} contains a control character or '|', "
                         f"which are reserved; use letters, digits and -_.:@")
    if instance_id.startswith(ENTITY_PREFIX):
        raise ValueError(f"instance_id {instance_id!r} starts with '{ENTITY_PREFIX}', which is "
                         f"reserved for durable entities; start it with another character")
    return instance_id


class Client:
    """Manages orchestration instances in a backend (no worker needed in the same process).

    `backend` may be a `Backend` or a URL for `aioflow.connect`. When `app` is given, names
    passed to `start_new` are checked against its registered orchestrators at once.
    """

    def __init__(self, backend: Backend | str | None = None, *, app: App | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend: Backend = connect(backend) if backend is None or isinstance(backend, str) \
            else backend
        self.app = app
        self.clock = clock
        #: Entity instance ids known to exist (signals to them need no existence check).
        self._known_entities: set[str] = set()

    # -- starting --------------------------------------------------------------------------
    async def start_new(self, fn_or_name: Any, input: Any = None, *,
                        instance_id: str | None = None) -> str:
        """Start an orchestration and return its instance id.

        Raises `InstanceExistsError` if a live instance has `instance_id` (a finished one is
        replaced), `UnknownFunctionError` for a name the client's `app` does not know, and
        `SerializationError` for an input that cannot be stored as JSON.
        """
        name = function_name(fn_or_name)
        if self.app is not None and name not in self.app.orchestrators:
            known = ", ".join(sorted(self.app.orchestrators)) or "none"
            raise UnknownFunctionError(
                f"cannot start {name!r}: no orchestrator with that name is registered "
                f"(registered: {known})")
        payload = to_json_value(input, what=f"the input of orchestration {name!r}")
        iid = validate_instance_id(instance_id) if instance_id is not None else uuid.uuid4().hex
        execution_id = uuid.uuid4().hex
        now = self.clock()
        record = InstanceRecord(
            instance_id=iid, name=name, execution_id=execution_id,
            runtime_status=RuntimeStatus.PENDING, created_time=now, last_updated_time=now,
            input=dumps(payload))
        start = ExecutionStarted(ts=now, name=name, execution_id=execution_id, input=payload)
        await self.backend.create_instance(
            record, Message(id=message_id(iid, execution_id, "start", 0), instance_id=iid,
                            data=encode_event(start)))
        return iid

    # -- reading ---------------------------------------------------------------------------
    async def get_status(self, instance_id: str, *, show_history: bool = False,
                         show_input: bool = True) -> OrchestrationStatus | None:
        """The instance's status, or None if there is no such instance."""
        record = await self.backend.get_instance(instance_id)
        if record is None:
            return None
        history = None
        if show_history:
            history = [event_to_json(decode_event(b))
                       for b in await self.backend.get_history(instance_id)]
        return _status(record, show_input=show_input, history=history)

    async def get_history(self, instance_id: str) -> list[HistoryEvent]:
        """The instance's history events (for the replay checker and debugging)."""
        return [decode_event(b) for b in await self.backend.get_history(instance_id)]

    async def query_instances(
        self, *, runtime_status: Any = None, created_from: datetime | float | None = None,
        created_to: datetime | float | None = None, name: str | None = None,
        instance_id_prefix: str | None = None, page_size: int = 100,
        continuation: str | None = None, show_input: bool = True,
    ) -> QueryPage:
        """One page of instances matching every given filter (created_to is exclusive)."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        query = InstanceQuery(
            runtime_status=_statuses(runtime_status),
            created_from=_ts(created_from, "created_from"),
            created_to=_ts(created_to, "created_to"),
            name=function_name(name) if name is not None else None,
            instance_id_prefix=instance_id_prefix)
        records, token = await self.backend.query_instances(
            query, page_size=page_size, continuation=continuation)
        # Entities are stored as instances too; they are listed by `query_entities` instead.
        return QueryPage([_status(r, show_input=show_input) for r in records
                          if not is_entity_instance(r.instance_id)], token)

    async def iter_instances(self, **filters: Any) -> AsyncIterator[OrchestrationStatus]:
        """Every instance matching the filters of `query_instances`, across all pages."""
        continuation = None
        while True:
            page = await self.query_instances(continuation=continuation, **filters)
            for status in page.instances:
                yield status
            if page.continuation is None:
                return
            continuation = page.continuation

    async def wait_for_completion(self, instance_id: str, *,
                                  timeout: float = 60.0) -> OrchestrationStatus:
        """Wait until the instance is Completed, Failed or Terminated and return its status.

        Raises `OrchestrationTimeoutError` after `timeout` seconds, `InstanceNotFoundError` if
        there is no such instance.
        """
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            status = await self.get_status(instance_id)
            if status is None:
                raise InstanceNotFoundError(instance_id, "wait for completion")
            if status.runtime_status.is_terminal:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OrchestrationTimeoutError(
                    f"instance {instance_id!r} is still {status.runtime_status.value} after "
                    f"{timeout} s; is a worker running for this backend?")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.25)

    # -- signalling ------------------------------------------------------------------------
    async def raise_event(self, instance_id: str, name: str, data: Any = None, *,
                          event_id: str | None = None) -> None:
        """Deliver an external event to a live instance (see `wait_for_external_event`).

        Raises `InstanceNotFoundError` / `InstanceNotRunningError` for an unknown or finished
        instance. Without `event_id` every call delivers one event, so retrying a call whose
        outcome you did not see (a timeout, say) may deliver it twice. With `event_id` (any
        string unique per event, e.g. a request id) the call is safe to retry: the instance
        receives an event with that id at most once during its current execution.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("an event needs a non-empty name")
        if event_id is not None and (not isinstance(event_id, str) or not event_id):
            raise ValueError(f"event_id must be a non-empty string, not {event_id!r}")
        payload = to_json_value(data, what=f"the data of event {name!r}")
        await self._send(instance_id, f"raise event {name!r}",
                         EventRaised(ts=self.clock(), name=name, input=payload),
                         message_key=None if event_id is None else f"event|{event_id}")

    async def terminate(self, instance_id: str, reason: str = "") -> None:
        await self._send(instance_id, "terminate",
                         ExecutionTerminated(ts=self.clock(), reason=str(reason)))

    async def suspend(self, instance_id: str, reason: str = "") -> None:
        await self._send(instance_id, "suspend",
                         ExecutionSuspended(ts=self.clock(), reason=str(reason)))

    async def resume(self, instance_id: str, reason: str = "") -> None:
        await self._send(instance_id, "resume",
                         ExecutionResumed(ts=self.clock(), reason=str(reason)))

    async def _send(self, instance_id: str, what: str, event: HistoryEvent, *,
                    message_key: str | None = None) -> None:
        if is_entity_instance(instance_id):
            raise ValueError(f"cannot {what}: {instance_id!r} is a durable entity, not an "
                             f"orchestration; send it operations with signal_entity")
        record = await self.backend.get_instance(instance_id)
        if record is None:
            raise InstanceNotFoundError(instance_id, what)
        if record.runtime_status.is_terminal:
            raise InstanceNotRunningError(instance_id, record.runtime_status.value, what)
        key = message_key or uuid.uuid4().hex
        await self.backend.send_messages([Message(
            id=f"{instance_id}|client|{key}", instance_id=instance_id,
            data=encode_event(event))])

    # -- entities --------------------------------------------------------------------------
    async def signal_entity(self, entity_id: EntityId | str | tuple[str, str], operation: str,
                            input: Any = None, *, signal_id: str | None = None) -> None:
        """Send a one-way operation to an entity (creating the entity if it has never existed).

        Operations from one client call are applied in the order sent. Without `signal_id`,
        each call sends one operation, so retrying a call whose outcome you did not see may
        apply it twice; with `signal_id` (unique per operation) a retry is delivered at most once.
        Raises `UnknownFunctionError` at once for an entity name the client's `app` does not know.
        """
        eid = as_entity_id(entity_id)
        if not isinstance(operation, str) or not operation:
            raise ValueError(f"an entity operation name must be a non-empty string, got "
                             f"{operation!r}")
        if self.app is not None and eid.name not in self.app.entities:
            known = ", ".join(sorted(self.app.entities)) or "none"
            raise UnknownFunctionError(
                f"cannot signal {eid}: no entity named {eid.name!r} is registered "
                f"(registered entities: {known})")
        if signal_id is not None and (not isinstance(signal_id, str) or not signal_id):
            raise ValueError(f"signal_id must be a non-empty string, not {signal_id!r}")
        payload = to_json_value(input, what=f"the input of operation {operation!r} of entity "
                                            f"{eid}")
        iid = eid.instance_id
        now = self.clock()
        message = Message(
            id=f"{iid}|client|{signal_id or uuid.uuid4().hex}", instance_id=iid,
            data=encode_event(EntityRequest(ts=now, operation=operation, input=payload)))
        record = InstanceRecord(
            instance_id=iid, name=f"{ENTITY_PREFIX}{eid.name}", execution_id="entity",
            runtime_status=RuntimeStatus.PENDING, created_time=now, last_updated_time=now)
        # An entity's row is never deleted once created (entities never finish, and only
        # finished instances are purged), so one look per entity id is enough per client.
        if iid not in self._known_entities:
            if await self.backend.get_instance(iid) is None:
                try:
                    await self.backend.create_instance(record, message)
                    self._remember_entity(iid)
                    return
                except InstanceExistsError:
                    pass  # created meanwhile by someone else: deliver as an ordinary message
            self._remember_entity(iid)
        await self.backend.send_messages([message])

    def _remember_entity(self, instance_id: str) -> None:
        if len(self._known_entities) >= _KNOWN_ENTITIES_LIMIT:
            self._known_entities.clear()  # bounded memory; a forgotten id costs one more read
        self._known_entities.add(instance_id)

    async def read_entity_state(
            self, entity_id: EntityId | str | tuple[str, str]) -> EntityState:
        """The entity's current state (`exists` is false if it has none, or never existed)."""
        eid = as_entity_id(entity_id)
        record = await self.backend.get_instance(eid.instance_id)
        if record is None:
            return EntityState(eid, exists=False)
        return _entity_state(eid, record)

    async def query_entities(
        self, *, name: str | None = None,
        last_operation_from: datetime | float | None = None,
        last_operation_to: datetime | float | None = None, include_deleted: bool = False,
        page_size: int = 100, continuation: str | None = None,
    ) -> EntityQueryPage:
        """One page of entities, optionally only those named `name` and whose last operation
        was at or after `last_operation_from` and before `last_operation_to`. Entities whose
        state was deleted are left out unless `include_deleted`."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        prefix = ENTITY_PREFIX if name is None else EntityId(name, "x").instance_id[:-1]
        low = _ts(last_operation_from, "last_operation_from")
        high = _ts(last_operation_to, "last_operation_to")
        records, token = await self.backend.query_instances(
            InstanceQuery(instance_id_prefix=prefix), page_size=page_size,
            continuation=continuation)
        found = []
        for record in records:
            try:
                eid = EntityId.parse(record.instance_id)
            except ValueError:
                continue
            state = _entity_state(eid, record)
            if not (state.exists or include_deleted):
                continue
            if low is not None and record.last_updated_time < low:
                continue
            if high is not None and record.last_updated_time >= high:
                continue
            found.append(state)
        return EntityQueryPage(found, token)

    # -- purging ---------------------------------------------------------------------------
    async def purge_instance_history(self, instance_id: str) -> PurgeResult:
        """Delete a finished instance and its history (a live one is left alone)."""
        return await self.backend.purge_instances(instance_id=instance_id)

    async def purge_instances(
        self, *, runtime_status: Any = None, created_from: datetime | float | None = None,
        created_to: datetime | float | None = None, name: str | None = None,
        instance_id_prefix: str | None = None,
    ) -> PurgeResult:
        """Delete every finished instance matching the filters."""
        query = InstanceQuery(
            runtime_status=_statuses(runtime_status),
            created_from=_ts(created_from, "created_from"),
            created_to=_ts(created_to, "created_to"),
            name=function_name(name) if name is not None else None,
            instance_id_prefix=instance_id_prefix)
        return await self.backend.purge_instances(query=query)

    async def close(self) -> None:
        await self.backend.close()


def _entity_state(eid: EntityId, record: InstanceRecord) -> EntityState:
    holder, queued = describe_scheduler(record.custom_status)
    return EntityState(
        entity_id=eid, exists=record.output is not None,
        state=loads(record.output) if record.output is not None else None,
        last_operation_time=_dt(record.last_updated_time), locked_by=holder, queued=queued)


def _status(record: InstanceRecord, *, show_input: bool = True,
            history: Iterable[dict[str, Any]] | None = None) -> OrchestrationStatus:
    failure = None
    if record.failure is not None:
        failure = FailureDetails.from_json(loads(record.failure))
    return OrchestrationStatus(
        instance_id=record.instance_id, name=record.name,
        runtime_status=record.runtime_status, created_time=_dt(record.created_time),
        last_updated_time=_dt(record.last_updated_time),
        input=loads(record.input) if show_input and record.input is not None else None,
        output=loads(record.output) if record.output is not None else None,
        custom_status=loads(record.custom_status) if record.custom_status is not None else None,
        failure_details=failure,
        history=list(history) if history is not None else None)
