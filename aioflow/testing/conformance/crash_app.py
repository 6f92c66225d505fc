"""The App the crash-recovery and concurrency suites run.

It lives at module level so that worker child processes (`_worker_main`) import exactly the same
orchestrators and activities as the test process that starts the instances. Every orchestrator's
output is a pure function of its input (`expected_result`), except for the worker process ids
the activities report, which are kept apart under ``"pids"`` so a test can see which processes
did the work.

Two workloads:

* `fault_workflow`: one instance that makes every kind of backend write: a chain of three
  activities, a fan-out of five, a durable timer, a sub-orchestration and an external event
  raised by the client (`FaultInjectionSuite`).
* `chain_flow`, `fan_out_flow`, `timer_flow`, `parent_flow`, `event_flow`, `loop_flow`,
  `entity_flow`: many small instances for worker processes to share and to be killed in the
  middle of (`MultiProcessSuite`); the entity flows all change the same three `TALLY` entities.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aioflow.app import App
from aioflow.context import OrchestrationContext
from aioflow.entities import EntityContext, EntityId

__all__ = [
    "APPROVAL_EVENT", "GO_EVENT", "READY_LINE", "TALLY", "WAITING_FOR_APPROVAL", "app",
    "expected_result",
]

app = App()

#: The start of the line a worker process (`_worker_main`) prints on stdout once it runs.
READY_LINE = "aioflow-worker ready"
#: The custom status `fault_workflow` publishes when it starts waiting for its event.
WAITING_FOR_APPROVAL = "waiting for approval"
#: The external event `fault_workflow` waits for.
APPROVAL_EVENT = "approval"
#: The external event `event_flow` waits for.
GO_EVENT = "go"
#: The entity name `entity_flow` signals and locks (keys "total", "left" and "right").
TALLY = "crash.tally"


# -- the fault-injection workload ----------------------------------------------------------------


@app.activity(name="crash.add_one")
async def add_one(x: int) -> int:
    return x + 1


@app.activity(name="crash.square")
async def square(x: int) -> int:
    return x * x


@app.orchestrator(name="crash.fault_child")
async def fault_child(ctx: OrchestrationContext, x: int) -> int:
    y = await ctx.call_activity(add_one, x)
    return y * 10


@app.orchestrator(name="crash.fault_workflow")
async def fault_workflow(ctx: OrchestrationContext, seed: int) -> dict[str, Any]:
    chain = []
    x = seed
    for _ in range(3):
        x = await ctx.call_activity(add_one, x)
        chain.append(x)
    squares = await asyncio.gather(*(ctx.call_activity(square, x + i) for i in range(5)))
    await asyncio.sleep(0.1)  # a durable timer
    child = await ctx.call_sub_orchestrator(fault_child, x)
    ctx.set_custom_status(WAITING_FOR_APPROVAL)
    # One wait only: a client that retries `raise_event` after a lost response may deliver the
    # event twice, and the second copy must change nothing.
    approval = await ctx.wait_for_external_event(APPROVAL_EVENT)
    ctx.set_custom_status("done")
    return {"chain": chain, "squares": list(squares), "child": child, "approval": approval}


def _fault_workflow_result(seed: int, approval: Any) -> dict[str, Any]:
    last = seed + 3
    return {
        "chain": [seed + 1, seed + 2, seed + 3],
        "squares": [(last + i) ** 2 for i in range(5)],
        "child": (last + 1) * 10,
        "approval": approval,
    }


# -- the multi-process workload ------------------------------------------------------------------


@app.activity(name="crash.step")
async def step(spec: dict[str, Any]) -> dict[str, Any]:
    """Add one to `value` after `sleep` seconds; report which process did it."""
    await asyncio.sleep(float(spec.get("sleep", 0.0)))
    return {"value": int(spec["value"]) + 1, "pid": os.getpid()}


@app.orchestrator(name="crash.chain")
async def chain_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    value, pids = int(spec["start"]), []
    for _ in range(int(spec["length"])):
        out = await ctx.call_activity(step, {"value": value, "sleep": spec.get("sleep", 0.0)})
        value = out["value"]
        pids.append(out["pid"])
    return {"result": value, "pids": pids}


@app.orchestrator(name="crash.fan_out")
async def fan_out_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    outs = await asyncio.gather(*(
        ctx.call_activity(step, {"value": i * 10, "sleep": spec.get("sleep", 0.0)})
        for i in range(int(spec["width"]))
    ))
    return {"result": [o["value"] for o in outs], "pids": [o["pid"] for o in outs]}


@app.orchestrator(name="crash.timer")
async def timer_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    first = await ctx.call_activity(step, {"value": spec["start"]})
    await asyncio.sleep(float(spec["delay"]))  # a durable timer
    second = await ctx.call_activity(step, {"value": first["value"]})
    return {"result": second["value"], "pids": [first["pid"], second["pid"]]}


@app.orchestrator(name="crash.parent")
async def parent_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    child = await ctx.call_sub_orchestrator(
        chain_flow, {"start": spec["start"], "length": 2, "sleep": spec.get("sleep", 0.0)})
    last = await ctx.call_activity(step, {"value": child["result"]})
    return {"result": last["value"], "pids": [*child["pids"], last["pid"]]}


@app.orchestrator(name="crash.event")
async def event_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """A step, a wait for the client's `GO_EVENT` (its data is a number to add), a step."""
    first = await ctx.call_activity(step, {"value": spec["start"], "sleep": spec.get("sleep", 0)})
    bump = await ctx.wait_for_external_event(GO_EVENT)
    second = await ctx.call_activity(step, {"value": first["value"] + int(bump)})
    return {"result": second["value"], "pids": [first["pid"], second["pid"]]}


