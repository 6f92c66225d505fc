"""Errors of the HTTP management API, always answered as JSON.

Every refusal is a 4xx response whose JSON body says what was wrong and what to do:

    {"status": 400, "error": "Bad Request", "message": "query parameter 'top' must be ..."}

`json_error_middleware` guarantees that shape for every response of the application it is
installed on: `ApiError`s raised by handlers, aiohttp's own HTTP errors (unknown route, method
not allowed, oversize body) and, as a last resort, unexpected exceptions, which become a bare
500 whose body holds no traceback or exception text (the traceback is logged on the server, on
the `aioflow.web` logger). Bad input never takes that last path: it is refused with a 4xx by
the code that parses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import hdrs, web

__all__ = ["ApiError", "error_response", "json_error_middleware", "json_response"]

logger = logging.getLogger("aioflow.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A request the API refuses; answered with `status` and a JSON body holding `message`.

    Raise it from a handler or an authoriser. `headers` are added to the response (for example
    `WWW-Authenticate` with a 401).
    """

    def __init__(self, status: int, message: str, *,
                 headers: Mapping[str, str] | None = None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"an ApiError status must be 4xx or 5xx, not {status}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def json_response(data: Any, *, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A response whose body is `data` encoded as JSON (UTF-8)."""
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json", charset="utf-8")


def error_response(status: int, message: str, *,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """The JSON error document for `status`: `{"status", "error", "message"}`."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return json_response({"status": status, "error": phrase, "message": message},
                         status=status, headers=headers)


# Headers of aiohttp's own HTTP errors that describe their text body, which we replace.
_BODY_HEADERS = {hdrs.CONTENT_TYPE.lower(), hdrs.CONTENT_LENGTH.lower()}


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    default_text = f"{exc.status}: {exc.reason}"
    text = exc.text if exc.text and exc.text != default_text else ""
    if exc.status == 404:
        message = text or "no such route in the management API; see its OpenAPI document " \
                          "(GET <prefix>/openapi.json) for the routes it has"
    elif exc.status == 405:
        allowed = exc.headers.get(hdrs.ALLOW, "")
        message = f"method not allowed on this route; allowed: {allowed or 'none'}"
    elif exc.status == 413:
        message = f"request body too large: {text or exc.reason}"
    else:
        message = text or exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    return error_response(exc.status, message, headers=headers)


@web.middleware
async def json_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error of the application as a JSON document, never with a traceback.

    `ApiError` and aiohttp HTTP errors keep their status. Any other exception is logged with
    its traceback (logger `aioflow.web`, level ERROR) and answered with a generic JSON 500.
    """
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not errors
            raise
        return _from_http_exception(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unexpected error while handling %s %s", request.method,
                         request.rel_url)
        return error_response(
            500, "internal server error: the server failed to handle this request and logged "
                 "the cause; retry later, and report it if it persists")
