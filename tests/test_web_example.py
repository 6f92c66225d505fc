"""examples/async_http_api.py serves real clients: started as a user would, driven over HTTP.

tests/test_examples.py runs its `--self-test`; this test runs it in serving mode instead, as
its own process on a free port, drives it with an HTTP client through the curl session of its
docstring, and stops it with Ctrl-C (SIGINT), which must shut it down cleanly.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_examples import EXAMPLES, _environment

API = "/runtime/webhooks/durabletask"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "async_http_api.py"), "--port", "0"], cwd=tmp_path,
        env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
        assert match, f"the example did not say where it listens: {first!r}"
        yield process, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert not list(tmp_path.iterdir()), "the example left files in its working directory"


async def poll(http: aiohttp.ClientSession, url: str, until: str) -> dict[str, Any]:
    for _ in range(100):
        async with http.get(url) as response:
            document: dict[str, Any] = await response.json()
        if document["runtimeStatus"] == until:
            return document
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became {until}: {document}")


async def test_the_example_service_answers_the_curl_session_and_stops_on_ctrl_c(
        service: tuple[subprocess.Popen[str], str]) -> None:
    process, base = service
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async with http.post(f"{base}/api/reports", json={"sections": ["a"]}) as response:
            assert response.status == 202
            report = await response.json()
        assert (await poll(http, report["statusQueryGetUri"], "Completed"))["output"] == \
            {"title": "report", "sections": ["a: done"]}

        async with http.post(f"{base}{API}/orchestrators/approve_expense/E1", json={}) as r:
            assert r.status == 202
        await poll(http, f"{base}{API}/instances/E1", "Running")
        async with http.post(f"{base}{API}/instances/E1/raiseEvent/ApprovalEvent",
                             json="yes") as response:
            assert response.status == 202
        assert (await poll(http, f"{base}{API}/instances/E1", "Completed"))["output"] == \
            {"expense": {}, "decision": "yes"}

        async with http.post(f"{base}{API}/orchestrators/approve_expense/E2", json={}) as r:
            assert r.status == 202
        async with http.post(f"{base}{API}/instances/E2/terminate",
                             params={"reason": "no"}) as response:
            assert response.status == 202
        await poll(http, f"{base}{API}/instances/E2", "Terminated")

    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "stopped" in output and "Traceback" not in output, output
