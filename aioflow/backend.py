"""The backend protocol: the one narrow interface a storage plugin implements.

A backend stores opaque bytes: instance rows, per-instance history (an append-only list of
encoded events), per-instance inboxes of messages, and a queue of activity tasks. It knows
nothing about orchestrators, replay, retries or timers; the runtime above it does all of that.
A backend module imports nothing from aioflow except this module (and `aioflow.errors` /
`aioflow.status` for the shared error and status types).

Correctness contract every backend must meet (the conformance suite in
`aioflow.testing.conformance` checks it):

* **Idempotent sends.** Every `Message` and `ActivityTask` has a unique, deterministic id. Sending
  one whose id was already sent (even if it was since consumed, as long as the instance's
  history was not purged) must not deliver it twice. Backends remember consumed message ids for
  at least as long as the instance's current execution lasts: a completion with
  `reset_history` (continue-as-new) may forget the ones consumed before it, since the runtime
  drops late copies of an old execution's messages (that keeps eternal orchestrations bounded).
* **Leases with fencing.** `lock_orchestrations` gives each work item a fresh `lock_token`;
  `complete_orchestrations`, `abandon_orchestration` and `renew_orchestration_lease` only act
  while that token is still the instance's current one and its lease has not been taken over.
  A worker whose lease expired and was taken over by another worker can therefore never commit.
* **Atomic completion.** One `OrchestrationCompletion` is all or nothing: history append,
  consumption of the messages it names, outbound messages, activity tasks, new instances and
  the instance row update are committed together or not at all.
* **Delayed messages.** A message with `visible_at` in the future is not handed out before then
  (durable timers are delayed messages the instance sends to itself).
* **At-least-once activities.** A locked activity task whose lease expires is handed out again.
  `complete_activities` deletes the task and delivers its result message; a result message
  whose id was already delivered is ignored.
* **Local hand-offs save round trips, never change the contract.** A completion may ask for its
  activity tasks to be stored already locked by the completing worker (`activity_lock`): they
  are then exactly like tasks that worker locked with `lock_activities` (same lease expiry and
  takeover rules). `complete_activities` may be asked to lock the instances it delivered results
  to (`lock`): exactly like `lock_orchestrations` restricted to those instances; returning no
  work items is always allowed.

Times are UTC epoch seconds (floats) everywhere in this module.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from aioflow.status import RuntimeStatus

__all__ = [
    "ActivityLock",
    "ActivityResult",
    "ActivityTask",
    "ActivityWorkItem",
    "Backend",
    "InstanceQuery",
    "InstanceRecord",
    "Message",
    "NewInstance",
    "OrchestrationCompletion",
    "OrchestrationLock",
    "OrchestrationWorkItem",
    "PurgeResult",
    "RuntimeStatus",
    "WorkKind",
    "decode_continuation",
    "encode_continuation",
]


@dataclass(slots=True)
class InstanceRecord:
    """The row a backend keeps per instance; what status queries read.

    `input`, `output`, `custom_status` and `failure` are encoded JSON (bytes) or None.
    `execution_id` changes on every continue-as-new; messages for an older execution are
    dropped by the runtime.
    """

    instance_id: str
    name: str
    execution_id: str
    runtime_status: RuntimeStatus
    created_time: float
    last_updated_time: float
    input: bytes | None = None
    output: bytes | None = None
    custom_status: bytes | None = None
    failure: bytes | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """An encoded history event on its way to an instance's inbox.

    `id` is unique and deterministic (re-sending after a crash is a no-op). The message is
    invisible to `lock_orchestrations` until `visible_at` (epoch seconds; 0 means now).
    """

    id: str
    instance_id: str
    data: bytes
    visible_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ActivityTask:
    """An encoded request to run one activity for one instance. `id` is unique and deterministic."""

    id: str
    instance_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance created as part of an orchestration step (a sub-orchestration).

    The backend creates the row (status PENDING) if no instance with that id exists, or if the
    existing one is terminal (COMPLETED/FAILED/TERMINATED: its history, inbox and row are replaced).
    If a live instance with that id exists, the row is left alone and only `start` is delivered to
    its inbox (the runtime then answers the caller with a failure). Either way `start` is sent
    with the usual idempotence by message id.
    """

    record: InstanceRecord
    start: Message


