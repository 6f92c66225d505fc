"""The orchestrators and activities the orchestration conformance suite runs.

Everything here is module level and deterministic, so a worker in another process can import
this module and run the same functions (``from aioflow.testing.conformance.apps import app``).
Nothing depends on test-local state. Activities that must count their calls or block until a
test lets them go use small in-process registries keyed by a name the test passes as input:

* `new_gate()` / `open_gate(name)` / `gate_entered(name)`: an activity (`wait_for_gate`, or the
  synchronous `sync_wait_for_gate`) blocks until the test opens its gate. Gates are
  `threading.Event`s, so they work from the host loop, from threads and from any test's loop.
* `call_count(key)`: how often `count_call` / `flaky` ran for `key`.

Each orchestrator exercises one feature; the suite in
`aioflow.testing.conformance.orchestrations` says what it expects of each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

import aioflow
from aioflow import OrchestrationContext, RetryPolicy, TaskFailedError

__all__ = [
    "GATE_LIMIT",
    "HAS_PYDANTIC",
    "Order",
    "PaymentDeclined",
    "app",
    "call_count",
    "gate_entered",
    "gate_passed",
    "new_gate",
    "open_all_gates",
    "open_gate",
]

app = aioflow.App()

# == in-process registries (gates and call counters) ===========================================

#: The longest a gated activity waits before giving up (a safety net for a test that forgot to
#: open its gate; it then fails with TimeoutError instead of hanging the worker).
GATE_LIMIT = 15.0


@dataclasses.dataclass
class _Gate:
    entered: threading.Event = dataclasses.field(default_factory=threading.Event)
    opened: threading.Event = dataclasses.field(default_factory=threading.Event)
    passed: threading.Event = dataclasses.field(default_factory=threading.Event)


_gates: dict[str, _Gate] = {}
_gates_lock = threading.Lock()
_calls: collections.Counter[str] = collections.Counter()
_calls_lock = threading.Lock()


def _gate(name: str) -> _Gate:
    with _gates_lock:
        gate = _gates.get(name)
        if gate is None:
            gate = _gates[name] = _Gate()
        return gate


def new_gate(prefix: str = "gate") -> str:
    """A fresh gate name; pass it as input to an activity that waits on it."""
    name = f"{prefix}-{uuid.uuid4().hex}"
    _gate(name)
    return name


def open_gate(name: str) -> None:
    """Let every activity waiting on `name` (now or later) continue."""
    _gate(name).opened.set()


def open_all_gates() -> None:
    """Open every gate (test teardown: nothing stays blocked)."""
    with _gates_lock:
        gates = list(_gates.values())
    for gate in gates:
        gate.opened.set()


def gate_entered(name: str) -> bool:
    """Whether an activity has started waiting on gate `name`."""
    return _gate(name).entered.is_set()


def gate_passed(name: str) -> bool:
    """Whether an activity waiting on gate `name` has returned."""
    return _gate(name).passed.is_set()


def call_count(key: str) -> int:
    """How many times `count_call` / `flaky` ran with `key`."""
    with _calls_lock:
        return _calls[key]


def _count(key: str) -> int:
    with _calls_lock:
        _calls[key] += 1
        return _calls[key]


class PaymentDeclined(Exception):
    """A user-defined error type: its name must survive the trip through history."""


# == activities ================================================================================


@app.activity
async def hello(name: str) -> str:
    return f"Hello {name}!"


@app.activity
async def add_one(x: int) -> int:
    return x + 1


@app.activity
async def double(x: int) -> int:
    return 2 * x


@app.activity
async def echo(value: Any) -> Any:
    return value


@app.activity
async def fail_with(message: str) -> None:
    """Always fails with `PaymentDeclined(message)`."""
    raise PaymentDeclined(message)


@app.activity
async def count_call(key: str) -> int:
    """Counts its calls per key; returns the count so far (1 on the first call)."""
    return _count(key)


@app.activity
async def flaky(spec: dict[str, Any]) -> int:
    """Fails with PaymentDeclined for the first `fail_times` calls per `key`, then succeeds.

    Returns the number of the attempt that succeeded.
    """
    attempt = _count(spec["key"])
    if attempt <= spec["fail_times"]:
        raise PaymentDeclined(f"attempt {attempt} failed")
    return attempt


@app.activity
async def wait_for_gate(gate: str) -> str:
    """Blocks (without blocking the event loop) until the test opens `gate`."""
    state = _gate(gate)
    state.entered.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GATE_LIMIT
    while not state.opened.is_set():
        if loop.time() > deadline:
            raise TimeoutError(f"gate {gate!r} was never opened")
        await asyncio.sleep(0.005)
    state.passed.set()
    return f"{gate} opened"


@app.activity
def sync_wait_for_gate(gate: str) -> dict[str, Any]:
    """A plain `def` activity: blocks its thread until the test opens `gate`."""
    state = _gate(gate)
    state.entered.set()
    if not state.opened.wait(GATE_LIMIT):
        raise TimeoutError(f"gate {gate!r} was never opened")
    state.passed.set()
    current = threading.current_thread()
    return {"thread_name": current.name, "thread_ident": threading.get_ident()}


@dataclasses.dataclass
class Order:
    order_id: str
    quantity: int
    placed_at: datetime


@app.activity
async def ship_date(order: Order) -> datetime:
    if not isinstance(order, Order) or not isinstance(order.placed_at, datetime):
        raise TypeError(f"ship_date expected an Order with a datetime, got {order!r}")
    return order.placed_at + timedelta(days=2)


try:
    import pydantic
except ImportError:  # pragma: no cover - pydantic is a test extra
    pydantic = None  # type: ignore[assignment]

#: Whether pydantic is installed (then `price_order` returns a pydantic model, `Receipt`).
HAS_PYDANTIC = pydantic is not None

if pydantic is not None:

    class Receipt(pydantic.BaseModel):
        order_id: str
        total: float
        paid_at: datetime

    @app.activity
    async def price_order(order: Order) -> Receipt:
        if not isinstance(order, Order) or not isinstance(order.placed_at, datetime):
            raise TypeError(f"price_order expected an Order with a datetime, got {order!r}")
        return Receipt(order_id=order.order_id, total=order.quantity * 2.5,
                       paid_at=order.placed_at + timedelta(hours=1))


# == orchestrators: basic patterns =============================================================


@app.orchestrator
async def echo_input(ctx: OrchestrationContext, value: Any) -> Any:
    return value


@app.orchestrator
async def greet_cities(ctx: OrchestrationContext, cities: list[str]) -> list[str]:
    """Function chaining: one activity after the other, each awaited."""
    return [await ctx.call_activity(hello, city) for city in cities]


@app.orchestrator
async def fan_out_task_all(ctx: OrchestrationContext, n: int) -> list[int]:
    return await ctx.task_all([ctx.call_activity(double, i) for i in range(n)])


@app.orchestrator
async def fan_out_gather(ctx: OrchestrationContext, n: int) -> list[int]:
    return list(await asyncio.gather(*(ctx.call_activity(double, i) for i in range(n))))


@app.orchestrator
async def race(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """A blocked activity races a fast one; the loser is cancelled; then a second gate.

    `spec`: {"how": "wait" | "task_any", "slow_gate": str, "after_gate": str}. The slow activity
    is listed first, so the winner is decided by completion, not by position.
    """
    slow = ctx.call_activity(wait_for_gate, spec["slow_gate"])
    fast = ctx.call_activity(hello, "fast")
    if spec["how"] == "wait":
        done, pending = await asyncio.wait([slow, fast], return_when=asyncio.FIRST_COMPLETED)
        winner = next(iter(done))
        for loser in pending:
            loser.cancel()
    else:
        winner = await ctx.task_any([slow, fast])
    result = winner.result()
    ctx.set_custom_status("raced")
    # The slow activity finishes while the orchestration waits here: its late result must be
    # ignored (it arrives before this one, since the test opens its gate first).
    after = await ctx.call_activity(wait_for_gate, spec["after_gate"])
    return {"winner": result, "loser_cancelled": slow.cancelled(), "after": after}


@app.orchestrator
async def timers(ctx: OrchestrationContext, seconds: float) -> list[str]:
    """asyncio.sleep and ctx.create_timer; returns current_utc_datetime before/between/after."""
    seen = [ctx.current_utc_datetime]
    await asyncio.sleep(seconds)
    seen.append(ctx.current_utc_datetime)
    await ctx.create_timer(ctx.current_utc_datetime + timedelta(seconds=seconds))
    seen.append(ctx.current_utc_datetime)
    return [t.isoformat() for t in seen]


@app.orchestrator
async def timeout_activity(ctx: OrchestrationContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Awaits an activity under `asyncio.wait_for` or `asyncio.timeout`.

    `spec`: {"how": "wait_for" | "timeout", "seconds": float, "gate": str | None}; with a gate
    the activity blocks until the test opens it, without one it returns at once.
    """
    if spec["gate"] is None:
        work = ctx.call_activity(hello, "quick")
    else:
        work = ctx.call_activity(wait_for_gate, spec["gate"])
    try:
        if spec["how"] == "wait_for":
            result = await asyncio.wait_for(work, spec["seconds"])
        else:
            async with asyncio.timeout(spec["seconds"]):
                result = await work
    except TimeoutError as exc:
        return {"timed_out": True, "error": type(exc).__name__}
    return {"timed_out": False, "result": result}


