"""aioflow throughput on the SQLite backend, with same-run baselines; prints JSON.

Scenarios (each on a fresh database file in its own temporary directory, one `Worker` and one
`Client` sharing one backend object in this process, on the loop `aioflow.run` picks):

* ``chain``: one instance calling 1,000 activities one after another (steps/s; a step is one
  activity call plus the orchestrator processing its result);
* ``fanout``: one instance calling 10,000 activities with ``asyncio.gather`` (activities/s, from
  ``start_new`` to completion);
* ``instances``: 1,000 instances of a 3-step chain started at once (instances/s, from the first
  ``start_new`` to the last completion);
* ``scaling``: a 10,000-step chain against a 1,000-step chain; the ratio of their per-step costs
  is ~1 when a step costs O(1), whatever the history length;

plus baselines measured in the same run (the 1,000-step chain on ``memory://``, 1,000 trivial
awaits on the bare loop, 1,000 aiosqlite ``SELECT 1`` round trips), peak RSS, the machine and
the worker settings. Each figure is printed next to its target; nothing is asserted.

Completion is observed exactly, without polling: the backend is wrapped in a pass-through
probe that sees every committed terminal step (and counts backend calls per method, so the
output shows how many calls -- on SQLite, thread hops -- each step costs).

Usage::

    python benchmarks/bench.py                  # full sizes, 3 runs each (~45 s on 2 cores)
    python benchmarks/bench.py --quick          # small sizes, 1 run: CI smoke (a few seconds)
    python benchmarks/bench.py --only chain     # one scenario (repeatable); baselines always run
    python benchmarks/bench.py --no-uvloop      # plain asyncio even if uvloop is installed
    python benchmarks/bench.py --profile out.prof --only fanout   # cProfile the scenarios
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aioflow
from aioflow.connect import ENV_VAR
from aioflow.status import RuntimeStatus

# -- the workload ---------------------------------------------------------------------------

app = aioflow.App()


@app.activity
async def inc(x: int) -> int:
    """A trivial async activity: the figures measure aioflow, not the activity (no thread hop)."""
    return x + 1


@app.orchestrator
async def chain(ctx: aioflow.OrchestrationContext, n: int) -> int:
    value = 0
    for _ in range(n):
        value = await ctx.call_activity(inc, value)
    return value


@app.orchestrator
async def fanout(ctx: aioflow.OrchestrationContext, n: int) -> int:
    results = await asyncio.gather(*(ctx.call_activity(inc, i) for i in range(n)))
    return sum(results)


FULL = {"chain": 1_000, "fanout": 10_000, "instances": 1_000, "instance_steps": 3,
        "scaling_long": 10_000, "scaling_short": 1_000, "baseline": 1_000}
QUICK = {"chain": 200, "fanout": 1_000, "instances": 100, "instance_steps": 3,
         "scaling_long": 2_000, "scaling_short": 200, "baseline": 200}

#: Worker settings for throughput with one worker and cheap async activities: claim big
#: batches (fewer transactions per unit of work), keep every live instance cached.
WORKER_SETTINGS: dict[str, Any] = {
    "max_concurrent_activities": 1_000,
    "activity_batch_size": 500,
    "max_concurrent_orchestrations": 200,
    "cache_size": 5_000,
    "lease_seconds": 60.0,
    "poll_interval": 1.0,
}

TARGETS = {
    "chain": (">=", 3_000, "steps/s"),
    "fanout": (">=", 10_000, "activities/s"),
    "instances": (">=", 1_000, "instances/s"),
    "scaling": ("<=", 1.2, "per-step cost ratio"),
}

SCENARIOS = ("chain", "fanout", "instances", "scaling")


# -- observing the backend --------------------------------------------------------------------

class Probe:
    """A pass-through backend wrapper: counts calls per method and sees terminal commits.

    It adds one coroutine frame per call (~1 µs), no I/O. `finished` holds the ids of instances
    whose terminal step (Completed/Failed/Terminated) was committed; `wait_finished(n)` returns
    once `n` of them were.
    """

    _COUNTED = frozenset({
        "create_instance", "get_instance", "get_history", "send_messages",
        "lock_orchestrations", "complete_orchestrations", "abandon_orchestration",
        "renew_orchestration_lease", "lock_activities", "complete_activities",
        "abandon_activity", "renew_activity_lease", "wait_for_work", "query_instances",
        "purge_instances",
    })

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()
        self.finished: dict[str, RuntimeStatus] = {}
        self._want = 0
        self._done = asyncio.Event()

    def reset(self) -> None:
        self.calls.clear()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self._COUNTED:
            return attr
        calls = self.calls

        async def counted(*args: Any, **kwargs: Any) -> Any:
            result = await attr(*args, **kwargs)
            calls[name] += 1
            if name in ("lock_orchestrations", "lock_activities") and not result:
                calls[name + " (empty)"] += 1
            return result

        setattr(self, name, counted)  # cache: later lookups skip __getattr__
        return counted

    async def complete_orchestrations(self, completions: Any) -> list[bool]:
        committed = await self.inner.complete_orchestrations(completions)
        self.calls["complete_orchestrations"] += 1
        self.calls["orchestration steps committed"] += sum(committed)
        for c, ok in zip(completions, committed, strict=True):
            if ok and c.instance.runtime_status.is_terminal:
                self.finished[c.instance_id] = c.instance.runtime_status
        if self._want and len(self.finished) >= self._want:
            self._done.set()
        return committed

    async def wait_finished(self, count: int, timeout: float) -> None:
        self._want = count
        if len(self.finished) < count:
            await asyncio.wait_for(self._done.wait(), timeout)


class Harness:
    """A fresh backend (SQLite file in a temp dir, or memory://), a Worker and a Client."""

    def __init__(self, kind: str, settings: dict[str, Any]) -> None:
        self.kind = kind
        self.settings = settings
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> Harness:
        if self.kind == "sqlite":
            self._tmp = tempfile.TemporaryDirectory(prefix="aioflow-bench-")
            url = f"sqlite:///{os.path.join(self._tmp.name, 'bench.db')}"
        else:
            url = "memory://"  # fresh and private (a named one would live on)
        self.backend = aioflow.connect(url)
        if hasattr(self.backend, "__aenter__"):
            await self.backend.__aenter__()  # open the connection (and schema) before timing
        self.probe = Probe(self.backend)
        self.worker = aioflow.Worker(app, self.probe, **self.settings)
        self.client = aioflow.Client(self.probe, app=app)
        await self.worker.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.worker.stop()
        finally:
            await self.backend.close()
            if self._tmp is not None:
                self._tmp.cleanup()

    async def run(self, name: str, inputs: list[int], timeout: float) -> float:
        """Start one instance per input at once; seconds until the last one finished."""
        began = time.perf_counter()
        ids = await asyncio.gather(*(self.client.start_new(name, i) for i in inputs))
        await self.probe.wait_finished(len(ids), timeout)
        elapsed = time.perf_counter() - began
        bad = {i: s.value for i in ids if (s := self.probe.finished[i]) != RuntimeStatus.COMPLETED}
        if bad:
            raise RuntimeError(f"{len(bad)} instances did not complete: {list(bad.items())[:3]}")
        return elapsed

    async def check_output(self, instance_id: str, expected: Any) -> None:
        """The workload's result must be right (a check of correctness, not of timing)."""
        status = await self.client.get_status(instance_id, show_input=False)
        if status is None or status.output != expected:
            raise RuntimeError(f"instance {instance_id}: expected output {expected!r}, got "
                               f"{status and status.output!r}")

    def per_unit_calls(self, units: int) -> dict[str, float]:
        """Backend calls per unit of work (calls on SQLite, each but wait_for_work = one hop)."""
        calls = dict(sorted(self.probe.calls.items()))
        out = {k: round(v / units, 3) for k, v in calls.items()}
        hops = sum(v for k, v in calls.items() if "(" not in k and k not in (
            "wait_for_work", "orchestration steps committed"))
        out["total_backend_round_trips"] = round(hops / units, 3)
        return out


def _target(name: str, value: float) -> dict[str, Any]:
    op, bound, unit = TARGETS[name]
    meets = value >= bound if op == ">=" else value <= bound
    return {"target": f"{op} {bound:,} {unit}", "meets_target": meets}


# -- scenarios --------------------------------------------------------------------------------

async def repeated(
    n: int, key: str, run: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run `run` n times; report the median run (by `key`) and every run's `key`."""
    runs = []
    for _ in range(n):
        gc.collect()
        runs.append(await run())
    median = dict(sorted(runs, key=lambda r: r[key])[len(runs) // 2])
    if n > 1:
        median["runs"] = {key: [r[key] for r in runs], "reported": "the median run"}
    return median


async def run_chain(kind: str, steps: int, settings: dict[str, Any]) -> dict[str, Any]:
    async with Harness(kind, settings) as h:
        h.probe.reset()
        elapsed = await h.run("chain", [steps], timeout=600)
        (iid,) = h.probe.finished
        calls = h.per_unit_calls(steps)
        stats = dict(h.worker.stats)
        await h.check_output(iid, steps)
    return {"steps": steps, "elapsed_s": round(elapsed, 4),
            "steps_per_s": round(steps / elapsed, 1),
            "per_step_us": round(elapsed / steps * 1e6, 1),
            "backend_calls_per_step": calls, "worker_stats": stats}


async def scenario_chain(sizes: dict[str, int], base: dict[str, Any], n: int) -> dict[str, Any]:
    result = await repeated(n, "steps_per_s",
                            lambda: run_chain("sqlite", sizes["chain"], WORKER_SETTINGS))
    result.update(_target("chain", result["steps_per_s"]))
    per_step = result["per_step_us"]
    result["ratios"] = {
        "per_step_vs_memory_backend_step": round(per_step / base["memory_chain"]["per_step_us"], 2),
        "per_step_vs_aiosqlite_round_trip": round(
            per_step / base["aiosqlite_select1"]["per_call_us"], 2),
        "per_step_vs_bare_loop_await": round(per_step / base["bare_loop_await"]["per_await_us"], 1),
    }
    return result


async def run_fanout(n: int) -> dict[str, Any]:
    async with Harness("sqlite", WORKER_SETTINGS) as h:
        elapsed = await h.run("fanout", [n], timeout=600)
        (iid,) = h.probe.finished
        calls = h.per_unit_calls(n)
        stats = dict(h.worker.stats)
        await h.check_output(iid, n * (n + 1) // 2)
    return {"activities": n, "elapsed_s": round(elapsed, 4),
            "activities_per_s": round(n / elapsed, 1),
            "per_activity_us": round(elapsed / n * 1e6, 1),
            "backend_calls_per_activity": calls, "worker_stats": stats}


async def scenario_fanout(sizes: dict[str, int], base: dict[str, Any], n: int) -> dict[str, Any]:
    result = await repeated(n, "activities_per_s", lambda: run_fanout(sizes["fanout"]))
    return {**_target("fanout", result["activities_per_s"]), **result}


async def run_instances(n: int, steps: int) -> dict[str, Any]:
    async with Harness("sqlite", WORKER_SETTINGS) as h:
        elapsed = await h.run("chain", [steps] * n, timeout=600)
        calls = h.per_unit_calls(n)
        stats = dict(h.worker.stats)
        await h.check_output(next(iter(h.probe.finished)), steps)
    return {"instances": n, "steps_each": steps, "elapsed_s": round(elapsed, 4),
            "instances_per_s": round(n / elapsed, 1),
            "activity_steps_per_s": round(n * steps / elapsed, 1),
            "backend_calls_per_instance": calls, "worker_stats": stats}


async def scenario_instances(sizes: dict[str, int], base: dict[str, Any], n: int) -> dict[str, Any]:
    result = await repeated(n, "instances_per_s",
                            lambda: run_instances(sizes["instances"], sizes["instance_steps"]))
    return {**_target("instances", result["instances_per_s"]), **result}


async def scenario_scaling(sizes: dict[str, int], base: dict[str, Any], n: int) -> dict[str, Any]:
    shorts, longs = [], []
    for _ in range(n):  # interleaved, so drift on the machine hits both alike
        gc.collect()
        shorts.append(await run_chain("sqlite", sizes["scaling_short"], WORKER_SETTINGS))
        gc.collect()
        longs.append(await run_chain("sqlite", sizes["scaling_long"], WORKER_SETTINGS))
    short = sorted(shorts, key=lambda r: r["per_step_us"])[n // 2]
    long = sorted(longs, key=lambda r: r["per_step_us"])[n // 2]
    ratio = long["per_step_us"] / short["per_step_us"]
    keys = ("steps", "elapsed_s", "steps_per_s", "per_step_us")
    out: dict[str, Any] = {
        "per_step_cost_ratio_long_vs_short": round(ratio, 3), **_target("scaling", ratio),
        "short": {k: short[k] for k in keys},
        "long": {k: long[k] for k in keys},
    }
    if n > 1:
        out["runs"] = {"short_per_step_us": [r["per_step_us"] for r in shorts],
                       "long_per_step_us": [r["per_step_us"] for r in longs],
                       "reported": "median of each"}
    out["long_backend_calls_per_step"] = long["backend_calls_per_step"]
    out["long_worker_stats"] = long["worker_stats"]
    return out


# -- baselines --------------------------------------------------------------------------------

async def baseline_bare_loop(n: int, rounds: int = 5) -> dict[str, Any]:
    """n awaits of a future resolved by call_soon: one trip through the host loop each."""
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        for i in range(n):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, i)
            await fut
        times.append(time.perf_counter() - began)
    elapsed = sorted(times)[rounds // 2]
    return {"awaits": n, "elapsed_s": round(elapsed, 6),
            "per_await_us": round(elapsed / n * 1e6, 3),
            "what": "await a future resolved by loop.call_soon; median of 5 rounds"}


async def baseline_aiosqlite(n: int, rounds: int = 5) -> dict[str, Any]:
    """n aiosqlite `SELECT 1` round trips: the cost of one hop to the connection thread."""
    import aiosqlite

    times = []
    with tempfile.TemporaryDirectory(prefix="aioflow-bench-") as tmp:
        async with aiosqlite.connect(os.path.join(tmp, "hop.db")) as db:
            for _ in range(50):
                await db.execute_fetchall("SELECT 1")
            for _ in range(rounds):
                began = time.perf_counter()
                for _ in range(n):
                    await db.execute_fetchall("SELECT 1")
                times.append(time.perf_counter() - began)
    elapsed = sorted(times)[rounds // 2]
    return {"calls": n, "elapsed_s": round(elapsed, 4), "per_call_us": round(elapsed / n * 1e6, 1),
            "what": "await db.execute_fetchall('SELECT 1'): one thread hop; median of 5 rounds"}


async def baselines(sizes: dict[str, int], n: int) -> dict[str, Any]:
    steps = sizes["baseline"]
    memory = await repeated(n, "steps_per_s", lambda: run_chain("memory", steps, WORKER_SETTINGS))
    return {
        "memory_chain": {k: v for k, v in memory.items() if k != "worker_stats"},
        "bare_loop_await": await baseline_bare_loop(steps),
        "aiosqlite_select1": await baseline_aiosqlite(steps),
    }


# -- report -----------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "aioflow": aioflow.__version__,
        "aiosqlite": _version("aiosqlite"),
        "orjson": _version("orjson"),
        "uvloop": _version("uvloop"),
        "loadavg_at_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows up here (and in the
    baselines), and explains a slow run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


async def main(sizes: dict[str, int], only: list[str], repeat: int,
               profile: str | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    loop_name = type(loop).__module__.split(".")[0]
    report: dict[str, Any] = {
        "event_loop": f"{loop_name} ({type(loop).__module__}.{type(loop).__qualname__})",
        "backend": "sqlite (aioflow_sqlite, synchronous=NORMAL, WAL), fresh file per scenario",
        "worker_settings": WORKER_SETTINGS,
        "activity": "async def inc(x) -> x + 1 (no thread pool)",
        "sizes": sizes,
        "repeat": repeat,
        "completion_detection": "a pass-through probe on complete_orchestrations sees the "
                                "terminal commit (no polling latency in the figures)",
    }
    # Warm up imports, statement caches and the code paths, on a throwaway database.
    await run_chain("sqlite", 20, WORKER_SETTINGS)
    report["baselines"] = await baselines(sizes, repeat)
    report["scenarios"] = {}
    report["peak_rss_mib_after"] = {"baselines": peak_rss_mib()}
    funcs: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "chain": scenario_chain, "fanout": scenario_fanout,
        "instances": scenario_instances, "scaling": scenario_scaling,
    }
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    for name in SCENARIOS:
        if only and name not in only:
            continue
        gc.collect()
        if profiler is not None:
            profiler.enable()
        report["scenarios"][name] = await funcs[name](sizes, report["baselines"], repeat)
        if profiler is not None:
            profiler.disable()
        report["peak_rss_mib_after"][name] = peak_rss_mib()
    if profiler is not None and profile:
        profiler.dump_stats(profile)
        report["profile"] = profile
    report["summary"] = summary(report)
    return report


_HEADLINES = {
    "chain": ("steps_per_s", "steps/s"),
    "fanout": ("activities_per_s", "activities/s"),
    "instances": ("instances_per_s", "instances/s"),
    "scaling": ("per_step_cost_ratio_long_vs_short", "per-step cost, long chain / short chain"),
}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Each headline figure next to its target, and the baselines to read them against."""
    out: dict[str, Any] = {}
    for name, result in report["scenarios"].items():
        key, unit = _HEADLINES[name]
        out[name] = {"value": result[key], "unit": unit, "target": result["target"],
                     "meets_target": result["meets_target"]}
    base = report["baselines"]
    out["baseline_memory_chain_steps_per_s"] = base["memory_chain"]["steps_per_s"]
    out["baseline_aiosqlite_round_trip_us"] = base["aiosqlite_select1"]["per_call_us"]
    out["baseline_bare_loop_await_us"] = base["bare_loop_await"]["per_await_us"]
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run")
    parser.add_argument("--only", action="append", choices=SCENARIOS, default=[],
                        help="run only this scenario (repeatable); baselines always run")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="runs per scenario, the median is reported (default 3; 1 with "
                             "--quick)")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="use asyncio.run instead of aioflow.run (which prefers uvloop)")
    parser.add_argument("--profile", metavar="FILE",
                        help="cProfile the scenarios (event-loop thread only) into FILE")
    args = parser.parse_args()
    if os.environ.pop(ENV_VAR, None):
        print("note: ignoring AIOFLOW_BACKEND; the benchmark picks its own backends",
              file=sys.stderr)
    sizes = QUICK if args.quick else FULL
    began = time.perf_counter()
    runner = asyncio.run if args.no_uvloop else aioflow.run
    repeat = args.repeat or (1 if args.quick else 3)
    host = machine()  # before the run: it records the load average at the start
    result = runner(main(sizes, args.only, repeat, args.profile))
    summary = result.pop("summary")
    if args.quick:
        summary["note"] = ("--quick: reduced sizes, a smoke test; the figures are not comparable "
                           "with the targets, which are for the full sizes")
    report = {"mode": "quick" if args.quick else "full", "machine": host,
              "event_loop": result.pop("event_loop"), "summary": summary,
              "peak_rss_mib": peak_rss_mib(), **result,
              "loadavg_at_end": _loadavg(),
              "total_elapsed_s": round(time.perf_counter() - began, 2)}
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    cli()
