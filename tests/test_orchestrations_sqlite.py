"""Every orchestration feature, end to end, on the SQLite backend (a fresh file per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

import aioflow
from aioflow.testing.conformance import OrchestrationSuite


class TestSqliteOrchestrations(OrchestrationSuite):
    @pytest_asyncio.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[aioflow.Backend]:
        store = aioflow.connect(f"sqlite:///{tmp_path / 'orchestrations.db'}")
        try:
            yield store
        finally:
            await store.close()