@app.orchestrator(name="crash.loop")
async def loop_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any] | None:
    """One activity per execution, then continue-as-new until `rounds` is used up."""
    out = await ctx.call_activity(step, {"value": spec["value"], "sleep": spec.get("sleep", 0.0)})
    pids = [*spec.get("pids", []), out["pid"]]
    if int(spec["rounds"]) > 1:
        ctx.continue_as_new({**spec, "value": out["value"], "rounds": int(spec["rounds"]) - 1,
                             "pids": pids})
        return None
    return {"result": out["value"], "pids": pids}


@app.entity(name=TALLY)
def tally(ctx: EntityContext) -> int:
    value = int(ctx.get_state(lambda: 0))
    if ctx.operation_name == "add":
        value += int(ctx.get_input())
        ctx.set_state(value)
    return value


@app.orchestrator(name="crash.entity")
async def entity_flow(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Signal the shared total `n` times, then move `n` from left to right in a critical
    section (so left + right stays 0 whatever order the flows run in)."""
    n = int(spec["n"])
    for _ in range(n):
        ctx.signal_entity(EntityId(TALLY, "total"), "add", 1)
    left, right = EntityId(TALLY, "left"), EntityId(TALLY, "right")
    async with ctx.lock_entities(left, right):
        before = await ctx.call_entity(left, "get") + await ctx.call_entity(right, "get")
        await ctx.call_entity(left, "add", -n)
        await ctx.call_entity(right, "add", n)
    return {"result": n if before == 0 else f"left + right was {before}", "pids": []}


def expected_result(name: str, spec: Any) -> Any:
    """The deterministic part of the output of orchestrator `name` started with `spec`.

    For the multi-process workload that is ``output["result"]``; for `fault_workflow` it is the
    whole output, given the approval event's data as ``spec["approval"]``.
    """
    if name == "crash.fault_workflow":
        return _fault_workflow_result(spec["seed"], spec["approval"])
    if name == "crash.fault_child":
        return (int(spec) + 1) * 10
    if name == "crash.chain":
        return int(spec["start"]) + int(spec["length"])
    if name == "crash.fan_out":
        return [i * 10 + 1 for i in range(int(spec["width"]))]
    if name == "crash.timer":
        return int(spec["start"]) + 2
    if name == "crash.parent":
        return int(spec["start"]) + 3
    if name == "crash.event":
        return int(spec["start"]) + 2 + int(spec["bump"])
    if name == "crash.loop":
        return int(spec["value"]) + int(spec["rounds"])
    if name == "crash.entity":
        return int(spec["n"])
    raise ValueError(f"no expected result known for orchestrator {name!r}")
