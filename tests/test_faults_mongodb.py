"""Crash recovery on the MongoDB backend: every write fails in turn, before and after it is
applied, and the workflow still completes exactly once with the right output."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from servers.ferretdb import MongoServer, mongodb_database, mongodb_server  # noqa: F401

from aioflow.backend import Backend
from aioflow.connect import connect
from aioflow.testing.conformance import FaultInjectionSuite


class TestMongoBackendFaults(FaultInjectionSuite):
    @pytest_asyncio.fixture
    async def backend(  # type: ignore[override]
        self, mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
    ) -> AsyncIterator[Backend]:
        store = connect(mongodb_server.url(mongodb_database))
        try:
            yield store
        finally:
            await store.close()
