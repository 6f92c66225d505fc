"""`OrchestrationContext`: what orchestrator code uses to do durable things."""

from __future__ import annotations

import asyncio
import logging
import random as _random
import uuid
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aioflow.retry import RetryPolicy

if TYPE_CHECKING:
    from aioflow.engine import CriticalSection, OrchestrationExecutor

__all__ = ["OrchestrationContext"]

_UUID_NAMESPACE = uuid.UUID("9b8e4c5e-2f0c-4d7e-9f6a-6a1c3f1f0a77")


class _ReplaySafeLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Drops records while the orchestrator is replaying, so each line is logged once."""

    def __init__(self, logger: logging.Logger, ctx: "OrchestrationContext") -> None:
        super().__init__(logger, {"instance_id": ctx.instance_id})
        self._ctx = ctx

    def isEnabledFor(self, level: int) -> bool:
        return not self._ctx.is_replaying and self.logger.isEnabledFor(level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self._ctx.is_replaying:
            super().log(level, msg, *args, **kwargs)


class OrchestrationContext:
    """The orchestrator's handle on durable execution.

    Every method that schedules work returns an awaitable (an asyncio Future or Task on the
    orchestration's replay loop) and records a command in history on first execution; on replay
    the command is matched against history instead of being sent again. Awaitables may be
    combined with plain asyncio (`gather`, `wait`, `wait_for`, `timeout`, `TaskGroup`).

    Orchestrator code must be deterministic: take time, ids and random numbers from this context,
    and do I/O only in activities.
    """

    def __init__(self, executor: "OrchestrationExecutor") -> None:
        self._executor = executor
        self._uuid_counter = 0
        self._random: _random.Random | None = None
        self._logger: logging.LoggerAdapter | None = None  # type: ignore[type-arg]

    # -- identity and deterministic helpers ------------------------------------------------
    @property
    def instance_id(self) -> str:
        return self._executor.instance_id

    @property
    def name(self) -> str:
        """The orchestrator's registered name."""
        return self._executor.name

    @property
    def parent_instance_id(self) -> str | None:
        """The calling orchestration's id, for a sub-orchestration; else None."""
        return self._executor.parent_instance_id

    @property
    def current_utc_datetime(self) -> datetime:
        """The orchestration's current time: when this step started (deterministic on replay)."""
        return datetime.fromtimestamp(self._executor.now, tz=UTC)

    @property
    def is_replaying(self) -> bool:
        """True while the code re-runs steps already recorded in history."""
        return self._executor.is_replaying

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """A logger that stays silent while replaying (logs each line once)."""
        if self._logger is None:
            self._logger = _ReplaySafeLogger(logging.getLogger("aioflow.orchestration"), self)
        return self._logger

    def new_uuid(self) -> str:
        """A UUID that is the same on every replay (derived from the instance and a counter)."""
        self._uuid_counter += 1
        seed = f"{self.instance_id}/{self._executor.execution_id}/{self._uuid_counter}"
        return str(uuid.uuid5(_UUID_NAMESPACE, seed))

    def random(self) -> float:
        """A float in [0, 1) from a generator seeded by the instance: the same on every replay."""
        if self._random is None:
            self._random = _random.Random(f"{self.instance_id}/{self._executor.execution_id}")
        return self._random.random()

    # -- durable operations ----------------------------------------------------------------
    def call_activity(self, fn_or_name: Any, input: Any = None, *,
                      retry: RetryPolicy | None = None) -> asyncio.Future[Any]:
        """Schedule an activity; await the result. Failures raise `TaskFailedError`."""
        return self._executor.call_activity(fn_or_name, input, retry)

    def call_sub_orchestrator(self, fn_or_name: Any, input: Any = None, *,
                              instance_id: str | None = None,
                              retry: RetryPolicy | None = None) -> asyncio.Future[Any]:
        """Start an orchestration as a child of this one; await its output.

        Without `instance_id`, a deterministic id derived from this instance is used.
        Failures raise `TaskFailedError` (kind "sub-orchestration").
        """
        return self._executor.call_sub_orchestrator(fn_or_name, input, instance_id, retry)

    def call_entity(self, entity_id: Any, operation: str,
                    input: Any = None) -> asyncio.Future[Any]:
        """Apply `operation` to an entity and await its result (request/response, durable).

        `entity_id` is an `EntityId` (or ``"@name@key"``, or ``(name, key)``). If the operation
        raises, this raises `TaskFailedError` (kind "entity") and the entity's state is unchanged.
        An entity name no registered entity has raises `UnknownFunctionError` at once.
        """
        return self._executor.call_entity(entity_id, operation, input)

    def signal_entity(self, entity_id: Any, operation: str, input: Any = None) -> None:
        """Send a one-way operation to an entity (recorded, sent once this step commits)."""
        self._executor.signal_entity(entity_id, operation, input)

    def lock_entities(self, *entity_ids: Any) -> "CriticalSection":
        """A critical section: ``async with ctx.lock_entities(a, b): ...`` holds the entities
        for the block, so no other orchestration or client operates on them meanwhile (their
        operations wait). Inside it, only the locked entities may be called. Locks are taken in
        a fixed order (no deadlocks) and released when the block ends, however it ends."""
        return self._executor.lock_entities(entity_ids)

    def create_timer(self, fire_at: datetime) -> asyncio.Future[None]:
        """A durable timer firing at `fire_at` (an aware datetime; naive means UTC).

        Cancel the returned future to cancel the timer. A time not in the future completes at once
        and records nothing.
        """
        if not isinstance(fire_at, datetime):
            raise TypeError(f"create_timer needs a datetime, got {type(fire_at).__name__}; for a "
                            f"delay in seconds use `await asyncio.sleep(seconds)`")
        if fire_at.tzinfo is None:
            fire_at = fire_at.replace(tzinfo=UTC)
        return self._executor.create_timer(fire_at.timestamp())

    def wait_for_external_event(self, name: str, *,
                                timeout: float | None = None) -> asyncio.Future[Any]:
        """Wait for an event raised with `Client.raise_event(instance_id, name, data)`.

        Names are case-insensitive. Events raised before anyone waits are buffered, and each
        event is delivered to exactly one wait, in arrival order. With `timeout` (seconds,
        a durable timer), `TimeoutError` is raised if no event came in time.
        """
        return self._executor.wait_for_event(name, timeout)

    def task_all(self, awaitables: Iterable[Awaitable[Any]]) -> asyncio.Future[list[Any]]:
        """Fan-in: a future of all results, in order (the first failure is raised)."""
        return asyncio.gather(*awaitables)

    def task_any(self, awaitables: Iterable[Awaitable[Any]]) -> asyncio.Future[Any]:
        """Race: a future of the first task to finish (returned, not its result).

        The losers are cancelled (their late results are ignored); ties go to the earliest in
        the list, so the winner is the same on every replay.
        """
        return self._executor.task_any(list(awaitables))

    def continue_as_new(self, input: Any = None) -> None:
        """Restart this instance with `input` and a fresh history once the orchestrator returns.

        Events raised but not yet received are carried over to the new execution.
        """
        self._executor.request_continue_as_new(input)

    def set_custom_status(self, value: Any) -> None:
        """Publish a JSON value visible in `get_status(...).custom_status`."""
        self._executor.set_custom_status(value)

    def __repr__(self) -> str:
        return f"<OrchestrationContext instance_id={self.instance_id!r}>"
