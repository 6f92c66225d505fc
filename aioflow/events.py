"""History events: the vocabulary of the append-only log every instance keeps.

An instance's history is a list of these events. Events that arrive from outside (activity
results, timer firings, raised events, terminate/suspend/resume, the start itself) travel as
inbox messages carrying one encoded event each; events the orchestrator produces (TaskScheduled,
TimerCreated, ...) are written by the worker when it commits a step. Each event carries what
replay needs and nothing more. Payloads (`input`, `result`) are plain JSON values.

`execution_id` on result events ties them to one execution of an instance: results addressed to an
execution that has since continued-as-new are dropped instead of being confused with new work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import orjson

from aioflow.serialization import dumps

__all__ = [
    "EntityOperationSent",
    "EntityRequest",
    "EventRaised",
    "ExecutionCompleted",
    "ExecutionResumed",
    "ExecutionStarted",
    "ExecutionSuspended",
    "ExecutionTerminated",
    "HistoryEvent",
    "OrchestratorStarted",
    "SubOrchestrationCompleted",
    "SubOrchestrationCreated",
    "SubOrchestrationFailed",
    "TaskCompleted",
    "TaskFailed",
    "TaskScheduled",
    "TimerCreated",
    "TimerFired",
    "decode_event",
    "encode_event",
    "event_to_json",
]


@dataclass(slots=True)
class HistoryEvent:
    kind: ClassVar[str] = "HistoryEvent"
    #: When the event was recorded (epoch seconds, UTC); informational only.
    ts: float


@dataclass(slots=True)
class ExecutionStarted(HistoryEvent):
    kind: ClassVar[str] = "ExecutionStarted"
    name: str
    execution_id: str
    input: Any = None
    parent_instance_id: str | None = None
    parent_execution_id: str | None = None
    parent_task_id: int | None = None


@dataclass(slots=True)
class OrchestratorStarted(HistoryEvent):
    """Marks the start of one activation; its `ts` is the orchestration's current time."""

    kind: ClassVar[str] = "OrchestratorStarted"


@dataclass(slots=True)
class TaskScheduled(HistoryEvent):
    kind: ClassVar[str] = "TaskScheduled"
    task_id: int
    name: str
    input: Any = None


@dataclass(slots=True)
class TaskCompleted(HistoryEvent):
    kind: ClassVar[str] = "TaskCompleted"
    task_id: int
    execution_id: str
    result: Any = None


@dataclass(slots=True)
class TaskFailed(HistoryEvent):
    kind: ClassVar[str] = "TaskFailed"
    task_id: int
    execution_id: str
    error_type: str = ""
    message: str = ""
    stack_trace: str = ""


@dataclass(slots=True)
class TimerCreated(HistoryEvent):
    kind: ClassVar[str] = "TimerCreated"
    task_id: int
    fire_at: float


@dataclass(slots=True)
class TimerFired(HistoryEvent):
    kind: ClassVar[str] = "TimerFired"
    task_id: int
    execution_id: str
    fire_at: float


@dataclass(slots=True)
class SubOrchestrationCreated(HistoryEvent):
    kind: ClassVar[str] = "SubOrchestrationCreated"
    task_id: int
    name: str
    instance_id: str
    input: Any = None


@dataclass(slots=True)
class SubOrchestrationCompleted(HistoryEvent):
    kind: ClassVar[str] = "SubOrchestrationCompleted"
    task_id: int
    execution_id: str
    result: Any = None


@dataclass(slots=True)
class SubOrchestrationFailed(HistoryEvent):
    kind: ClassVar[str] = "SubOrchestrationFailed"
    task_id: int
    execution_id: str
    error_type: str = ""
    message: str = ""
    stack_trace: str = ""


@dataclass(slots=True)
class EventRaised(HistoryEvent):
    kind: ClassVar[str] = "EventRaised"
    name: str
    input: Any = None


@dataclass(slots=True)
class ExecutionSuspended(HistoryEvent):
    kind: ClassVar[str] = "ExecutionSuspended"
    reason: str = ""


@dataclass(slots=True)
class ExecutionResumed(HistoryEvent):
    kind: ClassVar[str] = "ExecutionResumed"
    reason: str = ""


@dataclass(slots=True)
class ExecutionTerminated(HistoryEvent):
    kind: ClassVar[str] = "ExecutionTerminated"
    reason: str = ""


@dataclass(slots=True)
class ExecutionCompleted(HistoryEvent):
    """The execution ended: `status` is Completed, Failed, Terminated or ContinuedAsNew."""

    kind: ClassVar[str] = "ExecutionCompleted"
    status: str
    result: Any = None
    error_type: str = ""
    message: str = ""
    stack_trace: str = ""


@dataclass(slots=True)
class EntityOperationSent(HistoryEvent):
    """An orchestration sent a message to an entity (a command, matched on replay).

    `kind` is "call" (a reply comes back as TaskCompleted/TaskFailed with this `task_id`),
    "signal" (one-way), "lock" (a reply grants the lock of critical section `section`) or
    "unlock" (ends that critical section on the entity).
    """

    kind: ClassVar[str] = "EntityOperationSent"
    task_id: int
    entity_id: str
    operation: str
    input: Any = None
    op_kind: str = "call"
    section: str | None = None


@dataclass(slots=True)
class EntityRequest(HistoryEvent):
    """A message to an entity: one operation, lock or unlock, from an orchestration (`sender`,
    `sender_execution_id` and, for a call or a lock, the `task_id` to answer), another entity or
    a client (`sender` None)."""

    kind: ClassVar[str] = "EntityRequest"
    operation: str
    input: Any = None
    op_kind: str = "signal"
    sender: str | None = None
    sender_execution_id: str = ""
    task_id: int | None = None
    section: str | None = None


_KINDS: dict[str, type[HistoryEvent]] = {
    cls.kind: cls
    for cls in (
        ExecutionStarted, OrchestratorStarted, TaskScheduled, TaskCompleted, TaskFailed,
        TimerCreated, TimerFired, SubOrchestrationCreated, SubOrchestrationCompleted,
        SubOrchestrationFailed, EventRaised, ExecutionSuspended, ExecutionResumed,
        ExecutionTerminated, ExecutionCompleted, EntityOperationSent, EntityRequest,
    )
}
_FIELDS: dict[type[HistoryEvent], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()
}


def event_to_json(event: HistoryEvent) -> dict[str, Any]:
    """The event as a JSON-ready dict with its kind under "kind"."""
    data: dict[str, Any] = {"kind": event.kind}
    for name in _FIELDS[type(event)]:
        data[name] = getattr(event, name)
    return data


def encode_event(event: HistoryEvent) -> bytes:
    return dumps(event_to_json(event), what=f"{event.kind} event")


def decode_event(data: bytes) -> HistoryEvent:
    raw = orjson.loads(data)
    cls = _KINDS.get(raw.pop("kind", None))
    if cls is None:
        raise ValueError(f"unknown history event kind in {data[:80]!r}")
    return cls(**raw)
