"""Worker processes sharing one MongoDB database: the shared multi-process suite (with and
without SIGKILL), and a scale-out run of 1,000 activities across 100 instances."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import ClassVar

import pytest
from servers.ferretdb import MongoServer, mongodb_database, mongodb_server  # noqa: F401

from aioflow.client import Client
from aioflow.connect import connect
from aioflow.testing.conformance import MultiProcessSuite
from aioflow.testing.conformance.processes import Workload, _WorkerProcesses


class TestMongoWorkerProcesses(MultiProcessSuite):
    #: The scale-out run: instances (half chains, half fan-outs) x activities each.
    scale_instances: ClassVar[int] = 100
    scale_activities_per_instance: ClassVar[int] = 10
    scale_workers: ClassVar[int] = 3
    scale_timeout: ClassVar[float] = 240.0

    @pytest.fixture
    def backend_url(
        self, mongodb_server: MongoServer, mongodb_database: str  # noqa: F811
    ) -> str:
        return mongodb_server.url(mongodb_database)

    async def test_scale_out_three_workers_complete_1000_activities_once_each(
        self, backend_url: str, tmp_path: Path
    ) -> None:
        width = self.scale_activities_per_instance
        workload: Workload = {}
        for n in range(self.scale_instances):
            if n % 2:
                workload[f"scale-fan-{n:03d}"] = ("crash.fan_out", {"width": width, "sleep": 0})
            else:
                workload[f"scale-chain-{n:03d}"] = (
                    "crash.chain", {"start": n * 1000, "length": width, "sleep": 0})
        activities = self.scale_instances * width
        assert activities >= 1000 and len(workload) >= 100

        workers = _WorkerProcesses(backend_url, tmp_path, [
            "--lease", "5", "--poll", "0.05", "--max-orchestrations", "8",
            "--max-activities", "16", "--activity-batch", "8"])
        backend = connect(backend_url)
        client = Client(backend)
        try:
            for _ in range(self.scale_workers):
                await workers.start()
            began = time.monotonic()
            for iid, (name, spec) in workload.items():
                await self.start(client, iid, name, spec)
            timeout, self.completion_timeout = self.completion_timeout, self.scale_timeout
            try:
                await self.wait_until_finished(client, workload, workers)
            finally:
                self.completion_timeout = timeout
            elapsed = time.monotonic() - began
            # Exactly once: every instance Completed with the right result, and its history has
            # each activity scheduled once and answered once (no step was committed twice).
            problems = await self.check(client, workload)
            problems += [f"a worker process died: {c}" for c in workers.crashed()]
            assert not problems, self.report(problems, workers)
            per_worker = collections.Counter()
            for iid in workload:
                status = await client.get_status(iid)
                assert status is not None and isinstance(status.output, dict)
                per_worker.update(status.output["pids"])
            assert sum(per_worker.values()) == activities, (
                f"expected {activities} activity results in the outputs, got "
                f"{sum(per_worker.values())}")
            assert len(per_worker) == self.scale_workers, (
                f"activities ran in {len(per_worker)} of {self.scale_workers} worker processes "
                f"({dict(per_worker)}): the work was not shared")
            print(f"\nscale-out: {len(workload)} instances, {activities} activities, "
                  f"{self.scale_workers} worker processes: {elapsed:.1f} s "
                  f"({activities / elapsed:.0f} activities/s); activities per process: "
                  f"{sorted(per_worker.values())}")
        finally:
            await workers.close()
            await backend.close()
