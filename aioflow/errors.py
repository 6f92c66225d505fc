"""Every exception aioflow raises on purpose.

Each error says what was wrong and what to do about it; the message is written for the person
reading a traceback, not for the code that catches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aioflow.status import FailureDetails


class AioflowError(Exception):
    """Base class of every error aioflow raises on purpose."""


class ConfigurationError(AioflowError, ValueError):
    """Bad configuration: a malformed backend URL, an unknown scheme, a bad registration."""


class SerializationError(AioflowError, TypeError):
    """A value cannot be stored as JSON (inputs, outputs, event data, custom status)."""


class UnknownFunctionError(AioflowError, LookupError):
    """An orchestrator or activity name that no registry knows."""


class InstanceExistsError(AioflowError):
    """`start_new` was given the id of a live instance (pending, running or suspended)."""

    def __init__(self, instance_id: str, runtime_status: str) -> None:
        super().__init__(
            f"an orchestration instance with id {instance_id!r} already exists and is "
            f"{runtime_status}; pick another instance id, or wait for it to finish "
            f"(or terminate it) before reusing the id"
        )
        self.instance_id = instance_id
        self.runtime_status = runtime_status


class InstanceNotFoundError(AioflowError, LookupError):
    """An operation named an instance id that the backend does not have."""

    def __init__(self, instance_id: str, what: str = "") -> None:
        action = f" cannot {what}:" if what else ""
        super().__init__(
            f"{action} no orchestration instance with id {instance_id!r} exists "
            f"(it was never started, or its history was purged)".strip()
        )
        self.instance_id = instance_id


class InstanceNotRunningError(AioflowError):
    """An operation that needs a live instance (raise_event, terminate, ...) met a finished one."""

    def __init__(self, instance_id: str, runtime_status: str, what: str) -> None:
        super().__init__(
            f"cannot {what}: orchestration instance {instance_id!r} is {runtime_status}, "
            f"so nothing will ever receive it; start a new instance instead"
        )
        self.instance_id = instance_id
        self.runtime_status = runtime_status


class LeaseLostError(AioflowError):
    """A worker tried to commit under a lease that another worker has since taken over."""


class NonDeterminismError(AioflowError):
    """Replaying an orchestrator produced a different step than the one recorded in history.

    The orchestrator code (or something it depends on) changed, or it made a decision from a
    non-deterministic source (wall clock, random, I/O) instead of the context's helpers.
    """

    def __init__(self, instance_id: str, step: int, expected: str, actual: str) -> None:
        super().__init__(
            f"non-deterministic orchestrator in instance {instance_id!r} at step {step}: "
            f"history recorded {expected}, but the code now does {actual}. Orchestrator code "
            f"must make the same calls in the same order on every replay: do not branch on the "
            f"wall clock, random numbers or I/O (use ctx.current_utc_datetime, ctx.random(), "
            f"ctx.new_uuid() and activities), and version orchestrators instead of editing "
            f"ones that have running instances"
        )
        self.instance_id = instance_id
        self.step = step
        self.expected = expected
        self.actual = actual


class NonDeterministicOperationError(AioflowError, RuntimeError):
    """Orchestrator code tried to do I/O or await something that is not durable."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} is not allowed inside an orchestrator: orchestrators must be "
            f"deterministic; do I/O in an activity (ctx.call_activity) and wait with durable "
            f"primitives (activities, timers, external events, asyncio.sleep/gather/wait)"
        )


class EntityLockError(AioflowError, RuntimeError):
    """Orchestrator code broke a rule of critical sections (`ctx.lock_entities`): nesting them,
    or calling an entity it has not locked while it holds locks (which could deadlock)."""


class OrchestrationTimeoutError(AioflowError, TimeoutError):
    """`Client.wait_for_completion` gave up before the instance finished."""


class TaskFailedError(AioflowError):
    """An activity or sub-orchestration failed; raised where the orchestrator awaits it.

    `error_type`, `message` and `stack_trace` describe the original exception, which ran in
    another process perhaps, so the exception object itself is not available.
    """

    def __init__(
        self,
        task_name: str,
        error_type: str,
        message: str,
        stack_trace: str = "",
        *,
        kind: str = "activity",
    ) -> None:
        super().__init__(f"{kind} {task_name!r} failed: {error_type}: {message}")
        self.task_name = task_name
        self.error_type = error_type
        self.message = message
        self.stack_trace = stack_trace
        self.kind = kind

    @property
    def failure_details(self) -> "FailureDetails":
        from aioflow.status import FailureDetails

        return FailureDetails(self.error_type, self.message, self.stack_trace)


def describe(value: Any) -> str:
    """A short, safe description of a value for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
