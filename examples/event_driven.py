"""Event-driven workflow: start a workflow per business key, later find it by that key and
raise the event that lets it finish.

The caller that starts a workflow often does not keep the instance id — it only knows its own
key ("order-42"). The `order_workflow` orchestrator takes that key as its input, does some work,
then sleeps (durably, consuming nothing) in `ctx.wait_for_external_event("Workflow")` until
something outside tells it to go on.

The script plays two parts:

1. The starter: starts one workflow for each of "order-41", "order-42" and "order-43" with
   generated instance ids, and forgets the ids.
2. A separate client (its own `Client` and SQLite connection, as another process would have):
   queries the Running `order_workflow` instances created in a window of 20 minutes around now
   (`client.query_instances(created_from=..., created_to=..., runtime_status=...)`), picks the
   one whose input is "order-42", and raises the "Workflow" event on it. Then it checks on it
   again: order-42 is Completed while the other two are still waiting.

Run it:

    python examples/event_driven.py

Uses a fresh SQLite file in a temporary directory; exits with status 1 unless exactly the
order-42 workflow completed (and with the event's data in its output).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aioflow

app = aioflow.App()

EVENT_NAME = "Workflow"


@app.activity
async def prepare(key: str) -> str:
    print(f"  [activity] prepare({key!r}): package ready, waiting for pick-up")
    return f"PKG-{key}"


@app.activity
async def hand_over(info: dict[str, str]) -> str:
    print(f"  [activity] hand_over: {info['package']} collected by {info['courier']}")
    return f"{info['package']} with {info['courier']}"


@app.orchestrator
async def order_workflow(ctx: aioflow.OrchestrationContext, key: str) -> dict[str, str]:
    package = await ctx.call_activity(prepare, key)
    ctx.set_custom_status(f"{key}: waiting for the {EVENT_NAME!r} event")
    pickup = await ctx.wait_for_external_event(EVENT_NAME)  # no deadline: wait as long as it takes
    handed = await ctx.call_activity(hand_over, {"package": package, "courier": pickup["courier"]})
    ctx.set_custom_status(f"{key}: done")
    return {"key": key, "result": handed}


async def find_running_workflow(client: aioflow.Client, key: str) -> aioflow.OrchestrationStatus:
    """The running `order_workflow` instance whose input is `key`, created around now."""
    for attempt in range(1, 101):
        now = datetime.now(UTC)
        async for status in client.iter_instances(
                name=order_workflow, runtime_status=aioflow.RuntimeStatus.RUNNING,
                created_from=now - timedelta(minutes=20), created_to=now + timedelta(minutes=20)):
            if status.input == key:
                return status
        if attempt == 1:
            print(f"  [client] no running workflow for {key!r} yet; retrying")
        await asyncio.sleep(0.05)
    raise LookupError(f"no running order_workflow instance has the input {key!r}")


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aioflow-example-") as tmp:
        return await run_example(f"sqlite:///{Path(tmp) / 'event_driven.db'}")


async def run_example(url: str) -> int:
    keys = ["order-41", "order-42", "order-43"]
    backend = aioflow.connect(url)
    starter = aioflow.Client(backend, app=app)
    print(f"backend: {backend!r}")
    try:
        async with aioflow.Worker(app, backend):
            # -- 1. the starter: one workflow per key; the generated ids are not kept ----------
            for key in keys:
                await starter.start_new(order_workflow, key)
                print(f"[starter] started a workflow for {key!r}")

            # -- 2. another client, knowing only the key "order-42" ----------------------------
            other = aioflow.Client(url)
            try:
                print("[client] looking for the running workflow of 'order-42'")
                found = await find_running_workflow(other, "order-42")
                print(f"[client] found instance {found.instance_id!r}: name {found.name!r}, "
                      f"input {found.input!r}, status {found.runtime_status.value}, "
                      f"created {found.created_time:%H:%M:%S}, custom status "
                      f"{found.custom_status!r}")
                await other.raise_event(found.instance_id, EVENT_NAME, {"courier": "DHL"})
                print(f"[client] raised {EVENT_NAME!r} on {found.instance_id!r}")
                final = await other.wait_for_completion(found.instance_id, timeout=30)
                print(f"[client] {found.instance_id!r} is {final.runtime_status.value}: "
                      f"{final.output}")
                still_running = sorted(
                    [s.input async for s in other.iter_instances(
                        name=order_workflow, runtime_status=aioflow.RuntimeStatus.RUNNING)])
                completed = sorted(
                    [s.input async for s in other.iter_instances(
                        name=order_workflow, runtime_status=aioflow.RuntimeStatus.COMPLETED)])
            finally:
                await other.close()
    finally:
        await starter.close()

    print(f"completed workflows: {completed}; still waiting: {still_running}")
    expected_output = {"key": "order-42", "result": "PKG-order-42 with DHL"}
    problems = []
    if final.runtime_status is not aioflow.RuntimeStatus.COMPLETED \
            or final.output != expected_output:
        problems.append(f"order-42 should be Completed with {expected_output}: "
                        f"{final.runtime_status.value} {final.output} {final.failure_details}")
    if completed != ["order-42"] or still_running != ["order-41", "order-43"]:
        problems.append("only order-42 should have completed")
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}", file=sys.stderr)
        return 1
    print("OK: found order-42 by its input, raised the event, and only that workflow finished")
    return 0


if __name__ == "__main__":
    sys.exit(aioflow.run(main()))