@app.orchestrator
async def cancelled_timers(ctx: OrchestrationContext) -> dict[str, Any]:
    """Starts an hour-long ctx.create_timer and asyncio.sleep, cancels both, and returns."""
    timer = ctx.create_timer(ctx.current_utc_datetime + timedelta(hours=1))
    sleeper = asyncio.ensure_future(asyncio.sleep(3600))
    result = await ctx.call_activity(hello, "before the timers")
    timer.cancel()
    sleeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sleeper
    return {"result": result, "timer_cancelled": timer.cancelled(),
            "sleep_cancelled": sleeper.cancelled()}


@app.orchestrator
async def task_group(ctx: OrchestrationContext, fail: bool) -> list[int]:
    """asyncio.TaskGroup over activities; with `fail`, one member's activity fails."""

    async def member(i: int) -> int:
        return await ctx.call_activity(double, i)

    async def broken() -> None:
        await ctx.call_activity(fail_with, "a TaskGroup member failed")

    async with asyncio.TaskGroup() as tg:
        members = [tg.create_task(member(i)) for i in range(3)]
        if fail:
            tg.create_task(broken())
    return [m.result() for m in members]


# == orchestrators: external events ============================================================


@app.orchestrator
async def wait_event(ctx: OrchestrationContext, name: str) -> Any:
    return await ctx.wait_for_external_event(name)


