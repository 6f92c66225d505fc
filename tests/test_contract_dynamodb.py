"""The DynamoDB + SQS backend: the shared backend contract, plus what only it promises.

Runs against real servers started by the test run on 127.0.0.1 (`servers.aws_local`): moto's
DynamoDB server (standing in for DynamoDB Local, whose licence this project cannot use) and
ElasticMQ for SQS. Every test gets its own table and queues (a unique prefix).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import pytest_asyncio
from aioflow_dynamodb import DynamoDBBackend
from servers.aws_local import AwsEndpoints, aws_endpoints  # noqa: F401 - fixture

from aioflow.backend import Backend
from aioflow.testing.conformance import BackendContractSuite


class TestDynamoDBBackendContract(BackendContractSuite):
    # SQS delays and visibility timeouts are whole seconds: leases and delays the tests wait
    # out are one second here.
    short_lease: ClassVar[float] = 1.0
    short_delay: ClassVar[float] = 1.0
    clock_slack: ClassVar[float] = 0.5

    @pytest_asyncio.fixture
    async def backend(self, aws_endpoints: AwsEndpoints  # noqa: F811
                      ) -> AsyncIterator[Backend]:  # type: ignore[override]
        async with DynamoDBBackend(**aws_endpoints.options()) as store:  # type: ignore[arg-type]
            yield store
