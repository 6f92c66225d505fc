"""Every orchestration feature, end to end, on the MongoDB backend (a fresh database per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from servers.ferretdb import MongoServer, mongodb_database, mongodb_server  # noqa: F401

import aioflow
from aioflow.testing.conformance import OrchestrationSuite


class TestMongoOrchestrations(OrchestrationSuite):
    @pytest_asyncio.fixture
    async def backend(  # type: ignore[override]
        self, mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
    ) -> AsyncIterator[aioflow.Backend]:
        store = aioflow.connect(mongodb_server.url(mongodb_database))
        try:
            yield store
        finally:
            await store.close()
