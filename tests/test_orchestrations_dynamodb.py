"""Every orchestration feature, end to end, on the DynamoDB + SQS backend (moto + ElasticMQ on
127.0.0.1; a fresh table and queues per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from servers.aws_local import AwsEndpoints, aws_endpoints  # noqa: F401 - fixture

import aioflow
from aioflow.testing.conformance import OrchestrationSuite


class TestDynamoDBOrchestrations(OrchestrationSuite):
    @pytest_asyncio.fixture
    async def backend(self, aws_endpoints: AwsEndpoints  # noqa: F811
                      ) -> AsyncIterator[aioflow.Backend]:
        store = aioflow.connect(aws_endpoints.url())
        try:
            yield store
        finally:
            await store.close()
