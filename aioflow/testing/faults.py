"""`FaultyBackend`: a backend wrapper that fails one chosen write, to test crash recovery.

A crash can happen before, during or after any write a client or worker makes, and the
correctness contract says recovery must reach the same final state as an uninterrupted run. A
real crash between "the store applied my write" and "I learnt that it did" is hard to provoke on
purpose; this wrapper provokes it deterministically. Every call passes through to the wrapped
backend, except that the write numbered `fail_at` (1 = the first write) raises `InjectedFault`:

* ``mode="before"``: the exception is raised instead of calling the inner backend, so nothing was
  written (a crash, a timeout or a lost connection before the request reached the store);
* ``mode="after"``: the inner backend applied the write, then the caller gets the exception
  anyway (the response was lost): the caller must assume nothing and yet a retry must not do the
  work twice. This is the case that breaks code that is not idempotent.

Writes are the calls that change state a caller cannot read back atomically: `create_instance`,
`send_messages`, `complete_orchestrations`, `abandon_orchestration`, `complete_activities` and
`abandon_activity`, numbered in the order they are called (a call counts even if the inner
backend then rejects it). By default only writes are counted and failed; `counted=` chooses other
methods (a failed `get_history`, say). The wrapper records every counted call (`writes`), so a
test can first count the writes of a clean run and then fail each one in turn::

    faulty = FaultyBackend(MemoryBackend(), fail_at=7, mode="after")
    async with Worker(app, faulty):
        ...
    assert faulty.injected is not None, "the run made fewer than 7 writes"
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aioflow.backend import (
    ActivityResult,
    ActivityWorkItem,
    Backend,
    InstanceQuery,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    PurgeResult,
    WorkKind,
)

__all__ = ["WRITE_METHODS", "FaultMode", "FaultyBackend", "InjectedFault", "Write"]

FaultMode = Literal["before", "after"]

#: The backend methods `FaultyBackend` counts as writes, and may fail.
WRITE_METHODS = (
    "create_instance",
    "send_messages",
    "complete_orchestrations",
    "abandon_orchestration",
    "complete_activities",
    "abandon_activity",
)


class InjectedFault(Exception):
    """The failure `FaultyBackend` injects. `applied` says whether the write reached the store."""

    def __init__(self, number: int, method: str, mode: FaultMode) -> None:
        self.number = number
        self.method = method
        self.mode = mode
        self.applied = mode == "after"
        where = ("after the backend applied it" if self.applied
                 else "before it reached the backend")
        super().__init__(f"injected fault at call #{number} ({method}), {where}")


@dataclass(frozen=True, slots=True)
class Write:
    """One write seen by `FaultyBackend`: its number (from 1), method and a short summary."""

    number: int
    method: str
    detail: str

    def __str__(self) -> str:
        return f"#{self.number} {self.method}({self.detail})"


class FaultyBackend:
    """Wraps `inner` (any `Backend`) and fails call number `fail_at` in the given `mode`.

    Only calls of the methods in `counted` are numbered (and recorded in `writes`); by default
    those are the writes, `WRITE_METHODS`. A test may count other methods too, say
    ``counted=("get_history",)`` to fail a read. `fail_at` is one number or a collection of
    numbers (each fails once, all in the same mode); None fails nothing, so the wrapper only
    records. `arm()` chooses new calls to fail (counting continues). Attributes the protocol
    does not define (say, a memory backend's `next_visible_at`) are forwarded to `inner`.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        fail_at: int | Collection[int] | None = None,
        mode: FaultMode = "before",
        counted: Collection[str] = WRITE_METHODS,
    ) -> None:
        unknown = sorted(set(counted) - set(_ALL_METHODS))
        if unknown:
            raise ValueError(f"counted names methods the backend protocol does not have: "
                             f"{unknown}; choose from {', '.join(_ALL_METHODS)}")
        self.inner = inner
        self.counted = frozenset(counted)
        #: Every counted call so far, in call order.
        self.writes: list[Write] = []
        #: The calls that were failed, in order.
        self.faults: list[Write] = []
        self.fail_at: frozenset[int] = frozenset()
        self.mode: FaultMode = "before"
        self.arm(fail_at, mode)

    def arm(self, fail_at: int | Collection[int] | None, mode: FaultMode = "before") -> None:
        """Fail the counted calls numbered `fail_at` (from the wrapper's creation, from 1)."""
        if mode not in ("before", "after"):
            raise ValueError(f"mode must be 'before' or 'after', not {mode!r}")
        numbers = (frozenset() if fail_at is None
                   else frozenset([fail_at]) if isinstance(fail_at, int) else frozenset(fail_at))
        if any(n < 1 for n in numbers):
            raise ValueError(f"fail_at counts calls from 1, got {sorted(numbers)}")
        self.fail_at = numbers
        self.mode = mode

    @property
    def injected(self) -> Write | None:
        """The first call that was failed, or None if none was (yet)."""
        return self.faults[0] if self.faults else None

    @property
    def write_count(self) -> int:
        return len(self.writes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return (f"FaultyBackend({self.inner!r}, fail_at={sorted(self.fail_at)}, "
                f"mode={self.mode!r})")

    # -- the fault ----------------------------------------------------------------------------

    def _before(self, method: str, detail: str) -> Write | None:
        """Record a counted call; raise or return it if it is one to fail."""
        if method not in self.counted:
            return None
        write = Write(len(self.writes) + 1, method, detail)
        self.writes.append(write)
        if write.number in self.fail_at:
            self.faults.append(write)
            if self.mode == "before":
                raise InjectedFault(write.number, method, "before")
            return write
        return None

    @staticmethod
    def _after(write: Write | None) -> None:
        if write is not None:
            raise InjectedFault(write.number, write.method, "after")

    # -- writes -------------------------------------------------------------------------------

    async def create_instance(self, record: InstanceRecord, start: Message) -> None:
        write = self._before("create_instance", record.instance_id)
        await self.inner.create_instance(record, start)
        self._after(write)

    async def send_messages(self, messages: Sequence[Message]) -> None:
        write = self._before("send_messages", _ids(m.instance_id for m in messages))
        await self.inner.send_messages(messages)
        self._after(write)

    async def complete_orchestrations(
        self, completions: Sequence[OrchestrationCompletion]
    ) -> list[bool]:
        write = self._before("complete_orchestrations", _ids(c.instance_id for c in completions))
        flags = await self.inner.complete_orchestrations(completions)
        self._after(write)
        return flags

    async def abandon_orchestration(
        self, instance_id: str, lock_token: str, *, retry_after: float = 0.0
    ) -> None:
        write = self._before("abandon_orchestration", instance_id)
        await self.inner.abandon_orchestration(instance_id, lock_token, retry_after=retry_after)
        self._after(write)

    async def complete_activities(
        self, results: Sequence[ActivityResult], *, lock: OrchestrationLock | None = None
    ) -> list[OrchestrationWorkItem]:
        write = self._before("complete_activities", _ids(r.task_id for r in results))
        items = await self.inner.complete_activities(results, lock=lock)
        self._after(write)  # "after": committed, and any instances it locked stay locked
        return list(items or [])

    async def abandon_activity(self, task_id: str, lock_token: str) -> None:
        write = self._before("abandon_activity", task_id)
        await self.inner.abandon_activity(task_id, lock_token)
        self._after(write)

    # -- everything else passes through (and may be counted too) ---------------------------------

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        call = self._before("get_instance", instance_id)
        result = await self.inner.get_instance(instance_id)
        self._after(call)
        return result

    async def get_history(self, instance_id: str) -> list[bytes]:
        call = self._before("get_history", instance_id)
        result = await self.inner.get_history(instance_id)
        self._after(call)
        return result

    async def query_instances(
        self, query: InstanceQuery, *, page_size: int = 100, continuation: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        call = self._before("query_instances", "")
        result = await self.inner.query_instances(
            query, page_size=page_size, continuation=continuation
        )
        self._after(call)
        return result

    async def purge_instances(
        self, *, instance_id: str | None = None, query: InstanceQuery | None = None
    ) -> PurgeResult:
        call = self._before("purge_instances", instance_id or "")
        result = await self.inner.purge_instances(instance_id=instance_id, query=query)
        self._after(call)
        return result

    async def lock_orchestrations(
        self, worker_id: str, *, max_items: int, lease_seconds: float, max_messages: int = 1000
    ) -> list[OrchestrationWorkItem]:
        call = self._before("lock_orchestrations", worker_id)
        result = await self.inner.lock_orchestrations(
            worker_id, max_items=max_items, lease_seconds=lease_seconds,
            max_messages=max_messages,
        )
        self._after(call)
        return result

    async def renew_orchestration_lease(
        self, instance_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        call = self._before("renew_orchestration_lease", instance_id)
        result = await self.inner.renew_orchestration_lease(instance_id, lock_token, lease_seconds)
        self._after(call)
        return result

    async def lock_activities(
        self, worker_id: str, *, max_items: int, lease_seconds: float
    ) -> list[ActivityWorkItem]:
        call = self._before("lock_activities", worker_id)
        result = await self.inner.lock_activities(
            worker_id, max_items=max_items, lease_seconds=lease_seconds
        )
        self._after(call)
        return result

    async def renew_activity_lease(
        self, task_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        call = self._before("renew_activity_lease", task_id)
        result = await self.inner.renew_activity_lease(task_id, lock_token, lease_seconds)
        self._after(call)
        return result

    async def wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        call = self._before("wait_for_work", WorkKind(kind).value)
        await self.inner.wait_for_work(kind, timeout)
        self._after(call)

    async def close(self) -> None:
        await self.inner.close()


_ALL_METHODS = (
    *WRITE_METHODS,
    "get_instance",
    "get_history",
    "query_instances",
    "purge_instances",
    "lock_orchestrations",
    "renew_orchestration_lease",
    "lock_activities",
    "renew_activity_lease",
    "wait_for_work",
)


def _ids(values: Any) -> str:
    """A short, readable summary of the ids a write touches."""
    items = list(dict.fromkeys(values))
    text = ", ".join(items[:3])
    return text + (f", +{len(items) - 3}" if len(items) > 3 else "")
