"""Human interaction: wait for a person's approval, with a durable 72-hour deadline.

The `approval_workflow` orchestrator sends an approval request (an activity), then races two
durable things with `ctx.task_any`:

* `ctx.wait_for_external_event("ApprovalEvent")` — resolved when someone calls
  `client.raise_event(instance_id, "ApprovalEvent", {...})`, from any process;
* `ctx.create_timer(ctx.current_utc_datetime + timedelta(hours=72))` — the deadline.

If the approval arrives first, the timer is cancelled and the request is processed; if the
deadline passes first, the request is escalated (another activity). Both the timer and the
waiting are durable: the worker may be restarted at any time during those 72 hours.

The script shows both outcomes:

1. Approved — on SQLite: the request is approved by a client `raise_event` shortly after it was
   sent, long before the 72-hour deadline.
2. Timed out — nobody answers, so the 72-hour timer wins. By default this path runs in
   `aioflow.testing.TestEnvironment`, whose virtual clock jumps over the 72 hours instantly (the
   same orchestrator code, on the in-memory test backend). With `--timeout-seconds N` it instead
   runs on SQLite with a real N-second deadline.

Run it:

    python examples/human_interaction.py                      # 72 h deadline, skipped instantly
    python examples/human_interaction.py --timeout-seconds 2  # real 2 s deadline on SQLite

Exits with status 1 unless the first request was processed and the second was escalated.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import aioflow

app = aioflow.App()

APPROVAL_EVENT = "ApprovalEvent"
outbox: list[str] = []  # what the activities "sent", to check the outcome


def duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


@app.activity
async def send_approval_request(request: dict[str, object]) -> None:
    line = (f"approval request for {request['what']!r} sent to {request['approver']} "
            f"(deadline in {duration(float(request['timeout_seconds']))})")  # type: ignore[arg-type]
    outbox.append(f"request:{request['id']}")
    print(f"  [activity] {line}")


@app.activity
async def process_approved(request: dict[str, object]) -> str:
    outbox.append(f"processed:{request['id']}")
    print(f"  [activity] processing {request['what']!r}: approved by {request['approved_by']}")
    return f"{request['id']} processed"


@app.activity
async def escalate(request: dict[str, object]) -> str:
    outbox.append(f"escalated:{request['id']}")
    print(f"  [activity] no answer from {request['approver']} in time: escalating "
          f"{request['what']!r} to {request['escalate_to']}")
    return f"{request['id']} escalated to {request['escalate_to']}"


@app.orchestrator
async def approval_workflow(ctx: aioflow.OrchestrationContext,
                            request: dict[str, object]) -> dict[str, object]:
    await ctx.call_activity(send_approval_request, request)

    deadline = ctx.current_utc_datetime + timedelta(
        seconds=float(request["timeout_seconds"]))  # type: ignore[arg-type]
    timeout = ctx.create_timer(deadline)
    approval = ctx.wait_for_external_event(APPROVAL_EVENT)
    ctx.set_custom_status({"state": "waiting for approval", "deadline": deadline.isoformat()})

    winner = await ctx.task_any([approval, timeout])  # the loser is cancelled
    if winner is approval:
        answer = approval.result()
        if not answer.get("approved"):
            ctx.set_custom_status({"state": "rejected", "by": answer["by"]})
            return {"outcome": "rejected", "result": f"{request['id']} rejected by {answer['by']}"}
        ctx.set_custom_status({"state": "approved", "by": answer["by"]})
        result = await ctx.call_activity(process_approved, {**request, "approved_by": answer["by"]})
        return {"outcome": "approved", "result": result}
    ctx.set_custom_status({"state": "timed out"})
    result = await ctx.call_activity(escalate, request)
    return {"outcome": "escalated", "result": result}


def new_request(request_id: str, timeout_seconds: float) -> dict[str, object]:
    return {"id": request_id, "what": f"expense report {request_id}", "approver": "alice",
            "escalate_to": "bob (alice's manager)", "timeout_seconds": timeout_seconds}


async def wait_until_waiting(client: aioflow.Client, instance_id: str) -> None:
    """Poll the custom status until the workflow is waiting for the approval."""
    for _ in range(600):
        status = await client.get_status(instance_id)
        if status and isinstance(status.custom_status, dict) \
                and status.custom_status.get("state") == "waiting for approval":
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{instance_id} never started waiting for its approval")


async def approved_path(db: Path) -> aioflow.OrchestrationStatus:
    print("\n== 1. approved before the 72 h deadline (SQLite) ==")
    backend = aioflow.connect(f"sqlite:///{db}")
    client = aioflow.Client(backend, app=app)
    try:
        async with aioflow.Worker(app, backend):
            iid = await client.start_new(approval_workflow, new_request("EXP-1", 72 * 3600),
                                         instance_id="approval-EXP-1")
            print(f"started {iid!r}")
            await wait_until_waiting(client, iid)
            print(f"  [client] {iid} is waiting; alice approves it with raise_event")
            await client.raise_event(iid, APPROVAL_EVENT, {"approved": True, "by": "alice"})
            status = await client.wait_for_completion(iid, timeout=30)
    finally:
        await client.close()
    print(f"{iid}: {status.runtime_status.value}, output {status.output}")
    return status


async def timeout_path_skipping_time() -> aioflow.OrchestrationStatus:
    from aioflow.testing import TestEnvironment

    print("\n== 2. nobody answers: the 72 h deadline passes (TestEnvironment, time skipped) ==")
    async with TestEnvironment(app) as env:
        started_at = env.now
        iid = await env.client.start_new(approval_workflow, new_request("EXP-2", 72 * 3600),
                                         instance_id="approval-EXP-2")
        print(f"started {iid!r} at virtual time {started_at:%Y-%m-%d %H:%M}")
        status = await env.wait_for_completion(iid, timeout=30)
        print(f"finished at virtual time {env.now:%Y-%m-%d %H:%M} "
              f"({(env.now - started_at) / timedelta(hours=1):.0f} virtual hours later)")
    print(f"{iid}: {status.runtime_status.value}, output {status.output}")
    return status


async def timeout_path_real_time(db: Path, seconds: float) -> aioflow.OrchestrationStatus:
    print(f"\n== 2. nobody answers: the {seconds:g} s deadline passes (SQLite, real time) ==")
    backend = aioflow.connect(f"sqlite:///{db}")
    client = aioflow.Client(backend, app=app)
    try:
        async with aioflow.Worker(app, backend):
            iid = await client.start_new(approval_workflow, new_request("EXP-2", seconds),
                                         instance_id="approval-EXP-2")
            print(f"started {iid!r}; waiting {seconds:g} s for nobody to answer")
            status = await client.wait_for_completion(iid, timeout=seconds + 30)
    finally:
        await client.close()
    print(f"{iid}: {status.runtime_status.value}, output {status.output}")
    return status


async def main(timeout_seconds: float | None) -> int:
    with tempfile.TemporaryDirectory(prefix="aioflow-example-") as tmp:
        db = Path(tmp) / "human_interaction.db"
        approved = await approved_path(db)
        if timeout_seconds is None:
            timed_out = await timeout_path_skipping_time()
        else:
            timed_out = await timeout_path_real_time(db, timeout_seconds)

    print()
    problems = []
    if approved.runtime_status is not aioflow.RuntimeStatus.COMPLETED \
            or (approved.output or {}).get("outcome") != "approved":
        problems.append(f"EXP-1 should have been approved: {approved.runtime_status.value} "
                        f"{approved.output} {approved.failure_details}")
    if timed_out.runtime_status is not aioflow.RuntimeStatus.COMPLETED \
            or (timed_out.output or {}).get("outcome") != "escalated":
        problems.append(f"EXP-2 should have been escalated: {timed_out.runtime_status.value} "
                        f"{timed_out.output} {timed_out.failure_details}")
    expected_outbox = ["request:EXP-1", "processed:EXP-1", "request:EXP-2", "escalated:EXP-2"]
    if outbox != expected_outbox:
        problems.append(f"activities ran as {outbox}, expected {expected_outbox}")
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}", file=sys.stderr)
        return 1
    print("OK: EXP-1 approved and processed; EXP-2 timed out and escalated")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timeout-seconds", type=float, default=None, metavar="N",
        help="run the timeout path on SQLite with a real N-second deadline instead of skipping "
             "a 72-hour deadline in the time-skipping TestEnvironment")
    args = parser.parse_args(argv)
    if args.timeout_seconds is not None and args.timeout_seconds <= 0:
        parser.error("--timeout-seconds must be positive")
    return args


if __name__ == "__main__":
    sys.exit(aioflow.run(main(parse_args().timeout_seconds)))
