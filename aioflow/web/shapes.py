"""The JSON documents of the HTTP management API, in Durable Functions' camelCase shapes.

* `instance_document`: an instance's status (`GET /instances/{id}` and query results);
* `management_urls`: the check-status payload (`id`, `statusQueryGetUri`, ...);
* `history_event_document`: one entry of `historyEvents`;
* `entity_document`: an entity in the entity listing (`entityId`, `lastOperationTime`, `state`).

Times are ISO 8601 in UTC with a `Z` suffix and microseconds, so a `createdTime` read from a
document can be passed back as `createdTimeFrom` unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aioflow.entities import EntityState
from aioflow.status import OrchestrationStatus

__all__ = ["entity_document", "history_event_document", "instance_document", "iso_time",
           "management_urls"]

# History event fields holding a function's output, left out unless showHistoryOutput=true.
_OUTPUT_FIELDS = frozenset({"result"})
# History event fields holding epoch seconds, shown as ISO 8601 times.
_TIME_FIELDS = frozenset({"ts", "fire_at"})
_RENAMED = {"kind": "eventType", "ts": "timestamp"}


def iso_time(value: datetime | float) -> str:
    """`2024-05-01T12:00:00.000000Z`: a UTC time (a datetime or epoch seconds) as ISO 8601."""
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, tz=UTC)
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def history_event_document(event: dict[str, Any], *, show_output: bool) -> dict[str, Any]:
    """One history event (as `Client.get_status(show_history=True)` gives it) in camelCase:
    `eventType`, `timestamp` and the event's fields; outputs only when `show_output`."""
    document: dict[str, Any] = {}
    for key, value in event.items():
        if key in _OUTPUT_FIELDS and not show_output:
            continue
        if key in _TIME_FIELDS and isinstance(value, (int, float)):
            value = iso_time(value)
        document[_RENAMED.get(key) or _camel(key)] = value
    return document


def instance_document(status: OrchestrationStatus, *, show_history_output: bool = False
                      ) -> dict[str, Any]:
    """An instance as JSON: `name`, `instanceId`, `runtimeStatus`, `input`, `customStatus`,
    `output`, `createdTime`, `lastUpdatedTime`, plus `failureDetails` when it failed and
    `historyEvents` when the status was read with its history."""
    document: dict[str, Any] = {
        "name": status.name,
        "instanceId": status.instance_id,
        "runtimeStatus": status.runtime_status.value,
        "input": status.input,
        "customStatus": status.custom_status,
        "output": status.output,
        "createdTime": iso_time(status.created_time),
        "lastUpdatedTime": iso_time(status.last_updated_time),
    }
    if status.failure_details is not None:
        failure = status.failure_details
        document["failureDetails"] = {"errorType": failure.error_type,
                                      "errorMessage": failure.message,
                                      "stackTrace": failure.stack_trace}
    if status.history is not None:
        document["historyEvents"] = [
            history_event_document(event, show_output=show_history_output)
            for event in status.history]
    return document


def management_urls(api_url: str, instance_id: str) -> dict[str, str]:
    """The check-status payload: the instance id and the URLs that manage it.

    `api_url` is the absolute URL of the management API (scheme, host and prefix, no trailing
    slash). `{eventName}` and `{text}` are placeholders for the caller to fill in, as in
    Durable Functions.
    """
    instance_url = f"{api_url}/instances/{quote(instance_id, safe='')}"
    return {
        "id": instance_id,
        "statusQueryGetUri": instance_url,
        "sendEventPostUri": f"{instance_url}/raiseEvent/{{eventName}}",
        "terminatePostUri": f"{instance_url}/terminate?reason={{text}}",
        "suspendPostUri": f"{instance_url}/suspend?reason={{text}}",
        "resumePostUri": f"{instance_url}/resume?reason={{text}}",
        "purgeHistoryDeleteUri": instance_url,
    }


def entity_document(state: EntityState, *, fetch_state: bool) -> dict[str, Any]:
    """An entity as `GET /entities[/{name}]` lists it (Durable Functions' field names)."""
    document: dict[str, Any] = {
        "entityId": {"name": state.entity_id.name, "key": state.entity_id.key},
        "lastOperationTime": iso_time(state.last_operation_time)
        if state.last_operation_time is not None else None,
    }
    if fetch_state:
        document["state"] = state.state
    return document
