"""Worker processes sharing one DynamoDB table and its SQS queues, with and without being
killed by SIGKILL (moto + ElasticMQ on 127.0.0.1)."""

from __future__ import annotations

import pytest
from servers.aws_local import AwsEndpoints, aws_endpoints  # noqa: F401 - fixture

from aioflow.testing.conformance import MultiProcessSuite


class TestDynamoDBWorkerProcesses(MultiProcessSuite):
    # Recovery is slower here than on SQLite: a hint a killed worker had received stays
    # invisible for SQS's 30 s receive timeout, and the sweeper re-sends lost ones after its
    # 10 s grace, on a single-threaded moto. After the chaos test kills every worker at once,
    # an instance can legitimately need well over the default 60 s (seen once in CI).
    completion_timeout = 180.0

    @pytest.fixture
    def backend_url(self, aws_endpoints: AwsEndpoints) -> str:  # noqa: F811
        return aws_endpoints.url()
