"""Async HTTP API: an aiohttp service that starts orchestrations and lets clients poll them.

The service embeds aioflow with `aioflow.web.setup` (a worker runs inside it, on SQLite) and
offers two ways in:

* its own route, `POST /api/reports`, which starts `build_report` (two slow sections, about a
  second) and answers with `aioflow.web.create_check_status_response`: 202, a `Location` to
  poll and the URLs that manage the instance;
* the Durable-Functions-style management API under `/runtime/webhooks/durabletask`, which
  starts any orchestrator by name, reads status, raises events, terminates, purges.

Run it (one command; Ctrl-C stops it):

    python examples/async_http_api.py                 # http://127.0.0.1:8080, temporary SQLite
    python examples/async_http_api.py --port 9000 --db reports.db --token "$TOKEN"
    python examples/async_http_api.py --self-test     # runs the session below itself and checks it

A curl session against it (real output; long URLs and headers trimmed with "..."):

    $ API=127.0.0.1:8080/runtime/webhooks/durabletask
    $ curl -si -X POST 127.0.0.1:8080/api/reports -H 'Content-Type: application/json' \
          -d '{"title": "Q3", "sections": ["sales", "costs"]}'
    HTTP/1.1 202 Accepted
    Location: http://127.0.0.1:8080/runtime/webhooks/durabletask/instances/3a9acaa84ab54f05...
    Retry-After: 1
    {"id":"3a9acaa84ab54f05b53866a02469736e","statusQueryGetUri":"http://127.0.0.1:8080/runtime/
    webhooks/durabletask/instances/3a9acaa84ab54f05b53866a02469736e","sendEventPostUri":"http://...
    /raiseEvent/{eventName}","terminatePostUri":"http://.../terminate?reason={text}",...}

    $ ID=3a9acaa84ab54f05b53866a02469736e
    $ curl -si $API/instances/$ID
    HTTP/1.1 202 Accepted
    Retry-After: 1
    {"name":"build_report","instanceId":"3a9acaa84ab54f05b53866a02469736e","runtimeStatus":"Running",
     "input":{"title":"Q3","sections":["sales","costs"]},"customStatus":{"rendering":"sales",
     "step":1,"of":2},"output":null,"createdTime":"2026-12-01T14:04:10.921242Z",...}

    $ curl -si $API/instances/$ID                      # a second and a half later
    HTTP/1.1 200 OK
    {"name":"build_report",...,"runtimeStatus":"Completed",...,"customStatus":{"done":2},
     "output":{"title":"Q3","sections":["sales: done","costs: done"]},...}

    $ curl -s -X POST $API/orchestrators/approve_expense/EXP-7 \
          -H 'Content-Type: application/json' -d '{"amount": 120}' -o /dev/null -w '%{http_code}\n'
    202
    $ curl -si -X POST $API/instances/EXP-7/raiseEvent/ApprovalEvent \
          -H 'Content-Type: application/json' -d '{"approved": true, "by": "ann"}'
    HTTP/1.1 202 Accepted
    $ curl -s $API/instances/EXP-7
    {"name":"approve_expense","instanceId":"EXP-7","runtimeStatus":"Completed","input":{"amount":120},
     "customStatus":"decided","output":{"expense":{"amount":120},"decision":{"approved":true,
     "by":"ann"}},...}

    $ curl -s -X POST $API/orchestrators/approve_expense/EXP-8 -H 'Content-Type: application/json' \
          -d '{"amount": 99999}' -o /dev/null -w '%{http_code}\n'
    202
    $ curl -si -X POST "$API/instances/EXP-8/terminate?reason=duplicate"
    HTTP/1.1 202 Accepted
    $ curl -s $API/instances/EXP-8
    {"name":"approve_expense","instanceId":"EXP-8","runtimeStatus":"Terminated",...,
     "output":"duplicate",...}
    $ curl -s -X POST $API/instances/EXP-8/raiseEvent/ApprovalEvent \
          -H 'Content-Type: application/json' -d 'true' -w ' %{http_code}\n'
    {"status":410,"error":"Gone","message":"cannot raise event 'ApprovalEvent': orchestration
     instance 'EXP-8' is Terminated, so nothing will ever receive it; start a new instance
     instead"} 410

    $ curl -s "$API/instances?runtimeStatus=Completed,Terminated&top=2" -D -
    HTTP/1.1 200 OK
    x-ms-continuation-token: WzE3OTYxMzM4NTIuNjc2Mzc1MiwiRVhQLTciXQ
    [{"name":"build_report",...},{"name":"approve_expense","instanceId":"EXP-7",...}]
    $ curl -s -X DELETE $API/instances/EXP-8
    {"instancesDeleted":1}
    $ curl -s -X DELETE -G $API/instances -d createdTimeFrom=2020-01-01T00:00:00Z \
          -d runtimeStatus=Completed
    {"instancesDeleted":2}

Without `--token` the management API answers loopback clients only; with one, send
`-H "Authorization: Bearer $TOKEN"` on every management call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import aioflow
import aioflow.web

flow = aioflow.App()


@flow.activity
async def render_section(section: str) -> str:
    await asyncio.sleep(0.5)  # stands in for slow work: queries, rendering, uploads
    return f"{section}: done"


@flow.orchestrator
async def build_report(ctx: aioflow.OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Renders the report's sections one after the other, reporting progress."""
    sections = [str(s) for s in spec.get("sections", ["summary", "details"])]
    rendered = []
    for number, section in enumerate(sections, start=1):
        ctx.set_custom_status({"rendering": section, "step": number, "of": len(sections)})
        rendered.append(await ctx.call_activity(render_section, section))
    ctx.set_custom_status({"done": len(sections)})
    return {"title": spec.get("title", "report"), "sections": rendered}


