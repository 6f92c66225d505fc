"""Monitor: poll on a durable timer until a condition holds, act once, or give up at expiry.

An `issue_monitor` orchestration watches a (fake, in-process) issue tracker. Every
`interval_seconds` it calls the `count_open_issues` activity; as soon as more than `threshold`
issues are open it calls the `send_alert` activity — exactly once — and finishes. If the
threshold is not crossed before `expiry_seconds` have passed, it finishes without alerting.

Why an orchestration rather than a cron job: the monitor stops itself after alerting, the
interval could change from poll to poll, each monitored repository is just another instance, and
while it waits on the durable timer nothing runs at all (the timer is a delayed message in the
SQLite backend, so it survives a restart of the process).

The script starts two monitors side by side:

* `acme/rockets`, where a simulated user opens an issue every 0.15 s: the first poll that sees
  more than 3 open issues makes the monitor alert, once, and stop polling;
* `acme/quiet`, where nobody files issues: that monitor polls until it expires, without alerting.

Run it:

    python examples/monitor.py

The intervals are fractions of a second for the demo; a real monitor would use minutes or hours
(`await ctx.create_timer(ctx.current_utc_datetime + timedelta(hours=1))`, or simply
`await asyncio.sleep(3600)`, which is the same durable timer). Exits with status 1 unless the busy
repository was alerted on exactly once and the quiet one expired without an alert.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import aioflow

app = aioflow.App()


class FakeIssueTracker:
    """An in-process stand-in for an issue tracker's API."""

    def __init__(self) -> None:
        self.open_issues: dict[str, list[str]] = {}
        self.alerts: list[dict[str, object]] = []
        self.started = time.monotonic()

    def open_issue(self, repo: str, title: str) -> None:
        self.open_issues.setdefault(repo, []).append(title)

    def count_open(self, repo: str) -> int:
        return len(self.open_issues.get(repo, []))

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:5.2f}s"


tracker = FakeIssueTracker()


@app.activity
async def count_open_issues(repo: str) -> int:
    count = tracker.count_open(repo)
    print(f"  {tracker.elapsed()} [poll]  {repo}: {count} open issue(s)")
    return count


@app.activity
async def send_alert(alert: dict[str, object]) -> None:
    tracker.alerts.append(alert)
    print(f"  {tracker.elapsed()} [ALERT] {alert['repo']} has {alert['open_issues']} open "
          f"issues (threshold {alert['threshold']}); notifying {alert['notify']}")


@app.orchestrator
async def issue_monitor(ctx: aioflow.OrchestrationContext,
                        request: dict[str, object]) -> dict[str, object]:
    repo = str(request["repo"])
    threshold = int(request["threshold"])  # type: ignore[call-overload]
    interval = timedelta(seconds=float(request["interval_seconds"]))  # type: ignore[arg-type]
    expiry = ctx.current_utc_datetime + timedelta(
        seconds=float(request["expiry_seconds"]))  # type: ignore[arg-type]

    polls = 0
    while ctx.current_utc_datetime < expiry:
        polls += 1
        open_issues = await ctx.call_activity(count_open_issues, repo)
        ctx.set_custom_status({"polls": polls, "open_issues": open_issues})
        if open_issues > threshold:
            await ctx.call_activity(send_alert, {
                "repo": repo, "open_issues": open_issues, "threshold": threshold,
                "notify": request["notify"]})
            return {"repo": repo, "result": "alerted", "polls": polls,
                    "open_issues": open_issues}
        # Sleep until the next poll on a durable timer (the orchestrator is unloaded meanwhile).
        await ctx.create_timer(ctx.current_utc_datetime + interval)
    return {"repo": repo, "result": "expired", "polls": polls}


async def simulate_users(repo: str, every: float, count: int) -> None:
    """People opening issues on `repo`, one every `every` seconds."""
    for n in range(1, count + 1):
        await asyncio.sleep(every)
        tracker.open_issue(repo, f"bug #{n}")
        print(f"  {tracker.elapsed()} [user]  opened issue #{n} on {repo}")


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aioflow-example-") as tmp:
        return await run_example(Path(tmp) / "monitor.db")


async def run_example(db: Path) -> int:
    backend = aioflow.connect(f"sqlite:///{db}")
    client = aioflow.Client(backend, app=app)
    print(f"backend: {backend!r}")
    common = {"threshold": 3, "interval_seconds": 0.25, "notify": "+1-555-0100"}
    try:
        async with aioflow.Worker(app, backend):
            busy = await client.start_new(
                issue_monitor, {"repo": "acme/rockets", "expiry_seconds": 10, **common},
                instance_id="monitor-acme-rockets")
            quiet = await client.start_new(
                issue_monitor, {"repo": "acme/quiet", "expiry_seconds": 1.0, **common},
                instance_id="monitor-acme-quiet")
            print(f"started monitors {busy!r} and {quiet!r}")
            users = asyncio.create_task(simulate_users("acme/rockets", every=0.15, count=6))
            busy_status = await client.wait_for_completion(busy, timeout=30)
            quiet_status = await client.wait_for_completion(quiet, timeout=30)
            await users
            # Give a (wrong) extra poll or alert a chance to show up before checking.
            await asyncio.sleep(0.3)
    finally:
        await client.close()

    print(f"{busy}: {busy_status.runtime_status.value}, output {busy_status.output}")
    print(f"{quiet}: {quiet_status.runtime_status.value}, output {quiet_status.output}")
    print(f"alerts sent: {len(tracker.alerts)}")

    problems = []
    for status in (busy_status, quiet_status):
        if status.runtime_status is not aioflow.RuntimeStatus.COMPLETED:
            problems.append(f"{status.instance_id} is {status.runtime_status.value}: "
                            f"{status.failure_details}")
    out = busy_status.output or {}
    if out.get("result") != "alerted" or not out.get("open_issues", 0) > 3:
        problems.append(f"acme/rockets should have alerted with more than 3 issues: {out}")
    if (quiet_status.output or {}).get("result") != "expired":
        problems.append(f"acme/quiet should have expired: {quiet_status.output}")
    if [a["repo"] for a in tracker.alerts] != ["acme/rockets"]:
        problems.append(f"expected exactly one alert, for acme/rockets; got {tracker.alerts}")
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}", file=sys.stderr)
        return 1
    print(f"OK: acme/rockets alerted exactly once after {out['polls']} polls; "
          f"acme/quiet expired after {quiet_status.output['polls']} polls without an alert")
    return 0


if __name__ == "__main__":
    sys.exit(aioflow.run(main()))
