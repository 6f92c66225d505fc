"""Every orchestration feature, end to end, on the in-memory backend.

The suite runs twice: with the worker's instance cache (the normal case: a step costs only the
new events) and with `cache_size=0`, where every step rebuilds the orchestration by replaying
its history, so each feature is also checked to replay deterministically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest_asyncio

from aioflow.testing.conformance import OrchestrationSuite
from aioflow.testing.memory import MemoryBackend


class TestMemoryOrchestrations(OrchestrationSuite):
    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[MemoryBackend]:
        async with MemoryBackend() as store:
            yield store


class TestMemoryOrchestrationsReplayingEveryStep(TestMemoryOrchestrations):
    worker_options: ClassVar[dict[str, Any]] = {"cache_size": 0}