@app.orchestrator
async def event_after_gate(ctx: OrchestrationContext, gate: str) -> Any:
    """Reaches its wait only after a blocked activity: events raised meanwhile are buffered."""
    await ctx.call_activity(wait_for_gate, gate)
    return await ctx.wait_for_external_event("approval")


@app.orchestrator
async def collect_events(ctx: OrchestrationContext, spec: dict[str, Any]) -> list[Any]:
    return [await ctx.wait_for_external_event(spec["name"]) for _ in range(spec["count"])]


@app.orchestrator
async def wait_event_with_timeout(ctx: OrchestrationContext,
                                  spec: dict[str, Any]) -> dict[str, Any]:
    try:
        value = await ctx.wait_for_external_event(spec["name"], timeout=spec["timeout"])
    except Exception as exc:  # the test checks which type was raised
        return {"raised": type(exc).__name__}
    return {"event": value}


@app.orchestrator
async def approval(ctx: OrchestrationContext, timeout: float) -> dict[str, Any]:
    """Human interaction: an "Approval" event races a durable timer."""
    event = ctx.wait_for_external_event("Approval")
    deadline = ctx.create_timer(ctx.current_utc_datetime + timedelta(seconds=timeout))
    winner = await ctx.task_any([event, deadline])
    if winner is event:
        return {"outcome": "approved", "by": event.result(),
                "timer_cancelled": deadline.cancelled()}
    return {"outcome": "escalated", "event_cancelled": event.cancelled()}


# == orchestrators: failures and retries =======================================================


@app.orchestrator
async def compensate(ctx: OrchestrationContext) -> dict[str, Any]:
    """try/except/finally around a failing activity (a saga with compensation)."""
    steps: list[str] = []
    caught: dict[str, Any] = {}
    try:
        steps.append(await ctx.call_activity(hello, "reserve"))
        await ctx.call_activity(fail_with, "card declined")
        steps.append("not reached")
    except TaskFailedError as error:
        caught = {"error_type": error.error_type, "message": error.message,
                  "stack_trace": error.stack_trace, "task_name": error.task_name,
                  "kind": error.kind, "str": str(error)}
        steps.append(await ctx.call_activity(hello, "refund"))
    finally:
        steps.append(await ctx.call_activity(hello, "release"))
    return {"steps": steps, "caught": caught}


