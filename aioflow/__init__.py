"""aioflow: durable orchestrations for asyncio.

Write workflows as plain `async def` orchestrators; aioflow records every durable step in an
append-only history in a pluggable backend (SQLite by default) and replays it after a crash, so
the workflow finishes correctly however often its process dies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from aioflow.app import App
from aioflow.backend import Backend
from aioflow.client import Client
from aioflow.connect import connect
from aioflow.context import OrchestrationContext
from aioflow.engine import CriticalSection
from aioflow.entities import EntityContext, EntityId, EntityQueryPage, EntityState
from aioflow.errors import (
    AioflowError,
    ConfigurationError,
    EntityLockError,
    InstanceExistsError,
    InstanceNotFoundError,
    InstanceNotRunningError,
    NonDeterminismError,
    NonDeterministicOperationError,
    OrchestrationTimeoutError,
    SerializationError,
    TaskFailedError,
    UnknownFunctionError,
)
from aioflow.retry import RetryPolicy
from aioflow.status import FailureDetails, OrchestrationStatus, QueryPage, RuntimeStatus
from aioflow.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AioflowError", "App", "Backend", "Client", "ConfigurationError", "CriticalSection",
    "EntityContext", "EntityId", "EntityLockError", "EntityQueryPage", "EntityState",
    "FailureDetails",
    "InstanceExistsError", "InstanceNotFoundError", "InstanceNotRunningError",
    "NonDeterminismError", "NonDeterministicOperationError", "OrchestrationContext",
    "OrchestrationStatus", "OrchestrationTimeoutError", "QueryPage", "RetryPolicy",
    "RuntimeStatus", "SerializationError", "TaskFailedError", "UnknownFunctionError", "Worker",
    "connect", "run",
]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed (the `uvloop` extra)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
