"""aioflow_dynamodb: the DynamoDB + SQS backend for aioflow (serverless scale-out on AWS).

Select it with ``dynamodb://?region=eu-west-1&table_prefix=myapp&queue_prefix=myapp``
(entry point ``aioflow.backends: dynamodb``) or construct `DynamoDBBackend(...)` directly.
See `aioflow_dynamodb.backend` for the design and guarantees and `aioflow_dynamodb.url` for
the URL form.
"""

from .backend import DynamoDBBackend
from .url import open_backend, parse_url

__all__ = ["DynamoDBBackend", "open_backend", "parse_url"]