@app.orchestrator
async def unhandled_activity_failure(ctx: OrchestrationContext, message: str) -> None:
    await ctx.call_activity(fail_with, message)


@app.orchestrator
async def orchestrator_raises(ctx: OrchestrationContext, message: str) -> None:
    await ctx.call_activity(hello, "first")
    raise ValueError(message)


@app.orchestrator
async def retrying(ctx: OrchestrationContext, spec: dict[str, Any]) -> int:
    """Calls `flaky` under a RetryPolicy (first interval 0.05 s, backoff x2)."""
    policy = RetryPolicy(
        first_retry_interval=spec.get("interval", 0.05),
        max_number_of_attempts=spec["max_attempts"],
        backoff_coefficient=2.0,
        handle=(lambda error: False) if spec.get("never_retry") else None,
    )
    return await ctx.call_activity(
        flaky, {"key": spec["key"], "fail_times": spec["fail_times"]}, retry=policy)


@app.orchestrator
async def calls_unknown_activity(ctx: OrchestrationContext, name: str) -> dict[str, str]:
    try:
        await ctx.call_activity(name, "anything")
    except TaskFailedError as error:
        return {"error_type": error.error_type, "message": error.message}
    return {"error_type": "", "message": "the unknown activity did not fail"}


# == orchestrators: sub-orchestrations =========================================================


@app.orchestrator
async def whoami(ctx: OrchestrationContext) -> dict[str, Any]:
    return {"instance_id": ctx.instance_id, "parent_instance_id": ctx.parent_instance_id}


@app.orchestrator
async def flaky_child(ctx: OrchestrationContext, spec: dict[str, Any]) -> int:
    attempt = await ctx.call_activity(count_call, spec["key"])
    if attempt <= spec["fail_times"]:
        raise PaymentDeclined(f"child attempt {attempt} failed")
    return attempt


@app.orchestrator
async def parent_of_greeter(ctx: OrchestrationContext, cities: list[str]) -> list[str]:
    return await ctx.call_sub_orchestrator(greet_cities, cities)


@app.orchestrator
async def parent_catching_child_failure(ctx: OrchestrationContext) -> dict[str, str]:
    try:
        await ctx.call_sub_orchestrator(orchestrator_raises, "the child broke")
    except TaskFailedError as error:
        return {"error_type": error.error_type, "message": error.message, "kind": error.kind,
                "task_name": error.task_name}
    return {"error_type": "", "message": "the failing child did not fail its parent"}


@app.orchestrator
async def parent_with_named_child(ctx: OrchestrationContext, child_id: str) -> dict[str, Any]:
    return await ctx.call_sub_orchestrator(whoami, instance_id=child_id)


@app.orchestrator
async def parent_retrying_child(ctx: OrchestrationContext, key: str) -> int:
    return await ctx.call_sub_orchestrator(
        flaky_child, {"key": key, "fail_times": 1},
        retry=RetryPolicy(first_retry_interval=0.05, max_number_of_attempts=3))


@app.orchestrator
async def parent_of_waiter(ctx: OrchestrationContext, child_id: str) -> Any:
    """Its child waits for an event that never comes (the test terminates the child)."""
    return await ctx.call_sub_orchestrator(wait_event, "never", instance_id=child_id)


# == orchestrators: continue-as-new, custom status =============================================


@app.orchestrator
async def counter(ctx: OrchestrationContext, state: dict[str, int]) -> int:
    """Counts to `stop` with one activity per execution, continuing as new each time."""
    if state["value"] >= state["stop"]:
        return state["value"]
    value = await ctx.call_activity(add_one, state["value"])
    ctx.continue_as_new({"value": value, "stop": state["stop"]})
    return -1  # ignored: the instance continues as new


@app.orchestrator
async def carry_over(ctx: OrchestrationContext, state: dict[str, Any]) -> Any:
    """Generation 0 blocks on a gate (the test raises "carried" meanwhile), then continues as
    new; generation 1 receives the event raised during generation 0."""
    if state["generation"] == 0:
        await ctx.call_activity(wait_for_gate, state["gate"])
        ctx.continue_as_new({"generation": 1, "gate": state["gate"]})
        return None
    return await ctx.wait_for_external_event("carried")


