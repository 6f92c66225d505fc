"""End to end: the async HTTP API pattern against a real aiohttp server on 127.0.0.1.

A service embeds aioflow the way the README shows (its own route starts an orchestration and
answers with `create_check_status_response`), runs with `web.AppRunner` and a TCP site like
production code, and a plain HTTP client drives it only through the URLs and headers the
answers contain, honouring `Retry-After`, as a Durable Functions client would.

It runs on every backend in `web_support.SERVER_BACKENDS` (adding one there adds it here).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from servers.aws_local import aws_endpoints  # noqa: F401
from servers.ferretdb import mongodb_database, mongodb_server  # noqa: F401
from web_support import PREFIX, SERVER_BACKENDS, BackendUrl, service

import aioflow.web


@pytest.fixture(params=SERVER_BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url: BackendUrl = request.param
    return url(request, tmp_path)


async def start_order(request: web.Request) -> web.Response:
    """The user's own route: start the chain and answer with the check-status response."""
    order = await request.json()
    client = request.config_dict[aioflow.web.CLIENT_KEY]
    instance_id = await client.start_new("doubled_twice", order["n"])
    return aioflow.web.create_check_status_response(request, instance_id)


@pytest.fixture
async def base_url(backend_url: str) -> AsyncIterator[str]:
    app = service(backend_url)
    app.router.add_post("/api/orders", start_order)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def poll(http: aiohttp.ClientSession, url: str, *, until: str,
               limit: float = 20.0) -> tuple[int, dict[str, Any]]:
    """GET `url` until its runtimeStatus is `until`, sleeping Retry-After between polls."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        async with http.get(url) as response:
            document = await response.json()
            status = response.status
            retry_after = response.headers.get("Retry-After")
        if document.get("runtimeStatus") == until:
            return status, document
        assert status == 202 and retry_after is not None, \
            f"an unfinished instance must answer 202 with Retry-After: {status} {document}"
        assert asyncio.get_running_loop().time() < deadline, f"never {until}: {document}"
        await asyncio.sleep(float(retry_after))


async def test_start_poll_raise_event_terminate_query_and_purge_over_http(base_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        # 1. The user's route starts the chain; poll the Location header to the output.
        async with http.post(f"{base_url}/api/orders", json={"n": 5}) as response:
            assert response.status == 202
            order = await response.json()
            location = response.headers["Location"]
        assert location == order["statusQueryGetUri"]
        assert location.startswith(f"{base_url}{PREFIX}/instances/")
        status, document = await poll(http, location, until="Completed")
        assert status == 200 and document["output"] == 20

        # 2. Start through the management API, wait until it waits, raise its event.
        async with http.post(f"{base_url}{PREFIX}/orchestrators/wait_for_approval") as response:
            assert response.status == 202
            approval = await response.json()
        await poll(http, approval["statusQueryGetUri"], until="Running")
        event_url = approval["sendEventPostUri"].replace("{eventName}", "approval")
        async with http.post(event_url, json={"approved_by": "ann"}) as response:
            assert response.status == 202
        status, document = await poll(http, approval["statusQueryGetUri"], until="Completed")
        assert status == 200 and document["output"] == {"approved_by": "ann"}

        # 3. Start another and terminate it with a reason.
        async with http.post(f"{base_url}{PREFIX}/orchestrators/wait_for_approval") as response:
            doomed = await response.json()
        terminate_url = doomed["terminatePostUri"].replace("{text}", "too+slow")
        async with http.post(terminate_url) as response:
            assert response.status == 202
        status, document = await poll(http, doomed["statusQueryGetUri"], until="Terminated")
        assert status == 200 and document["output"] == "too slow"

        # 4. Query the finished ones, then purge each through its purge URL. Queries may lag
        #    behind status reads on a store whose query index is eventually consistent
        #    (DynamoDB's GSIs), so a client retries a query briefly, as this one does.
        expected = {order["id"]: "Completed", approval["id"]: "Completed",
                    doomed["id"]: "Terminated"}
        deadline = asyncio.get_running_loop().time() + 10.0
        while True:
            async with http.get(f"{base_url}{PREFIX}/instances",
                                params={"runtimeStatus": "Completed,Terminated"}) as response:
                assert response.status == 200
                found = {item["instanceId"]: item["runtimeStatus"]
                         for item in await response.json()}
            if found == expected or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert found == expected
        for started in (order, approval, doomed):
            async with http.delete(started["purgeHistoryDeleteUri"]) as response:
                assert response.status == 200
                assert await response.json() == {"instancesDeleted": 1}
            async with http.get(started["statusQueryGetUri"]) as response:
                assert response.status == 404