@dataclass(slots=True)
class OrchestrationWorkItem:
    """One locked instance: its row, its visible inbox messages (oldest first) and its lease.

    `history_length` is the number of history events stored; the worker uses it to decide whether
    its cached copy of the instance is current or it must call `get_history`.
    """

    instance: InstanceRecord
    messages: list[Message]
    history_length: int
    lock_token: str


@dataclass(frozen=True, slots=True)
class ActivityLock:
    """A completing worker's request to keep the activity tasks of its own step.

    The step's `activities` are stored already locked under `lock_token` (one token for all of
    them), with a lease of `lease_seconds` from the commit and a `dequeue_count` of 1, so the
    worker runs them without a `lock_activities` round trip. Until the lease expires,
    `lock_activities` does not hand them out; `renew_activity_lease`, `abandon_activity` and
    `complete_activities` accept the token. If the worker dies, the lease expires and the tasks
    are handed out as usual. A task whose id was already queued keeps its existing lock.
    """

    lock_token: str
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class OrchestrationLock:
    """A worker's request, made with `complete_activities`, to lock the instances the results
    were delivered to, in the same round trip: the same rules as `lock_orchestrations`
    (lockable instances only, fresh tokens, at most `max_items` items of at most
    `max_messages` messages each), restricted to those instances."""

    worker_id: str
    max_items: int
    lease_seconds: float
    max_messages: int = 1000


@dataclass(slots=True)
class OrchestrationCompletion:
    """Everything one orchestration step commits, atomically, under the work item's lease.

    * `new_history` is appended after the stored history; when `reset_history` is true the stored
      history is deleted first (continue-as-new starts a fresh execution).
    * `consumed` names inbox messages to delete (they were appended, or deliberately dropped).
    * `messages` go to instance inboxes (this instance's timers are delayed messages to itself);
      `activities` go to the activity queue; `new_instances` are sub-orchestrations (and
      entities) to create. `new_instances` are applied before `messages`: a message this step
      sends to an instance it creates (or finds live) arrives after that instance's start
      message, in the order listed (durable entities rely on it).
    * `instance` is the new row; its `instance_id` is the work item's.
    * `release`: unlock the instance when committed (the usual case). When false the lease is kept.
    * `activity_lock`: store `activities` already locked by the completing worker (see
      `ActivityLock`); None queues them for any worker.
    """

    instance_id: str
    lock_token: str
    instance: InstanceRecord
    new_history: list[bytes] = field(default_factory=list)
    reset_history: bool = False
    consumed: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    activities: list[ActivityTask] = field(default_factory=list)
    new_instances: list[NewInstance] = field(default_factory=list)
    release: bool = True
    activity_lock: ActivityLock | None = None


@dataclass(slots=True)
class ActivityWorkItem:
    """One locked activity task. `dequeue_count` counts how often it was handed out (1 = first)."""

    task: ActivityTask
    lock_token: str
    dequeue_count: int = 1


@dataclass(frozen=True, slots=True)
class ActivityResult:
    """The outcome of one activity task: delete the task, deliver `message` to the instance.

    `lock_token` is the work item's; a backend may ignore it (results are idempotent by message
    id), but must not fail because the task was already completed by someone else.
    """

    task_id: str
    lock_token: str
    message: Message


@dataclass(frozen=True, slots=True)
class InstanceQuery:
    """Filters for `query_instances` and `purge_instances`; None means "any".

    `created_from` is inclusive and `created_to` exclusive (epoch seconds).
    """

    runtime_status: frozenset[RuntimeStatus] | None = None
    created_from: float | None = None
    created_to: float | None = None
    name: str | None = None
    instance_id_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class PurgeResult:
    deleted_instance_count: int


class WorkKind(str, enum.Enum):  # noqa: UP042 - StrEnum would change str() of members
    ORCHESTRATION = "orchestration"
    ACTIVITY = "activity"


