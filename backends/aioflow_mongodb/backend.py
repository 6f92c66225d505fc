"""`MongoBackend`: the aioflow backend protocol on MongoDB, without multi-document transactions.

What it relies on
-----------------
Only what every MongoDB deployment (standalone, replica set, sharded cluster) and compatible
servers offer: a write to ONE document is atomic (conditional updates such as
``find_one_and_update`` see and change the document in one step), and a unique ``_id`` rejects
a second insert. No transactions, change streams or TTL indexes.

How each promise of the contract is kept
----------------------------------------
* **Leases with fencing.** The instance document holds the lease (``tok``, ``until``). A lock
  is a conditional update (``until <= now`` and no pending commit -> fresh random token), so two
  workers can never both hold it; renew/abandon/commit are conditional on the token.
* **Atomic completion.** A completion is first written whole, as a *commit record*, onto the
  instance document by one conditional update fenced by the token (``tok == mine`` and no
  pending commit). That single-document write is the commit point: from then on the step is
  committed and is *rolled forward*: history batches, new instances, outbound messages and
  activity tasks are inserted under deterministic ids (a second insert is a no-op), the
  consumed messages are marked, and finally the row is updated and the record cleared, again
  conditionally on the record's id, so each part is applied exactly once however many times it
  is attempted. The committing worker rolls forward at once; if it dies midway, any worker
  that finds a pending record whose lease has expired finishes it (`lock_orchestrations`).
  Readers never see half a step: `get_instance` and `get_history` read a pending record as
  committed (its row, stored history + its events), and history beyond the row's length is
  ignored.
* **Idempotent sends.** A message's ``_id`` is derived from (instance id, message id); consumed
  messages keep their id (the payload is dropped) until the instance is purged, replaced or
  continues as new, so a re-send is a duplicate-key no-op. Activity tasks use the task id.
* **16 MiB.** History is stored in batch documents (one per step, split at 4 MiB), payloads
  over 1 MiB and commit records over 4 MiB go to chunk documents, so no document grows with an
  instance's age and no payload size surfaces as a server error.
* **Ids are data.** Instance ids, message ids and names are only used as string values in
  filters (never as field names or inside expressions) and are checked to be ``str``.

See the package README section for the collections, indexes and the recommended shard keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import bson
from pymongo import ASCENDING, AsyncMongoClient, DeleteOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, ServerSelectionTimeoutError
from pymongo.errors import ConfigurationError as PyMongoConfigurationError

from aioflow.backend import (
    ActivityResult,
    ActivityTask,
    ActivityWorkItem,
    InstanceQuery,
    InstanceRecord,
    Message,
    OrchestrationCompletion,
    OrchestrationLock,
    OrchestrationWorkItem,
    PurgeResult,
    RuntimeStatus,
    WorkKind,
    decode_continuation,
    encode_continuation,
)
from aioflow.errors import AioflowError, ConfigurationError, InstanceExistsError

from . import _docs
from ._docs import TERMINAL, Doc, check_str, key, message_key, next_seq

__all__ = ["INDEXES", "MongoBackend", "MongoUnavailableError"]

_DUPLICATE_KEY = 11000
#: Statements per bulk write command (see `_bulk`).
_BULK_LIMIT = 50
#: How many future wake-up times (delayed messages written here) are remembered.
_MAX_DUE = 10_000

#: The indexes created on first use: collection suffix -> list of (name, keys).
INDEXES: dict[str, list[tuple[str, list[tuple[str, int]]]]] = {
    "instances": [
        ("by_created", [("ct", ASCENDING), ("_id", ASCENDING)]),
        ("by_status", [("st", ASCENDING), ("ct", ASCENDING)]),
        ("pending_commits", [("pend", ASCENDING), ("until", ASCENDING)]),
    ],
    "messages": [
        # pending messages in send order, visibility checked from the index
        ("pending", [("c", ASCENDING), ("s", ASCENDING), ("v", ASCENDING)]),
        ("inbox", [("i", ASCENDING), ("c", ASCENDING), ("s", ASCENDING)]),
    ],
    "history": [("by_instance", [("i", ASCENDING), ("g", ASCENDING), ("n", ASCENDING)])],
    "tasks": [
        ("lockable", [("until", ASCENDING), ("s", ASCENDING)]),
        ("by_instance", [("i", ASCENDING)]),
    ],
    "chunks": [("by_owner", [("o", ASCENDING), ("k", ASCENDING)]), ("by_instance",
                                                                     [("i", ASCENDING)])],
}


class MongoUnavailableError(AioflowError, ConnectionError):
    """The MongoDB server could not be reached within the server-selection timeout."""


def _token() -> str:
    return os.urandom(16).hex()


def _row_doc(iid: str, fields: Doc, gen: str, origin: str | None, commit: Doc) -> Doc:
    """A fresh instance document whose start message is still to be delivered (`commit`)."""
    return {"_id": iid, **fields, "gen": gen, "origin": origin, "hg": _token(), "hl": 0,
            "tok": None, "until": 0.0, "pend": True, "cm": commit}


class MongoBackend:
    """The aioflow backend protocol on a MongoDB database (see the module docstring).

    Give it a ``mongodb://`` / ``mongodb+srv://`` URI, an `AsyncMongoClient` the application
    already has, or an `AsyncDatabase`:

    * ``MongoBackend("mongodb://host/appdb")`` (database from the URI path, or ``database=``);
      the backend creates and owns the client and closes it in `close`.
    * ``MongoBackend(client, database="appdb")``: uses the application's client; `close` does
      not close it.
    * ``MongoBackend(client.appdb)``: the same with a database object.

    Collections are named ``<prefix>instances``, ``<prefix>messages``, ``<prefix>history``,
    ``<prefix>tasks`` and ``<prefix>chunks`` (prefix ``aioflow_``); their indexes are created on
    first use. Use one backend object per event loop; any number of processes may share one
    database.
    """

    def __init__(
        self,
        target: str | AsyncMongoClient[Doc] | AsyncDatabase[Doc],
        database: str | None = None,
        *,
        prefix: str = "aioflow_",
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._uri: str | None = None
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None
        self._owns_client = False
        self._options = dict(client_options or {})
        if isinstance(target, str):
            from .url import split_uri

            self._uri, in_uri, options = split_uri(target, database_required=database is None)
            self._owns_client = True
            self.database_name = database or in_uri
            if prefix == "aioflow_" and "prefix" in options:
                prefix = options["prefix"]
        elif isinstance(target, AsyncDatabase):
            if database is not None and database != target.name:
                raise ConfigurationError(
                    f"MongoBackend got database object {target.name!r} and database="
                    f"{database!r}; give one or the other")
            self._db = target
            self._client = target.client
            self.database_name = target.name
        elif isinstance(target, AsyncMongoClient):
            self._client = target
            name = database
            if name is None:
                try:
                    name = target.get_default_database().name
                except PyMongoConfigurationError:
                    name = None
            if not name:
                raise ConfigurationError(
                    "MongoBackend(client) needs a database name: pass database='name' (or "
                    "put it in the client's URI path, mongodb://host/name)")
            self.database_name = name
        else:
            raise ConfigurationError(
                f"MongoBackend needs a mongodb:// URI, an AsyncMongoClient or an "
                f"AsyncDatabase, not {type(target).__name__}")
        _check_database_name(self.database_name)
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_]*", prefix):
            raise ConfigurationError(
                f"invalid collection prefix {prefix!r}: use letters, digits and '_' only")
        self.prefix = prefix
        self._ready_lock = asyncio.Lock()
        self._ready = False
        self._closed = False
        self._events = {kind: asyncio.Event() for kind in WorkKind}
        self._due: list[float] = []
        self._held: dict[str, tuple[int, str]] = {}  # lock token -> (history length, gen)

    def __repr__(self) -> str:
        return f"MongoBackend(database={self.database_name!r}, prefix={self.prefix!r})"

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def database(self) -> AsyncDatabase[Doc]:
        """The database object (after the first call or ``async with``)."""
        if self._db is None:
            raise RuntimeError(f"{self!r} is not open yet")
        return self._db

    def collection(self, suffix: str) -> AsyncCollection[Doc]:
        return self.database.get_collection(self.prefix + suffix)

    async def _open(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._ready:
                return
            if self._client is None:
                assert self._uri is not None
                self._client = AsyncMongoClient(self._uri, **self._options)
            if self._db is None:
                self._db = self._client.get_database(self.database_name)
            self._instances = self.collection("instances")
            self._messages = self.collection("messages")
            self._history = self.collection("history")
            self._tasks = self.collection("tasks")
            self._chunks = self.collection("chunks")
            try:
                await asyncio.gather(*(
                    self.collection(suffix).create_index(keys, name=name)
                    for suffix, indexes in INDEXES.items() for name, keys in indexes))
            except ServerSelectionTimeoutError as exc:
                hosts = ", ".join(f"{h}:{p}" for h, p in self._client.topology_description
                                  .server_descriptions()) or "the URI's hosts"
                raise MongoUnavailableError(
                    f"cannot reach MongoDB at {hosts} (database {self.database_name!r}): no "
                    f"server answered within the server-selection timeout. Check that the "
                    f"server runs and that the URI's host, port and TLS options are right. "
                    f"Driver detail: {exc}") from exc
            self._ready = True

    async def close(self) -> None:
        """Close the client if this backend created it (from a URI). Idempotent."""
        async with self._ready_lock:
            if self._closed:
                return
            self._closed = True
            self._ready = False
            client, self._client = self._client, None
            if client is not None and self._owns_client:
                await client.close()

    # -- wake-ups ---------------------------------------------------------------------------

    def _wake_for(self, messages: Iterable[Doc | Message]) -> None:
        now = time.time()
        for m in messages:
            visible = m.visible_at if isinstance(m, Message) else m["v"]
            if visible <= now:
                self._events[WorkKind.ORCHESTRATION].set()
            else:
                if len(self._due) >= _MAX_DUE:
                    self._due = heapq.nsmallest(_MAX_DUE // 2, self._due)
                heapq.heappush(self._due, visible)

    async def wait_for_work(self, kind: WorkKind, timeout: float) -> None:
        """Return when work of `kind` may be available, or after `timeout` seconds.

        Wakes early for work this backend object wrote (and for its delayed messages when they
        become visible); work written by other processes is found by the caller's polling
        (`timeout` is its interval). Spurious returns happen.
        """
        kind = WorkKind(kind)
        event = self._events[kind]
        delay = max(0.0, timeout)
        if kind is WorkKind.ORCHESTRATION and self._due:
            now = time.time()
            if self._due[0] <= now:
                while self._due and self._due[0] <= now:
                    heapq.heappop(self._due)
                return
            delay = min(delay, self._due[0] - now + 0.002)
        if not event.is_set() and delay > 0:
            try:
                await asyncio.wait_for(event.wait(), delay)
            except TimeoutError:
                pass
        event.clear()

    # -- instances --------------------------------------------------------------------------

    async def create_instance(self, record: InstanceRecord, start: Message) -> None:
        """Create `record` with `start` in its inbox.

        Raises `InstanceExistsError` if a live instance has the id. A terminal one is replaced:
        its row is swapped atomically, then its history, inbox and tasks are deleted.
        """
        iid = check_str(record.instance_id, "instance_id")
        if start.instance_id != iid:
            raise ValueError(
                f"start message is addressed to {start.instance_id!r}, but the instance being "
                f"created is {iid!r}")
        await self._open()
        chunks: list[Doc] = []
        fields = _docs.row_fields(record, key("row", iid, _token()), chunks)
        start_doc = self._message_doc(start, chunks, key("start", iid, _token()))
        await self._insert_ignoring_duplicates(self._chunks, chunks)
        await self._start(iid, fields, start_doc, origin=None, fail_if_live=True)
        self._wake_for([start])

    async def _start(self, iid: str, fields: Doc, start: Doc, *, origin: str | None,
                     fail_if_live: bool) -> None:
        """Create (or replace a terminal) instance with row `fields` and deliver the message
        document `start` (see `NewInstance`); chunks of both are already stored. `origin`
        names the commit part creating it, so that applying that part again is a no-op."""
        for _ in range(20):
            doc = await self._instances.find_one({"_id": iid}, {"cm": 0})
            if doc is not None and doc["pend"]:
                await self._roll_forward(iid)  # finish what is half done, then decide
                continue
            if doc is not None and origin is not None and doc.get("origin") == origin:
                return  # this very part created it already (a repeated roll-forward)
            if doc is not None and doc["st"] not in TERMINAL:
                if fail_if_live:
                    raise InstanceExistsError(iid, doc["st"])
                await self._insert_messages([start])
                return
            commit: Doc = {"cid": _token(), "kind": "start", "start": start}
            if doc is not None:
                commit.update(cutoff=next_seq(), old_hg=doc["hg"])
            new_doc = _row_doc(iid, fields, _token(), origin, commit)
            if doc is None:
                try:
                    await self._instances.insert_one(new_doc)
                except DuplicateKeyError:
                    continue
            else:
                replaced = await self._instances.replace_one(
                    {"_id": iid, "gen": doc["gen"], "pend": False}, new_doc)
                if replaced.matched_count != 1:
                    continue
            await self._apply(iid, commit)
            return
        raise RuntimeError(f"could not create instance {iid!r}: it kept changing under us")

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """The instance's row as committed (a commit still being applied counts), or None."""
        check_str(instance_id, "instance_id")
        await self._open()
        doc = await self._instances.find_one({"_id": instance_id})
        if doc is None:
            return None
        fields: Mapping[str, Any] = doc
        if doc["pend"] and doc["cm"]["kind"] == "step":
            fields = (await self._load_commit(doc["cm"]))["row"]
        return _docs.record_from(instance_id, fields,
                                 await self._load_chunks(_docs.row_refs(fields)))

    async def get_history(self, instance_id: str) -> list[bytes]:
        """The stored history, oldest first ([] if unknown); a pending commit's events count."""
        check_str(instance_id, "instance_id")
        await self._open()
        doc = await self._instances.find_one({"_id": instance_id}, {"hg": 1, "hl": 1, "pend": 1,
                                                                     "cm": 1})
        if doc is None:
            return []
        extra: list[Any] = []
        stored: list[Any] = []
        reset = False
        if doc["pend"] and doc["cm"]["kind"] == "step":
            record = await self._load_commit(doc["cm"])
            extra, reset = record["hist"], record["reset"]
        if not reset:
            stored = await self._stored_history(instance_id, doc["hg"], doc["hl"])
        items = stored + extra
        chunks = await self._load_chunks(_docs.refs(items))
        return [_docs.unpack(item, chunks) or b"" for item in items]

    async def _stored_history(self, iid: str, hg: str, length: int) -> list[Any]:
        items: list[Any] = []
        async for batch in self._history.find({"i": iid, "g": hg}).sort("n", ASCENDING):
            if batch["n"] != len(items):  # a batch of an unfinished write: never past the row
                break
            items.extend(batch["d"])
            if len(items) >= length:
                break
        return items[:length]

    async def query_instances(
        self, query: InstanceQuery, *, page_size: int = 100, continuation: str | None = None
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page of matching instances ordered by (created_time, instance_id).

        The continuation token encodes the last row's sort key, so paging is stable while
        instances come and go. Filters apply to the rows as applied (a step being committed
        this very moment is matched by its previous row).
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size!r}")
        filters = _where(query)
        if continuation is not None:
            created, last = decode_continuation(continuation)
            filters.append({"$or": [{"ct": {"$gt": created}},
                                    {"ct": created, "_id": {"$gt": last}}]})
        await self._open()
        docs = await self._instances.find(_and(filters)).sort(
            [("ct", ASCENDING), ("_id", ASCENDING)]).limit(page_size + 1).to_list(None)
        records = []
        for doc in docs[:page_size]:
            fields: Mapping[str, Any] = doc
            if doc["pend"] and doc["cm"]["kind"] == "step":
                fields = (await self._load_commit(doc["cm"]))["row"]
            records.append(_docs.record_from(doc["_id"], fields, await self._load_chunks(
                _docs.row_refs(fields))))
        token = None
        if len(docs) > page_size:
            token = encode_continuation(docs[page_size - 1]["ct"], docs[page_size - 1]["_id"])
        return records, token

    async def purge_instances(
        self, *, instance_id: str | None = None, query: InstanceQuery | None = None
    ) -> PurgeResult:
        """Delete terminal instances: row, history, inbox (and remembered ids), tasks, chunks.

        With `instance_id`, that one if terminal; with `query`, every terminal match; with
        both, that one if it matches. Live instances are never purged. Purging an id with no
        instance drops messages waiting for it.
        """
        if instance_id is None and query is None:
            raise TypeError("purge_instances needs instance_id or query (or both)")
        filters = _where(query or InstanceQuery())
        filters.append({"st": {"$in": list(TERMINAL)}, "pend": False})
        if instance_id is not None:
            filters.append({"_id": check_str(instance_id, "instance_id")})
        await self._open()
        count = 0
        async for doc in self._instances.find(_and(filters), {"gen": 1}):
            gone = await self._instances.delete_one(
                {"_id": doc["_id"], "gen": doc["gen"], "pend": False,
                 "st": {"$in": list(TERMINAL)}})
            if gone.deleted_count:
                count += 1
                await self._discard(doc["_id"])
        if instance_id is not None and count == 0:
            if await self._instances.find_one({"_id": instance_id}, {"_id": 1}) is None:
                await self._discard(instance_id)
        return PurgeResult(deleted_instance_count=count)

    async def _discard(self, iid: str) -> None:
        await asyncio.gather(*(c.delete_many({"i": iid}) for c in (
            self._history, self._messages, self._tasks, self._chunks)))

    # -- messages ---------------------------------------------------------------------------

    @staticmethod
    def _message_doc(message: Message, chunks: list[Doc], owner: str | None = None) -> Doc:
        """The stored form of `message`; a big payload goes to `chunks` under `owner`."""
        iid = check_str(message.instance_id, "a message's instance_id")
        mid = check_str(message.id, "a message id")
        mkey = message_key(iid, mid)
        return {"_id": mkey, "i": iid, "m": mid,
                "d": _docs.pack(message.data, owner or key("msg", mkey, _token()), iid, chunks),
                "v": float(message.visible_at), "s": next_seq(), "c": False}

    async def send_messages(self, messages: Sequence[Message]) -> None:
        """Put messages in inboxes; ids an inbox already had (pending or consumed) are
        ignored. A message to an id with no instance waits for one to be created."""
        if not messages:
            return
        await self._open()
        chunks: list[Doc] = []
        docs = [self._message_doc(m, chunks) for m in messages]
        await self._insert_ignoring_duplicates(self._chunks, chunks)
        await self._insert_messages(docs)
        self._wake_for(messages)

    async def _insert_messages(self, docs: list[Doc]) -> list[Doc]:
        """Insert message documents; returns those that were new."""
        return await self._insert_ignoring_duplicates(self._messages, docs)

    @staticmethod
    async def _insert_ignoring_duplicates(collection: AsyncCollection[Doc],
                                          docs: list[Doc]) -> list[Doc]:
        """Insert `docs` (any order); a duplicate ``_id`` is skipped. Returns the new ones."""
        if not docs:
            return []
        try:
            await collection.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                raise
            skipped = {e["index"] for e in errors}
            return [d for n, d in enumerate(docs) if n not in skipped]
        return docs

    # -- orchestration work items -----------------------------------------------------------

    async def lock_orchestrations(
        self, worker_id: str, *, max_items: int, lease_seconds: float, max_messages: int = 1000
    ) -> list[OrchestrationWorkItem]:
        """Lock up to `max_items` instances with visible messages and no live lease.

        Instances whose oldest visible message was sent first come first; each item holds its
        visible messages in send order (at most `max_messages`). First finishes the commits
        left half-applied by workers that died (pending past their lease).
        """
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if max_items < 1:
            return []
        await self._open()
        now = time.time()
        # Instances that cannot be locked now (leased, or a commit is being applied), then the
        # oldest visible messages of the others (a bounded scan; FerretDB has no $group $min to
        # do better). A commit left pending past its lease lost its writer: finish it first.
        busy: list[str] = []
        async for doc in self._instances.find({"$or": [{"until": {"$gt": now}}, {"pend": True}]},
                                              {"until": 1, "pend": 1}):
            if doc["pend"] and doc["until"] <= now:
                await self._roll_forward(doc["_id"])  # then it is lockable like any other
                continue
            busy.append(doc["_id"])
        candidates: dict[str, None] = {}
        async for m in self._messages.find(
                {"c": False, "v": {"$lte": now}, "i": {"$nin": busy}}, {"i": 1}).sort(
                [("s", ASCENDING), ("_id", ASCENDING)]).limit(max(100, max_items * 20)):
            candidates[m["i"]] = None
        return await self._lock_instances(list(candidates), worker_id, max_items, lease_seconds,
                                          max_messages)

    async def _lock_instances(self, candidates: list[str], worker_id: str, max_items: int,
                              lease_seconds: float, max_messages: int
                              ) -> list[OrchestrationWorkItem]:
        """Lock the first `max_items` lockable instances among `candidates` (in order): one
        conditional ``find_one_and_update`` each, which also returns the row."""
        now = time.time()
        lockable = {"until": {"$lte": now}, "pend": False}
        until = now + lease_seconds
        tokens: dict[str, str] = {}
        docs: dict[str, Doc] = {}
        remaining = list(dict.fromkeys(candidates))
        for _ in range(3):  # candidates other workers took meanwhile make room for the next
            if not remaining or len(docs) >= max_items:
                break
            batch, remaining = remaining[:max_items - len(docs)], remaining[max_items - len(docs):]
            for iid in batch:
                tokens[iid] = _token()
            claimed = await asyncio.gather(*(self._instances.find_one_and_update(
                {"_id": iid, **lockable},
                {"$set": {"tok": tokens[iid], "until": until, "by": worker_id}},
                return_document=ReturnDocument.AFTER) for iid in batch))
            docs.update((doc["_id"], doc) for doc in claimed if doc is not None)
        mine = [iid for iid in candidates if iid in docs]
        if not mine:
            return []
        inbox: dict[str, list[Doc]] = {iid: [] for iid in mine}
        async for m in self._messages.find(
                {"i": {"$in": mine}, "c": False, "v": {"$lte": now}}).sort(
                [("s", ASCENDING), ("_id", ASCENDING)]):
            if len(inbox[m["i"]]) < max_messages:
                inbox[m["i"]].append(m)
        chunks = await self._load_chunks(
            _docs.refs(m["d"] for ms in inbox.values() for m in ms)
            + [r for iid in mine for r in _docs.row_refs(docs[iid])])
        items = []
        for iid in mine:
            doc, token = docs[iid], tokens[iid]
            if not inbox[iid]:  # consumed meanwhile by the previous holder: not work
                await self._instances.update_one({"_id": iid, "tok": token},
                                                 {"$set": {"tok": None, "until": 0.0}})
                continue
            self._remember(token, doc["hl"], doc["hg"])
            items.append(OrchestrationWorkItem(
                instance=_docs.record_from(iid, doc, chunks),
                messages=[Message(m["m"], iid, _docs.unpack(m["d"], chunks) or b"", m["v"])
                          for m in inbox[iid]],
                history_length=doc["hl"], lock_token=token))
        return items

    def _remember(self, token: str, history_length: int, gen: str) -> None:
        if len(self._held) > 10_000:
            self._held.clear()
        self._held[token] = (history_length, gen)

    async def complete_orchestrations(
        self, completions: Sequence[OrchestrationCompletion]
    ) -> list[bool]:
        """Commit each completion atomically (see the module docstring); one flag each.

        False means the token was no longer current and nothing of that completion was
        written. A completion whose token is still current commits even if its lease expired
        (nobody took it over). Completions of different instances are committed concurrently,
        those of one instance in order.
        """
        if not completions:
            return []
        for c in completions:
            check_str(c.instance_id, "instance_id")
            if c.instance.instance_id != c.instance_id:
                raise ValueError(
                    f"complete_orchestrations: the completion is for {c.instance_id!r} but its "
                    f"instance row is for {c.instance.instance_id!r}")
            for new in c.new_instances:
                if new.start.instance_id != new.record.instance_id:
                    raise ValueError(
                        f"complete_orchestrations (new instance): the start message is "
                        f"addressed to {new.start.instance_id!r} but the record is for "
                        f"{new.record.instance_id!r}")
        await self._open()
        flags = [False] * len(completions)
        by_instance: dict[str, list[int]] = {}
        for n, c in enumerate(completions):
            by_instance.setdefault(c.instance_id, []).append(n)

        async def commit_in_order(numbers: list[int]) -> None:
            for n in numbers:
                flags[n] = await self._commit(completions[n])

        await asyncio.gather(*(commit_in_order(ns) for ns in by_instance.values()))
        activities = False
        for ok, c in zip(flags, completions, strict=True):
            if ok:
                self._wake_for(c.messages)
                self._wake_for(n.start for n in c.new_instances)
                activities = activities or bool(c.activities and c.activity_lock is None)
        if activities:
            self._events[WorkKind.ACTIVITY].set()
        return flags

    async def _commit(self, c: OrchestrationCompletion) -> bool:
        iid, token = c.instance_id, c.lock_token
        held = self._held.get(token)
        pending: str | None = None
        for _ in range(5):
            if held is None:
                doc = await self._instances.find_one({"_id": iid}, {"tok": 1, "hl": 1, "hg": 1,
                                                                     "pend": 1, "cm.cid": 1})
                if doc is None or doc["tok"] != token:
                    return False
                if doc["pend"]:
                    await self._roll_forward(iid)
                    if doc["cm"]["cid"] == pending:  # our own earlier attempt: it is in
                        return True
                    continue
                held = (doc["hl"], doc["hg"])
            hl, hg = held
            record, chunks = self._commit_record(c, hl, hg)
            pending = record["cid"]
            # Chunks are written ahead of the commit point; if the commit is refused they stay
            # as garbage of this instance until it is purged (they only exist for payloads
            # over INLINE_LIMIT).
            await self._insert_ignoring_duplicates(self._chunks, chunks)
            stored = record if _docs.weight(record) <= _docs.BATCH_LIMIT else \
                await self._offload_record(iid, record)
            flipped = await self._instances.update_one(
                {"_id": iid, "tok": token, "pend": False, "hl": hl, "hg": hg},
                {"$set": {"pend": True, "cm": stored}})
            if flipped.matched_count == 1:
                await self._apply(iid, stored)
                if c.release:
                    self._held.pop(token, None)
                else:
                    self._remember(token, record["hl0"] + len(record["hist"]), record["hg"])
                return True
            held = None  # find out why: lost lease, a stale cached length, a pending commit
        raise RuntimeError(f"could not commit a step of {iid!r}: its row kept changing")

    def _commit_record(self, c: OrchestrationCompletion, hl: int, hg: str
                       ) -> tuple[Doc, list[Doc]]:
        """The commit record of `c` on top of history (`hl`, `hg`), and the chunk documents
        its big payloads need. Its id is derived from the content, so a retried identical
        completion is recognised."""
        iid = c.instance_id
        digest = hashlib.sha256(json.dumps(
            [c.lock_token, hl, hg, c.consumed, len(c.new_history), c.reset_history,
             [m.id for m in c.messages], [t.id for t in c.activities]]).encode())
        cid = "c" + digest.hexdigest()[:31]
        chunks: list[Doc] = []
        now = time.time()
        new_hg = _token() if c.reset_history else hg
        hl0 = 0 if c.reset_history else hl
        alock = c.activity_lock
        tasks = []
        for t in c.activities:
            check_str(t.id, "an activity task id")
            tid = check_str(t.instance_id, "an activity task's instance_id")
            tasks.append({
                "_id": t.id, "i": tid,
                "d": _docs.pack(t.data, key(cid, "task", t.id), tid, chunks),
                "s": next_seq(),
                "tok": alock.lock_token if alock else None,
                "until": now + alock.lease_seconds if alock else 0.0,
                "dq": 1 if alock else 0})
        new = []
        for n in c.new_instances:
            child = n.record.instance_id
            check_str(child, "a new instance's id")
            new.append({"row": _docs.row_fields(n.record, key(cid, "new", child), chunks),
                        "start": self._message_doc(n.start, chunks, key(cid, "start", child))})
        record: Doc = {
            "cid": cid, "kind": "step", "tok": c.lock_token,
            "row": _docs.row_fields(c.instance, key(cid, "row"), chunks),
            "hist": [_docs.pack(e, key(cid, "h", n), iid, chunks)
                     for n, e in enumerate(c.new_history)],
            "reset": bool(c.reset_history), "hg": new_hg, "hl0": hl0,
            "consumed": [message_key(iid, check_str(m, "a consumed message id"))
                         for m in c.consumed],
            "msgs": [self._message_doc(m, chunks, key(cid, "msg", n))
                     for n, m in enumerate(c.messages)],
            "tasks": tasks, "new": new, "release": bool(c.release),
        }
        return record, chunks

    async def _offload_record(self, iid: str, record: Doc) -> Doc:
        """Store a big commit record in chunks; the instance keeps a small reference."""
        chunks: list[Doc] = []
        blob = _docs.pack(bson.encode(record), key(record["cid"], "record"), iid, chunks)
        await self._insert_ignoring_duplicates(self._chunks, chunks)
        return {"cid": record["cid"], "kind": "step", "blob": blob}

    async def _load_commit(self, stored: Doc) -> Doc:
        if "blob" not in stored:
            return stored
        chunks = await self._load_chunks(_docs.refs([stored["blob"]]))
        return bson.decode(_docs.unpack(stored["blob"], chunks) or b"")

    async def _roll_forward(self, iid: str) -> None:
        """Finish the pending commit of `iid`, if it still has one."""
        doc = await self._instances.find_one({"_id": iid}, {"pend": 1, "cm": 1})
        if doc is not None and doc["pend"]:
            await self._apply(iid, doc["cm"])

    async def _apply(self, iid: str, stored: Doc) -> None:
        """Apply every part of a commit (idempotently), then clear it from the row."""
        cid = stored["cid"]
        if stored["kind"] == "start":
            if "cutoff" in stored:  # a replaced terminal instance: drop its old data
                older = {"i": iid, "s": {"$lt": stored["cutoff"]}}
                await asyncio.gather(
                    self._messages.delete_many(older), self._tasks.delete_many(older),
                    self._history.delete_many({"i": iid, "g": stored["old_hg"]}))
            await self._insert_messages([stored["start"]])
            await self._instances.update_one({"_id": iid, "cm.cid": cid},
                                             {"$set": {"pend": False, "cm": None}})
            return
        record = await self._load_commit(stored)
        hg, hl0, hist = record["hg"], record["hl0"], record["hist"]
        if hist:
            await self._insert_ignoring_duplicates(self._history, [
                {"_id": key(iid, hg, hl0 + offset), "i": iid, "g": hg, "n": hl0 + offset,
                 "d": run} for offset, run in _docs.batches(hist)])
        if record["reset"]:
            await self._history.delete_many({"i": iid, "g": {"$ne": hg}})
        for new in record["new"]:
            start = new["start"]
            await self._start(start["i"], new["row"], start, origin=start["_id"],
                              fail_if_live=False)
        await self._insert_messages(record["msgs"])
        await self._insert_ignoring_duplicates(self._tasks, record["tasks"])
        if record["consumed"]:
            # One update per id, filtered by _id alone (idempotent): FerretDB serves exactly
            # that from its index, where an $in or a second condition scans the collection.
            await _bulk(self._messages, [UpdateOne({"_id": k}, {"$set": {"c": True, "d": None}})
                                         for k in record["consumed"]])
        if record["reset"]:
            await self._messages.delete_many({"i": iid, "c": True})
        update: Doc = {**record["row"], "hg": hg, "hl": hl0 + len(hist), "pend": False,
                       "cm": None}
        if record["release"]:
            update.update(tok=None, until=0.0)
        await self._instances.update_one({"_id": iid, "cm.cid": cid}, {"$set": update})
        if "blob" in stored:
            await self._chunks.delete_many({"_id": {"$in": _docs.chunk_ids([stored["blob"]])}})

    async def abandon_orchestration(
        self, instance_id: str, lock_token: str, *, retry_after: float = 0.0
    ) -> None:
        """Release the lock without committing; lockable again after `retry_after` seconds.
        A stale token is ignored."""
        await self._open()
        until = time.time() + retry_after if retry_after > 0 else 0.0
        result = await self._instances.update_one(
            {"_id": check_str(instance_id, "instance_id"), "tok": check_str(lock_token, "token"),
             "pend": False},
            {"$set": {"tok": None, "until": until}})
        self._held.pop(lock_token, None)
        if result.modified_count:
            if retry_after > 0:
                heapq.heappush(self._due, until)
            else:
                self._events[WorkKind.ORCHESTRATION].set()

    async def renew_orchestration_lease(
        self, instance_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to now + `lease_seconds`; False if the token is not current."""
        await self._open()
        result = await self._instances.update_one(
            {"_id": check_str(instance_id, "instance_id"), "tok": check_str(lock_token, "token")},
            {"$set": {"until": time.time() + lease_seconds}})
        return result.matched_count == 1

    # -- activity work items ----------------------------------------------------------------

    async def lock_activities(
        self, worker_id: str, *, max_items: int, lease_seconds: float
    ) -> list[ActivityWorkItem]:
        """Lock up to `max_items` tasks, oldest first, including ones whose lease expired
        (their `dequeue_count` then exceeds 1)."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if max_items < 1:
            return []
        await self._open()
        won: list[Doc] = []
        tried: set[str] = set()
        for _ in range(3):  # other workers may take the same candidates: try a few rounds
            now = time.time()
            lockable: Doc = {"until": {"$lte": now}}
            wanted = max_items - len(won)
            ids = [d["_id"] async for d in self._tasks.find(
                {**lockable, "_id": {"$nin": list(tried)}}, {"_id": 1}).sort(
                [("s", ASCENDING), ("_id", ASCENDING)]).limit(wanted)]
            if not ids:
                break
            tried.update(ids)
            tokens = {tid: _token() for tid in ids}
            await _bulk(self._tasks, [
                UpdateOne({"_id": tid, **lockable},
                          {"$set": {"tok": tokens[tid], "until": now + lease_seconds,
                                    "by": worker_id}, "$inc": {"dq": 1}})
                for tid in ids])
            won += [d async for d in self._tasks.find({"_id": {"$in": ids}})
                    if d["tok"] == tokens[d["_id"]]]
            if len(won) >= max_items:
                break
        won.sort(key=lambda d: (d["s"], d["_id"]))
        chunks = await self._load_chunks(_docs.refs(d["d"] for d in won))
        return [ActivityWorkItem(ActivityTask(d["_id"], d["i"], _docs.unpack(d["d"], chunks)
                                              or b""), d["tok"], d["dq"]) for d in won]

    async def complete_activities(
        self, results: Sequence[ActivityResult], *, lock: OrchestrationLock | None = None
    ) -> list[OrchestrationWorkItem]:
        """Deliver each result message (ignored if its id was already delivered), then delete
        its task (if still there, whoever holds it): a crash in between re-runs the task, and
        its result is then a duplicate. With `lock`, lock the lockable instances among those
        that got a new message (in the order of `results`) and return them."""
        if not results:
            return []
        if lock is not None and (lock.lease_seconds <= 0 or lock.max_messages < 1):
            raise ValueError(f"invalid {lock!r}: lease_seconds must be positive and "
                             f"max_messages at least 1")
        await self._open()
        chunks: list[Doc] = []
        docs = [self._message_doc(r.message, chunks) for r in results]
        await self._insert_ignoring_duplicates(self._chunks, chunks)
        delivered = await self._insert_messages(docs)
        await _bulk(self._tasks, [DeleteOne({"_id": check_str(r.task_id, "task_id")})
                                  for r in results])
        items: list[OrchestrationWorkItem] = []
        if lock is not None and delivered:
            targets = list(dict.fromkeys(d["i"] for d in delivered))
            items = await self._lock_instances(targets, lock.worker_id, lock.max_items,
                                               lock.lease_seconds, lock.max_messages)
        taken = {item.instance.instance_id for item in items}
        self._wake_for(d for d in delivered if d["i"] not in taken)
        return items

    async def abandon_activity(self, task_id: str, lock_token: str) -> None:
        """Make a locked task available again now. A stale token is ignored."""
        await self._open()
        result = await self._tasks.update_one(
            {"_id": check_str(task_id, "task_id"), "tok": check_str(lock_token, "token")},
            {"$set": {"tok": None, "until": 0.0}})
        if result.modified_count:
            self._events[WorkKind.ACTIVITY].set()

    async def renew_activity_lease(
        self, task_id: str, lock_token: str, lease_seconds: float
    ) -> bool:
        """Extend the lease to now + `lease_seconds`; False if the token is no longer current
        (the task was taken over, abandoned or completed)."""
        await self._open()
        result = await self._tasks.update_one(
            {"_id": check_str(task_id, "task_id"), "tok": check_str(lock_token, "token")},
            {"$set": {"until": time.time() + lease_seconds}})
        return result.matched_count == 1

    # -- chunks -----------------------------------------------------------------------------

    async def _load_chunks(self, references: list[Doc]) -> dict[str, list[bytes]]:
        """The chunks of `references` (from `_docs.refs`), fetched by ``_id`` one by one (the
        ids are derived from the reference; FerretDB serves only such lookups from an index)."""
        if not references:
            return {}
        found = await asyncio.gather(*(self._chunks.find_one({"_id": cid})
                                       for cid in _docs.chunk_ids(references)))
        return _docs.group_chunks(doc for doc in found if doc is not None)


# -- queries -------------------------------------------------------------------------------------


async def _bulk(collection: AsyncCollection[Doc], ops: Sequence[Any]) -> None:
    """Run write operations (any order) in commands of at most `_BULK_LIMIT` statements.

    FerretDB 1.24 keeps a database connection per statement of one command until the command
    ends and deadlocks past its pool of 100; MongoDB does not mind, and the extra commands
    only matter for batches of hundreds.
    """
    for start in range(0, len(ops), _BULK_LIMIT):
        await collection.bulk_write(list(ops[start:start + _BULK_LIMIT]), ordered=False)



def _where(query: InstanceQuery) -> list[Doc]:
    filters: list[Doc] = []
    if query.runtime_status is not None:
        filters.append({"st": {"$in": sorted(RuntimeStatus(s).value
                                             for s in query.runtime_status)}})
    if query.created_from is not None:
        filters.append({"ct": {"$gte": float(query.created_from)}})
    if query.created_to is not None:
        filters.append({"ct": {"$lt": float(query.created_to)}})
    if query.name is not None:
        filters.append({"name": {"$eq": check_str(query.name, "the name filter")}})
    prefix = query.instance_id_prefix
    if prefix:
        check_str(prefix, "instance_id_prefix")
        last = ord(prefix[-1])
        if last < 0x10FFFF and not 0xD7FF <= last < 0xE000:
            filters.append({"_id": {"$gte": prefix, "$lt": prefix[:-1] + chr(last + 1)}})
        else:
            filters.append({"_id": {"$regex": "^" + re.escape(prefix)}})
    return filters


def _and(filters: list[Doc]) -> Doc:
    if not filters:
        return {}
    return filters[0] if len(filters) == 1 else {"$and": filters}


# -- names ---------------------------------------------------------------------------------------

_BAD_DB_CHARS = set('/\\. "$*<>:|?\x00')


def _check_database_name(name: str) -> None:
    if not isinstance(name, str) or not name or set(name) & _BAD_DB_CHARS or \
            len(name.encode()) > 63:
        raise ConfigurationError(
            f"invalid MongoDB database name {name!r}: use 1-63 bytes without any of "
            f"/\\. \"$*<>:|? (e.g. 'aioflow')")
