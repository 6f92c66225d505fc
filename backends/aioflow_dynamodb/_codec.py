"""How aioflow's values are laid out in DynamoDB items and SQS hint bodies.

Everything lives in ONE table, one partition per instance (``pk = "I#" + instance_id``):

=================  ==========================================================================
sort key           item
=================  ==========================================================================
``R``              the instance row: record fields, lock (``lt`` token, ``lu`` locked until),
                   ``gen`` (bumped when a terminal instance is replaced), history epoch ``ep``
                   and length ``hl``, the last step's hints ``hx``, and, between a big step's
                   commit and its roll-forward, its pending effects ``fx`` (see `backend`)
``H#ep#first``     history: the events a step appended, framed into one binary attribute
``M#message_id``   an inbox message; while pending it has the order key ``q`` (indexed by the
                   local secondary index ``pending``), its data and ``v`` (visible at); once
                   consumed only the key remains, so a re-send of that id stays a no-op
``T#task_id``      a queued activity task and its lease
``B#blob#part``    a part of a value too big for an item (see `put_blob`)
=================  ==========================================================================

plus outbox items (``pk = "O#" + uuid``) holding SQS hints not yet known to be sent.

Numbers are DynamoDB ``N`` strings made with `repr` (exact for floats). Bytes are ``B``.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from aioflow.backend import ActivityTask, InstanceRecord, Message
from aioflow.status import RuntimeStatus

#: Values up to this size are stored inline in their item; larger ones go to blob parts.
#: DynamoDB items hold at most 400 KB, and an instance row carries four payload fields plus
#: the pending effects, so each stays well below a fifth of that.
INLINE_LIMIT = 64 * 1024
#: Size of one blob part (an item of its own: below the 400 KB item limit with room to spare).
BLOB_PART = 350 * 1024
#: Record fields that hold payloads (encoded JSON bytes or None).
PAYLOAD_FIELDS = ("input", "output", "custom_status", "failure")

Item = dict[str, Any]


def s(value: str) -> dict[str, str]:
    return {"S": value}


def n(value: float | int) -> dict[str, str]:
    return {"N": repr(value)}


def b(value: bytes) -> dict[str, bytes]:
    return {"B": bytes(value)}


def num(item: Item, name: str, default: float = 0.0) -> float:
    attr = item.get(name)
    return default if attr is None else float(attr["N"])


def text(item: Item, name: str) -> str | None:
    attr = item.get(name)
    return None if attr is None else str(attr["S"])


def instance_pk(instance_id: str) -> str:
    return "I#" + instance_id


def row_key(instance_id: str) -> Item:
    return {"pk": s(instance_pk(instance_id)), "sk": s("R")}


def message_key(instance_id: str, message_id: str) -> Item:
    return {"pk": s(instance_pk(instance_id)), "sk": s("M#" + message_id)}


def task_key(instance_id: str, task_id: str) -> Item:
    return {"pk": s(instance_pk(instance_id)), "sk": s("T#" + task_id)}


def history_sk(epoch: int, first: int) -> str:
    return f"H#{epoch:06d}#{first:010d}"


def history_prefix(epoch: int) -> str:
    return f"H#{epoch:06d}#"


def created_key(created_time: float, instance_id: str) -> str:
    """The sort key of the ``by-created`` index: orders rows by (created_time, instance_id)."""
    return f"{created_time:020.6f}#{instance_id}"


# -- framing -----------------------------------------------------------------------------------


def frame(chunks: Iterable[bytes]) -> bytes:
    """Length-prefixed concatenation of byte strings (history events of one step)."""
    return b"".join(struct.pack(">I", len(c)) + bytes(c) for c in chunks)


def unframe(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        pos += 4
        out.append(data[pos:pos + size])
        pos += size
    return out


# -- records -----------------------------------------------------------------------------------


def record_attributes(record: InstanceRecord) -> Item:
    """The non-payload record fields as attribute values (names: nm, ex, st, ct, ut)."""
    return {
        "nm": s(record.name), "ex": s(record.execution_id),
        "st": s(record.runtime_status.value), "ct": n(record.created_time),
        "ut": n(record.last_updated_time),
    }


def payload_attr(field: str) -> str:
    return "f_" + field


def blob_ref_attr(field: str) -> str:
    return "r_" + field


def decode_record(instance_id: str, item: Item,
                  payloads: dict[str, bytes | None]) -> InstanceRecord:
    return InstanceRecord(
        instance_id=instance_id, name=item["nm"]["S"], execution_id=item["ex"]["S"],
        runtime_status=RuntimeStatus(item["st"]["S"]), created_time=num(item, "ct"),
        last_updated_time=num(item, "ut"), **payloads,
    )


def record_to_json(record: InstanceRecord) -> dict[str, Any]:
    return {
        "id": record.instance_id, "nm": record.name, "ex": record.execution_id,
        "st": record.runtime_status.value, "ct": record.created_time,
        "ut": record.last_updated_time,
        **{f: _b64(getattr(record, f)) for f in PAYLOAD_FIELDS},
    }


def record_from_json(data: dict[str, Any]) -> InstanceRecord:
    return InstanceRecord(
        instance_id=data["id"], name=data["nm"], execution_id=data["ex"],
        runtime_status=RuntimeStatus(data["st"]), created_time=data["ct"],
        last_updated_time=data["ut"], **{f: _unb64(data[f]) for f in PAYLOAD_FIELDS},
    )


def message_to_json(message: Message) -> list[Any]:
    return [message.id, message.instance_id, _b64(message.data), message.visible_at]


def message_from_json(data: Sequence[Any]) -> Message:
    data_bytes = _unb64(data[2])
    assert data_bytes is not None
    return Message(data[0], data[1], data_bytes, float(data[3]))


def task_to_json(task: ActivityTask) -> list[Any]:
    return [task.id, task.instance_id, _b64(task.data)]


def task_from_json(data: Sequence[Any]) -> ActivityTask:
    data_bytes = _unb64(data[2])
    assert data_bytes is not None
    return ActivityTask(data[0], data[1], data_bytes)


def _b64(value: bytes | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"payloads must be bytes, got {type(value).__name__}")
    return base64.b64encode(bytes(value)).decode("ascii")


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)


def check_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    return bytes(value)
