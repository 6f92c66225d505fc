"""`SuiteBase`: the fixtures and helpers shared by the end-to-end conformance suites.

A backend provides one fixture, ``backend``; the suites start their own workers and clients.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from aioflow import Backend, Client, OrchestrationStatus, RuntimeStatus, Worker
from aioflow.testing.conformance import apps
from aioflow.testing.conformance.apps import app

__all__ = ["SuiteBase"]


class SuiteBase:
    """Fixtures and helpers for end-to-end tests on a backend; subclass a suite to use them.

    Provide an async fixture named ``backend`` that yields an open backend holding no instances,
    messages or activity tasks, and closes it when the test is done. The suite starts its own
    workers and clients on it.
    """

    pytestmark = pytest.mark.asyncio

    #: How often an idle worker polls the backend at most (seconds).
    poll_interval: ClassVar[float] = 0.02
    #: The length of the durable timers the tests wait out (seconds).
    timer_seconds: ClassVar[float] = 0.2
    #: How long a test waits for an instance to finish before failing (seconds).
    completion_timeout: ClassVar[float] = 15.0
    #: Extra `Worker` options for every worker the suite starts (a test's own options win),
    #: e.g. ``{"cache_size": 0}`` to make every step replay the history.
    worker_options: ClassVar[dict[str, Any]] = {}

    # -- fixtures -------------------------------------------------------------------------------

    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        """Override me: yield an open, empty backend and close it afterwards."""
        raise NotImplementedError(
            f"{type(self).__name__} must define an async fixture named 'backend' that yields an "
            f"open, empty aioflow backend (and closes it afterwards); see OrchestrationSuite"
        )
        yield  # pragma: no cover - makes this an async generator like the overrides

    def make_worker(self, backend: Backend, **options: Any) -> Worker:
        """A worker for the suite's app with short polling (not started)."""
        options = {"poll_interval": self.poll_interval, "shutdown_timeout": 1.0,
                   **self.worker_options, **options}
        return Worker(app, backend, **options)

    @pytest_asyncio.fixture
    async def worker(self, backend: Backend) -> AsyncIterator[Worker]:
        """A started worker; stopped (after opening every gate) when the test ends."""
        worker = self.make_worker(backend)
        await worker.start()
        try:
            yield worker
        finally:
            apps.open_all_gates()
            await worker.stop()

    @pytest_asyncio.fixture
    async def client(self, backend: Backend) -> Client:
        """A client that knows the suite's app (so unknown names fail at start_new)."""
        return Client(backend, app=app)

    # -- helpers --------------------------------------------------------------------------------

    async def finished(self, client: Client, instance_id: str,
                       timeout: float | None = None) -> OrchestrationStatus:
        """Wait until the instance is Completed, Failed or Terminated."""
        return await client.wait_for_completion(
            instance_id, timeout=self.completion_timeout if timeout is None else timeout)

    async def completed(self, client: Client, instance_id: str) -> OrchestrationStatus:
        """Wait for the instance and assert it Completed (showing why, if it did not)."""
        status = await self.finished(client, instance_id)
        assert status.runtime_status is RuntimeStatus.COMPLETED, (
            f"instance {instance_id!r} ({status.name}) should have Completed but is "
            f"{status.runtime_status.value}: {status.failure_details}\n"
            f"{status.failure_details.stack_trace if status.failure_details else ''}"
        )
        return status

    async def failed(self, client: Client, instance_id: str) -> OrchestrationStatus:
        """Wait for the instance and assert it Failed with failure details."""
        status = await self.finished(client, instance_id)
        assert status.runtime_status is RuntimeStatus.FAILED, (
            f"instance {instance_id!r} ({status.name}) should have Failed but is "
            f"{status.runtime_status.value} with output {status.output!r}"
        )
        assert status.failure_details is not None, "a Failed instance must have failure_details"
        return status

    async def run(self, client: Client, orchestrator: Any, input: Any = None,
                  **options: Any) -> OrchestrationStatus:
        """Start an orchestration and wait for it to complete successfully."""
        instance_id = await client.start_new(orchestrator, input, **options)
        return await self.completed(client, instance_id)

    async def wait_until(self, condition: Callable[[], Awaitable[bool] | bool], what: str,
                         timeout: float | None = None) -> None:
        """Poll `condition` until it is true; fail naming `what` did not happen."""
        deadline = time.monotonic() + (self.completion_timeout if timeout is None else timeout)
        while True:
            outcome = condition()
            if not isinstance(outcome, bool):
                outcome = await outcome
            if outcome:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting until {what}")
            await asyncio.sleep(0.01)

    async def status_of(self, client: Client, instance_id: str) -> OrchestrationStatus:
        status = await client.get_status(instance_id)
        assert status is not None, f"instance {instance_id!r} disappeared"
        return status

    async def wait_for_custom_status(self, client: Client, instance_id: str,
                                     value: Any) -> OrchestrationStatus:
        async def reached() -> bool:
            status = await self.status_of(client, instance_id)
            assert not status.is_terminal, (
                f"instance {instance_id!r} finished ({status.runtime_status.value}: "
                f"{status.failure_details or status.output!r}) before setting custom status "
                f"{value!r}")
            return bool(status.custom_status == value)

        await self.wait_until(reached, f"instance {instance_id!r} has custom status {value!r}")
        return await self.status_of(client, instance_id)

    async def wait_for_runtime_status(self, client: Client, instance_id: str,
                                      expected: RuntimeStatus) -> OrchestrationStatus:
        async def reached() -> bool:
            status = await self.status_of(client, instance_id)
            assert status.runtime_status is expected or not status.is_terminal, (
                f"instance {instance_id!r} finished ({status.runtime_status.value}: "
                f"{status.failure_details or status.output!r}) instead of becoming "
                f"{expected.value}")
            return status.runtime_status is expected

        await self.wait_until(reached, f"instance {instance_id!r} is {expected.value}")
        return await self.status_of(client, instance_id)

    async def wait_for_gate(self, gate: str) -> None:
        await self.wait_until(lambda: apps.gate_entered(gate),
                              f"an activity is waiting on gate {gate!r}")

    @staticmethod
    def unique(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"
