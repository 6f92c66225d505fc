"""Property: whatever a client sends to any route, the answer is never a 5xx.

Hypothesis generates requests for every route of the management API (and some that do not
exist): any method, path parameters of any text, query parameters with known and unknown names
and hostile values, arbitrary content types, continuation tokens and Host headers, and bodies
that are valid JSON, broken JSON, binary junk or larger than the limit. They are sent over a
real socket with the standard library's HTTP client (which sends bytes as given, unlike a
helpful client).

For every request: the status is below 500; an error status has a JSON body with `status`,
`error` and a non-empty `message`, and no traceback; and nothing reached the
last-resort handler of unexpected exceptions (it logs on `aioflow.web`). Examples are bounded
(300) and the deadline is off, since a request may legitimately wait (`timeout`, at most 0.3 s
here).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web_support import BACKENDS, PREFIX, BackendUrl, serve, service

from aioflow.web import ROUTES

RUNNING = "fuzz-running"
FINISHED = "fuzz-finished"
MAX_BODY = 2048

KNOWN_VALUES = [RUNNING, FINISHED, "echo", "doubled_twice", "wait_for_approval", "ghost", "counter",
                "approval", "", " ", "..", "%", "%2F", "a|b", "\x00", "é", "x" * 300]
QUERY_NAMES = ["timeout", "pollingInterval", "showHistory", "showHistoryOutput", "showInput",
               "runtimeStatus", "createdTimeFrom", "createdTimeTo", "instanceIdPrefix", "top",
               "reason", "op", "fetchState", "lastOperationTimeFrom", "lastOperationTimeTo"]
QUERY_VALUES = ["add", "get", "true", "false", "TRUE", "1", "0", "-1", "1e309", "nan", "inf",
                "0.1", "5",
                "1000", "1001", "Running", "completed,Failed", "Running,", "2024-01-01",
                "2024-01-01T00:00:00Z", "2024-01-01T00:00:00+14:00", "0001-01-01", "9999-12-31",
                "9999-12-31T23:59:59-12:00", "24:00", "", "\x00", "é", "٣"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/problem+json", "application/json; charset=utf-16",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ";",
                 "application/json; charset=", "*/*"]

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    blacklist_characters="\x7f"), max_size=120)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                      allow_infinity=False) \
        | st.text(max_size=40)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                        max_leaves=20)


bodies = st.one_of(
    st.none(),
    json_values().map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 1100).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([b"{", b"NaN", b"1e999", b'"\\ud800"', b"\xef\xbb\xbf{}", b"null"]),
    st.integers(MAX_BODY + 1, MAX_BODY + 2000).map(lambda n: b"1" * n),
)


# Continuation tokens: junk, and well-formed encodings of the wrong thing.
tokens = header_text | json_values().map(
    lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode())


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    templates = [(r.method, r.path) for r in ROUTES] + [("GET", "/instances/{a}/{b}/{c}"),
                                                         ("POST", "/{a}")]
    method, template = draw(st.sampled_from(templates))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]))

    def fill(match: re.Match[str]) -> str:
        value = draw(st.sampled_from(KNOWN_VALUES) | st.text(max_size=60))
        return quote(value, safe="") or "x"

    path = PREFIX + re.sub(r"\{[^}]+\}", fill, template)
    # Mostly a few parameters, so that requests often get past the first check they fail.
    query = draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES) | st.text(max_size=10),
                                    st.sampled_from(QUERY_VALUES) | st.text(max_size=40)),
                          max_size=draw(st.sampled_from([0, 0, 1, 4]))))
    if query:
        path += "?" + urlencode(query, quote_via=quote)
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(CONTENT_TYPES) | header_text)
    if draw(st.booleans()):
        headers["x-ms-continuation-token"] = draw(tokens)
    if draw(st.integers(0, 5)) == 0:
        headers["Idempotency-Key"] = draw(header_text)
    if draw(st.integers(0, 5)) == 0:
        headers["Host"] = draw(header_text)
    body = draw(bodies)
    return method, path, headers, body


class Unexpected(logging.Handler):
    """Collects what reaches the `aioflow.web` logger (only unexpected failures log there)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def fuzz(port: int, unexpected: Unexpected) -> None:
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(requests())
    def property(request: tuple[str, str, dict[str, str], bytes | None]) -> None:
        method, path, headers, body = request
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        shown = f"{method} {path[:200]} {headers} body={(body or b'')[:100]!r}"
        assert response.status < 500, f"{response.status} for {shown}: {data[:500]!r}"
        if response.status >= 400:
            assert b"Traceback" not in data, f"a traceback in the answer to {shown}"
            assert response.getheader("Content-Type", "").startswith("application/json"), shown
            document = json.loads(data)
            assert document["status"] == response.status, shown
            assert isinstance(document["message"], str) and document["message"], shown
        assert not unexpected.records, \
            f"{shown} reached the handler of unexpected errors: {unexpected.records[0].exc_info}"

    property()


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url: BackendUrl = request.param
    return url(request, tmp_path)


async def test_no_generated_request_gets_a_5xx_or_a_traceback(backend_url: str) -> None:
    unexpected = Unexpected()
    logging.getLogger("aioflow.web").addHandler(unexpected)
    try:
        app = service(backend_url, max_body_size=MAX_BODY, max_wait_seconds=0.3)
        async with serve(app) as client:
            assert (await client.post(
                f"{PREFIX}/orchestrators/wait_for_approval/{RUNNING}")).status == 202
            assert (await client.post(
                f"{PREFIX}/orchestrators/echo/{FINISHED}?timeout=0.3")).status == 200
            assert client.port is not None
            await asyncio.to_thread(fuzz, client.port, unexpected)
    finally:
        logging.getLogger("aioflow.web").removeHandler(unexpected)
