"""Aggregator: a durable entity that many senders update at once, each update applied once.

The `counter` entity is the one from the Durable Functions documentation: operations `add`,
`reset` and `get` on an integer state. Here it counts events per device metric, keyed by the
metric ("sensor-7/temperature-alarms").

The script feeds one counter from many places at the same time, on a fresh SQLite database with
two workers sharing it:

* 20 clients (think: 20 web requests) each signal `add 1` 40 times, concurrently: 800 signals;
* 10 `report_batch` orchestrations each signal `add` 20 times: 200 more;
* one `read_after` orchestration then calls `get` and returns the value it saw.

Operations on one entity are applied one at a time and exactly once, so the count ends at exactly
1,000 however the signals interleave and whichever worker applies them. The script then moves
budget between two `budget` entities inside a critical section (`ctx.lock_entities`), while
another orchestration audits the total under the same locks.

Run it:

    python examples/aggregator.py

Exits with status 1 unless the counter reads exactly 1000 and the budgets still add up.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aioflow
from aioflow import EntityContext, EntityId, OrchestrationContext

app = aioflow.App()
METRIC = EntityId("counter", "sensor-7/temperature-alarms")


@app.entity
def counter(ctx: EntityContext) -> None:
    """The counter from the docs: add, reset, get."""
    value = ctx.get_state(lambda: 0)
    if ctx.operation_name == "add":
        ctx.set_state(value + ctx.get_input())
    elif ctx.operation_name == "reset":
        ctx.set_state(0)
    elif ctx.operation_name == "get":
        ctx.set_result(value)
    else:
        raise ValueError(f"counter has no operation {ctx.operation_name!r}")


@app.entity
class Budget:
    """A class entity: public methods are operations, attributes are the state."""

    def __init__(self) -> None:
        self.amount = 0

    def grant(self, amount: int) -> int:
        self.amount += amount
        return self.amount

    def spend(self, amount: int) -> int:
        if amount > self.amount:
            raise ValueError(f"cannot spend {amount}, only {self.amount} left")
        self.amount -= amount
        return self.amount

    def get(self) -> int:
        return self.amount


@app.orchestrator
async def report_batch(ctx: OrchestrationContext, events: int) -> int:
    for _ in range(events):
        ctx.signal_entity(METRIC, "add", 1)  # one-way: sent when this step commits
    return events


@app.orchestrator
async def read_after(ctx: OrchestrationContext) -> int:
    return int(await ctx.call_entity(METRIC, "get"))  # request/response, durable


@app.orchestrator
async def move_budget(ctx: OrchestrationContext, spec: dict[str, Any]) -> str:
    source, target = EntityId("budget", spec["from"]), EntityId("budget", spec["to"])
    async with ctx.lock_entities(source, target):  # nobody else touches either meanwhile
        await ctx.call_entity(source, "spend", spec["amount"])
        await ctx.call_entity(target, "grant", spec["amount"])
    return f"moved {spec['amount']} from {spec['from']} to {spec['to']}"


@app.orchestrator
async def audit_budgets(ctx: OrchestrationContext, keys: list[str]) -> int:
    ids = [EntityId("budget", k) for k in keys]
    async with ctx.lock_entities(*ids):
        return sum([await ctx.call_entity(i, "get") for i in ids])


async def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'aggregator.db'}"
        backend = aioflow.connect(url)
        other = aioflow.connect(url)  # the second worker's own connection, as in another process
        client = aioflow.Client(backend, app=app)
        started = time.monotonic()
        async with aioflow.Worker(app, backend, poll_interval=0.05), \
                aioflow.Worker(app, other, poll_interval=0.05) as second:

            async def web_request(n: int) -> None:
                for _ in range(40):
                    await client.signal_entity(METRIC, "add", 1)

            batches = [await client.start_new(report_batch, 20) for _ in range(10)]
            await asyncio.gather(*(web_request(n) for n in range(20)))
            print("[clients] 20 clients sent 800 signals; 10 orchestrations send 200 more")
            for iid in batches:
                await client.wait_for_completion(iid)
            while (await client.read_entity_state(METRIC)).state != 1000:
                if time.monotonic() - started > 60:
                    break
                await asyncio.sleep(0.05)
            seen = await client.wait_for_completion(await client.start_new(read_after))
            state = await client.read_entity_state(METRIC)
            print(f"[counter] {METRIC.key}: {state.state} "
                  f"(a read_after orchestration saw {seen.output})")

            await client.signal_entity(EntityId("budget", "ops"), "grant", 300)
            await client.signal_entity(EntityId("budget", "dev"), "grant", 200)
            moves = [await client.start_new(move_budget, {"from": a, "to": b, "amount": n})
                     for a, b, n in [("ops", "dev", 50), ("dev", "ops", 120), ("ops", "dev", 75)]]
            audit = await client.start_new(audit_budgets, ["dev", "ops"])
            for iid in moves:
                print(f"[budget] {(await client.wait_for_completion(iid)).output}")
            total = (await client.wait_for_completion(audit)).output
            ops = (await client.read_entity_state(EntityId("budget", "ops"))).state
            dev = (await client.read_entity_state(EntityId("budget", "dev"))).state
            print(f"[budget] ops={ops['amount']} dev={dev['amount']}, audited total {total}")
            print(f"[workers] the second worker applied {second.stats['entity_operations']} "
                  f"entity operations")
        await client.close()
        await other.close()
    if state.state != 1000 or seen.output != 1000:
        print(f"FAIL: the counter reads {state.state} (read_after saw {seen.output}); "
              f"expected exactly 1000", file=sys.stderr)
        return 1
    if total != 500 or ops["amount"] + dev["amount"] != 500:
        print(f"FAIL: budgets total {total} / {ops} + {dev}; expected 500", file=sys.stderr)
        return 1
    print("OK: 1000 concurrent signals counted exactly once; budgets still total 500")
    return 0


if __name__ == "__main__":
    sys.exit(aioflow.run(main()))
