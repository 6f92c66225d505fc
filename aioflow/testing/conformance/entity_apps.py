"""The entities (and the orchestrators that use them) the entity conformance tests run.

They are registered on the same `app` as the rest of the suite (`apps.app`), at module level and
deterministic, so worker processes that import this module run the same code.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioflow import (
    EntityContext,
    EntityId,
    EntityLockError,
    OrchestrationContext,
    TaskFailedError,
)
from aioflow.testing.conformance.apps import app

__all__ = ["Account", "account", "counter", "journal"]


def counter(key: str) -> EntityId:
    return EntityId("counter", key)


def account(key: str) -> EntityId:
    return EntityId("account", key)


def journal(key: str) -> EntityId:
    return EntityId("journal", key)


# == entities ===================================================================================

@app.entity(name="counter")
def counter_entity(ctx: EntityContext) -> Any:
    """A function entity: add, get, reset, delete, plus operations that misbehave on purpose."""
    value = ctx.get_state(lambda: 0)
    op = ctx.operation_name
    if op == "add":
        ctx.set_state(value + ctx.get_input())
    elif op == "get":
        return value
    elif op == "reset":
        ctx.set_state(0)
    elif op == "delete":
        ctx.destruct_on_exit()
    elif op == "add_then_fail":  # changes the state, then raises: the change must not stick
        ctx.set_state(value + 1000)
        ctx.signal_entity(journal(ctx.entity_key), "append", "must never arrive")
        raise ValueError(f"add_then_fail on {ctx.entity_key} fails on purpose")
    elif op == "store_unserialisable":
        ctx.set_state(object())
    else:
        raise ValueError(f"counter has no operation {op!r}")
    return None


@app.entity(name="journal")
async def journal_entity(ctx: EntityContext) -> Any:
    """An async function entity keeping a list: append, get, and forward (signals a counter)."""
    entries = ctx.get_state(list)
    op = ctx.operation_name
    await asyncio.sleep(0)  # entity code may await
    if op == "append":
        entries.append(ctx.get_input())
        ctx.set_state(entries)
    elif op == "get":
        ctx.set_result(entries)
    elif op == "forward":
        ctx.signal_entity(counter(ctx.get_input()), "add", 1)
        entries.append(f"forwarded to {ctx.get_input()}")
        ctx.set_state(entries)
    else:
        raise ValueError(f"journal has no operation {op!r}")
    return None


@app.entity(name="account")
class Account:
    """A class entity: public methods are operations, attributes the state."""

    def __init__(self) -> None:
        self.balance = 0
        self.operations = 0

    def deposit(self, amount: int) -> int:
        self.balance += amount
        self.operations += 1
        return self.balance

    def withdraw(self, amount: int) -> int:
        if amount > self.balance:
            raise ValueError(f"cannot withdraw {amount}: the balance is {self.balance}")
        self.balance -= amount
        self.operations += 1
        return self.balance

    async def get(self) -> int:
        await asyncio.sleep(0)
        return self.balance

    def _secret(self) -> None:  # private: not an operation
        self.balance = -1


# == orchestrators ==============================================================================

@app.orchestrator
async def entity_script(ctx: OrchestrationContext, steps: list[list[Any]]) -> list[Any]:
    """Run [kind, name, key, operation, input] steps in order ("call" or "signal"); a failed
    call is recorded as ["error", message] and the script goes on."""
    out: list[Any] = []
    for kind, name, key, operation, value in steps:
        target = EntityId(name, key)
        if kind == "signal":
            ctx.signal_entity(target, operation, value)
            out.append(None)
            continue
        try:
            out.append(await ctx.call_entity(target, operation, value))
        except TaskFailedError as error:
            out.append(["error", str(error)])
    return out


@app.orchestrator
async def signal_counter(ctx: OrchestrationContext, spec: dict[str, Any]) -> int:
    """Signal counter `key` `n` times with add 1 (one-way), then return n."""
    for _ in range(spec["n"]):
        ctx.signal_entity(counter(spec["key"]), "add", 1)
    return int(spec["n"])


@app.orchestrator
async def transfer(ctx: OrchestrationContext, spec: dict[str, Any]) -> bool:
    """Move `amount` between two accounts atomically, if the source has enough."""
    source, target = account(spec["from"]), account(spec["to"])
    async with ctx.lock_entities(source, target):
        balance = await ctx.call_entity(source, "get")
        if balance < spec["amount"]:
            return False
        await ctx.call_entity(source, "withdraw", spec["amount"])
        await ctx.call_entity(target, "deposit", spec["amount"])
        return True


@app.orchestrator
async def audit(ctx: OrchestrationContext, keys: list[str]) -> int:
    """The total of the accounts, read while holding all of them."""
    ids = [account(k) for k in keys]
    async with ctx.lock_entities(*ids):
        balances = await asyncio.gather(*(ctx.call_entity(i, "get") for i in ids))
    return sum(balances)


@app.orchestrator
async def hold_lock(ctx: OrchestrationContext, key: str) -> int:
    """Lock counter `key`, add 1, and keep it locked until event "release" arrives."""
    async with ctx.lock_entities(counter(key)):
        await ctx.call_entity(counter(key), "add", 1)
        ctx.set_custom_status("locked")
        await ctx.wait_for_external_event("release")
        return int(await ctx.call_entity(counter(key), "get"))


@app.orchestrator
async def fail_inside_lock(ctx: OrchestrationContext, key: str) -> None:
    """Lock counter `key` and fail inside the section."""
    async with ctx.lock_entities(counter(key)):
        await ctx.call_entity(counter(key), "add", 1)
        raise RuntimeError("failing while holding the lock")


@app.orchestrator
async def break_locking_rules(ctx: OrchestrationContext, key: str) -> list[str]:
    """Try the two forbidden things in a critical section and report the errors."""
    errors = []
    async with ctx.lock_entities(counter(key)):
        try:
            await ctx.call_entity(journal(key), "get")
        except EntityLockError as error:
            errors.append(f"call: {error}")
        try:
            async with ctx.lock_entities(journal(key)):
                pass
        except EntityLockError as error:
            errors.append(f"nested: {error}")
        ctx.signal_entity(journal(key), "append", "signals are allowed")
    return errors


@app.orchestrator
async def call_unknown_entity(ctx: OrchestrationContext, name: str) -> str:
    try:
        await ctx.call_entity(EntityId(name, "k"), "get")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"
