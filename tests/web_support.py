"""Shared pieces of the HTTP management API tests (tests/test_web_*.py).

`flow` is the aioflow App the test services run; `serve(...)` starts a service around it on
127.0.0.1 through aiohttp's test server and client (a real socket, a real HTTP parser).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import aioflow
import aioflow.web

PREFIX = aioflow.web.DEFAULT_PREFIX

BackendUrl = Callable[[pytest.FixtureRequest, Path], str]

#: The backends the end-to-end and fuzz tests run the HTTP API on: each is a function of the
#: pytest request (to use a session fixture that starts a server) and a temporary directory,
#: returning a backend URL. Adding a backend is one line here, for example:
#:     pytest.param(lambda request, tmp: request.getfixturevalue("dynamodb_url"), id="dynamodb"),
BACKENDS: list[Any] = [
    pytest.param(lambda request, tmp: "memory://", id="memory"),
    pytest.param(lambda request, tmp: f"sqlite:///{tmp / 'web.db'}", id="sqlite"),
]

#: The end-to-end HTTP test (tests/test_web_server.py) also runs on the server-backed stores;
#: their session fixtures are imported there.
SERVER_BACKENDS: list[Any] = [
    *BACKENDS,
    pytest.param(lambda request, tmp: request.getfixturevalue("mongodb_server").url(
        request.getfixturevalue("mongodb_database")), id="mongodb"),
    pytest.param(lambda request, tmp: request.getfixturevalue("aws_endpoints").url(),
                 id="dynamodb"),
]

flow = aioflow.App()


@flow.activity
async def double(value: int) -> int:
    return value * 2


@flow.orchestrator
async def echo(ctx: aioflow.OrchestrationContext, value: Any) -> Any:
    """Returns its input unchanged."""
    return value


@flow.orchestrator
async def doubled_twice(ctx: aioflow.OrchestrationContext, value: int) -> int:
    """A two-step chain of activities: value * 4."""
    once = await ctx.call_activity(double, value)
    return await ctx.call_activity(double, once)


@flow.orchestrator
async def wait_for_approval(ctx: aioflow.OrchestrationContext, _: Any = None) -> Any:
    """Waits (forever) for an "approval" event and returns its data."""
    ctx.set_custom_status("waiting for approval")
    return await ctx.wait_for_external_event("approval")


@flow.orchestrator
async def collect(ctx: aioflow.OrchestrationContext, _: Any = None) -> list[Any]:
    """Collects the data of "item" events until one arrives with null data."""
    items: list[Any] = []
    while (item := await ctx.wait_for_external_event("item")) is not None:
        items.append(item)
    return items


@flow.entity
def counter(ctx: aioflow.EntityContext) -> Any:
    """A counter entity: add, get, delete."""
    value = ctx.get_state(lambda: 0)
    if ctx.operation_name == "add":
        ctx.set_state(value + ctx.get_input())
    elif ctx.operation_name == "delete":
        ctx.destruct_on_exit()
    elif ctx.operation_name != "get":
        raise ValueError(f"counter has no operation {ctx.operation_name!r}")
    return value


class OrderRejected(Exception):
    pass


@flow.orchestrator
async def always_fails(ctx: aioflow.OrchestrationContext, reason: str) -> None:
    raise OrderRejected(reason)


FAST_WORKER = {"poll_interval": 0.05, "shutdown_timeout": 2.0}


def service(backend: aioflow.Backend | str = "memory://", **options: Any) -> web.Application:
    """An aiohttp application running `flow` with the management API at its default prefix."""
    app = web.Application()
    options.setdefault("worker_options", FAST_WORKER)
    aioflow.web.setup(app, flow, backend, **options)
    return app


@contextlib.asynccontextmanager
async def serve(app: web.Application | None = None, **options: Any
                ) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """Serve `app` (default: `service(**options)`) on 127.0.0.1 and yield a client for it."""
    async with TestClient(TestServer(app if app is not None else service(**options))) as client:
        yield client


async def wait_for_status(client: TestClient[web.Request, web.Application], instance_id: str,
                          wanted: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """Poll GET /instances/{id} until its runtimeStatus is `wanted`; return the document."""
    deadline = asyncio.get_running_loop().time() + timeout
    document: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await client.get(f"{PREFIX}/instances/{instance_id}")
        document = await response.json()
        if document.get("runtimeStatus") == wanted:
            return document
        await asyncio.sleep(0.02)
    raise AssertionError(f"instance {instance_id} never became {wanted}; last seen: {document}")


async def error_of(response: Any, status: int) -> str:
    """Assert `response` is a JSON error with `status`; return its message."""
    text = await response.text()
    assert response.status == status, f"expected {status}, got {response.status}: {text}"
    assert response.content_type == "application/json", text
    body = await response.json()
    assert body["status"] == status and body["error"] and body["message"], body
    assert "Traceback" not in text, text
    return str(body["message"])
