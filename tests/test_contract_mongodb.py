"""The MongoDB backend: the shared backend contract, plus what only this backend promises.

Runs against FerretDB (built and started by `tests/servers/ferretdb.py`) or the server named by
``AIOFLOW_TEST_MONGODB_URI``; every test has its own database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from aioflow_mongodb import MongoBackend
from servers.ferretdb import MongoServer, mongodb_database, mongodb_server  # noqa: F401

from aioflow.backend import Backend
from aioflow.testing.conformance import BackendContractSuite

# -- the shared contract ------------------------------------------------------------------------


class TestMongoBackendContract(BackendContractSuite):
    @pytest_asyncio.fixture
    async def backend(  # type: ignore[override]
        self, mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
    ) -> AsyncIterator[Backend]:
        async with MongoBackend(mongodb_server.url(mongodb_database)) as store:
            yield store
