"""Durable entities: small pieces of state that apply operations one at a time.

An entity is addressed by an `EntityId` (a name and a key, e.g. `EntityId("counter", "sensor-7")`).
Its code is registered with `@app.entity`, either as a function of an `EntityContext`::

    @app.entity
    def counter(ctx: aioflow.EntityContext) -> None:
        value = ctx.get_state(lambda: 0)
        if ctx.operation_name == "add":
            ctx.set_state(value + ctx.get_input())
        elif ctx.operation_name == "get":
            ctx.set_result(value)

or as a class, whose public methods are the operations and whose instance attributes are the
state (a dataclass or pydantic model is rebuilt with its field types)::

    @app.entity
    class Account:
        def __init__(self) -> None:
            self.balance = 0

        def deposit(self, amount: int) -> int:
            self.balance += amount
            return self.balance

Guarantees (on every backend, however many workers run):

* The operations sent to one entity are applied one at a time, each exactly once, in the order
  each sender sent them. An entity is stored as one backend instance (id ``@name@key``) whose
  inbox holds the operations; a batch of operations is committed atomically with the new state
  and the replies, under the worker's lease, so a crash re-runs the whole batch from the old state.
* An operation that raises leaves the state as it was before it, and the caller of
  `call_entity` gets a `TaskFailedError` with the cause; a signalled operation's error is logged.
* A critical section (`ctx.lock_entities(...)` in an orchestrator) holds its entities for the
  whole block: they apply operations from that orchestration only, and queue everyone else's.
  Locks are taken in sorted id order, so two critical sections can never deadlock, and they are
  released when the block exits or the orchestration ends in any way.

Entity code runs on the worker's event loop (not replayed: it is not an orchestrator), so it may
be `async def`; it should still be quick, since the entity applies nothing else meanwhile.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aioflow.errors import ConfigurationError, UnknownFunctionError
from aioflow.events import EntityRequest, HistoryEvent, TaskCompleted, TaskFailed, event_to_json
from aioflow.serialization import dumps, from_json_value, loads, param_annotation, to_json_value

__all__ = [
    "ENTITY_PREFIX",
    "EntityBatchResult",
    "EntityContext",
    "EntityId",
    "EntityQueryPage",
    "EntityState",
    "RegisteredEntity",
    "as_entity_id",
    "describe_scheduler",
    "entity_instance_id",
    "is_entity_instance",
    "register_entity",
    "run_entity_batch",
]

logger = logging.getLogger("aioflow.entities")

#: Backend instance ids of entities start with this; orchestration ids may not.
ENTITY_PREFIX = "@"
_MAX_ID_LENGTH = 256
_current: contextvars.ContextVar[EntityContext] = contextvars.ContextVar("aioflow_entity")


def _check_part(value: Any, what: str, *, allow_at: bool) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"an entity {what} must be a non-empty string, got {value!r}")
    if any(ord(c) < 32 for c in value) or "|" in value or (not allow_at and "@" in value):
        banned = "'|'" if allow_at else "'@' or '|'"
        raise ValueError(f"entity {what} {value!r} contains a control character or {banned}, "
                         f"which are reserved")
    return value


@dataclass(frozen=True, slots=True, order=True)
class EntityId:
    """The address of one entity: its registered `name` (case-insensitive, stored lower-case)
    and a `key` chosen by the application (case-sensitive)."""

    name: str
    key: str

    def __post_init__(self) -> None:
        name = _check_part(self.name, "name", allow_at=False).lower()
        object.__setattr__(self, "name", name)
        _check_part(self.key, "key", allow_at=True)
        if len(self.instance_id) > _MAX_ID_LENGTH:
            raise ValueError(f"entity id {self.instance_id!r} is longer than {_MAX_ID_LENGTH} "
                             f"characters; use a shorter key")

    @property
    def instance_id(self) -> str:
        """The backend instance id that stores this entity: ``@name@key``."""
        return f"{ENTITY_PREFIX}{self.name}@{self.key}"

    @classmethod
    def parse(cls, value: str) -> EntityId:
        """The inverse of `instance_id`: ``"@counter@k1"`` -> ``EntityId("counter", "k1")``."""
        if not isinstance(value, str) or not value.startswith(ENTITY_PREFIX) or \
                "@" not in value[1:]:
            raise ValueError(f"{value!r} is not an entity id; expected '@name@key'")
        name, _, key = value[1:].partition("@")
        return cls(name, key)

    def __str__(self) -> str:
        return self.instance_id


def as_entity_id(value: EntityId | str | tuple[str, str]) -> EntityId:
    """Accept an EntityId, an ``"@name@key"`` string or a ``(name, key)`` pair."""
    if isinstance(value, EntityId):
        return value
    if isinstance(value, str):
        return EntityId.parse(value)
    if isinstance(value, tuple) and len(value) == 2:
        return EntityId(*value)
    raise TypeError(f"expected an EntityId (or '@name@key', or (name, key)), got {value!r}")


def entity_instance_id(value: EntityId | str | tuple[str, str]) -> str:
    return as_entity_id(value).instance_id


def is_entity_instance(instance_id: str) -> bool:
    return instance_id.startswith(ENTITY_PREFIX)


@dataclass(frozen=True, slots=True)
class EntityState:
    """What `Client.read_entity_state` returns: whether the entity has state, and the state.

    `state` is the stored JSON value (None when `exists` is false). `locked_by` names the
    orchestration holding the entity in a critical section, and `queued` counts operations
    waiting for that section to end.
    """

    entity_id: EntityId
    exists: bool
    state: Any = None
    last_operation_time: datetime | None = None
    locked_by: str | None = None
    queued: int = 0


@dataclass(frozen=True, slots=True)
class EntityQueryPage:
    """One page of `Client.query_entities`; pass `continuation` back for the next (None: done).
    A page may hold fewer entities than asked for even when more follow."""

    entities: list[EntityState]
    continuation: str | None


class EntityContext:
    """What entity code uses while it applies one operation.

    `get_state` returns a fresh copy of the state each time, so changes count only once passed to
    `set_state`; `set_state` checks at once that the value can be stored as JSON. If the
    operation raises, nothing it did (state, result, signals, deletion) takes effect.
    """

    def __init__(self, entity_id: EntityId, operation: str, input: Any,
                 state: bytes | None) -> None:
        self._entity_id = entity_id
        self._operation = operation
        self._input = input
        self._state = state
        self._result: Any = None
        self._has_result = False
        self._destruct = False
        self._signals: list[tuple[EntityId, str, Any]] = []

    @staticmethod
    def current() -> EntityContext:
        """The context of the operation running now (for class-based entities' methods)."""
        try:
            return _current.get()
        except LookupError:
            raise RuntimeError("EntityContext.current() is only available while an entity "
                               "operation runs") from None

    @property
    def entity_id(self) -> EntityId:
        return self._entity_id

    @property
    def entity_name(self) -> str:
        return self._entity_id.name

    @property
    def entity_key(self) -> str:
        return self._entity_id.key

    @property
    def operation_name(self) -> str:
        return self._operation

    @property
    def has_state(self) -> bool:
        return self._state is not None

    def get_input(self, type_: Any = None) -> Any:
        """The operation's input (plain JSON, or rebuilt as `type_`, e.g. a dataclass)."""
        return from_json_value(self._input, type_)

    def get_state(self, initializer: Any = None, type_: Any = None) -> Any:
        """The current state; if the entity has none, `initializer()` (when callable) or
        `initializer` itself."""
        if self._state is None:
            return initializer() if callable(initializer) else initializer
        return from_json_value(loads(self._state), type_)

    def set_state(self, value: Any) -> None:
        """Replace the state; raises SerializationError at once if `value` is not storable."""
        self._state = dumps(value, what=f"the state of entity {self._entity_id}")
        self._destruct = False

    def set_result(self, value: Any) -> None:
        """The value `call_entity` returns to the caller (must be JSON-storable)."""
        self._result = to_json_value(
            value, what=f"the result of operation {self._operation!r} of entity "
                        f"{self._entity_id}")
        self._has_result = True

    def destruct_on_exit(self) -> None:
        """Delete the entity's state when this operation ends (a later operation starts afresh)."""
        self._destruct = True

    def signal_entity(self, entity_id: EntityId | str | tuple[str, str], operation: str,
                      input: Any = None) -> None:
        """Send a one-way operation to another entity when this operation succeeds."""
        target = as_entity_id(entity_id)
        _check_operation(operation)
        payload = to_json_value(input, what=f"the input of operation {operation!r} of entity "
                                            f"{target}")
        self._signals.append((target, operation, payload))

    def __repr__(self) -> str:
        return f"<EntityContext {self._entity_id} operation={self._operation!r}>"


def _check_operation(operation: Any) -> str:
    if not isinstance(operation, str) or not operation:
        raise ValueError(f"an entity operation name must be a non-empty string, got "
                         f"{operation!r}")
    return operation


# == registration ===========================================================================

@dataclass(frozen=True, slots=True)
class _Operation:
    fn: Callable[..., Any]
    takes_input: bool
    input_type: Any


@dataclass(frozen=True, slots=True)
class RegisteredEntity:
    """An entity's code: a function of an EntityContext, or a class whose methods are operations."""

    name: str
    target: Any
    is_class: bool
    operations: dict[str, _Operation] = field(default_factory=dict)

    async def apply(self, ctx: EntityContext) -> None:
        """Apply `ctx.operation_name` to the state in `ctx` (raises what the operation raised)."""
        token = _current.set(ctx)
        try:
            if self.is_class:
                await self._apply_to_class(ctx)
            else:
                returned = self.target(ctx)
                if inspect.isawaitable(returned):
                    returned = await returned
                if returned is not None and not ctx._has_result:
                    ctx.set_result(returned)
        finally:
            _current.reset(token)

    async def _apply_to_class(self, ctx: EntityContext) -> None:
        name = ctx.operation_name
        op = self.operations.get(name)
        if op is None:
            if name.lower() == "delete":  # every class-based entity can be deleted
                ctx.destruct_on_exit()
                return
            known = ", ".join(sorted(self.operations)) or "none"
            raise UnknownFunctionError(
                f"entity {self.name!r} has no operation {name!r} (its operations: {known}, "
                f"and 'delete')")
        obj = self._instance(ctx)
        args = (from_json_value(ctx._input, op.input_type),) if op.takes_input else ()
        returned = op.fn(obj, *args)
        if inspect.isawaitable(returned):
            returned = await returned
        if not ctx._destruct:
            ctx.set_state(_snapshot(obj))
        if returned is not None and not ctx._has_result:
            ctx.set_result(returned)

    def _instance(self, ctx: EntityContext) -> Any:
        cls = self.target
        if ctx._state is None:
            return cls()
        data = loads(ctx._state)
        if dataclasses.is_dataclass(cls) or callable(getattr(cls, "model_validate", None)):
            return from_json_value(data, cls)
        obj = cls.__new__(cls)
        if isinstance(data, dict):
            obj.__dict__.update(data)
        return obj


def _snapshot(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) or callable(getattr(obj, "model_dump", None)):
        return obj
    return dict(vars(obj))


def register_entity(name: str, target: Any) -> RegisteredEntity:
    """Describe `target` (an entity function or class) for the registry under `name`."""
    name = _check_part(name, "name", allow_at=False).lower()
    if inspect.isclass(target):
        ops: dict[str, _Operation] = {}
        for attr, fn in inspect.getmembers(target, inspect.isfunction):
            if attr.startswith("_"):
                continue
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            ops[attr] = _Operation(fn, takes_input=len(params) >= 2,
                                   input_type=param_annotation(fn, 1))
        try:
            inspect.signature(target).bind()
        except TypeError as exc:
            raise ConfigurationError(
                f"entity class {target.__qualname__!r} must be constructible without arguments "
                f"(its __init__ sets the initial state): {exc}") from None
        except ValueError:  # no signature to inspect (a builtin base): trust it
            pass
        return RegisteredEntity(name, target, True, ops)
    if not callable(target):
        raise ConfigurationError(f"entity {target!r} is neither a function nor a class")
    return RegisteredEntity(name, target, False)


# == applying a batch =======================================================================

@dataclass(slots=True)
class EntityBatchResult:
    """What one batch of requests did to an entity; the worker commits it atomically.

    `state` is the encoded state (None: the entity has none); `scheduler` the encoded lock and
    queue (None when unlocked with nothing queued). `replies` go to orchestrations (results of
    calls, lock grants); `signals` to other entities, each with a per-entity sequence number for
    its deterministic message id.
    """

    state: bytes | None
    scheduler: bytes | None
    replies: list[tuple[str, HistoryEvent]] = field(default_factory=list)
    signals: list[tuple[EntityId, EntityRequest, int]] = field(default_factory=list)
    applied: int = 0


class _Batch:
    def __init__(self, registered: RegisteredEntity | None, entity_id: EntityId,
                 state: bytes | None, scheduler: bytes | None, now: float,
                 unknown_error: str) -> None:
        self.registered = registered
        self.entity_id = entity_id
        self.state = state
        self.now = now
        self.unknown_error = unknown_error
        meta = loads(scheduler) if scheduler is not None else {}
        self.lock: dict[str, Any] | None = meta.get("lock")
        self.queue: list[dict[str, Any]] = meta.get("queue", [])
        self.seq: int = meta.get("seq", 0)
        self.result = EntityBatchResult(state, None)

    async def dispatch(self, request: EntityRequest) -> None:
        lock = self.lock
        # An unlock is never held back: it either ends the current section or withdraws a lock
        # request still waiting in the queue.
        if lock is not None and request.sender != lock["holder"] and \
                request.op_kind != "unlock":
            self.queue.append(event_to_json(request))
            return
        await self.handle(request)

    async def handle(self, request: EntityRequest) -> None:
        kind = request.op_kind
        self.result.applied += 1
        if kind == "lock":
            if self.registered is None:
                self.reply(request, failure=("UnknownFunctionError", self.unknown_error, ""))
                return
            self.lock = {"holder": request.sender, "section": request.section}
            self.reply(request, value=None)
        elif kind == "unlock":
            if self.lock is not None and self.lock.get("section") == request.section:
                self.lock = None
                held, self.queue = self.queue, []
                for raw in held:
                    raw = dict(raw)
                    raw.pop("kind", None)
                    await self.dispatch(EntityRequest(**raw))
            else:  # the section ended before its lock was granted: forget the request
                self.queue = [q for q in self.queue
                              if not (q.get("op_kind") == "lock"
                                      and q.get("section") == request.section)]
        else:
            await self.operate(request)

    async def operate(self, request: EntityRequest) -> None:
        if self.registered is None:
            self.fail(request, "UnknownFunctionError", self.unknown_error, "")
            return
        ctx = EntityContext(self.entity_id, request.operation, request.input, self.state)
        try:
            await self.registered.apply(ctx)
        except Exception as exc:
            self.fail(request, type(exc).__name__, str(exc) or type(exc).__name__,
                      "".join(traceback.format_exception(exc)))
            return
        self.state = None if ctx._destruct else ctx._state
        for target, operation, payload in ctx._signals:
            self.seq += 1
            self.result.signals.append((target, EntityRequest(
                ts=self.now, operation=operation, input=payload, op_kind="signal",
                sender=self.entity_id.instance_id), self.seq))
        if request.op_kind == "call":
            self.reply(request, value=ctx._result)

    def fail(self, request: EntityRequest, error_type: str, message: str, trace: str) -> None:
        if request.op_kind == "call":
            self.reply(request, failure=(error_type, message, trace))
        else:
            logger.warning("signalled operation %r of entity %s failed: %s: %s (the state is "
                           "unchanged)", request.operation, self.entity_id, error_type, message)

    def reply(self, request: EntityRequest, *, value: Any = None,
              failure: tuple[str, str, str] | None = None) -> None:
        if request.sender is None or request.task_id is None:
            return
        event: HistoryEvent
        if failure is None:
            event = TaskCompleted(ts=self.now, task_id=request.task_id,
                                  execution_id=request.sender_execution_id, result=value)
        else:
            event = TaskFailed(ts=self.now, task_id=request.task_id,
                               execution_id=request.sender_execution_id, error_type=failure[0],
                               message=failure[1], stack_trace=failure[2])
        self.result.replies.append((request.sender, event))

    def finish(self) -> EntityBatchResult:
        result = self.result
        result.state = self.state
        if self.lock is not None or self.queue or self.seq:
            result.scheduler = dumps({"lock": self.lock, "queue": self.queue, "seq": self.seq})
        return result


async def run_entity_batch(registered: RegisteredEntity | None, entity_id: EntityId,
                           state: bytes | None, scheduler: bytes | None,
                           requests: list[EntityRequest], now: float, *,
                           unknown_error: str = "") -> EntityBatchResult:
    """Apply `requests` (in arrival order) to an entity whose stored state and scheduler
    metadata are given; `registered` None means no code is registered under its name, and every
    call then fails with `unknown_error`."""
    batch = _Batch(registered, entity_id, state, scheduler, now, unknown_error)
    for request in requests:
        await batch.dispatch(request)
    return batch.finish()


def describe_scheduler(scheduler: bytes | None) -> tuple[str | None, int]:
    """(holder of the lock, number of queued requests) from stored scheduler metadata."""
    if scheduler is None:
        return None, 0
    meta = loads(scheduler)
    lock = meta.get("lock")
    return (lock.get("holder") if lock else None), len(meta.get("queue", []))

