"""Scale-out on the DynamoDB + SQS backend: three worker processes on the same table and queues
complete 1,000 activities across 100 instances, every step exactly once, every result right.

It reuses `MultiProcessSuite`'s machinery: its worker child processes, its workload flows
(`crash_app`) and its exactly-once check of every stored history (`history_problems`: one
start, one completion, each task scheduled once and answered once).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from servers.aws_local import AwsEndpoints, aws_endpoints  # noqa: F401 - fixture

from aioflow.client import Client
from aioflow.connect import connect
from aioflow.events import TaskCompleted
from aioflow.testing.conformance import MultiProcessSuite
from aioflow.testing.conformance.processes import _WorkerProcesses

WORKERS = 3
CHAINS = 20  # 10 activities one after another each: 11 orchestration steps
FAN_OUTS = 80  # 10 activities at once each: a start step, then results in batches
WIDTH = 10


@pytest.mark.slow
async def test_three_worker_processes_complete_1000_activities_across_100_instances(
    aws_endpoints: AwsEndpoints, tmp_path: Path  # noqa: F811
) -> None:
    checks = MultiProcessSuite()
    checks.completion_timeout = 240.0
    workload: dict[str, tuple[str, dict[str, Any]]] = {}
    for i in range(CHAINS):
        workload[f"chain-{i:03d}"] = ("crash.chain", {"start": i * 100, "length": WIDTH,
                                                      "sleep": 0.0})
    for i in range(FAN_OUTS):
        workload[f"fan-{i:03d}"] = ("crash.fan_out", {"width": WIDTH, "sleep": 0.0})
    url = aws_endpoints.url()
    workers = _WorkerProcesses(url, tmp_path, [
        "--lease", "20", "--poll", "0.5", "--max-orchestrations", "16",
        "--max-activities", "32", "--activity-batch", "10"])
    backend = connect(url)
    client = Client(backend)
    try:
        for _ in range(WORKERS):
            await workers.start()
        began = time.monotonic()
        names = list(workload.items())
        for i in range(0, len(names), 20):
            await asyncio.gather(*(checks.start(client, iid, name, spec)
                                   for iid, (name, spec) in names[i:i + 20]))
        # Wait instance by instance (a cheap read each) rather than querying every instance
        # ten times a second: moto's queries scan the whole table.
        deadline = time.monotonic() + checks.completion_timeout
        for iid in workload:
            await client.wait_for_completion(iid, timeout=max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - began

        problems = await checks.check(client, workload)
        problems += [f"a worker process died: {c}" for c in workers.crashed()]
        assert not problems, checks.report(problems, workers)
        activities = 0
        for iid in workload:
            history = await client.get_history(iid)
            activities += sum(isinstance(e, TaskCompleted) for e in history)
        assert activities == (CHAINS + FAN_OUTS) * WIDTH >= 1000, (
            f"expected {(CHAINS + FAN_OUTS) * WIDTH} completed activities, counted {activities}")
        pids = await checks.activity_pids(client, workload)
        assert pids <= {p.pid for p in workers.started} and len(pids) == WORKERS, (
            f"every one of the {WORKERS} worker processes must have run activities; "
            f"activities ran in {sorted(pids)}")
        print(f"\nscale-out: {len(workload)} instances, {activities} activities, "
              f"{WORKERS} worker processes, {elapsed:.1f} s "
              f"({activities / elapsed:.0f} activities/s)")
    finally:
        await workers.close()
        await backend.close()
