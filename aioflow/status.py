"""What a client can learn about an instance: runtime status, failure details, query pages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class RuntimeStatus(str, enum.Enum):  # noqa: UP042 - StrEnum would change str() and format()
    """The lifecycle state of an orchestration instance (names as in Durable Functions)."""

    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    CONTINUED_AS_NEW = "ContinuedAsNew"
    FAILED = "Failed"
    TERMINATED = "Terminated"
    SUSPENDED = "Suspended"

    @property
    def is_terminal(self) -> bool:
        """True once the instance will never run again (its id may then be reused)."""
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({RuntimeStatus.COMPLETED, RuntimeStatus.FAILED, RuntimeStatus.TERMINATED})


@dataclass(frozen=True, slots=True)
class FailureDetails:
    """Why something failed: the original exception's type name, message and traceback text."""

    error_type: str
    message: str
    stack_trace: str = ""

    def to_json(self) -> dict[str, str]:
        return {"error_type": self.error_type, "message": self.message,
                "stack_trace": self.stack_trace}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FailureDetails":
        return cls(str(data.get("error_type", "")), str(data.get("message", "")),
                   str(data.get("stack_trace", "")))

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


@dataclass(frozen=True, slots=True)
class OrchestrationStatus:
    """A snapshot of one instance, as returned by `Client.get_status` and queries.

    `input`, `output` and `custom_status` are the JSON values as stored (dicts, lists, strings,
    numbers); `history` is only filled when asked for, as a list of JSON-ready dicts.
    """

    instance_id: str
    name: str
    runtime_status: RuntimeStatus
    created_time: datetime
    last_updated_time: datetime
    input: Any = None
    output: Any = None
    custom_status: Any = None
    failure_details: FailureDetails | None = None
    history: list[dict[str, Any]] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.runtime_status.is_terminal

    def to_json(self) -> dict[str, Any]:
        """The Durable-Functions-shaped JSON form (also used by the HTTP API)."""
        data: dict[str, Any] = {
            "instanceId": self.instance_id,
            "name": self.name,
            "runtimeStatus": self.runtime_status.value,
            "input": self.input,
            "output": self.output,
            "customStatus": self.custom_status,
            "createdTime": self.created_time.isoformat(),
            "lastUpdatedTime": self.last_updated_time.isoformat(),
        }
        if self.failure_details is not None:
            data["failureDetails"] = self.failure_details.to_json()
        if self.history is not None:
            data["historyEvents"] = self.history
        return data


@dataclass(frozen=True, slots=True)
class QueryPage:
    """One page of `Client.query_instances`; pass `continuation` back to get the next one."""

    instances: list[OrchestrationStatus] = field(default_factory=list)
    continuation: str | None = None
