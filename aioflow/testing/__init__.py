"""The test kit: run orchestrations in tests without waiting for real time.

* `TestEnvironment` runs a worker and a client on an in-memory backend with a virtual clock that
  jumps forward whenever every instance is waiting on a durable timer, so a 72-hour timeout
  completes in milliseconds.
* `replay_history` replays a stored history against (changed) orchestrator code and raises
  `NonDeterminismError` if the code no longer matches it: the check to run before deploying a
  change while instances are in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aioflow.app import App
from aioflow.client import Client
from aioflow.engine import OrchestrationExecutor
from aioflow.events import HistoryEvent, decode_event
from aioflow.status import OrchestrationStatus, RuntimeStatus
from aioflow.testing.memory import MemoryBackend
from aioflow.worker import Worker

__all__ = ["TestEnvironment", "VirtualClock", "replay_history"]


class VirtualClock:
    """A clock that only moves when told to (epoch seconds)."""

    def __init__(self, start: float) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance_to(self, when: float) -> None:
        if when > self._now:
            self._now = when

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)


class TestEnvironment:
    """A worker, a client and an in-memory backend sharing a time-skipping virtual clock.

    ```python
    async with TestEnvironment(app) as env:
        iid = await env.client.start_new(approval_flow, "req-1")
        status = await env.wait_for_completion(iid)   # a 72 h timer fires at once
    ```

    Time skipping: when nothing is runnable (no activity running, no message visible, the worker
    idle) and some durable timer is pending, the clock jumps straight to it. Pass
    `time_skipping=False` to move time only with `skip()`.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, app: App, *, start_time: datetime | float | None = None,
                 time_skipping: bool = True, **worker_options: Any) -> None:
        if isinstance(start_time, datetime):
            if start_time.tzinfo is None:
                start_time = start_time.replace(tzinfo=UTC)
            start = start_time.timestamp()
        else:
            start = time.time() if start_time is None else float(start_time)
        self.app = app
        self.clock = VirtualClock(start)
        self.backend = MemoryBackend(clock=self.clock)
        self.client = Client(self.backend, app=app, clock=self.clock)
        worker_options.setdefault("poll_interval", 0.01)
        self.worker = Worker(app, self.backend, clock=self.clock, **worker_options)
        self.time_skipping = time_skipping
        self._skipper: asyncio.Task[None] | None = None

    @property
    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), tz=UTC)

    async def __aenter__(self) -> "TestEnvironment":
        await self.worker.start()
        if self.time_skipping:
            self._skipper = asyncio.create_task(self._skip_when_idle())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._skipper is not None:
            self._skipper.cancel()
            await asyncio.gather(self._skipper, return_exceptions=True)
        await self.worker.stop()

    async def skip(self, seconds: float) -> None:
        """Move the virtual clock forward by `seconds` and let due timers fire."""
        self.clock.advance(seconds)
        self.backend.wake_waiters()
        await asyncio.sleep(0)

    async def wait_for_completion(self, instance_id: str, *,
                                  timeout: float = 30.0) -> OrchestrationStatus:
        """Wait (real seconds) for the instance to finish, skipping virtual time as needed."""
        return await self.client.wait_for_completion(instance_id, timeout=timeout)

    def _idle(self) -> bool:
        w = self.worker
        return not w._running_activities and not w._results and w._busy is None

    async def _skip_when_idle(self) -> None:
        quiet = 0
        last = None
        while True:
            await asyncio.sleep(0.003)
            progress = (sum(self.worker.stats.values()), self.clock())
            if self._idle() and progress == last:
                quiet += 1
            else:
                quiet = 0
            last = progress
            if quiet < 3:
                continue
            due = self.backend.next_visible_at()
            if due is not None and due > self.clock():
                self.clock.advance_to(due)
                self.backend.wake_waiters()
                quiet = 0


def replay_history(app: App, history: Iterable[HistoryEvent | bytes], *,
                   instance_id: str = "replay-check") -> RuntimeStatus:
    """Replay `history` with the orchestrators registered on `app`.

    Returns the runtime status the replay reaches. Raises `NonDeterminismError` (naming the step
    and both commands) when the code would now make different durable calls than the history
    records. Use it in CI on histories saved from production (`Client.get_history`).
    """
    events = [decode_event(e) if isinstance(e, (bytes, bytearray)) else e for e in history]
    executor = OrchestrationExecutor(app, instance_id)
    try:
        executor.load(events)
        if executor.replay_error is not None:
            raise executor.replay_error
        return executor.runtime_status
    finally:
        executor.close()
