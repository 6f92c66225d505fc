"""Run one aioflow worker for `crash_app.app` in this process, until SIGTERM or SIGINT.

    python -m aioflow.testing.conformance._worker_main URL [--lease SECONDS] [...]

`MultiProcessSuite` starts these as child processes sharing one backend, and kills some of them
with SIGKILL on purpose. Once the worker's dispatch loops run, the process prints one line that
starts with `READY_LINE` (and its pid) on stdout, so the parent knows it is up; nothing else is
written to stdout. Warnings and errors are logged to stderr. SIGTERM stops the worker gracefully
(running activities get `--shutdown-timeout` seconds) and exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aioflow.connect import connect
from aioflow.testing.conformance.crash_app import READY_LINE, app
from aioflow.worker import Worker

__all__ = ["READY_LINE", "main"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aioflow.testing.conformance._worker_main",
        description="Run a worker for the crash-test app until SIGTERM.")
    parser.add_argument("url", help="backend URL, as for aioflow.connect")
    parser.add_argument("--lease", type=float, default=1.0, help="lease seconds (default 1)")
    parser.add_argument("--poll", type=float, default=0.05,
                        help="longest idle poll interval in seconds (default 0.05)")
    parser.add_argument("--max-orchestrations", type=int, default=8,
                        help="orchestration work items claimed per batch (default 8)")
    parser.add_argument("--max-activities", type=int, default=64,
                        help="activities run at once (default 64)")
    parser.add_argument("--activity-batch", type=int, default=8,
                        help="activity tasks claimed per batch (default 8)")
    parser.add_argument("--shutdown-timeout", type=float, default=2.0,
                        help="seconds running activities get on SIGTERM (default 2)")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    backend = connect(args.url)
    worker = Worker(
        app, backend, lease_seconds=args.lease, poll_interval=args.poll,
        max_concurrent_orchestrations=args.max_orchestrations,
        max_concurrent_activities=args.max_activities,
        activity_batch_size=args.activity_batch, shutdown_timeout=args.shutdown_timeout,
        worker_id=f"crash-worker:{os.getpid()}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    try:
        print(f"{READY_LINE} pid={os.getpid()}", flush=True)
        await stop.wait()
    finally:
        await worker.stop()
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format=f"%(asctime)s pid={os.getpid()} %(levelname)s %(name)s: %(message)s")
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
