"""Durable retry policies for activities and sub-orchestrations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aioflow.errors import TaskFailedError

Interval = timedelta | float


def _seconds(value: Interval, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"RetryPolicy.{what} must not be negative, got {value!r}")
    return seconds


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, to retry a failed activity or sub-orchestration.

    Intervals are `timedelta`s or seconds. Attempt n (n >= 1) that fails is followed by a durable
    timer of `first_retry_interval * backoff_coefficient ** (n - 1)` (capped by
    `max_retry_interval`), then attempt n + 1, until `max_number_of_attempts` attempts were made
    or `retry_timeout` has passed since the first attempt was scheduled. `handle(error)` is called
    with the `TaskFailedError` of each failed attempt; returning False stops retrying at once.
    Every attempt and every wait is recorded in history, so retries survive restarts.
    """

    first_retry_interval: Interval
    max_number_of_attempts: int
    backoff_coefficient: float = 1.0
    max_retry_interval: Interval | None = None
    retry_timeout: Interval | None = None
    handle: Callable[["TaskFailedError"], bool] | None = None

    def __post_init__(self) -> None:
        if self.max_number_of_attempts < 1:
            raise ValueError("RetryPolicy.max_number_of_attempts must be at least 1")
        if self.backoff_coefficient < 1.0:
            raise ValueError("RetryPolicy.backoff_coefficient must be at least 1.0")
        _seconds(self.first_retry_interval, "first_retry_interval")
        if self.max_retry_interval is not None:
            _seconds(self.max_retry_interval, "max_retry_interval")
        if self.retry_timeout is not None:
            _seconds(self.retry_timeout, "retry_timeout")

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        delay = _seconds(self.first_retry_interval, "first_retry_interval") * (
            self.backoff_coefficient ** (attempt - 1)
        )
        if self.max_retry_interval is not None:
            delay = min(delay, _seconds(self.max_retry_interval, "max_retry_interval"))
        return delay

    @property
    def timeout_seconds(self) -> float | None:
        if self.retry_timeout is None:
            return None
        return _seconds(self.retry_timeout, "retry_timeout")
