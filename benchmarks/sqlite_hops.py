"""What one SQLite backend transaction costs, measured against one aiosqlite round trip.

Every aiosqlite call is a hop to the connection's thread and back; on a small machine that hop
costs far more than a simple statement. The SQLite backend therefore runs each whole
transaction in one hop. This script measures, in one run on this machine:

* ``select1``: one aiosqlite round trip, ``await db.execute_fetchall("SELECT 1")`` (baseline);
* ``one_completion``: one ``complete_orchestrations`` call carrying a typical step (3 history
  events, 1 consumed message, 1 activity task, the row update) -- one transaction;
* ``naive_completion``: the same step written with one aiosqlite call per statement (what the
  backend avoids), for comparison;
* ``batch_100_completions``: one ``complete_orchestrations`` call carrying 100 such steps for
  100 instances -- still one transaction;
* ``one_completion_sql_only_in_thread``: the single-step transaction timed inside the
  connection thread (no hop): what is left of ``one_completion`` once the hop is paid;

and prints them as JSON with ratios to the baseline. Usage::

    python benchmarks/sqlite_hops.py [--synchronous NORMAL|FULL] [--quick]

Runs in well under 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import version

import aiosqlite
from aioflow_sqlite import SqliteBackend, _sql

from aioflow.backend import (
    ActivityTask,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    OrchestrationWorkItem,
)
from aioflow.status import RuntimeStatus

EVENT = b'{"type":"TaskScheduled","name":"Add","input":[1,2],"timestamp":1700000000.123}'
TASK = b'{"name":"Add","input":[1,2],"instance":"x","execution":"e1","seq":7}'


def summary(samples: list[float]) -> dict[str, float]:
    """Median, mean and p90 of per-call durations, in microseconds."""
    ordered = sorted(samples)
    return {
        "median_us": round(statistics.median(ordered) * 1e6, 1),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
        "p90_us": round(ordered[int(len(ordered) * 0.9)] * 1e6, 1),
        "n": len(ordered),
    }


async def timed(n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(n):
        began = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - began)
    return samples


def record(instance_id: str) -> InstanceRecord:
    now = time.time()
    return InstanceRecord(instance_id, "Bench", "e1", RuntimeStatus.PENDING, now, now, b"{}")


async def prepare(
    store: SqliteBackend, prefix: str, instances: int, steps: int
) -> list[OrchestrationWorkItem]:
    """Create and lock `instances` instances, each with `steps` messages waiting."""
    for k in range(instances):
        iid = f"{prefix}-{k}"
        await store.create_instance(record(iid), Message(f"{iid}-start", iid, b"{}"))
    await store.send_messages([
        Message(f"{prefix}-{k}-m{s}", f"{prefix}-{k}", EVENT)
        for k in range(instances) for s in range(steps)
    ])
    items = await store.lock_orchestrations(
        "bench", max_items=instances, lease_seconds=3600, max_messages=1
    )
    assert len(items) == instances
    return sorted(items, key=lambda i: int(i.instance.instance_id.rsplit("-", 1)[1]))


def step(item: OrchestrationWorkItem, s: int) -> OrchestrationCompletion:
    """A typical orchestration step; keeps the lease so the next step can run without relocking."""
    iid = item.instance.instance_id
    row = item.instance
    return OrchestrationCompletion(
        instance_id=iid,
        lock_token=item.lock_token,
        instance=InstanceRecord(row.instance_id, row.name, row.execution_id,
                                RuntimeStatus.RUNNING, row.created_time, time.time(), row.input),
        new_history=[EVENT, EVENT, EVENT],
        consumed=[f"{iid}-m{s}"],
        activities=[ActivityTask(f"{iid}-t{s}-{uuid.uuid4().hex[:8]}", iid, TASK)],
        release=False,
    )


async def naive_step(db: aiosqlite.Connection, item: OrchestrationWorkItem, s: int) -> None:
    """The same step as `step`, one aiosqlite call per statement (what the backend avoids)."""
    c = step(item, s)
    r = c.instance
    await db.execute("BEGIN IMMEDIATE")
    cur = await db.execute(
        "UPDATE aioflow_instances SET runtime_status = ?, last_updated_time = ?, "
        "history_length = history_length + ? WHERE instance_id = ? AND lock_token = ? "
        "RETURNING history_length",
        (r.runtime_status.value, r.last_updated_time, 3, c.instance_id, c.lock_token),
    )
    (length,) = await cur.fetchone()  # type: ignore[misc]
    await cur.close()
    await db.executemany(
        "INSERT INTO aioflow_history (instance_id, seq, data) VALUES (?, ?, ?)",
        [(c.instance_id, length - 3 + i, e) for i, e in enumerate(c.new_history)],
    )
    await db.executemany(
        "UPDATE aioflow_messages SET consumed = 1, data = NULL WHERE instance_id = ? AND id = ?",
        [(c.instance_id, m) for m in c.consumed],
    )
    await db.executemany(
        "INSERT OR IGNORE INTO aioflow_activities (id, instance_id, data) VALUES (?, ?, ?)",
        [(t.id, t.instance_id, t.data) for t in c.activities],
    )
    await db.execute(
        "UPDATE aioflow_instances SET ready_at = (SELECT MIN(visible_at) FROM aioflow_messages "
        "WHERE instance_id = ?1 AND consumed = 0) WHERE instance_id = ?1", (c.instance_id,)
    )
    await db.execute("COMMIT")


async def main(synchronous: str, quick: bool) -> dict[str, object]:
    # Measurements are interleaved in rounds, so that a change in machine load (other jobs on
    # a shared 2-core box) hits the baseline and the figures alike, and the ratios hold.
    rounds = 2 if quick else 8
    n_select, n_single, n_batch = (150, 75, 5) if quick else (400, 200, 10)
    select1: list[float] = []
    single: list[float] = []
    naive: list[float] = []
    hundreds: list[float] = []
    sql_single: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        # The per-statement variant writes to its own file: a second writer on the backend's
        # file would invalidate the backend connection's page cache and skew its figures.
        path = os.path.join(tmp, "bench.db")
        naive_path = os.path.join(tmp, "naive.db")
        async with SqliteBackend(path, synchronous=synchronous) as store, SqliteBackend(
            naive_path, synchronous=synchronous
        ) as naive_store, aiosqlite.connect(naive_path, isolation_level=None) as db:
            await db.execute(f"PRAGMA synchronous = {synchronous}")
            await db.execute("PRAGMA busy_timeout = 30000")
            steps = rounds * n_single
            (one_item,) = await prepare(store, "single", 1, 2 * steps)
            (naive_item,) = await prepare(naive_store, "naive", 1, steps)
            batch = await prepare(store, "batch", 100, rounds * n_batch)
            for _ in range(50):  # warm up the thread and the statement cache
                await db.execute_fetchall("SELECT 1")

            def sql_only(conn: sqlite3.Connection, todo: list[OrchestrationCompletion]
                         ) -> list[float]:
                """The single-step transaction timed inside the connection thread (no hop)."""
                samples = []
                for completion in todo:
                    began = time.perf_counter()
                    _sql.complete_orchestrations(conn, [completion])
                    samples.append(time.perf_counter() - began)
                return samples

            for r in range(rounds):
                # Build the completions up front: only the backend call is timed.
                s0, b0 = r * n_single, r * n_batch
                ones = [[step(one_item, s0 + i)] for i in range(n_single)]
                in_thread = [step(one_item, steps + s0 + i) for i in range(n_single)]
                batches = [[step(it, b0 + i) for it in batch] for i in range(n_batch)]

                async def one(i: int, ones: list[list[OrchestrationCompletion]] = ones) -> None:
                    assert await store.complete_orchestrations(ones[i]) == [True]

                async def hundred(
                    i: int, batches: list[list[OrchestrationCompletion]] = batches
                ) -> None:
                    assert await store.complete_orchestrations(batches[i]) == [True] * 100

                select1 += await timed(n_select, lambda i: db.execute_fetchall("SELECT 1"))
                single += await timed(n_single, one)
                async def by_statement(i: int, s0: int = s0) -> None:
                    await naive_step(db, naive_item, s0 + i)

                naive += await timed(n_single, by_statement)
                hundreds += await timed(n_batch, hundred)
                sql_single += await store._call(sql_only, in_thread)
            assert len(await store.get_history("batch-7")) == 3 * rounds * n_batch

    base = statistics.median(select1)
    one_c = statistics.median(single)
    naive_c = statistics.median(naive)
    batch_c = statistics.median(hundreds)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "aiosqlite": version("aiosqlite"),
            "synchronous": synchronous,
            "journal_mode": "WAL",
        },
        "select1": summary(select1),
        "one_completion": summary(single),
        "naive_completion_one_call_per_statement": summary(naive),
        "batch_100_completions": summary(hundreds),
        "one_completion_sql_only_in_thread": summary(sql_single),
        "ratios_to_select1": {
            "one_completion": round(one_c / base, 2),
            "naive_completion_one_call_per_statement": round(naive_c / base, 2),
            "batch_100_completions": round(batch_c / base, 2),
            "batch_100_completions_per_completion": round(batch_c / 100 / base, 3),
            "one_completion_sql_only_in_thread": round(statistics.median(sql_single) / base, 2),
        },
        "notes": (
            "medians over interleaved rounds; a typical step is 3 history events, 1 consumed "
            "message, 1 activity task and the row update; every completion call is one "
            "transaction and one thread hop"
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL", "EXTRA"])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = parser.parse_args()
    began = time.perf_counter()
    result = asyncio.run(main(args.synchronous, args.quick))
    result["elapsed_s"] = round(time.perf_counter() - began, 2)
    json.dump(result, sys.stdout, indent=2)
    print()
