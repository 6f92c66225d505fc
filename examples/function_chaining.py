"""Function chaining: run activities one after another, each taking the previous one's result.

The orchestrator processes an order in four steps — validate → reserve stock → charge the card →
ship — and every step's output feeds the next. Each `await ctx.call_activity(...)` is a durable
step: it is recorded in the SQLite history, so if the process died after "charge", a restarted
worker would replay validate/reserve/charge from history (without charging twice) and go on with
"ship".

Typed payloads: the activities take and return dataclasses; aioflow stores them as JSON and
rebuilds them from the annotations.

Run it:

    python examples/function_chaining.py

It uses a fresh SQLite file in a temporary directory, prints each step and exits with status 1
if the final result is not what the chain should produce.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aioflow

app = aioflow.App()


@dataclass
class Order:
    order_id: str
    sku: str
    quantity: int
    unit_price_cents: int
    card: str


@dataclass
class Reservation:
    order_id: str
    reservation_id: str
    amount_cents: int
    card: str


@dataclass
class Payment:
    order_id: str
    reservation_id: str
    payment_id: str
    amount_cents: int


@dataclass
class Shipment:
    order_id: str
    tracking_number: str
    payment_id: str
    amount_cents: int


# -- activities: the steps that talk to the outside world (here: print and compute) ----------

STOCK = {"widget": 10, "gadget": 0}


@app.activity
async def validate_order(order: Order) -> Order:
    if order.quantity < 1:
        raise ValueError(f"order {order.order_id}: quantity must be positive")
    if order.sku not in STOCK:
        raise ValueError(f"order {order.order_id}: unknown product {order.sku!r}")
    print(f"  [activity] validate_order   {order.order_id}: {order.quantity} x {order.sku} ok")
    return order


@app.activity
async def reserve_stock(order: Order) -> Reservation:
    if STOCK[order.sku] < order.quantity:
        raise RuntimeError(f"only {STOCK[order.sku]} {order.sku} left")
    STOCK[order.sku] -= order.quantity
    reservation = Reservation(order.order_id, f"RSV-{order.order_id}",
                              order.quantity * order.unit_price_cents, order.card)
    print(f"  [activity] reserve_stock    {reservation.reservation_id}, "
          f"{STOCK[order.sku]} {order.sku} left")
    return reservation


@app.activity
def charge_card(reservation: Reservation) -> Payment:
    # A plain `def` activity runs in a thread pool, so blocking client libraries are fine here.
    payment = Payment(reservation.order_id, reservation.reservation_id,
                      f"PAY-{reservation.order_id}", reservation.amount_cents)
    print(f"  [activity] charge_card      {payment.payment_id}: "
          f"{payment.amount_cents / 100:.2f} EUR on card ...{reservation.card[-4:]}")
    return payment


@app.activity
async def ship_order(payment: Payment) -> Shipment:
    shipment = Shipment(payment.order_id, f"TRK-{payment.order_id}-0001", payment.payment_id,
                        payment.amount_cents)
    print(f"  [activity] ship_order       tracking number {shipment.tracking_number}")
    return shipment


# -- the orchestrator: plain sequential code --------------------------------------------------

@app.orchestrator
async def process_order(ctx: aioflow.OrchestrationContext, order: Order) -> dict[str, object]:
    ctx.set_custom_status("validating")
    valid = await ctx.call_activity(validate_order, order)
    ctx.set_custom_status("reserving")
    reservation = await ctx.call_activity(reserve_stock, valid)
    ctx.set_custom_status("charging")
    payment = await ctx.call_activity(charge_card, reservation)
    ctx.set_custom_status("shipping")
    shipment = await ctx.call_activity(ship_order, payment)
    ctx.set_custom_status("done")
    # The rebuilt values are real dataclasses, not dicts.
    assert isinstance(shipment, Shipment)
    return {"order_id": shipment.order_id, "tracking_number": shipment.tracking_number,
            "payment_id": shipment.payment_id, "charged_cents": shipment.amount_cents}


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aioflow-example-") as tmp:
        return await run_example(Path(tmp) / "function_chaining.db")


async def run_example(db: Path) -> int:
    backend = aioflow.connect(f"sqlite:///{db}")
    client = aioflow.Client(backend, app=app)
    order = Order("order-1001", "widget", 3, 1250, "4111111111111111")
    print(f"backend: {backend!r}")
    try:
        async with aioflow.Worker(app, backend):
            instance_id = await client.start_new(process_order, order,
                                                 instance_id="order-1001")
            print(f"started process_order as instance {instance_id!r}")
            status = await client.wait_for_completion(instance_id, timeout=30)
        history = await client.get_history(instance_id)
    finally:
        await client.close()

    print(f"instance {instance_id!r} is {status.runtime_status.value}, "
          f"custom status {status.custom_status!r}")
    print(f"output: {status.output}")
    print(f"history: {len(history)} events")
    expected = {"order_id": "order-1001", "tracking_number": "TRK-order-1001-0001",
                "payment_id": "PAY-order-1001", "charged_cents": 3750}
    if status.runtime_status is not aioflow.RuntimeStatus.COMPLETED or status.output != expected:
        print(f"FAILED: expected Completed with output {expected}", file=sys.stderr)
        if status.failure_details is not None:
            print(status.failure_details.stack_trace, file=sys.stderr)
        return 1
    print("OK: order-1001 validated -> reserved -> charged 37.50 EUR -> shipped")
    return 0


if __name__ == "__main__":
    sys.exit(aioflow.run(main()))
