"""`EntitySuite`: durable entities end to end, on a real worker and client over a backend.

It is part of `OrchestrationSuite`, so every backend that runs that suite runs these too. The
entities and orchestrators it uses are in `aioflow.testing.conformance.entity_apps`.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from aioflow import (
    Backend,
    Client,
    EntityId,
    RuntimeStatus,
    SerializationError,
    UnknownFunctionError,
    Worker,
)
from aioflow.testing.conformance import entity_apps as ea
from aioflow.testing.conformance._base import SuiteBase

__all__ = ["EntitySuite"]


class EntitySuite(SuiteBase):
    """Entity tests: exactly-once, ordered operations; errors; critical sections; queries."""

    async def state_of(self, client: Client, entity: EntityId) -> Any:
        return (await client.read_entity_state(entity)).state

    async def wait_for_state(self, client: Client, entity: EntityId, expected: Any,
                             timeout: float | None = None) -> None:
        async def reached() -> bool:
            return bool(await self.state_of(client, entity) == expected)

        try:
            await self.wait_until(reached, f"entity {entity} has state {expected!r}", timeout)
        except BaseException:
            print(f"entity {entity} state is {await client.read_entity_state(entity)}")
            raise

    # == the basics =============================================================================

    async def test_a_function_entity_applies_signals_and_answers_calls(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("basics")
        await client.signal_entity(ea.counter(key), "add", 5)
        status = await self.run(client, ea.entity_script, [
            ["call", "counter", key, "add", 10],
            ["call", "counter", key, "get", None],
            ["signal", "counter", key, "add", 1],
            ["call", "counter", key, "get", None],
        ])
        assert status.output == [None, 15, None, 16], (
            "call_entity returns the operation's result, after every earlier operation from "
            f"the same sender (client signal of 5, then +10, then +1); got {status.output}")
        state = await client.read_entity_state(ea.counter(key))
        assert state.exists and state.state == 16 and state.locked_by is None, state

    async def test_a_class_entity_has_its_methods_as_operations_and_attributes_as_state(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("class")
        status = await self.run(client, ea.entity_script, [
            ["call", "account", key, "deposit", 70],
            ["call", "account", key, "withdraw", 20],
            ["call", "account", key, "get", None],
            ["call", "account", key, "_secret", None],
        ])
        assert status.output[:3] == [70, 50, 50], status.output
        error = status.output[3]
        assert error[0] == "error" and "no operation '_secret'" in error[1], (
            f"private methods are not operations, and calling one names it: {error}")
        assert await self.state_of(client, ea.account(key)) == {"balance": 50, "operations": 2}

    async def test_an_operation_that_raises_leaves_the_state_unchanged_and_fails_the_call(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("rollback")
        status = await self.run(client, ea.entity_script, [
            ["call", "counter", key, "add", 3],
            ["call", "counter", key, "add_then_fail", None],
            ["call", "counter", key, "get", None],
            ["call", "account", key, "withdraw", 5],
            ["call", "account", key, "get", None],
        ])
        out = status.output
        assert out[1][0] == "error" and "ValueError" in out[1][1] and "on purpose" in out[1][1], (
            f"the caller gets the operation's error with its type and message: {out[1]}")
        assert out[2] == 3, (
            f"a failed operation's state change must be rolled back: expected 3, got {out[2]}")
        assert out[3][0] == "error" and "cannot withdraw 5" in out[3][1], out[3]
        assert out[4] == 0, "a failed method call on a class entity must not change it"
        await asyncio.sleep(self.timer_seconds)
        journal = await client.read_entity_state(ea.journal(key))
        assert not journal.exists, (
            f"signals sent by a failed operation must not be sent: journal is {journal}")

    async def test_a_non_serialisable_state_fails_at_set_state_with_a_clear_error(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("badstate")
        status = await self.run(client, ea.entity_script, [
            ["call", "counter", key, "add", 1],
            ["call", "counter", key, "store_unserialisable", None],
            ["call", "counter", key, "get", None],
        ])
        error = status.output[1]
        assert error[0] == "error" and SerializationError.__name__ in error[1] and \
            "cannot be stored as JSON" in error[1] and key in error[1], (
                f"set_state(object()) must fail with a SerializationError naming the entity: "
                f"{error}")
        assert status.output[2] == 1, "the state stays as it was"

    async def test_unknown_entity_names_and_operations_are_errors_that_name_them(
            self, worker: Worker, client: Client) -> None:
        status = await self.run(client, ea.call_unknown_entity, "no_such_entity")
        assert status.output.startswith("UnknownFunctionError") and \
            "no_such_entity" in status.output, status.output
        try:
            await client.signal_entity(EntityId("no_such_entity", "k"), "add", 1)
        except UnknownFunctionError as error:
            assert "no_such_entity" in str(error)
        else:
            raise AssertionError("a client with an app must refuse to signal an unknown entity")
        key = self.unique("unknown-op")
        status = await self.run(client, ea.entity_script, [
            ["call", "counter", key, "add", 2],
            ["call", "counter", key, "multiply", 3],
            ["call", "account", key, "close", None],
            ["call", "counter", key, "get", None],
        ])
        assert "multiply" in status.output[1][1] and "close" in status.output[2][1], status.output
        assert status.output[3] == 2, "an unknown operation leaves the state untouched"

    async def test_an_operation_for_an_unregistered_entity_is_consumed_and_changes_nothing(
            self, backend: Backend, client: Client) -> None:
        """A client without an app cannot check names: the worker meets the unknown name,
        consumes the operation (it must not come back forever) and stores no state."""
        ghost = EntityId("ghost", self.unique("k"))
        async with self.make_worker(backend) as worker:
            await Client(backend).signal_entity(ghost, "add", 1)

            async def handled() -> bool:
                status = await client.get_status(ghost.instance_id)
                return status is not None and status.runtime_status is RuntimeStatus.RUNNING

            await self.wait_until(handled, f"a worker handled the operation sent to {ghost}")
            state = await client.read_entity_state(ghost)
        assert not state.exists, f"an operation on an unknown entity changes nothing: {state}"
        assert worker.stats["entity_operations"] == 1, (
            f"the worker must apply (and reject) the one operation once: {worker.stats}")

    async def test_destruct_on_exit_deletes_the_state(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("delete")
        await self.run(client, ea.entity_script, [
            ["call", "counter", key, "add", 4], ["call", "counter", key, "delete", None]])
        assert not (await client.read_entity_state(ea.counter(key))).exists
        status = await self.run(client, ea.entity_script, [
            ["call", "counter", key, "get", None], ["call", "account", key, "deposit", 1],
            ["call", "account", key, "delete", None]])
        assert status.output[0] == 0, "a deleted entity starts again from its initial state"
        assert not (await client.read_entity_state(ea.account(key))).exists, (
            "every class entity has a built-in 'delete' operation")
        never = await client.read_entity_state(ea.counter(self.unique("never")))
        assert not never.exists and never.state is None

    async def test_an_entity_can_signal_another_entity(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("forward")
        await client.signal_entity(ea.journal(key), "forward", key)
        await client.signal_entity(ea.journal(key), "forward", key)
        await self.wait_for_state(client, ea.counter(key), 2)
        assert await self.state_of(client, ea.journal(key)) == [f"forwarded to {key}"] * 2

    # == ordering and exactly-once ==============================================================

    async def test_operations_from_one_sender_are_applied_in_the_order_sent(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("order")
        for n in range(20):
            await client.signal_entity(ea.journal(key), "append", f"client-{n}")
        steps = [["signal", "journal", key, "append", f"orch-{n}"] for n in range(20)]
        await self.run(client, ea.entity_script, [*steps, ["call", "journal", key, "get", None]])
        entries = await self.state_of(client, ea.journal(key))
        assert [e for e in entries if e.startswith("client")] == \
            [f"client-{n}" for n in range(20)], f"client signals out of order: {entries}"
        assert [e for e in entries if e.startswith("orch")] == \
            [f"orch-{n}" for n in range(20)], f"orchestration signals out of order: {entries}"

    async def test_a_retried_signal_with_a_signal_id_is_applied_once(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("idempotent")
        for _ in range(3):
            await client.signal_entity(ea.counter(key), "add", 1, signal_id="request-1")
        await client.signal_entity(ea.counter(key), "add", 10, signal_id="request-2")
        await self.wait_for_state(client, ea.counter(key), 11)
        await asyncio.sleep(self.timer_seconds)
        assert await self.state_of(client, ea.counter(key)) == 11

    async def test_a_thousand_concurrent_signals_from_clients_and_orchestrations_count_exactly(
            self, backend: Backend, client: Client) -> None:
        key = self.unique("hot")
        target = ea.counter(key)
        options = {"max_concurrent_orchestrations": 20}
        async with self.make_worker(backend, **options) as one, \
                self.make_worker(backend, **options) as two:
            async def client_burst(n: int) -> None:
                own = Client(backend)  # many clients, each sending its own stream
                for _ in range(n):
                    await own.signal_entity(target, "add", 1)

            orchestrations = [await client.start_new(ea.signal_counter, {"key": key, "n": 50})
                              for _ in range(10)]
            await asyncio.gather(*(client_burst(50) for _ in range(10)))
            for iid in orchestrations:
                await self.completed(client, iid)
            await self.wait_for_state(client, target, 1000, timeout=self.completion_timeout * 4)
            await asyncio.sleep(self.timer_seconds)
            final = await self.state_of(client, target)
        assert final == 1000, (
            f"500 client signals and 500 orchestration signals must add up to exactly 1000 "
            f"with two workers; got {final}")
        assert one.stats["entity_operations"] + two.stats["entity_operations"] >= 1000

    # == critical sections ======================================================================

    async def test_transfers_under_locks_never_change_the_total(
            self, backend: Backend, client: Client) -> None:
        prefix = self.unique("bank")
        keys = [f"{prefix}-{n}" for n in range(4)]
        rng = random.Random(7)
        options = {"max_concurrent_orchestrations": 10}
        async with self.make_worker(backend, **options), self.make_worker(backend, **options):
            for key in keys:
                await client.signal_entity(ea.account(key), "deposit", 100)
            for key in keys:
                await self.wait_for_state(client, ea.account(key),
                                          {"balance": 100, "operations": 1})
            transfers = []
            audits = []
            for n in range(16):
                source, dest = rng.sample(keys, 2)
                transfers.append(await client.start_new(
                    ea.transfer, {"from": source, "to": dest, "amount": rng.randint(1, 80)}))
                if n % 4 == 0:
                    audits.append(await client.start_new(ea.audit, keys))
            moved = [(await self.completed(client, iid)).output for iid in transfers]
            totals = [(await self.completed(client, iid)).output for iid in audits]
            final = await self.run(client, ea.audit, keys)
        assert any(moved), "some transfers must have moved money"
        assert totals == [400] * len(audits), (
            f"an audit holding every account must always see the total of 400: {totals}")
        assert final.output == 400
        balances = [await self.state_of(client, ea.account(k)) for k in keys]
        assert sum(b["balance"] for b in balances) == 400 and all(
            b["balance"] >= 0 for b in balances), balances

    async def test_a_locked_entity_queues_other_senders_until_the_section_ends(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("held")
        holder = await client.start_new(ea.hold_lock, key)
        await self.wait_for_custom_status(client, holder, "locked")
        await client.signal_entity(ea.counter(key), "add", 100)
        other = await client.start_new(ea.entity_script, [["call", "counter", key, "add", 10]])
        await asyncio.sleep(self.timer_seconds)
        state = await client.read_entity_state(ea.counter(key))
        assert state.state == 1 and state.locked_by == holder and state.queued == 2, (
            f"while {holder} holds the counter, other operations must wait in its queue: {state}")
        assert not (await self.status_of(client, other)).is_terminal
        await client.raise_event(holder, "release")
        assert (await self.completed(client, holder)).output == 1, (
            "the holder sees only its own operations")
        await self.completed(client, other)
        await self.wait_for_state(client, ea.counter(key), 111)
        assert (await client.read_entity_state(ea.counter(key))).locked_by is None

    async def test_locks_are_released_when_the_orchestration_fails_or_is_terminated(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("release")
        failed = await client.start_new(ea.fail_inside_lock, key)
        await self.failed(client, failed)
        holder = await client.start_new(ea.hold_lock, key)
        await self.wait_for_custom_status(client, holder, "locked")
        await client.terminate(holder, "stop holding")
        await self.finished(client, holder)
        status = await self.run(client, ea.entity_script, [["call", "counter", key, "get", None]])
        assert status.output == [2], (
            "after a failure and a termination inside critical sections the counter must be "
            f"unlocked (a call answers): {status.output}")
        state = await client.read_entity_state(ea.counter(key))
        assert state.locked_by is None and state.queued == 0, state

    async def test_locking_rules_are_enforced_with_clear_errors(
            self, worker: Worker, client: Client) -> None:
        key = self.unique("rules")
        status = await self.run(client, ea.break_locking_rules, key)
        call, nested = status.output
        assert call.startswith("call:") and "does not lock it" in call, call
        assert nested.startswith("nested:") and "cannot be nested" in nested, nested
        await self.wait_for_state(client, ea.journal(key), ["signals are allowed"])

    # == clients and queries ====================================================================

    async def test_query_entities_by_name_and_last_operation_time_with_paging(
            self, worker: Worker, client: Client) -> None:
        prefix = self.unique("query")
        before = client.clock() - 1.0
        for n in range(5):
            await client.signal_entity(ea.counter(f"{prefix}-{n}"), "add", n + 1)
        await client.signal_entity(ea.journal(prefix), "append", "x")
        for n in range(5):
            await self.wait_for_state(client, ea.counter(f"{prefix}-{n}"), n + 1)
        await self.wait_for_state(client, ea.journal(prefix), ["x"])
        await client.signal_entity(ea.counter(f"{prefix}-4"), "delete")
        await self.wait_until(
            lambda: _missing(client, ea.counter(f"{prefix}-4")), "the counter is deleted")

        found: list[Any] = []
        continuation = None
        while True:
            page = await client.query_entities(name="counter", page_size=2,
                                               last_operation_from=before,
                                               continuation=continuation)
            found.extend(page.entities)
            continuation = page.continuation
            if continuation is None:
                break
        mine = sorted((s.entity_id.key, s.state) for s in found
                      if s.entity_id.key.startswith(prefix))
        assert mine == [(f"{prefix}-{n}", n + 1) for n in range(4)], (
            f"query_entities(name='counter') pages through live counters only: {mine}")
        everything = await client.query_entities(include_deleted=True, page_size=1000)
        keys = {(s.entity_id.name, s.entity_id.key) for s in everything.entities}
        assert ("journal", prefix) in keys and ("counter", f"{prefix}-4") in keys
        later = await client.query_entities(last_operation_from=before + 3600)
        assert not [s for s in later.entities if s.entity_id.key.startswith(prefix)]
        listed = await client.query_instances(page_size=1000)
        assert not [s for s in listed.instances if s.instance_id.startswith("@")], (
            "entities must not be listed among orchestration instances")

    async def test_entity_ids_are_reserved_and_orchestration_verbs_refuse_them(
            self, worker: Worker, client: Client) -> None:
        for bad in ("@counter@x", "@x"):
            try:
                await client.start_new(ea.entity_script, [], instance_id=bad)
            except ValueError as error:
                assert "reserved for durable entities" in str(error)
            else:
                raise AssertionError(f"start_new must refuse instance id {bad!r}")
        try:
            await client.raise_event("@counter@x", "go")
        except ValueError as error:
            assert "signal_entity" in str(error)
        else:
            raise AssertionError("raise_event must refuse an entity id")
        for bad_id in (("", "k"), ("a@b", "k"), ("counter", ""), ("counter", "a|b")):
            try:
                EntityId(*bad_id)
            except ValueError:
                continue
            raise AssertionError(f"EntityId{bad_id} must be rejected")
        assert EntityId("Counter", "K") == EntityId.parse("@counter@K")


async def _missing(client: Client, entity: EntityId) -> bool:
    return not (await client.read_entity_state(entity)).exists

