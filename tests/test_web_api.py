"""The HTTP management API, route by route, through aiohttp's test client.

Each test reads as the behaviour a Durable Functions user expects from the route: status
codes, headers and camelCase JSON fields. The service runs `tests/web_support.flow` on the
in-memory backend with a real worker; tests/test_web_server.py repeats the polling flow on
every backend through a plain server.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from web_support import PREFIX, error_of, flow, serve, service, wait_for_status
from yarl import URL

import aioflow
import aioflow.web
from aioflow.web import CLIENT_KEY, WORKER_KEY

CHECK_STATUS_FIELDS = {"id", "statusQueryGetUri", "sendEventPostUri", "terminatePostUri",
                       "suspendPostUri", "resumePostUri", "purgeHistoryDeleteUri"}
STATUS_FIELDS = {"name", "instanceId", "runtimeStatus", "input", "customStatus", "output",
                 "createdTime", "lastUpdatedTime"}


def path_of(url: str) -> str:
    """The path and query of an absolute URL (the test client takes relative ones)."""
    return str(URL(url).relative())


async def start(client: Any, name: str, body: Any = None, *, instance_id: str | None = None,
                query: str = "") -> dict[str, Any]:
    path = f"{PREFIX}/orchestrators/{name}" + (f"/{instance_id}" if instance_id else "")
    response = await client.post(path + query, json=body)
    assert response.status == 202, await response.text()
    return dict(await response.json())


# -- POST /orchestrators/{name}[/{instanceId}] -------------------------------------------------
async def test_start_answers_202_with_location_retry_after_and_the_check_status_payload() -> None:
    async with serve() as client:
        response = await client.post(f"{PREFIX}/orchestrators/echo", json={"order": 7})
        assert response.status == 202
        payload = await response.json()
        assert set(payload) == CHECK_STATUS_FIELDS
        base = f"http://{client.host}:{client.port}{PREFIX}/instances/{payload['id']}"
        assert payload["statusQueryGetUri"] == base
        assert payload["sendEventPostUri"] == f"{base}/raiseEvent/{{eventName}}"
        assert payload["terminatePostUri"] == f"{base}/terminate?reason={{text}}"
        assert payload["suspendPostUri"] == f"{base}/suspend?reason={{text}}"
        assert payload["resumePostUri"] == f"{base}/resume?reason={{text}}"
        assert payload["purgeHistoryDeleteUri"] == base
        assert response.headers["Location"] == base
        assert response.headers["Retry-After"] == "1"
        done = await wait_for_status(client, payload["id"], "Completed")
        assert done["input"] == {"order": 7} and done["output"] == {"order": 7}


async def test_start_under_a_chosen_instance_id_and_refuse_a_live_duplicate() -> None:
    async with serve() as client:
        payload = await start(client, "wait_for_approval", instance_id="order-42")
        assert payload["id"] == "order-42"
        again = await client.post(f"{PREFIX}/orchestrators/wait_for_approval/order-42")
        message = await error_of(again, 409)
        assert "order-42" in message and "already exists" in message


async def test_start_with_an_empty_body_gives_a_null_input() -> None:
    async with serve() as client:
        response = await client.post(f"{PREFIX}/orchestrators/echo")
        assert response.status == 202
        done = await wait_for_status(client, (await response.json())["id"], "Completed")
        assert done["input"] is None and done["output"] is None


async def test_start_an_unknown_orchestrator_is_404_naming_the_registered_ones() -> None:
    async with serve() as client:
        message = await error_of(await client.post(f"{PREFIX}/orchestrators/nope"), 404)
        assert "'nope'" in message and "doubled_twice" in message


async def test_start_with_timeout_answers_200_with_the_output_when_it_finishes_in_time() -> None:
    async with serve() as client:
        response = await client.post(
            f"{PREFIX}/orchestrators/doubled_twice?timeout=10&pollingInterval=0.05", json=5)
        assert response.status == 200, await response.text()
        assert await response.json() == 20


async def test_start_with_timeout_answers_202_when_it_is_still_running() -> None:
    async with serve() as client:
        response = await client.post(f"{PREFIX}/orchestrators/wait_for_approval?timeout=0.2")
        assert response.status == 202
        assert set(await response.json()) == CHECK_STATUS_FIELDS


async def test_start_with_timeout_answers_200_with_the_status_of_a_failed_instance() -> None:
    async with serve() as client:
        response = await client.post(f"{PREFIX}/orchestrators/always_fails?timeout=10",
                                     json="out of stock")
        assert response.status == 200
        document = await response.json()
        assert document["runtimeStatus"] == "Failed"
        assert document["failureDetails"]["errorType"] == "OrderRejected"
        assert document["failureDetails"]["errorMessage"] == "out of stock"


# -- GET /instances/{instanceId} ----------------------------------------------------------------
async def test_status_is_202_while_running_200_when_finished_404_when_unknown() -> None:
    async with serve() as client:
        iid = (await start(client, "wait_for_approval", instance_id="approval-1"))["id"]
        running = await wait_for_status(client, iid, "Running")
        response = await client.get(f"{PREFIX}/instances/{iid}")
        assert response.status == 202
        assert response.headers["Location"].endswith(f"{PREFIX}/instances/approval-1")
        assert response.headers["Retry-After"] == "1"
        assert STATUS_FIELDS <= set(running)
        assert running["name"] == "wait_for_approval" and running["instanceId"] == iid
        assert running["customStatus"] == "waiting for approval"

        await client.post(f"{PREFIX}/instances/{iid}/raiseEvent/approval", json={"by": "ann"})
        await wait_for_status(client, iid, "Completed")
        response = await client.get(f"{PREFIX}/instances/{iid}")
        assert response.status == 200 and "Location" not in response.headers
        document = await response.json()
        assert document["output"] == {"by": "ann"}
        created = datetime.fromisoformat(document["createdTime"])
        updated = datetime.fromisoformat(document["lastUpdatedTime"])
        assert document["createdTime"].endswith("Z") and created <= updated
        assert abs(datetime.now(UTC) - created) < timedelta(minutes=1)

        assert "never-started" in await error_of(
            await client.get(f"{PREFIX}/instances/never-started"), 404)


async def test_status_of_a_failed_and_of_a_terminated_instance_is_200() -> None:
    async with serve() as client:
        failed = (await start(client, "always_fails", "bad card"))["id"]
        document = await wait_for_status(client, failed, "Failed")
        assert (await client.get(f"{PREFIX}/instances/{failed}")).status == 200
        assert document["failureDetails"]["errorMessage"] == "bad card"
        waiting = (await start(client, "wait_for_approval"))["id"]
        await client.post(f"{PREFIX}/instances/{waiting}/terminate?reason=no")
        await wait_for_status(client, waiting, "Terminated")
        assert (await client.get(f"{PREFIX}/instances/{waiting}")).status == 200


async def test_show_input_history_and_history_output() -> None:
    async with serve() as client:
        iid = (await start(client, "doubled_twice", 3))["id"]
        await wait_for_status(client, iid, "Completed")

        plain = await (await client.get(f"{PREFIX}/instances/{iid}")).json()
        assert plain["input"] == 3 and "historyEvents" not in plain
        hidden = await (await client.get(f"{PREFIX}/instances/{iid}?showInput=false")).json()
        assert hidden["input"] is None and hidden["output"] == 12

        history = (await (await client.get(
            f"{PREFIX}/instances/{iid}?showHistory=true")).json())["historyEvents"]
        kinds = [event["eventType"] for event in history]
        assert kinds[0:2] == ["OrchestratorStarted", "ExecutionStarted"] \
            or kinds[0] == "ExecutionStarted", kinds
        assert kinds.count("TaskScheduled") == 2 and kinds[-1] == "ExecutionCompleted"
        assert all(event["timestamp"].endswith("Z") for event in history)
        completed = [e for e in history if e["eventType"] == "TaskCompleted"]
        assert completed and all("result" not in e and "taskId" in e for e in completed)

        with_output = (await (await client.get(
            f"{PREFIX}/instances/{iid}?showHistory=true&showHistoryOutput=true")).json())
        results = [e["result"] for e in with_output["historyEvents"]
                   if e["eventType"] == "TaskCompleted"]
        assert results == [6, 12]


# -- GET /instances -----------------------------------------------------------------------------
async def test_query_filters_by_status_prefix_and_created_time() -> None:
    async with serve() as client:
        before = datetime.now(UTC) - timedelta(seconds=1)
        for n in range(3):
            await start(client, "echo", n, instance_id=f"done-{n}")
        await start(client, "wait_for_approval", instance_id="open-1")
        for n in range(3):
            await wait_for_status(client, f"done-{n}", "Completed")
        await wait_for_status(client, "open-1", "Running")

        async def ids(query: str) -> list[str]:
            response = await client.get(f"{PREFIX}/instances{query}")
            assert response.status == 200, await response.text()
            return [item["instanceId"] for item in await response.json()]

        assert sorted(await ids("")) == ["done-0", "done-1", "done-2", "open-1"]
        assert await ids("?runtimeStatus=Running") == ["open-1"]
        assert sorted(await ids("?runtimeStatus=running,COMPLETED")) == \
            ["done-0", "done-1", "done-2", "open-1"]
        assert sorted(await ids("?instanceIdPrefix=done-")) == ["done-0", "done-1", "done-2"]
        since = before.isoformat()
        assert len(await ids(f"?createdTimeFrom={since.replace('+00:00', 'Z')}")) == 4
        assert await ids(f"?createdTimeTo={before.isoformat().replace('+00:00', 'Z')}") == []
        page = await (await client.get(f"{PREFIX}/instances?showInput=false")).json()
        assert all(item["input"] is None for item in page)
        assert all(STATUS_FIELDS <= set(item) for item in page)


async def test_query_pages_with_top_and_the_continuation_header() -> None:
    async with serve() as client:
        for n in range(7):
            await start(client, "echo", n, instance_id=f"page-{n}")
        seen: list[str] = []
        token: str | None = None
        pages = 0
        while True:
            headers = {"x-ms-continuation-token": token} if token else {}
            response = await client.get(f"{PREFIX}/instances?top=3", headers=headers)
            assert response.status == 200
            batch = await response.json()
            assert len(batch) <= 3
            seen += [item["instanceId"] for item in batch]
            pages += 1
            token = response.headers.get("x-ms-continuation-token")
            if token is None:
                break
        assert pages == 3
        assert sorted(seen) == [f"page-{n}" for n in range(7)] and len(set(seen)) == 7


# -- POST /instances/{id}/raiseEvent/{eventName} --------------------------------------------
async def test_raise_event_is_202_and_delivers_the_json_body() -> None:
    async with serve() as client:
        iid = (await start(client, "wait_for_approval"))["id"]
        response = await client.post(f"{PREFIX}/instances/{iid}/raiseEvent/approval",
                                     json={"approved": True})
        assert response.status == 202
        assert (await wait_for_status(client, iid, "Completed"))["output"] == {"approved": True}


async def test_raise_event_for_an_unknown_instance_is_404_and_for_a_finished_one_410() -> None:
    async with serve() as client:
        message = await error_of(
            await client.post(f"{PREFIX}/instances/ghost/raiseEvent/approval", json=1), 404)
        assert "ghost" in message
        iid = (await start(client, "echo", 1))["id"]
        await wait_for_status(client, iid, "Completed")
        message = await error_of(
            await client.post(f"{PREFIX}/instances/{iid}/raiseEvent/approval", json=1), 410)
        assert "Completed" in message


async def test_raise_event_with_an_idempotency_key_is_delivered_once() -> None:
    async with serve() as client:
        iid = (await start(client, "collect"))["id"]
        await wait_for_status(client, iid, "Running")
        url = f"{PREFIX}/instances/{iid}/raiseEvent/item"
        for key, value in (("k1", "a"), ("k1", "a"), ("k2", "b")):  # "a" retried once
            response = await client.post(url, json=value, headers={"Idempotency-Key": key})
            assert response.status == 202
        await client.post(url)  # null data ends the collection
        assert (await wait_for_status(client, iid, "Completed"))["output"] == ["a", "b"]


# -- terminate / suspend / resume -----------------------------------------------------------
async def test_terminate_with_a_reason() -> None:
    async with serve() as client:
        iid = (await start(client, "wait_for_approval"))["id"]
        response = await client.post(f"{PREFIX}/instances/{iid}/terminate?reason=changed+mind")
        assert response.status == 202
        document = await wait_for_status(client, iid, "Terminated")
        assert document["output"] == "changed mind"
        await error_of(await client.post(f"{PREFIX}/instances/{iid}/terminate"), 410)
        await error_of(await client.post(f"{PREFIX}/instances/ghost/terminate"), 404)


async def test_suspend_and_resume() -> None:
    async with serve() as client:
        iid = (await start(client, "wait_for_approval"))["id"]
        await wait_for_status(client, iid, "Running")
        assert (await client.post(f"{PREFIX}/instances/{iid}/suspend?reason=audit")).status \
            == 202
        await wait_for_status(client, iid, "Suspended")
        assert (await client.get(f"{PREFIX}/instances/{iid}")).status == 202
        assert (await client.post(f"{PREFIX}/instances/{iid}/resume")).status == 202
        await wait_for_status(client, iid, "Running")
        await client.post(f"{PREFIX}/instances/{iid}/raiseEvent/approval", json="ok")
        await wait_for_status(client, iid, "Completed")
        for action in ("suspend", "resume"):
            await error_of(await client.post(f"{PREFIX}/instances/{iid}/{action}"), 410)
            await error_of(await client.post(f"{PREFIX}/instances/ghost/{action}"), 404)


# -- purge ------------------------------------------------------------------------------------
async def test_purge_one_finished_instance() -> None:
    async with serve() as client:
        iid = (await start(client, "echo", 1))["id"]
        await wait_for_status(client, iid, "Completed")
        response = await client.delete(f"{PREFIX}/instances/{iid}")
        assert response.status == 200 and await response.json() == {"instancesDeleted": 1}
        await error_of(await client.get(f"{PREFIX}/instances/{iid}"), 404)
        await error_of(await client.delete(f"{PREFIX}/instances/{iid}"), 404)


async def test_purge_refuses_a_running_instance() -> None:
    async with serve() as client:
        iid = (await start(client, "wait_for_approval"))["id"]
        message = await error_of(await client.delete(f"{PREFIX}/instances/{iid}"), 409)
        assert "terminate it first" in message
        assert (await client.get(f"{PREFIX}/instances/{iid}")).status == 202


async def test_purge_by_filter_deletes_finished_matches_only() -> None:
    async with serve() as client:
        for n in range(3):
            await start(client, "echo", n, instance_id=f"old-{n}")
        await start(client, "wait_for_approval", instance_id="old-live")
        for n in range(3):
            await wait_for_status(client, f"old-{n}", "Completed")
        since = "2000-01-01T00:00:00Z"
        message = await error_of(await client.delete(f"{PREFIX}/instances"), 400)
        assert "createdTimeFrom" in message
        response = await client.delete(
            f"{PREFIX}/instances?createdTimeFrom={since}&instanceIdPrefix=old-")
        assert response.status == 200 and await response.json() == {"instancesDeleted": 3}
        assert (await client.get(f"{PREFIX}/instances/old-live")).status == 202
        await error_of(await client.delete(f"{PREFIX}/instances?createdTimeFrom={since}"), 404)


# -- the OpenAPI document ---------------------------------------------------------------------
async def test_the_openapi_document_is_served_under_the_prefix() -> None:
    async with serve() as client:
        response = await client.get(f"{PREFIX}/openapi.json")
        assert response.status == 200
        document = await response.json()
        assert document["openapi"].startswith("3.")
        assert document["servers"] == [{"url": PREFIX}]
        assert document == aioflow.web.openapi_document(PREFIX)


# -- embedding: lifecycle, keys, helpers for users' handlers ----------------------------------
async def test_users_handlers_reach_the_client_and_answer_with_the_helpers() -> None:
    async def start_order(request: web.Request) -> web.Response:
        client = request.config_dict[CLIENT_KEY]
        iid = await client.start_new("doubled_twice", int(request.match_info["n"]))
        return aioflow.web.create_check_status_response(request, iid)

    async def start_and_wait(request: web.Request) -> web.Response:
        client = request.app[CLIENT_KEY]
        iid = await client.start_new("doubled_twice", int(request.match_info["n"]))
        return await aioflow.web.wait_for_completion_or_create_check_status_response(
            request, iid, timeout=10, polling_interval=0.05)

    app = service()
    app.router.add_post("/orders/{n}", start_order)
    app.router.add_post("/orders/{n}/sync", start_and_wait)
    async with serve(app) as client:
        response = await client.post("/orders/2")
        assert response.status == 202 and response.headers["Retry-After"] == "1"
        payload = await response.json()
        assert response.headers["Location"] == payload["statusQueryGetUri"]
        status = await wait_for_status(client, payload["id"], "Completed")
        assert status["output"] == 8
        response = await client.post("/orders/5/sync")
        assert response.status == 200 and await response.json() == 20


async def test_a_custom_prefix_public_url_and_retry_after() -> None:
    app = service(prefix="/ops/flows", public_url="https://api.example.com/shop",
                  retry_after=7)
    async with serve(app) as client:
        response = await client.post("/ops/flows/orchestrators/echo", json=1)
        assert response.status == 202 and response.headers["Retry-After"] == "7"
        payload = await response.json()
        assert payload["statusQueryGetUri"] == \
            f"https://api.example.com/shop/ops/flows/instances/{payload['id']}"
        assert (await client.get(f"{PREFIX}/instances")).status == 404
        assert (await client.get("/ops/flows/instances")).status == 200


async def test_instance_ids_are_escaped_in_the_urls_and_round_trip() -> None:
    async def start_odd(request: web.Request) -> web.Response:
        iid = await request.app[CLIENT_KEY].start_new("wait_for_approval",
                                                      instance_id="a/b c?d%e#é")
        return aioflow.web.create_check_status_response(request, iid)

    app = service()
    app.router.add_post("/odd", start_odd)
    async with serve(app) as client:
        payload = await (await client.post("/odd")).json()
        assert payload["id"] == "a/b c?d%e#é"
        status_url = path_of(payload["statusQueryGetUri"])
        assert "/instances/a%2Fb%20c%3Fd%25e%23%C3%A9" in status_url
        document = await (await client.get(URL(status_url, encoded=True))).json()
        assert document["instanceId"] == "a/b c?d%e#é"
        event_url = payload["sendEventPostUri"].replace("{eventName}", "approval")
        response = await client.post(URL(path_of(event_url), encoded=True), json="yes")
        assert response.status == 202
        assert (await wait_for_status(client, "a%2Fb%20c%3Fd%25e%23%C3%A9", "Completed"))[
            "output"] == "yes"


async def test_the_worker_runs_with_the_app_and_stops_with_it() -> None:
    backend = aioflow.connect("memory://")
    app = service(backend)
    async with serve(app) as client:
        assert isinstance(app[WORKER_KEY], aioflow.Worker)
        response = await client.post(f"{PREFIX}/orchestrators/echo?timeout=10", json=1)
        assert response.status == 200, "no worker ran the orchestration while the app ran"
    after = aioflow.Client(backend)
    iid = await after.start_new("echo", 2)
    await asyncio.sleep(0.3)
    status = await after.get_status(iid)
    assert status is not None and status.runtime_status is aioflow.RuntimeStatus.PENDING, \
        "the worker kept running after the app shut down"
    await backend.close()


async def test_without_a_worker_instances_stay_pending() -> None:
    app = service(run_worker=False)
    async with serve(app) as client:
        assert WORKER_KEY not in app
        iid = (await start(client, "echo", 1))["id"]
        await asyncio.sleep(0.2)
        response = await client.get(f"{PREFIX}/instances/{iid}")
        assert response.status == 202 and (await response.json())["runtimeStatus"] == "Pending"


async def test_a_backend_object_stays_open_for_its_owner() -> None:
    backend = aioflow.connect("memory://")
    async with serve(service(backend)) as client:
        iid = (await start(client, "echo", "kept"))["id"]
        await wait_for_status(client, iid, "Completed")
    status = await aioflow.Client(backend).get_status(iid)  # still usable after shutdown
    assert status is not None and status.output == "kept"
    await backend.close()


async def test_without_the_management_api_the_helpers_say_why_they_cannot_work() -> None:
    async def handler(request: web.Request) -> web.Response:
        try:
            return aioflow.web.create_check_status_response(request, "x")
        except aioflow.ConfigurationError as exc:
            return web.Response(text=str(exc))

    app = service(prefix=None)
    app.router.add_get("/x", handler)
    async with serve(app) as client:
        assert (await client.get(f"{PREFIX}/instances")).status == 404
        assert "the management API is not mounted" in await (await client.get("/x")).text()


@pytest.mark.parametrize(("options", "complaint"), [
    ({"prefix": "no-slash"}, "prefix"),
    ({"prefix": "/trailing/"}, "prefix"),
    ({"token": "short"}, "at least 16"),
    ({"token": "x" * 20, "authorizer": lambda r: True}, "not both"),
    ({"public_url": "ftp://example.com"}, "public_url"),
    ({"retry_after": -1}, "retry_after"),
    ({"worker_options": {"max_concurrent_activities": 0}}, "at least 1"),
])
def test_setup_refuses_bad_options_at_once(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        aioflow.web.setup(web.Application(), flow, "memory://", **options)


def test_setup_refuses_a_second_call_and_a_started_app() -> None:
    app = web.Application()
    aioflow.web.setup(app, flow, "memory://")
    with pytest.raises(aioflow.ConfigurationError, match="already called"):
        aioflow.web.setup(app, flow, "memory://")
    started = web.Application()
    started.freeze()
    with pytest.raises(RuntimeError, match="before the application starts"):
        aioflow.web.setup(started, flow, "memory://")


def test_setup_refuses_a_bad_backend_url_at_once() -> None:
    with pytest.raises(aioflow.ConfigurationError, match="no backend for URL scheme"):
        aioflow.web.setup(web.Application(), flow, "nosuch://x")
