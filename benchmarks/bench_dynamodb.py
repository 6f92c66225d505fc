"""aioflow throughput on the DynamoDB + SQS backend, against memory:// in the same run; prints JSON.

The same scenarios as `bench.py` (SQLite) at smaller sizes, because every backend call here is
an HTTP round trip:

* ``chain``: one instance calling `--chain` activities one after another (steps/s);
* ``fanout``: one instance calling `--fanout` activities with ``asyncio.gather`` (activities/s);
* ``instances``: `--instances` instances of a 3-step chain started at once (instances/s);

each run on a fresh table and queues, and each also on ``memory://`` in the same invocation: the
figure that matters is the ratio (DynamoDB / memory), not the absolute number. For every
scenario it also prints the AWS API calls per orchestration step (a step = one activity call
and the orchestrator step that consumes its result), split into DynamoDB reads, DynamoDB writes
and SQS calls, counted by the backend itself (`DynamoDBBackend.calls`), so that users can
estimate request costs.

The servers are the test ones, started by this script on 127.0.0.1: moto (DynamoDB; it stands in
for Amazon's DynamoDB Local, whose licence this project cannot use) and ElasticMQ (SQS). They are
not AWS: absolute figures say little about AWS latency; call counts are exact.

Usage::

    python benchmarks/bench_dynamodb.py            # default sizes (about a minute on 2 cores)
    python benchmarks/bench_dynamodb.py --quick    # tiny sizes, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aioflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import app, chain, fanout  # the SQLite benchmark's workload, unchanged
from servers.aws_local import AwsEndpoints, aws_servers

_READS = {"GetItem", "Query", "BatchGetItem", "Scan", "DescribeTable"}
_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


def split_calls(calls: dict[str, int], steps: int) -> dict[str, Any]:
    """Calls per step: DynamoDB reads / writes, SQS, and each operation."""
    per_op = {k: round(v / steps, 2) for k, v in sorted(calls.items())}
    reads = sum(v for k, v in calls.items() if k.split(".")[1] in _READS)
    writes = sum(v for k, v in calls.items() if k.split(".")[1] in _WRITES)
    sqs = sum(v for k, v in calls.items() if k.startswith("sqs."))
    return {"dynamodb_reads": round(reads / steps, 2), "dynamodb_writes": round(writes / steps, 2),
            "sqs_calls": round(sqs / steps, 2), "by_operation": per_op}


async def run(url: str, scenario: str, size: int) -> dict[str, Any]:
    """Run one scenario on a fresh backend; seconds and (for DynamoDB) calls per step."""
    backend = aioflow.connect(url)
    client = aioflow.Client(backend)
    worker = aioflow.Worker(app, backend, poll_interval=0.2, max_concurrent_orchestrations=32,
                            max_concurrent_activities=64)
    try:
        await backend.get_instance("warm-up")  # opens clients, creates the table and queues
        before = collections.Counter(getattr(backend, "calls", {}))
        async with worker:
            began = time.perf_counter()
            if scenario == "instances":
                ids = await asyncio.gather(*(client.start_new(chain, 3) for _ in range(size)))
                for iid in ids:
                    status = await client.wait_for_completion(iid, timeout=600)
                    assert status.output == 3, status
                steps = size * 3
            else:
                flow = chain if scenario == "chain" else fanout
                iid = await client.start_new(flow, size)
                status = await client.wait_for_completion(iid, timeout=600)
                expected = size if scenario == "chain" else sum(range(1, size + 1))
                assert status.output == expected, status
                steps = size
            seconds = time.perf_counter() - began
        calls = collections.Counter(getattr(backend, "calls", {}))
        calls.subtract(before)
        result: dict[str, Any] = {"seconds": round(seconds, 3),
                                  "per_second": round((size if scenario != "chain" else steps)
                                                      / seconds, 1)}
        if calls:
            result["calls_per_step"] = split_calls(
                {k: v for k, v in calls.items() if v}, steps)
        return result
    finally:
        await backend.close()


async def main(sizes: dict[str, int], endpoints: AwsEndpoints) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu(), "python": platform.python_version(),
                    "servers": "moto (DynamoDB) + ElasticMQ (SQS) on 127.0.0.1, not AWS"},
        "sizes": sizes, "scenarios": {}}
    units = {"chain": "steps/s", "fanout": "activities/s", "instances": "instances/s"}
    for scenario, size in sizes.items():
        memory = await run("memory://", scenario, size)
        dynamodb = await run(endpoints.url(), scenario, size)
        report["scenarios"][scenario] = {
            "unit": units[scenario], "memory": memory["per_second"],
            "dynamodb": dynamodb["per_second"],
            "ratio_dynamodb_to_memory": round(dynamodb["per_second"] / memory["per_second"], 4),
            "calls_per_step": dynamodb["calls_per_step"]}
    return report


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--chain", type=int, default=100)
    parser.add_argument("--fanout", type=int, default=300)
    parser.add_argument("--instances", type=int, default=50)
    args = parser.parse_args()
    sizes = ({"chain": 10, "fanout": 20, "instances": 5} if args.quick else
             {"chain": args.chain, "fanout": args.fanout, "instances": args.instances})
    with tempfile.TemporaryDirectory() as logs, aws_servers(Path(logs)) as endpoints:
        report = asyncio.run(main(sizes, endpoints))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli()