@flow.orchestrator
async def approve_expense(ctx: aioflow.OrchestrationContext,
                          expense: dict[str, Any]) -> dict[str, Any]:
    """Waits, durably and for as long as it takes, for an "ApprovalEvent"."""
    ctx.set_custom_status("waiting for approval")
    decision = await ctx.wait_for_external_event("ApprovalEvent")
    ctx.set_custom_status("decided")
    return {"expense": expense, "decision": decision}


async def start_report(request: web.Request) -> web.Response:
    """POST /api/reports: the service's own route, in the async HTTP API style."""
    try:
        spec = await request.json() if request.can_read_body else {}
    except ValueError:
        return web.json_response({"message": "send the report spec as JSON"}, status=400)
    if not isinstance(spec, dict):
        return web.json_response({"message": "the report spec must be a JSON object"},
                                 status=400)
    client = request.config_dict[aioflow.web.CLIENT_KEY]
    instance_id = await client.start_new(build_report, spec)
    return aioflow.web.create_check_status_response(request, instance_id)


def make_app(db: Path, token: str | None) -> web.Application:
    app = web.Application()
    app.router.add_post("/api/reports", start_report)
    aioflow.web.setup(app, flow, f"sqlite:///{db}", token=token,
                      worker_options={"poll_interval": 0.2})
    return app


@contextlib.asynccontextmanager
async def running(args: argparse.Namespace) -> AsyncIterator[str]:
    """Serve the app on args.host:args.port; yield its base URL."""
    with contextlib.ExitStack() as stack:
        db = args.db or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="aioflow-http-"))) / "async_http_api.db"
        runner = web.AppRunner(make_app(Path(db), args.token))
        await runner.setup()
        try:
            await web.TCPSite(runner, args.host, args.port).start()
            host, port = runner.addresses[0][:2]
            yield f"http://{host}:{port}"
        finally:
            await runner.cleanup()


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running(args) as base:
        print(f"listening on {base} (management API: {base}{aioflow.web.DEFAULT_PREFIX}); "
              f"Ctrl-C stops", flush=True)
        await stop.wait()
        print("stopping: the worker finishes its current step", flush=True)
    print("stopped", flush=True)
    return 0


async def self_test(args: argparse.Namespace) -> int:
    """Drive the service over HTTP the way the curl session in the docstring does."""
    args.port = 0
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    api = aioflow.web.DEFAULT_PREFIX
    async with running(args) as base, aiohttp.ClientSession(headers=headers) as http:
        print(f"listening on {base}")

        async def poll(url: str, until: str) -> dict[str, Any]:
            while True:
                async with http.get(url) as response:
                    document: dict[str, Any] = await response.json()
                    print(f"  GET status -> {response.status} {document['runtimeStatus']} "
                          f"{document['customStatus']}")
                    if document["runtimeStatus"] == until:
                        return document
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))

        async with http.post(f"{base}/api/reports",
                             json={"title": "Q3", "sections": ["sales", "costs"]}) as response:
            report = await response.json()
            print(f"POST /api/reports -> {response.status}, Location "
                  f"{response.headers['Location']}")
        finished = await poll(report["statusQueryGetUri"], "Completed")

        async with http.post(f"{base}{api}/orchestrators/approve_expense/EXP-7",
                             json={"amount": 120}) as response:
            expense = await response.json()
            print(f"POST .../orchestrators/approve_expense/EXP-7 -> {response.status}")
        await poll(expense["statusQueryGetUri"], "Running")
        event_url = expense["sendEventPostUri"].replace("{eventName}", "ApprovalEvent")
        async with http.post(event_url, json={"approved": True, "by": "ann"}) as response:
            print(f"POST .../raiseEvent/ApprovalEvent -> {response.status}")
        approved = await poll(expense["statusQueryGetUri"], "Completed")

        async with http.post(f"{base}{api}/orchestrators/approve_expense/EXP-8",
                             json={"amount": 99999}) as response:
            doomed = await response.json()
        terminate_url = doomed["terminatePostUri"].replace("{text}", "duplicate")
        async with http.post(terminate_url) as response:
            print(f"POST .../EXP-8/terminate?reason=duplicate -> {response.status}")
        terminated = await poll(doomed["statusQueryGetUri"], "Terminated")

    problems = []
    if finished["output"] != {"title": "Q3", "sections": ["sales: done", "costs: done"]}:
        problems.append(f"unexpected report {finished['output']}")
    if approved["output"] != {"expense": {"amount": 120},
                              "decision": {"approved": True, "by": "ann"}}:
        problems.append(f"unexpected approval {approved['output']}")
    if terminated["output"] != "duplicate":
        problems.append(f"unexpected termination {terminated['output']}")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("OK: report polled to completion, EXP-7 approved by event, EXP-8 terminated")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080,
                        help="port to listen on; 0 picks a free one (default 8080)")
    parser.add_argument("--db", type=Path, default=None,
                        help="SQLite file to keep instances in (default: a temporary one, "
                             "deleted on exit)")
    parser.add_argument("--token", default=os.environ.get("AIOFLOW_API_TOKEN"),
                        help="require 'Authorization: Bearer TOKEN' on the management API "
                             "(default: $AIOFLOW_API_TOKEN; without one, loopback clients only)")
    parser.add_argument("--self-test", action="store_true",
                        help="start on a free port, run the curl session with an HTTP client, "
                             "check the outcomes and exit")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(aioflow.run(self_test(arguments) if arguments.self_test else serve(arguments)))
