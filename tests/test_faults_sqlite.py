"""Crash recovery on the SQLite backend: every write fails in turn, before and after it is
applied, and the workflow still completes exactly once with the right output."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from aioflow.backend import Backend
from aioflow.connect import connect
from aioflow.testing.conformance import FaultInjectionSuite


class TestSqliteBackendFaults(FaultInjectionSuite):
    @pytest_asyncio.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[Backend]:
        store = connect(f"sqlite:///{tmp_path / 'faults.db'}")
        try:
            yield store
        finally:
            await store.close()
