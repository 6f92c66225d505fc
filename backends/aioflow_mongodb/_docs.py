"""How the MongoDB backend lays data out in documents: ids, payloads, chunks and rows.

Everything here is pure (no I/O). The rules that keep queries safe and documents small:

* Ids built from user data (instance ids, message ids) are only ever used as string VALUES,
  never as field names or operators, and composite ids are length-prefixed
  (``"<len>:<instance id>:<message id>"``), so no choice of ids can collide or change a query.
* A payload larger than `INLINE_LIMIT` is stored in chunk documents (at most `CHUNK_SIZE`
  bytes each) and the owning document keeps a small reference instead. Lists of payloads
  (history, the commit record) are split so that no document approaches MongoDB's 16 MiB limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from aioflow.backend import InstanceRecord
from aioflow.status import RuntimeStatus

#: Payloads larger than this are moved to chunk documents.
INLINE_LIMIT = 1 << 20
#: Bytes per chunk document.
CHUNK_SIZE = 4 << 20
#: Inline payload bytes a batch document (history, commit record) may hold.
BATCH_LIMIT = 4 << 20

TERMINAL = tuple(s.value for s in RuntimeStatus if s.is_terminal)

Doc = dict[str, Any]


def key(*parts: str | int) -> str:
    """An unambiguous composite id: every part is prefixed with its length."""
    return ":".join(f"{len(str(p))}.{p}" for p in parts)


def message_key(instance_id: str, message_id: str) -> str:
    return key(instance_id, message_id)


def check_str(value: object, what: str) -> str:
    """Ids must be plain strings: anything else could be read as a query operator."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__} ({value!r})")
    return value


def check_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


class Sequence:
    """Send order within this process: strictly increasing integers near ``time.time_ns()``."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        now = time.time_ns()
        self._last = now if now > self._last else self._last + 1
        return self._last


next_seq = Sequence()


# -- payloads and chunks -----------------------------------------------------------------------


def pack(data: bytes | None, owner: str, instance_id: str, chunks: list[Doc]) -> Any:
    """`data` as stored: the bytes themselves, or a reference to chunk documents that this
    call appends to `chunks` (ids derived from `owner`, so writing them twice is a no-op)."""
    if data is None:
        return None
    data = check_bytes(data, "a payload")
    if len(data) <= INLINE_LIMIT:
        return data
    count = 0
    for count, start in enumerate(range(0, len(data), CHUNK_SIZE), start=1):
        chunks.append({"_id": key(owner, count), "o": owner, "i": instance_id, "k": count,
                       "d": data[start:start + CHUNK_SIZE]})
    return {"ref": owner, "n": count, "len": len(data)}


def refs(values: Iterable[Any]) -> list[Doc]:
    """The chunk references among stored payloads `values`."""
    return [dict(v) for v in values if isinstance(v, Mapping) and "ref" in v]


def chunk_ids(references: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ids of the chunk documents that `references` need (ids are derived, not stored)."""
    return [key(r["ref"], k) for r in references for k in range(1, r["n"] + 1)]


def unpack(value: Any, chunks: Mapping[str, list[bytes]]) -> bytes | None:
    """A stored payload back as bytes; `chunks` maps owner -> chunk data in order."""
    if value is None or isinstance(value, bytes):
        return value
    parts = chunks.get(value["ref"], [])
    data = b"".join(parts)
    if len(parts) != value["n"] or len(data) != value["len"]:
        raise RuntimeError(
            f"chunk documents of payload {value['ref']!r} are missing or damaged "
            f"({len(parts)} of {value['n']} chunks, {len(data)} of {value['len']} bytes)")
    return data


def group_chunks(docs: Iterable[Doc]) -> dict[str, list[bytes]]:
    found: dict[str, list[tuple[int, bytes]]] = {}
    for doc in docs:
        found.setdefault(doc["o"], []).append((doc["k"], doc["d"]))
    return {owner: [d for _, d in sorted(parts)] for owner, parts in found.items()}


def batches(items: list[Any], limit: int = BATCH_LIMIT) -> Iterator[tuple[int, list[Any]]]:
    """Split stored payloads into runs of at most `limit` inline bytes: (offset, run)."""
    run: list[Any] = []
    size = 0
    offset = 0
    for index, item in enumerate(items):
        weight = len(item) if isinstance(item, bytes) else 64
        if run and size + weight > limit:
            yield offset, run
            run, size, offset = [], 0, index
        run.append(item)
        size += weight
    if run:
        yield offset, run


def weight(value: Any) -> int:
    """Roughly how many bytes a stored value adds to a document."""
    if isinstance(value, bytes):
        return len(value) + 16
    if isinstance(value, str):
        return len(value) + 16
    if isinstance(value, Mapping):
        return sum(weight(v) + len(k) for k, v in value.items()) + 16
    if isinstance(value, (list, tuple)):
        return sum(weight(v) for v in value) + 16
    return 16


# -- instance rows -----------------------------------------------------------------------------

_ROW_PAYLOADS = ("input", "output", "custom_status", "failure")


def row_fields(record: InstanceRecord, owner: str, chunks: list[Doc]) -> Doc:
    """The stored fields of an instance row (payloads packed)."""
    iid = record.instance_id
    fields: Doc = {
        "name": check_str(record.name, "the orchestrator name"),
        "ex": check_str(record.execution_id, "the execution id"),
        "st": RuntimeStatus(record.runtime_status).value,
        "ct": float(record.created_time),
        "ut": float(record.last_updated_time),
    }
    for name in _ROW_PAYLOADS:
        fields[name] = pack(getattr(record, name), key(owner, name), iid, chunks)
    return fields


def row_refs(fields: Mapping[str, Any]) -> list[Doc]:
    return refs(fields.get(name) for name in _ROW_PAYLOADS)


def record_from(instance_id: str, fields: Mapping[str, Any],
                chunks: Mapping[str, list[bytes]]) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id,
        name=fields["name"],
        execution_id=fields["ex"],
        runtime_status=RuntimeStatus(fields["st"]),
        created_time=fields["ct"],
        last_updated_time=fields["ut"],
        input=unpack(fields.get("input"), chunks),
        output=unpack(fields.get("output"), chunks),
        custom_status=unpack(fields.get("custom_status"), chunks),
        failure=unpack(fields.get("failure"), chunks),
    )
