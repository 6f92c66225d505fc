"""Worker processes sharing one DynamoDB table and its SQS queues, with and without being
killed by SIGKILL (moto + ElasticMQ on 127.0.0.1)."""

from __future__ import annotations

import pytest
from servers.aws_local import AwsEndpoints, aws_endpoints  # noqa: F401 - fixture

from aioflow.testing.conformance import MultiProcessSuite


class TestDynamoDBWorkerProcesses(MultiProcessSuite):
    @pytest.fixture
    def backend_url(self, aws_endpoints: AwsEndpoints) -> str:  # noqa: F811
        return aws_endpoints.url()
