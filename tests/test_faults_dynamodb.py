"""Crash recovery on the DynamoDB + SQS backend: every write fails in turn, before and after it
is applied, and the workflow still completes exactly once with the right output."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from servers.aws_local import AwsEndpoints, aws_endpoints  # noqa: F401 - fixture

from aioflow.backend import Backend
from aioflow.connect import connect
from aioflow.testing.conformance import FaultInjectionSuite


class TestDynamoDBBackendFaults(FaultInjectionSuite):
    @pytest_asyncio.fixture
    async def backend(self, aws_endpoints: AwsEndpoints  # noqa: F811
                      ) -> AsyncIterator[Backend]:
        store = connect(aws_endpoints.url())
        try:
            yield store
        finally:
            await store.close()
