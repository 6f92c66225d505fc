"""Bad requests get a 4xx with a JSON body saying what was wrong; never a 500 or a traceback.

The hand-picked cases here name each kind of bad input the issue lists; tests/test_web_fuzz.py
throws generated input at every route. Both check that bad input never reaches the last-resort
handler of unexpected exceptions (which logs on the `aioflow.web` logger), and the last test
shows what that handler does when something really breaks.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from web_support import PREFIX, error_of, serve, service

import aioflow
from aioflow.testing.memory import MemoryBackend

RUNNING = "running-1"
FINISHED = "finished-1"
JSON = {"Content-Type": "application/json"}

# (method, path under the prefix, request options, expected status, words the message has)
CASES: list[tuple[str, str, dict[str, Any], int, list[str]]] = [
    # bodies
    ("POST", "/orchestrators/echo", {"data": b"{not json", "headers": JSON}, 400,
     ["not valid JSON"]),
    ("POST", "/orchestrators/echo", {"data": b"\xff\xfe", "headers": JSON}, 400,
     ["not valid JSON"]),
    ("POST", "/orchestrators/echo", {"data": b"NaN", "headers": JSON}, 400, ["not valid JSON"]),
    ("POST", "/orchestrators/echo", {"data": b"[" * 2000 + b"]" * 2000, "headers": JSON}, 400,
     ["not valid JSON"]),
    ("POST", "/orchestrators/echo", {"data": b"[" * 300 + b"]" * 300, "headers": JSON}, 400,
     ["cannot be an orchestration input"]),
    ("POST", "/orchestrators/echo", {"data": b'{"a": 1}',
                                     "headers": {"Content-Type": "text/plain"}}, 415,
     ["Content-Type: application/json", "text/plain"]),
    ("POST", "/orchestrators/echo", {"data": b'{"a": 1}'}, 415, ["application/json"]),
    ("POST", "/orchestrators/echo", {"data": b'{"a": 1}', "headers": {
        "Content-Type": "application/json; charset=latin-1"}}, 415, ["UTF-8"]),
    ("POST", "/orchestrators/echo", {"data": b"1" * 5000, "headers": JSON}, 413,
     ["limit of 4096 bytes"]),
    ("POST", f"/instances/{RUNNING}/raiseEvent/approval",
     {"data": b"{bad", "headers": JSON}, 400, ["not valid JSON"]),
    ("POST", f"/instances/{RUNNING}/raiseEvent/approval",
     {"data": b"true", "headers": {"Content-Type": "application/xml"}}, 415, ["application/xml"]),
    ("POST", f"/instances/{RUNNING}/raiseEvent/approval",
     {"data": b"1" * 5000, "headers": JSON}, 413, ["larger than the limit"]),
    # names and ids
    ("POST", "/orchestrators/no_such_thing", {}, 404, ["no_such_thing", "registered: "]),
    ("POST", "/orchestrators/echo/" + "x" * 300, {}, 400, ["instanceId", "limit is 256"]),
    ("GET", "/instances/" + "x" * 300, {}, 400, ["instanceId", "limit is 256"]),
    ("GET", "/instances/a%7Cb", {}, 400, ["reserved"]),
    ("GET", "/instances/a%01b", {}, 400, ["control character"]),
    ("POST", f"/orchestrators/echo/{RUNNING}", {}, 409, ["already exists"]),
    # filters
    ("GET", "/instances?createdTimeFrom=yesterday", {}, 400, ["createdTimeFrom", "ISO 8601"]),
    ("GET", "/instances?createdTimeTo=2024-13-45", {}, 400, ["createdTimeTo", "ISO 8601"]),
    ("GET", "/instances?createdTimeFrom=2024-02-30T00:00:00Z", {}, 400, ["createdTimeFrom"]),
    ("GET", "/instances?runtimeStatus=Running,Sleeping", {}, 400,
     ["'Sleeping'", "Pending, Running, Completed"]),
    ("GET", "/instances?runtimeStatus=", {}, 400, ["runtime status ''"]),
    ("DELETE", "/instances?createdTimeFrom=2024-01-01&runtimeStatus=Done", {}, 400, ["'Done'"]),
    ("DELETE", "/instances?runtimeStatus=Completed", {}, 400, ["createdTimeFrom"]),
    ("GET", "/instances?top=0", {}, 400, ["'top'", "1 to 1000"]),
    ("GET", "/instances?top=1001", {}, 400, ["'top'"]),
    ("GET", "/instances?top=-5", {}, 400, ["'top'"]),
    ("GET", "/instances?top=ten", {}, 400, ["'top'"]),
    ("GET", "/instances?top=%EF%BC%91", {}, 400, ["'top'"]),  # a full-width digit one
    ("GET", "/instances?top=1&top=2", {}, 400, ["given 2 times"]),
    ("GET", "/instances", {"headers": {"x-ms-continuation-token": "bm90IGEgdG9rZW4="}}, 400,
     ["x-ms-continuation-token", "unchanged"]),
    ("GET", "/instances", {"headers": {"x-ms-continuation-token": "!!!"}}, 400,
     ["x-ms-continuation-token"]),
    ("GET", "/instances", {"headers": {"x-ms-continuation-token": "a" * 5000}}, 400,
     ["x-ms-continuation-token"]),
    # flags and durations
    ("GET", f"/instances/{RUNNING}?showHistory=maybe", {}, 400, ["'showHistory'", "true or"]),
    ("GET", f"/instances/{RUNNING}?showInput=2", {}, 400, ["'showInput'"]),
    ("POST", "/orchestrators/echo?timeout=-1", {}, 400, ["'timeout'", "seconds"]),
    ("POST", "/orchestrators/echo?timeout=nan", {}, 400, ["'timeout'"]),
    ("POST", "/orchestrators/echo?timeout=1e9", {}, 400, ["'timeout'", "0 to 2"]),
    ("POST", "/orchestrators/echo?timeout=1&pollingInterval=0", {}, 400, ["'pollingInterval'"]),
    ("POST", f"/instances/{RUNNING}/terminate?reason=" + "r" * 5000, {}, 400,
     ["'reason'", "4096"]),
    ("POST", f"/instances/{RUNNING}/raiseEvent/go", {"headers": {"Idempotency-Key": "k" * 300}},
     400, ["Idempotency-Key"]),
    # state
    ("POST", f"/instances/{FINISHED}/raiseEvent/approval", {}, 410, ["Completed"]),
    ("POST", f"/instances/{FINISHED}/terminate", {}, 410, ["Completed"]),
    ("POST", "/instances/ghost/suspend", {}, 404, ["ghost"]),
    ("DELETE", f"/instances/{RUNNING}", {}, 409, ["terminate it first"]),
    # routing
    ("GET", "/orchestrators/echo", {}, 405, ["POST"]),
    ("PATCH", "/instances", {}, 405, ["GET"]),
    ("GET", "/nothing/here", {}, 404, ["openapi.json"]),
]


@pytest.fixture
async def api() -> Any:
    async with serve(service(max_body_size=4096, max_wait_seconds=2)) as client:
        started = await client.post(f"{PREFIX}/orchestrators/wait_for_approval/{RUNNING}")
        assert started.status == 202
        done = await client.post(f"{PREFIX}/orchestrators/echo/{FINISHED}?timeout=2", json=1)
        assert done.status == 200
        yield client


async def test_every_kind_of_bad_request_gets_a_4xx_json_error_saying_what_was_wrong(
        api: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aioflow.web")
    failures = []
    for method, path, options, status, words in CASES:
        response = await api.request(method, f"{PREFIX}{path}", **options)
        try:
            message = await error_of(response, status)
            missing = [word for word in words if word not in message]
            assert not missing, f"the message lacks {missing}: {message!r}"
        except AssertionError as exc:
            failures.append(f"{method} {path[:80]}: {exc}")
    assert not failures, "\n".join(failures)
    assert not caplog.records, "bad input reached the handler of unexpected errors"


async def test_an_oversize_chunked_body_is_refused_while_it_arrives(api: Any) -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b" " * 1000

    response = await api.post(f"{PREFIX}/orchestrators/echo", data=chunks(), headers=JSON)
    await error_of(response, 413)


async def test_a_host_header_no_url_can_be_built_from_is_refused_before_starting_anything(
        api: Any) -> None:
    before = await (await api.get(f"{PREFIX}/instances")).json()
    response = await api.post(f"{PREFIX}/orchestrators/echo", headers={"Host": "a:b:c"})
    assert "Host header" in await error_of(response, 400)
    assert await (await api.get(f"{PREFIX}/instances")).json() == before


class BrokenBackend(MemoryBackend):
    """A backend whose instance reads fail in a way nothing anticipates."""

    async def get_instance(self, instance_id: str) -> Any:
        raise RuntimeError("disk on fire at /var/lib/secret/path")


async def test_an_unexpected_failure_is_a_json_500_without_details_and_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aioflow.web")
    async with serve(service(BrokenBackend())) as client:
        response = await client.get(f"{PREFIX}/instances/anything")
        message = await error_of(response, 500)
        text = await response.text()
        assert "logged" in message
        assert "disk on fire" not in text and "RuntimeError" not in text and "/var/lib" not in text
    [record] = [r for r in caplog.records if r.name == "aioflow.web"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "GET /runtime/webhooks/durabletask/instances/anything" in record.getMessage()
    assert "disk on fire" in str(record.exc_info[1])


def test_the_cases_cover_every_status_the_api_refuses_with() -> None:
    assert {status for *_, status, _ in CASES} == {400, 404, 405, 409, 410, 413, 415}
    assert aioflow.web.ROUTES  # the routes exist; the fuzz test walks all of them
