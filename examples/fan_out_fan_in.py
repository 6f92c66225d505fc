"""Fan-out/fan-in: start many activities in parallel, wait for all of them, aggregate.

The orchestrator asks one activity for the list of documents, then starts one `count_words`
activity per document at once with plain `asyncio.gather` (fan-out), waits for every result
(fan-in) and adds them up. `ctx.task_all(...)` does the same thing; `asyncio.gather` is shown
because inside an orchestrator ordinary asyncio combinators mean durable things.

The activities really do run concurrently on the worker (the script prints how many were in
flight at most), and each result is recorded in the SQLite history as it arrives: after a crash
only the documents whose counts were not yet recorded are counted again.

Run it:

    python examples/fan_out_fan_in.py

It uses a fresh SQLite file in a temporary directory and exits with status 1 if the total differs
from a plain local count of the same documents.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import aioflow

app = aioflow.App()

# An in-process stand-in for a document store.
DOCUMENTS = {
    f"doc-{n:02d}.txt": " ".join(["durable"] * n + ["functions", "on", "asyncio"])
    for n in range(1, 13)
}
DOCUMENTS["empty.txt"] = ""
DOCUMENTS["poem.txt"] = "the quick brown fox\njumps over\n\tthe lazy dog"

_in_flight = 0
max_in_flight = 0


@app.activity
async def list_documents(prefix: str) -> list[str]:
    names = sorted(name for name in DOCUMENTS if name.startswith(prefix))
    print(f"  [activity] list_documents({prefix!r}) -> {len(names)} documents")
    return names


@app.activity
async def count_words(name: str) -> dict[str, object]:
    global _in_flight, max_in_flight
    _in_flight += 1
    max_in_flight = max(max_in_flight, _in_flight)
    try:
        await asyncio.sleep(0.05)  # pretend to download the document
        words = len(DOCUMENTS[name].split())
        print(f"  [activity] count_words({name!r}) -> {words}")
        return {"name": name, "words": words}
    finally:
        _in_flight -= 1


@app.orchestrator
async def word_count(ctx: aioflow.OrchestrationContext, prefix: str) -> dict[str, object]:
    names = await ctx.call_activity(list_documents, prefix)
    ctx.logger.info("fanning out to %d documents", len(names))
    # Fan-out: schedule every activity before awaiting any of them ...
    counts = await asyncio.gather(*(ctx.call_activity(count_words, n) for n in names))
    # ... fan-in: the results come back in the order they were scheduled.
    largest = max(counts, key=lambda c: c["words"])
    return {"documents": len(counts), "total_words": sum(c["words"] for c in counts),
            "largest": largest["name"]}


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aioflow-example-") as tmp:
        return await run_example(Path(tmp) / "fan_out_fan_in.db")


async def run_example(db: Path) -> int:
    backend = aioflow.connect(f"sqlite:///{db}")
    client = aioflow.Client(backend, app=app)
    print(f"backend: {backend!r}")
    try:
        async with aioflow.Worker(app, backend):
            instance_id = await client.start_new(word_count, "")
            print(f"started word_count as instance {instance_id!r}")
            status = await client.wait_for_completion(instance_id, timeout=30)
    finally:
        await client.close()

    expected = {"documents": len(DOCUMENTS),
                "total_words": sum(len(text.split()) for text in DOCUMENTS.values()),
                "largest": "doc-12.txt"}
    print(f"instance {instance_id!r} is {status.runtime_status.value}")
    print(f"output: {status.output}")
    print(f"at most {max_in_flight} count_words activities ran at the same time")
    if status.runtime_status is not aioflow.RuntimeStatus.COMPLETED or status.output != expected:
        print(f"FAILED: expected Completed with output {expected}", file=sys.stderr)
        if status.failure_details is not None:
            print(status.failure_details.stack_trace, file=sys.stderr)
        return 1
    if max_in_flight < 2:
        print("FAILED: the count_words activities did not run in parallel", file=sys.stderr)
        return 1
    print(f"OK: counted {expected['total_words']} words in {expected['documents']} documents")
    return 0


if __name__ == "__main__":
    sys.exit(aioflow.run(main()))
