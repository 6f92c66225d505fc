"""Responses for users' own handlers: the async HTTP API pattern in one call.

A handler that starts an orchestration answers with `create_check_status_response`: 202
Accepted, a `Location` header to poll, a `Retry-After` header, and the check-status payload
(the URLs that query, signal, terminate, suspend, resume and purge the instance through the
management API). `wait_for_completion_or_create_check_status_response` first waits a little
for the instance to finish, and answers 200 with its output when it does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import hdrs, web

from aioflow.errors import ConfigurationError
from aioflow.status import OrchestrationStatus, RuntimeStatus
from aioflow.web.errors import ApiError, error_response, json_response
from aioflow.web.keys import CLIENT_KEY, SETTINGS_KEY, ApiSettings
from aioflow.web.shapes import instance_document, management_urls

__all__ = [
    "create_check_status_response",
    "http_management_payload",
    "management_api_url",
    "polling_headers",
    "wait_for_completion_or_create_check_status_response",
]


def _settings(request: web.Request) -> ApiSettings:
    settings = request.config_dict.get(SETTINGS_KEY)
    if settings is None:
        raise ConfigurationError(
            "aioflow is not set up on this aiohttp application: call "
            "aioflow.web.setup(app, flow_app, backend) before starting it")
    return settings


def management_api_url(request: web.Request) -> str:
    """The absolute URL of the management API, as seen by the client of `request`.

    It is `public_url` when `setup` was given one (do that behind a reverse proxy), otherwise
    the scheme and `Host` of the request, followed by the management API's prefix.
    """
    settings = _settings(request)
    if settings.prefix is None:
        raise ConfigurationError(
            "the management API is not mounted (setup(..., prefix=None)), so there are no "
            "URLs to manage instances with; pass a prefix to setup()")
    if settings.public_url is not None:
        return settings.public_url.rstrip("/") + settings.prefix
    try:
        origin = str(request.url.origin())
    except ValueError:
        raise ApiError(400, f"the request's Host header {request.host[:80]!r} is not a valid "
                            f"host name") from None
    return origin + settings.prefix


def http_management_payload(request: web.Request, instance_id: str) -> dict[str, str]:
    """The check-status payload for `instance_id`: `id`, `statusQueryGetUri`,
    `sendEventPostUri`, `terminatePostUri`, `suspendPostUri`, `resumePostUri` and
    `purgeHistoryDeleteUri` (absolute URLs; see `management_api_url`)."""
    return management_urls(management_api_url(request), instance_id)


def create_check_status_response(request: web.Request, instance_id: str) -> web.Response:
    """202 Accepted with the check-status payload, `Location: <statusQueryGetUri>` and
    `Retry-After: <seconds>`: what a handler that started `instance_id` should answer."""
    payload = http_management_payload(request, instance_id)
    return json_response(payload, status=202, headers=_polling_headers(request, payload))


def polling_headers(request: web.Request, instance_id: str) -> dict[str, str]:
    """`Location` (the instance's statusQueryGetUri) and `Retry-After`, for 202 answers."""
    return _polling_headers(request, http_management_payload(request, instance_id))


def _polling_headers(request: web.Request, payload: dict[str, str]) -> dict[str, str]:
    return {hdrs.LOCATION: payload["statusQueryGetUri"],
            hdrs.RETRY_AFTER: str(_settings(request).retry_after)}


async def wait_for_completion_or_create_check_status_response(
    request: web.Request, instance_id: str, timeout: float = 10.0, *,
    polling_interval: float = 1.0,
) -> web.Response:
    """Wait up to `timeout` seconds for `instance_id` to finish.

    * Completed in time: 200 with the orchestration's output as the JSON body.
    * Failed or Terminated in time: 200 with the instance's status document (its
      `runtimeStatus`, and `failureDetails` for a failure).
    * Still running after `timeout`: the 202 of `create_check_status_response`.
    * No such instance: 404 with a JSON error.

    The status is read again at growing intervals of at most `polling_interval` seconds.
    """
    if not timeout >= 0 or not polling_interval > 0:
        raise ValueError(f"timeout must be >= 0 and polling_interval > 0 (got {timeout!r}, "
                         f"{polling_interval!r})")
    status = await _wait(request, instance_id, timeout, polling_interval)
    if status is None:
        return error_response(404, f"no orchestration instance with id {instance_id!r} exists")
    if not status.runtime_status.is_terminal:
        return create_check_status_response(request, instance_id)
    body: Any = status.output if status.runtime_status is RuntimeStatus.COMPLETED \
        else instance_document(status)
    return json_response(body, status=200)


async def _wait(request: web.Request, instance_id: str, timeout: float,
                polling_interval: float) -> OrchestrationStatus | None:
    client = request.config_dict[CLIENT_KEY]
    deadline = time.monotonic() + timeout
    delay = min(0.01, polling_interval)
    while True:
        status = await client.get_status(instance_id)
        remaining = deadline - time.monotonic()
        if status is None or status.runtime_status.is_terminal or remaining <= 0:
            return status
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, polling_interval)
