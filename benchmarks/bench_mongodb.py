"""aioflow throughput on the MongoDB backend, against a memory:// baseline run in the same
invocation, and the MongoDB commands one orchestration step costs; prints JSON.

The scenarios of `bench.py` at smaller sizes (each on a fresh database, one `Worker` and one
`Client` sharing one backend object in this process):

* ``chain``: one instance calling N activities one after another (steps/s);
* ``fanout``: one instance calling N activities with ``asyncio.gather`` (activities/s);
* ``instances``: N instances of a 3-step chain started at once (instances/s).

Each scenario also runs on ``memory://`` right before, and the MongoDB figure is reported as a
ratio to it (``slowdown_vs_memory``), so the numbers compare across machines. Every command the
driver sends is counted with PyMongo's command monitoring and reported per unit of work
(``mongodb_commands_per_step`` etc., by command name), next to the backend calls per unit.

The server: ``--uri mongodb://host:port/`` (or ``AIOFLOW_TEST_MONGODB_URI``), else FerretDB
built and started exactly as the tests do (``tests/servers/ferretdb.py``). FerretDB's SQLite
handler is much slower than MongoDB, so its figures are not MongoDB figures.

Usage::

    python benchmarks/bench_mongodb.py              # default sizes (about a minute on 2 cores)
    python benchmarks/bench_mongodb.py --quick      # small sizes
    python benchmarks/bench_mongodb.py --uri mongodb://127.0.0.1:27017/
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pymongo import MongoClient, monitoring

import aioflow
from aioflow.status import RuntimeStatus

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import WORKER_SETTINGS, Probe, app, machine, peak_rss_mib
from servers.ferretdb import ENV_URI, build_ferretdb, start_ferretdb

SIZES = {"chain": 300, "fanout": 1_000, "instances": 100}
QUICK = {"chain": 60, "fanout": 200, "instances": 20}
INSTANCE_STEPS = 3


class CommandCounter(monitoring.CommandListener):
    """Counts the commands the driver sends (by name), and their server-side time."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    def reset(self) -> None:
        self.counts.clear()
        self.seconds = 0.0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.seconds += event.duration_micros / 1e6

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.seconds += event.duration_micros / 1e6


class Run:
    """One scenario on one backend URL: a fresh backend, a Worker and a Client."""

    def __init__(self, url: str, counter: CommandCounter | None) -> None:
        self.url = url
        self.counter = counter

    async def __aenter__(self) -> Run:
        if self.url.startswith("memory://"):
            self.backend = aioflow.connect(self.url)
        else:
            from aioflow_mongodb import MongoBackend, split_uri

            client_uri, database, options = split_uri(self.url)
            self.backend = MongoBackend(client_uri, database, **options, client_options={
                "event_listeners": [self.counter] if self.counter else []})
            await self.backend.__aenter__()  # create the indexes before timing
        self.probe = Probe(self.backend)
        self.worker = aioflow.Worker(app, self.probe, **WORKER_SETTINGS)
        self.client = aioflow.Client(self.probe, app=app)
        await self.worker.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.worker.stop()
        finally:
            await self.backend.close()

    async def timed(self, name: str, inputs: list[int]) -> float:
        self.probe.reset()
        if self.counter is not None:
            self.counter.reset()
        began = time.perf_counter()
        ids = await asyncio.gather(*(self.client.start_new(name, i) for i in inputs))
        await self.probe.wait_finished(len(ids), timeout=900)
        elapsed = time.perf_counter() - began
        bad = [i for i in ids if self.probe.finished[i] != RuntimeStatus.COMPLETED]
        if bad:
            raise RuntimeError(f"{len(bad)} instances did not complete, e.g. {bad[:3]}")
        return elapsed

    def per_unit(self, units: int) -> dict[str, Any]:
        calls = {k: round(v / units, 2) for k, v in sorted(self.probe.calls.items())
                 if k != "wait_for_work"}
        out: dict[str, Any] = {"backend_calls": calls}
        if self.counter is not None:
            total = sum(self.counter.counts.values())
            out["mongodb_commands"] = {
                "total": round(total / units, 2),
                **{k: round(v / units, 2) for k, v in self.counter.counts.most_common()}}
            out["mongodb_command_ms_total"] = round(self.counter.seconds / units * 1000, 2)
        return out


def _fresh(server_uri: str) -> str:
    return f"{server_uri.rstrip('/')}/aioflow_bench_{uuid.uuid4().hex[:10]}"


async def scenario(server_uri: str, name: str, sizes: dict[str, int]) -> dict[str, Any]:
    if name == "chain":
        inputs, units, unit, workflow = [sizes["chain"]], sizes["chain"], "step", "chain"
    elif name == "fanout":
        inputs, units, unit, workflow = [sizes["fanout"]], sizes["fanout"], "activity", "fanout"
    else:
        n = sizes["instances"]
        inputs, units, unit, workflow = [INSTANCE_STEPS] * n, n, "instance", "chain"
    result: dict[str, Any] = {"size": units, "unit": unit}
    for label, url, counter in (("memory", "memory://", None),
                                ("mongodb", _fresh(server_uri), CommandCounter())):
        async with Run(url, counter) as run:
            elapsed = await run.timed(workflow, inputs)
            result[label] = {"elapsed_s": round(elapsed, 3),
                             f"{unit}s_per_s": round(units / elapsed, 1),
                             **run.per_unit(units)}
        if counter is not None:
            with MongoClient(server_uri) as sync_client:
                sync_client.drop_database(url.rsplit("/", 1)[1])
    result["slowdown_vs_memory"] = round(
        result["mongodb"]["elapsed_s"] / result["memory"]["elapsed_s"], 1)
    return result


async def main(server_uri: str, server: str, sizes: dict[str, int]) -> dict[str, Any]:
    report: dict[str, Any] = {"server": server, "machine": machine(), "sizes": sizes,
                              "worker_settings": WORKER_SETTINGS}
    for name in ("chain", "fanout", "instances"):
        report[name] = await scenario(server_uri, name, sizes)
    report["peak_rss_mib"] = peak_rss_mib()
    report["summary"] = {
        name: {
            "mongodb": report[name]["mongodb"][f"{report[name]['unit']}s_per_s"],
            "memory": report[name]["memory"][f"{report[name]['unit']}s_per_s"],
            "slowdown_vs_memory": report[name]["slowdown_vs_memory"],
            f"mongodb_commands_per_{report[name]['unit']}":
                report[name]["mongodb"]["mongodb_commands"]["total"],
        } for name in ("chain", "fanout", "instances")}
    return report


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", help=f"a MongoDB server (default: ${ENV_URI}, else FerretDB)")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    sizes = QUICK if args.quick else SIZES
    uri = args.uri or os.environ.get(ENV_URI)
    process = None
    if uri:
        server = f"MongoDB server at {uri}"
    else:
        binary = build_ferretdb()
        uri, process = start_ferretdb(binary)
        server = (f"FerretDB v1.24.2, SQLite handler (synchronous=NORMAL), embedded in "
                  f"tools/ferretdb, on loopback ({binary.name})")
    try:
        report = asyncio.run(main(uri, server, sizes))
    finally:
        if process is not None:
            process.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli()
