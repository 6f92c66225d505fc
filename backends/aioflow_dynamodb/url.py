"""`open_backend(url)`: the ``dynamodb:`` URL scheme (entry point ``aioflow.backends: dynamodb``).

URL form::

    dynamodb://?region=eu-west-1&table_prefix=myapp&queue_prefix=myapp
    dynamodb://?region=eu-west-1&table_prefix=myapp&queue_prefix=myapp
        &endpoint_url=http://127.0.0.1:8000&sqs_endpoint_url=http://127.0.0.1:9324&create=false

Parameters:

* ``region`` (required): the AWS region of the table and the queues.
* ``table_prefix`` (required): the table is ``{table_prefix}-aioflow``.
* ``queue_prefix`` (default: ``table_prefix``): the queues are
  ``{queue_prefix}-aioflow-orchestrations`` and ``{queue_prefix}-aioflow-activities``.
* ``endpoint_url``: a DynamoDB endpoint other than AWS's (a local server); also used for SQS
  unless ``sqs_endpoint_url`` is given.
* ``sqs_endpoint_url``: an SQS endpoint other than AWS's.
* ``create`` (``true``/``false``, default true): create the table and queues on first use.
* ``connect_timeout`` (seconds, default 3), ``sweep_interval`` and ``sweep_grace`` (seconds,
  default 10 each): see `DynamoDBBackend`.

Credentials are never part of the URL: the standard AWS chain provides them (environment,
profile, instance/task role).
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aioflow.errors import ConfigurationError

from .backend import DynamoDBBackend

__all__ = ["open_backend", "parse_url"]

_PARAMETERS = ("region", "table_prefix", "queue_prefix", "endpoint_url", "sqs_endpoint_url",
               "create", "connect_timeout", "sweep_interval", "sweep_grace")
_EXAMPLE = "dynamodb://?region=eu-west-1&table_prefix=myapp&queue_prefix=myapp"
_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
# Table names allow [A-Za-z0-9_.-] (3-255); queue names [A-Za-z0-9_-] (up to 80 with suffix).
_TABLE_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_QUEUE_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,50}$")


def parse_url(url: str) -> dict[str, Any]:
    """The `DynamoDBBackend` keyword arguments a ``dynamodb:`` URL asks for.

    Raises `ConfigurationError` saying what is wrong and what to write instead.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"malformed DynamoDB backend URL {url!r}: {exc}; write "
                                 f"{_EXAMPLE}") from exc
    if parts.scheme.lower() != "dynamodb":
        raise ConfigurationError(f"not a DynamoDB backend URL: {url!r} (the scheme must be "
                                 f"'dynamodb'); write {_EXAMPLE}")
    if parts.netloc or parts.path not in ("", "/"):
        raise ConfigurationError(
            f"DynamoDB backend URL {url!r} has a host or path; everything goes in the query "
            f"string, e.g. {_EXAMPLE} (a local server: add &endpoint_url=http://HOST:PORT)")
    if parts.fragment:
        raise ConfigurationError(f"DynamoDB backend URL {url!r} has a fragment; remove it")
    raw: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _PARAMETERS:
            raise ConfigurationError(f"unknown parameter {key!r} in DynamoDB backend URL "
                                     f"{url!r}; valid parameters: {', '.join(_PARAMETERS)}")
        if key in raw:
            raise ConfigurationError(f"parameter {key!r} is given twice in {url!r}")
        raw[key] = value
    for required in ("region", "table_prefix"):
        if not raw.get(required):
            raise ConfigurationError(f"DynamoDB backend URL {url!r} lacks {required}=...; "
                                     f"write {_EXAMPLE}")
    options: dict[str, Any] = {}
    if not _REGION.match(raw["region"]):
        raise ConfigurationError(f"invalid region={raw['region']!r} in {url!r}: give an AWS "
                                 f"region name such as eu-west-1 or us-east-1")
    options["region"] = raw["region"]
    if not _TABLE_PREFIX.match(raw["table_prefix"]):
        raise ConfigurationError(
            f"invalid table_prefix={raw['table_prefix']!r} in {url!r}: use 1-200 letters, "
            f"digits, '_', '-' or '.'")
    options["table_prefix"] = raw["table_prefix"]
    queue_prefix = raw.get("queue_prefix") or raw["table_prefix"]
    if not _QUEUE_PREFIX.match(queue_prefix):
        raise ConfigurationError(
            f"invalid queue_prefix={queue_prefix!r} in {url!r}: SQS queue names allow 1-50 "
            f"letters, digits, '_' or '-' here (no '.')")
    options["queue_prefix"] = queue_prefix
    for key in ("endpoint_url", "sqs_endpoint_url"):
        if key in raw:
            endpoint = urlsplit(raw[key])
            if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
                raise ConfigurationError(f"invalid {key}={raw[key]!r} in {url!r}: give an "
                                         f"http(s) URL such as http://127.0.0.1:8000")
            options[key] = raw[key]
    if "create" in raw:
        flag = raw["create"].lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigurationError(f"invalid create={raw['create']!r} in {url!r}: use true "
                                     f"or false")
        options["create"] = flag in ("true", "1", "yes")
    for key in ("connect_timeout", "sweep_interval", "sweep_grace"):
        if key in raw:
            try:
                seconds = float(raw[key])
            except ValueError:
                seconds = -1.0
            if not (seconds > 0 and math.isfinite(seconds)):
                raise ConfigurationError(f"invalid {key}={raw[key]!r} in {url!r}: give "
                                         f"seconds, a positive number")
            options[key] = seconds
    return options


def open_backend(url: str) -> DynamoDBBackend:
    """Create a `DynamoDBBackend` from a ``dynamodb:`` URL (see the module docstring).

    Cheap and synchronous: nothing is contacted until the backend is first used.
    """
    return DynamoDBBackend(**parse_url(url))