def encode_continuation(created_time: float, instance_id: str) -> str:
    """An opaque `query_instances` continuation token for a page ending at the instance with
    this sort key (queries are ordered by (created_time, instance_id)). Backends may use it so
    that every store gives out the same kind of token."""
    raw = json.dumps([created_time, instance_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_continuation(token: str) -> tuple[float, str]:
    """The (created_time, instance_id) sort key in a token from `encode_continuation`.

    Raises ValueError, saying what to pass instead, for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
        created_time, instance_id = json.loads(raw)
        if isinstance(created_time, bool) or not isinstance(created_time, (int, float)) \
                or not isinstance(instance_id, str):
            raise TypeError(token)
    except (ValueError, TypeError, UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(
            f"invalid continuation token {token!r}: pass back exactly the token a previous "
            f"query_instances call returned") from exc
    return float(created_time), instance_id


@runtime_checkable
class Backend(Protocol):
    """The storage interface. All methods are coroutines and may be called concurrently.

    Ordering: `lock_orchestrations` returns each instance's visible messages in the order they
    were sent (per sender this is guaranteed; across senders any order is allowed). Queries
    return instances ordered by (created_time, instance_id).
    """

    # -- instances -------------------------------------------------------------------------
    async def create_instance(self, record: InstanceRecord, start: Message) -> None:
        """Create `record` (PENDING) and put `start` in its inbox, atomically.

        Raises `aioflow.errors.InstanceExistsError` if a live (non-terminal) instance with that id
        exists. A terminal one is replaced: its history, inbox and row are discarded first.
        """
        ...

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        ...

    async def get_history(self, instance_id: str) -> list[bytes]:
        """The instance's stored history events, oldest first ([] if unknown)."""
        ...

    async def query_instances(
        self, query: InstanceQuery, *, page_size: int = 100, continuation: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page of instances matching `query`, and a continuation token (None: no more)."""
        ...

    async def purge_instances(
        self, *, instance_id: str | None = None, query: InstanceQuery | None = None
    ) -> PurgeResult:
        """Delete terminal instances (row, history, inbox, pending activity tasks).

        With `instance_id`, that one instance if it is terminal; with `query`, every terminal
        instance matching it. Live instances are never purged.
        """
        ...

    # -- messages --------------------------------------------------------------------------
    async def send_messages(self, messages: Sequence[Message]) -> None:
        """Put messages in instance inboxes; ids already sent are ignored."""
        ...

    # -- orchestration work items ----------------------------------------------------------
    async def lock_orchestrations(
        self, worker_id: str, *, max_items: int, lease_seconds: float, max_messages: int = 1000
    ) -> list[OrchestrationWorkItem]:
        """Lock up to `max_items` instances that exist, have visible inbox messages and are not
        locked (or whose lease expired). Each gets a fresh `lock_token`; at most
        `max_messages` messages per item are returned.
        """
        ...

    async def complete_orchestrations(
        self, completions: Sequence[OrchestrationCompletion]
    ) -> list[bool]:
        """Commit each completion atomically (ideally all in one transaction).

        Returns one flag per completion: False when its lease was lost (its token is no longer
        current), in which case nothing of that completion was written.
        """
        ...

    async def abandon_orchestration(
        self, instance_id: str, lock_token: str, *, retry_after: float = 0.0
    ) -> None:
        """Release the lock without committing; the messages stay and become lockable again
        after `retry_after` seconds. A stale token is ignored."""
        ...

    async def renew_orchestration_lease(
        self, instance_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease; False if the token is no longer current."""
        ...

    # -- activity work items ---------------------------------------------------------------
    async def lock_activities(
        self, worker_id: str, *, max_items: int, lease_seconds: float
    ) -> list[ActivityWorkItem]:
        """Lock up to `max_items` activity tasks that are not locked (or whose lease expired)."""
        ...

    async def complete_activities(
        self, results: Sequence[ActivityResult], *, lock: OrchestrationLock | None = None
    ) -> list[OrchestrationWorkItem]:
        """For each result: delete its task (if still there) and deliver its message (ignored if
        that message id was already delivered). Ideally all in one transaction.

        With `lock`, the backend may also lock instances the results were delivered to (see
        `OrchestrationLock`) and return them as work items for the caller, which then owns them
        exactly as if `lock_orchestrations` had returned them. It may always return [].
        """
        ...

    async def abandon_activity(self, task_id: str, lock_token: str) -> None:
        """Make a locked task available again now. A stale token is ignored."""
        ...

    async def renew_activity_lease(
        self, task_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease; False if the token is no longer current (another worker has it)."""
        ...

    # -- lifecycle and wake-ups ------------------------------------------------------------
    async def wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        """Return when work of `kind` may be available, or after `timeout` seconds.

        A backend that can be notified (in-process, long polls) returns early; a plain
        implementation just sleeps. Spurious returns are allowed.
        """
        ...

    async def close(self) -> None:
        ...
