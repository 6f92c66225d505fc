"""Durable entity throughput on a backend (SQLite by default), with a same-run baseline.

Scenarios, each on a fresh store, with one `Worker` and one `Client` in this process:

* ``signals``: 20 concurrent clients each signal one counter entity `--signals / 20` times;
  operations applied per second, from the first signal to the moment the counter reads the
  total (the figure a hot aggregator cares about: many senders, one entity);
* ``calls``: one orchestration calls the counter `--calls` times one after another (durable
  request/response); calls per second, start to completion;
* ``locked``: `--transfers` orchestrations each move money between two of four accounts inside
  `ctx.lock_entities`, all started at once; critical sections per second.

Each scenario also runs on ``memory://`` in the same invocation (the baseline: aioflow's own
cost without storage), and the output gives the ratio. Nothing is asserted.

Usage::

    python benchmarks/bench_entities.py                   # SQLite, full sizes
    python benchmarks/bench_entities.py --quick           # small sizes (a smoke run)
    python benchmarks/bench_entities.py --url mongodb://127.0.0.1:27017/bench   # another store
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aioflow
from aioflow import EntityContext, EntityId, OrchestrationContext

app = aioflow.App()


@app.entity
def counter(ctx: EntityContext) -> int:
    value = int(ctx.get_state(lambda: 0))
    if ctx.operation_name == "add":
        value += int(ctx.get_input())
        ctx.set_state(value)
    return value


@app.entity
class Account:
    def __init__(self) -> None:
        self.balance = 1000

    def move(self, amount: int) -> int:
        self.balance += amount
        return self.balance


@app.orchestrator
async def call_many(ctx: OrchestrationContext, n: int) -> int:
    total = 0
    for _ in range(n):
        total = await ctx.call_entity(EntityId("counter", "calls"), "add", 1)
    return total


@app.orchestrator
async def transfer(ctx: OrchestrationContext, pair: list[str]) -> None:
    source, target = EntityId("account", pair[0]), EntityId("account", pair[1])
    async with ctx.lock_entities(source, target):
        await ctx.call_entity(source, "move", -1)
        await ctx.call_entity(target, "move", 1)


async def _signals(client: aioflow.Client, total: int) -> float:
    target = EntityId("counter", "hot")
    per_client = total // 20

    async def sender() -> None:
        for _ in range(per_client):
            await client.signal_entity(target, "add", 1)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(20)))
    while (await client.read_entity_state(target)).state != per_client * 20:
        await asyncio.sleep(0.005)
    return per_client * 20 / (time.perf_counter() - started)


async def _calls(client: aioflow.Client, n: int) -> float:
    started = time.perf_counter()
    iid = await client.start_new(call_many, n)
    status = await client.wait_for_completion(iid, timeout=600)
    assert status.output == n, status
    return n / (time.perf_counter() - started)


async def _locked(client: aioflow.Client, n: int) -> float:
    keys = ["a", "b", "c", "d"]
    # Overlapping pairs, so sections contend: (a, b), (b, c), ... then (a, c), ... (never x, x).
    pairs = [[keys[i % 4], keys[(i + 1 + (i // 4) % 3) % 4]] for i in range(n)]
    started = time.perf_counter()
    iids = [await client.start_new(transfer, pair) for pair in pairs]
    for iid in iids:
        await client.wait_for_completion(iid, timeout=600)
    elapsed = time.perf_counter() - started
    balances = [(await client.read_entity_state(EntityId("account", k))).state["balance"]
                for k in keys]
    assert sum(balances) == 4000, balances
    return n / elapsed


SCENARIOS: dict[str, tuple[str, Callable[[aioflow.Client, int], Awaitable[float]]]] = {
    "signals": ("operations/s", _signals),
    "calls": ("calls/s", _calls),
    "locked": ("critical sections/s", _locked),
}


async def _run(url: str, scenario: str, size: int) -> float:
    backend = aioflow.connect(url)
    client = aioflow.Client(backend)
    try:
        async with aioflow.Worker(app, backend, poll_interval=0.05):
            return await SCENARIOS[scenario][1](client, size)
    finally:
        await backend.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="backend URL (default: a fresh SQLite file per scenario)")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    sizes = {"signals": 400, "calls": 100, "locked": 20} if args.quick else \
        {"signals": 4000, "calls": 500, "locked": 100}
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "sizes": sizes, "scenarios": {}}
    for scenario, size in sizes.items():
        unit = SCENARIOS[scenario][0]
        with tempfile.TemporaryDirectory() as tmp:
            url = args.url or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
            measured = await _run(url, scenario, size)
        baseline = await _run(f"memory://bench-{scenario}", scenario, size)
        results["scenarios"][scenario] = {
            "unit": unit, "backend": round(measured, 1), "memory_baseline": round(baseline, 1),
            "ratio_to_baseline": round(measured / baseline, 3)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    aioflow.run(main())