@app.orchestrator
async def custom_status_reporter(ctx: OrchestrationContext) -> str:
    ctx.set_custom_status({"stage": "waiting for go"})
    await ctx.wait_for_external_event("go")
    ctx.set_custom_status({"stage": "done"})
    return "finished"


# == orchestrators: typed payloads, threads ====================================================


@app.orchestrator
async def typed_order(ctx: OrchestrationContext, order: Order) -> dict[str, Any]:
    """Reports the types its input and the activity results arrived as."""
    seen: dict[str, Any] = {
        "input": type(order).__name__,
        "input_placed_at": type(order.placed_at).__name__ if isinstance(order, Order) else "?",
    }
    shipped = await ctx.call_activity(ship_date, order)
    seen["ship_date"] = type(shipped).__name__
    seen["ship_date_value"] = shipped.isoformat() if isinstance(shipped, datetime) else shipped
    if "price_order" in app.activities:
        receipt = await ctx.call_activity("price_order", order)
        seen["receipt"] = type(receipt).__name__
        seen["receipt_paid_at"] = type(getattr(receipt, "paid_at", None)).__name__
        seen["receipt_total"] = getattr(receipt, "total", None)
    return seen


@app.orchestrator
async def sync_activity(ctx: OrchestrationContext, gate: str) -> dict[str, Any]:
    return await ctx.call_activity(sync_wait_for_gate, gate)


# == orchestrators: determinism and replay =====================================================


@app.orchestrator
async def deterministic_values(ctx: OrchestrationContext) -> dict[str, Any]:
    """Draws uuids and randoms, records them in history (as an activity input), waits for "go".

    If a fresh worker replays it after "go", the draws at the top happen again during replay:
    they must equal the recorded ones.
    """
    replaying_at_top = ctx.is_replaying
    drawn = {"uuids": [ctx.new_uuid(), ctx.new_uuid()], "randoms": [ctx.random(), ctx.random()]}
    await ctx.call_activity(echo, drawn)
    ctx.set_custom_status("waiting for go")
    await ctx.wait_for_external_event("go")
    later = {"uuids": [ctx.new_uuid()], "randoms": [ctx.random()]}
    return {"drawn": drawn, "later": later, "replaying_at_top": replaying_at_top,
            "replaying_at_end": ctx.is_replaying}


@app.orchestrator
async def logging_chain(ctx: OrchestrationContext, steps: int) -> int:
    """Logs one line per step through the replay-safe logger."""
    value = 0
    for step in range(steps):
        ctx.logger.info("logging_chain %s step %d", ctx.instance_id, step)
        value = await ctx.call_activity(add_one, value)
    ctx.logger.info("logging_chain %s done", ctx.instance_id)
    return value


@app.orchestrator
async def does_io(ctx: OrchestrationContext, what: str) -> str:
    """Tries something non-deterministic that the replay loop must refuse."""
    if what == "open_connection":
        await asyncio.open_connection("127.0.0.1", 9)
    elif what == "to_thread":
        await asyncio.to_thread(sum, [1, 2, 3])
    elif what == "run_in_executor":
        await asyncio.get_running_loop().run_in_executor(None, sum, [1, 2, 3])
    elif what == "subprocess":
        await asyncio.create_subprocess_exec("true")
    elif what == "getaddrinfo":
        await asyncio.get_running_loop().getaddrinfo("localhost", 80)
    else:
        raise ValueError(f"unknown operation {what!r}")
    return f"{what} was allowed"


@app.orchestrator
async def awaits_foreign_future(ctx: OrchestrationContext) -> str:
    """Awaits a future that belongs to another event loop (a classic mistake)."""
    other = asyncio.new_event_loop()
    try:
        await other.create_future()
    finally:
        other.close()
    return "awaited a foreign future"


@app.orchestrator
async def two_steps_with_pause(ctx: OrchestrationContext, name: str) -> list[str]:
    """An activity, a pause for "continue" (the test restarts the worker here), an activity."""
    first = await ctx.call_activity(hello, name)
    ctx.set_custom_status("paused")
    await ctx.wait_for_external_event("continue")
    second = await ctx.call_activity(hello, f"{name} again")
    return [first, second]


@app.orchestrator
async def counted_chain(ctx: OrchestrationContext, key: str) -> str:
    """Three counted activities: each must run exactly once per instance."""
    for step in range(3):
        await ctx.call_activity(count_call, f"{key}/{step}")
    return key
