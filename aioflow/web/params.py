"""Reading requests: query parameters, path parameters and JSON bodies, refused early.

Each function either returns a well-typed value or raises `ApiError` with a 4xx status whose
message names the parameter, says what was wrong and what is expected. Nothing here lets a
malformed request reach the client or the backend.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import hdrs, web

from aioflow.client import validate_instance_id
from aioflow.status import RuntimeStatus
from aioflow.web.errors import ApiError

__all__ = [
    "boolean",
    "instance_id",
    "json_body",
    "optional_text",
    "page_size",
    "runtime_statuses",
    "seconds",
    "timestamp",
]

MAX_PAGE_SIZE = 1000
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_MAX_TEXT = 4096


def _query(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise ApiError(400, f"query parameter {name!r} was given {len(values)} times; give it "
                            f"at most once")
    return values[0] if values else None


def boolean(request: web.Request, name: str, default: bool) -> bool:
    """A `true`/`false` query parameter (also 1/0, yes/no; any case)."""
    raw = _query(request, name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, f"query parameter {name!r} must be true or false, not {raw[:80]!r}")


def timestamp(request: web.Request, name: str) -> datetime | None:
    """An ISO 8601 date or date-time query parameter (UTC unless it has an offset)."""
    raw = _query(request, name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.strip())
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value.timestamp()  # out-of-range after the offset is applied raises here
    except (ValueError, OverflowError):
        raise ApiError(
            400, f"query parameter {name!r} must be an ISO 8601 date-time such as "
                 f"2024-05-01T12:00:00Z, not {raw[:80]!r}") from None
    return value


def runtime_statuses(request: web.Request, name: str = "runtimeStatus"
                     ) -> frozenset[RuntimeStatus] | None:
    """A comma-separated list of runtime status names (any case), repeatable."""
    raws = request.query.getall(name, [])
    if not raws:
        return None
    by_name = {status.value.lower(): status for status in RuntimeStatus}
    found: set[RuntimeStatus] = set()
    for raw in raws:
        for item in raw.split(","):
            status = by_name.get(item.strip().lower())
            if status is None:
                valid = ", ".join(s.value for s in RuntimeStatus)
                raise ApiError(400, f"query parameter {name!r} has an unknown runtime status "
                                    f"{item.strip()[:80]!r}; valid statuses: {valid} "
                                    f"(comma-separated)")
            found.add(status)
    return frozenset(found)


def page_size(request: web.Request, name: str = "top", default: int = 100) -> int:
    """A page size: a whole number from 1 to `MAX_PAGE_SIZE`."""
    raw = _query(request, name)
    if raw is None:
        return default
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9 \
            or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise ApiError(400, f"query parameter {name!r} must be a whole number from 1 to "
                            f"{MAX_PAGE_SIZE}, not {raw[:80]!r}")
    return int(text)


def seconds(request: web.Request, name: str, *, default: float | None, maximum: float,
            minimum: float = 0.0) -> float | None:
    """A duration in seconds (a number from `minimum` to `maximum`)."""
    raw = _query(request, name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not minimum <= value <= maximum:  # also false for NaN
        raise ApiError(400, f"query parameter {name!r} must be a number of seconds from "
                            f"{minimum:g} to {maximum:g}, not {raw[:80]!r}")
    return value


def optional_text(request: web.Request, name: str) -> str | None:
    """A free-text query parameter of at most 4096 characters."""
    raw = _query(request, name)
    if raw is not None and len(raw) > _MAX_TEXT:
        raise ApiError(400, f"query parameter {name!r} is {len(raw)} characters long; the "
                            f"limit is {_MAX_TEXT}")
    return raw


def instance_id(request: web.Request, name: str = "instanceId") -> str:
    """The instance id in the path, checked like `Client` checks ids."""
    raw = request.match_info[name]
    try:
        return validate_instance_id(raw)
    except ValueError as exc:
        raise ApiError(400, f"path parameter {name!r}: {exc}") from None


async def json_body(request: web.Request, max_size: int) -> Any:
    """The request body as a JSON value; an empty body is `None` (JSON null).

    A non-empty body must be sent with `Content-Type: application/json` (or a `+json` type) in
    UTF-8 and be at most `max_size` bytes: otherwise 415, 413 or 400.
    """
    declared = request.content_length
    if declared is not None and declared > max_size:
        raise _too_large(max_size)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body.extend(chunk)
        if len(body) > max_size:
            raise _too_large(max_size)
    if not body:
        return None
    content_type = request.content_type.lower()
    if hdrs.CONTENT_TYPE not in request.headers or not (
            content_type == "application/json" or content_type.endswith("+json")):
        got = request.headers.get(hdrs.CONTENT_TYPE, "none")
        raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: "
                            f"application/json', not {got[:80]!r} (with curl: -H "
                            f"'Content-Type: application/json')")
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise ApiError(415, f"the request body must be UTF-8 JSON, not charset {charset[:40]!r}")
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _too_large(max_size: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the limit of {max_size} bytes; "
                         f"send a smaller payload (store large data elsewhere and pass a "
                         f"reference)")
