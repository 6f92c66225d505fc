"""The AWS side: clients, error translation, table and queue set-up, call counting.

Nothing here knows about aioflow's data model; `backend` builds on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from typing import Any

import botocore.exceptions  # type: ignore[import-untyped]
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]

from aioflow.errors import ConfigurationError

logger = logging.getLogger("aioflow_dynamodb")

#: SQS's longest long poll, and its largest per-message delay.
MAX_WAIT_SECONDS = 20
MAX_DELAY_SECONDS = 900
#: Longest visibility timeout we set (SQS allows 12 hours).
MAX_VISIBILITY_SECONDS = 11 * 3600
#: Hints are kept for SQS's maximum retention: 14 days.
RETENTION_SECONDS = 14 * 24 * 3600

_CREDENTIALS_HELP = (
    "aioflow uses the standard AWS credential chain: set AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), or AWS_PROFILE "
    "naming a profile in ~/.aws/credentials, or run where an instance, task or pod role "
    "provides them"
)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def cancellation_codes(exc: botocore.exceptions.ClientError) -> list[str]:
    """The per-action reasons of a cancelled TransactWriteItems ("None" for actions that were
    fine). Read from the structured response, or from the message when a server leaves it
    out (moto does: "... reasons [ConditionalCheckFailed, None]")."""
    reasons = exc.response.get("CancellationReasons")
    if reasons:
        return [str(r.get("Code", "None")) for r in reasons]
    message = str(exc.response.get("Error", {}).get("Message", ""))
    if "[" in message and message.rstrip().endswith("]"):
        inner = message[message.rindex("[") + 1:message.rstrip().rindex("]")]
        return [part.strip() for part in inner.split(",")]
    return []


class Aws:
    """One DynamoDB client and one SQS client, opened together, with every call counted.

    `calls` counts API calls by ``"dynamodb.Operation"`` / ``"sqs.Operation"``; the benchmark
    reads it to report calls per orchestration step.
    """

    def __init__(self, *, region: str, endpoint_url: str | None, sqs_endpoint_url: str | None,
                 connect_timeout: float) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.sqs_endpoint_url = sqs_endpoint_url if sqs_endpoint_url is not None else endpoint_url
        self.connect_timeout = connect_timeout
        self.calls: collections.Counter[str] = collections.Counter()
        self._stack = contextlib.AsyncExitStack()
        self._ddb: Any = None
        self._sqs: Any = None

    def describe_endpoint(self, service: str) -> str:
        client = self._ddb if service == "dynamodb" else self._sqs
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
        return f"{service} endpoint {url or '(default)'} in region {self.region!r}"

    async def open(self) -> None:
        session = get_session()
        config = AioConfig(
            connect_timeout=self.connect_timeout, read_timeout=MAX_WAIT_SECONDS + 10,
            retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=64,
        )
        self._ddb = await self._stack.enter_async_context(session.create_client(
            "dynamodb", region_name=self.region, endpoint_url=self.endpoint_url, config=config))
        self._sqs = await self._stack.enter_async_context(session.create_client(
            "sqs", region_name=self.region, endpoint_url=self.sqs_endpoint_url, config=config))

    async def close(self) -> None:
        await self._stack.aclose()

    async def ddb(self, operation: str, **kwargs: Any) -> Any:
        """Call a DynamoDB operation (CamelCase name, as in the API reference)."""
        self.calls["dynamodb." + operation] += 1
        return await getattr(self._ddb, _snake(operation))(**kwargs)

    async def sqs(self, operation: str, **kwargs: Any) -> Any:
        self.calls["sqs." + operation] += 1
        return await getattr(self._sqs, _snake(operation))(**kwargs)

    # -- set-up ----------------------------------------------------------------------------

    async def check(self, coro_factory: Any, service: str) -> Any:
        """Run a first call and turn connection and credential failures into a
        `ConfigurationError` naming the endpoint, the region and what is missing."""
        where = self.describe_endpoint(service)
        try:
            return await coro_factory()
        except botocore.exceptions.NoCredentialsError as exc:
            raise ConfigurationError(
                f"no AWS credentials found for the {where}: {_CREDENTIALS_HELP}") from exc
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ConnectionClosedError) as exc:
            raise ConfigurationError(
                f"cannot reach the {where}: {exc}. Check the region and endpoint_url / "
                f"sqs_endpoint_url in the backend URL, and that the server is running") from exc
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in ("UnrecognizedClientException", "InvalidClientTokenId",
                        "InvalidSignatureException", "SignatureDoesNotMatch",
                        "ExpiredToken", "ExpiredTokenException"):
                raise ConfigurationError(
                    f"the {where} rejected the AWS credentials ({code}): {exc}. "
                    f"{_CREDENTIALS_HELP}") from exc
            if code in ("AccessDeniedException", "AccessDenied"):
                raise ConfigurationError(
                    f"access denied by the {where}: {exc}. The README of aioflow_dynamodb "
                    f"lists the IAM permissions the backend needs") from exc
            raise

    async def ensure_table(self, table: str, *, create: bool) -> None:
        async def describe() -> Any:
            return await self.ddb("DescribeTable", TableName=table)

        try:
            description = await self.check(describe, "dynamodb")
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            if not create:
                raise ConfigurationError(
                    f"DynamoDB table {table!r} does not exist in region {self.region!r} and "
                    f"the backend URL says create=false: create it (see the README for its "
                    f"schema) or drop create=false") from exc
            await self._create_table(table)
            description = await self._wait_active(table)
        if description["Table"].get("TableStatus") != "ACTIVE":
            await self._wait_active(table)

    async def _create_table(self, table: str) -> None:
        attrs = [("pk", "S"), ("sk", "S"), ("q", "S"), ("ix", "S"), ("ck", "S"),
                 ("xs", "S"), ("xa", "N")]
        try:
            await self.ddb(
                "CreateTable", TableName=table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": a, "AttributeType": t} for a, t in attrs],
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                           {"AttributeName": "sk", "KeyType": "RANGE"}],
                LocalSecondaryIndexes=[{
                    "IndexName": "pending",
                    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"},
                                  {"AttributeName": "q", "KeyType": "RANGE"}],
                    "Projection": {"ProjectionType": "ALL"},
                }],
                GlobalSecondaryIndexes=[
                    {"IndexName": "by-created",
                     "KeySchema": [{"AttributeName": "ix", "KeyType": "HASH"},
                                   {"AttributeName": "ck", "KeyType": "RANGE"}],
                     "Projection": {"ProjectionType": "KEYS_ONLY"}},
                    {"IndexName": "sweep",
                     "KeySchema": [{"AttributeName": "xs", "KeyType": "HASH"},
                                   {"AttributeName": "xa", "KeyType": "RANGE"}],
                     "Projection": {"ProjectionType": "KEYS_ONLY"}},
                ],
            )
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) != "ResourceInUseException":  # another process creates it
                raise

    async def _wait_active(self, table: str) -> Any:
        for _ in range(600):
            description = await self.ddb("DescribeTable", TableName=table)
            status = description["Table"].get("TableStatus")
            indexes = description["Table"].get("GlobalSecondaryIndexes", [])
            if status == "ACTIVE" and all(i.get("IndexStatus", "ACTIVE") == "ACTIVE"
                                          for i in indexes):
                with contextlib.suppress(botocore.exceptions.ClientError):
                    await self.ddb("UpdateTimeToLive", TableName=table, TimeToLiveSpecification={
                        "Enabled": True, "AttributeName": "ttl"})
                return description
            await asyncio.sleep(0.5)
        raise ConfigurationError(f"DynamoDB table {table!r} did not become ACTIVE in 5 minutes")

    async def ensure_queue(self, name: str, *, create: bool) -> str:
        async def get_url() -> Any:
            return await self.sqs("GetQueueUrl", QueueName=name)

        try:
            response = await self.check(get_url, "sqs")
            return str(response["QueueUrl"])
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in ("AWS.SimpleQueueService.NonExistentQueue",
                                       "QueueDoesNotExist"):
                raise
            if not create:
                raise ConfigurationError(
                    f"SQS queue {name!r} does not exist in region {self.region!r} and the "
                    f"backend URL says create=false: create it or drop create=false") from exc
        response = await self.sqs("CreateQueue", QueueName=name, Attributes={
            "MessageRetentionPeriod": str(RETENTION_SECONDS), "VisibilityTimeout": "30"})
        return str(response["QueueUrl"])


async def backoff(attempt: int) -> None:
    await asyncio.sleep(min(0.5, 0.01 * (2 ** attempt)) * (0.5 + random.random()))


def _snake(operation: str) -> str:
    out = []
    for i, ch in enumerate(operation):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
