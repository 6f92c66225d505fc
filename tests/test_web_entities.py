"""The entity routes of the HTTP management API (as in Durable Functions).

`POST /entities/{name}/{key}?op=...` signals an operation (202), `GET /entities/{name}/{key}`
answers the state (404 when there is none), and `GET /entities[/{name}]` lists entities a page
at a time. The service runs `tests/web_support.flow` (its `counter` entity) on the in-memory
backend with a real worker.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from web_support import PREFIX, error_of, serve


async def wait_for_state(client: Any, key: str, expected: Any) -> None:
    for _ in range(500):
        response = await client.get(f"{PREFIX}/entities/counter/{key}")
        if response.status == 200 and await response.json() == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"counter {key} never reached {expected!r}")


async def test_signal_answers_202_and_the_state_is_readable_once_applied() -> None:
    async with serve() as client:
        for amount in (5, 7):
            response = await client.post(f"{PREFIX}/entities/counter/c1?op=add", json=amount)
            assert response.status == 202, await response.text()
        await wait_for_state(client, "c1", 12)
        missing = await client.get(f"{PREFIX}/entities/counter/never-touched")
        assert "has no state" in await error_of(missing, 404)


async def test_a_retried_signal_with_an_idempotency_key_is_applied_once() -> None:
    async with serve() as client:
        for _ in range(3):
            response = await client.post(f"{PREFIX}/entities/counter/idem?op=add", json=1,
                                         headers={"Idempotency-Key": "req-1"})
            assert response.status == 202
        await client.post(f"{PREFIX}/entities/counter/idem?op=add", json=10)
        await wait_for_state(client, "idem", 11)


async def test_listing_entities_pages_and_filters_by_name_and_last_operation_time() -> None:
    async with serve() as client:
        before = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        for n in range(3):
            await client.post(f"{PREFIX}/entities/counter/k{n}?op=add", json=n + 1)
        for n in range(3):
            await wait_for_state(client, f"k{n}", n + 1)
        seen: list[dict[str, Any]] = []
        token = None
        while True:
            headers = {"x-ms-continuation-token": token} if token else {}
            response = await client.get(
                f"{PREFIX}/entities/counter", headers=headers,
                params={"top": "2", "fetchState": "true", "lastOperationTimeFrom": before})
            assert response.status == 200, await response.text()
            seen.extend(await response.json())
            token = response.headers.get("x-ms-continuation-token")
            if token is None:
                break
        assert sorted((e["entityId"]["key"], e["state"]) for e in seen) == \
            [("k0", 1), ("k1", 2), ("k2", 3)]
        assert all(e["entityId"]["name"] == "counter" and e["lastOperationTime"].endswith("Z")
                   for e in seen), seen
        everything = await (await client.get(f"{PREFIX}/entities")).json()
        assert {e["entityId"]["key"] for e in everything} == {"k0", "k1", "k2"}
        assert all("state" not in e for e in everything), "state only with fetchState=true"
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        later = await client.get(f"{PREFIX}/entities",
                                 params={"lastOperationTimeFrom": future})
        assert await later.json() == []


async def test_bad_entity_requests_are_json_4xx_that_say_what_was_wrong() -> None:
    async with serve() as client:
        no_op = await client.post(f"{PREFIX}/entities/counter/c1", json=1)
        assert "'op' is required" in await error_of(no_op, 400)
        unknown = await client.post(f"{PREFIX}/entities/ghost/c1?op=add", json=1)
        assert "no entity named 'ghost'" in await error_of(unknown, 404)
        bad_name = await client.get(f"{PREFIX}/entities/a@b/c1")
        assert "entity name" in await error_of(bad_name, 400)
        bad_time = await client.get(f"{PREFIX}/entities",
                                    params={"lastOperationTimeFrom": "yesterday"})
        assert "lastOperationTimeFrom" in await error_of(bad_time, 400)
        bad_body = await client.post(f"{PREFIX}/entities/counter/c1?op=add", data=b"{",
                                     headers={"Content-Type": "application/json"})
        await error_of(bad_body, 400)
        bad_token = await client.get(f"{PREFIX}/entities",
                                     headers={"x-ms-continuation-token": "junk"})
        assert "continuation" in await error_of(bad_token, 400)
