"""The OpenAPI 3.1 document of the HTTP management API, written as data.

`openapi_document(prefix)` is served at `<prefix>/openapi.json`. Paths are relative to the
server URL, which is the prefix the API is mounted under. A test checks that every route in
`aioflow.web.routes.ROUTES` is described here and that nothing else is.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_TIME = {"type": "string", "format": "date-time"}

_RETRY_HEADERS = {
    "Location": {"description": "statusQueryGetUri: where to poll",
                 "schema": {"type": "string", "format": "uri"}},
    "Retry-After": {"description": "seconds to wait before polling again",
                    "schema": {"type": "integer"}},
}

_COMMON_ERRORS = {
    "400": _error("Malformed request: a bad parameter, header or body"),
    "401": _error("A bearer token is required and was missing or wrong"),
    "403": _error("The authorizer refused the request (by default: not a loopback client)"),
}

_FILTERS = [_param("runtimeStatus"), _param("createdTimeFrom"), _param("createdTimeTo"),
            _param("instanceIdPrefix")]

_SIGNAL_RESPONSES = {
    "202": {"description": "Accepted: the message was delivered to the instance"},
    **_COMMON_ERRORS,
    "404": _error("No such instance"),
    "410": _error("The instance has finished (Completed, Failed or Terminated)"),
}


def _start_operation(operation_id: str, with_id: bool) -> dict[str, Any]:
    parameters = [_param("name")] + ([_param("instanceId")] if with_id else []) + [
        {"name": "timeout", "in": "query", "required": False,
         "description": "Wait up to this many seconds for the instance to finish",
         "schema": {"type": "number", "minimum": 0}},
        {"name": "pollingInterval", "in": "query", "required": False,
         "description": "Longest interval, in seconds, between status reads while waiting",
         "schema": {"type": "number", "exclusiveMinimum": 0, "default": 1}},
    ]
    return {
        "operationId": operation_id,
        "summary": "Start an orchestration" + (" under a chosen instance id" if with_id else ""),
        "tags": ["orchestrators"],
        "parameters": parameters,
        "requestBody": {"required": False, "description": "The orchestration input (empty: null)",
                        "content": {"application/json": {"schema": {}}}},
        "responses": {
            "200": _json({}, "Finished within `timeout`: the output (Completed), or the status "
                             "document (Failed, Terminated)"),
            "202": {**_json(_ref("CheckStatus"), "Started; poll statusQueryGetUri"),
                    "headers": _RETRY_HEADERS},
            **_COMMON_ERRORS,
            "404": _error("No orchestrator with that name is registered"),
            "409": _error("A live instance with that id exists"),
            "413": _error("The body is larger than the configured limit"),
            "415": _error("The body is not sent as application/json"),
        },
    }


def _signal_operation(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "operationId": operation_id, "summary": summary, "tags": ["instances"],
        "parameters": [_param("instanceId"),
                       {"name": "reason", "in": "query", "required": False,
                        "schema": {"type": "string", "maxLength": 4096}}],
        "responses": _SIGNAL_RESPONSES,
    }


def _list_entities(operation_id: str, *, by_name: bool) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "Query entities" + (" with one name" if by_name else "") + ", a page at a time",
        "tags": ["entities"],
        "parameters": [
            *([_param("entityName")] if by_name else []),
            {"name": "lastOperationTimeFrom", "in": "query", "required": False,
             "description": "Inclusive lower bound (ISO 8601)", "schema": _TIME},
            {"name": "lastOperationTimeTo", "in": "query", "required": False,
             "description": "Exclusive upper bound (ISO 8601)", "schema": _TIME},
            {"name": "fetchState", "in": "query", "required": False,
             "schema": {"type": "boolean", "default": False}},
            {"name": "top", "in": "query", "required": False, "description": "Page size",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
            {"name": "x-ms-continuation-token", "in": "header", "required": False,
             "description": "The continuation token of the previous page",
             "schema": {"type": "string"}}],
        "responses": {
            "200": {**_json({"type": "array", "items": _ref("EntityStatus")},
                            "One page of entities (possibly fewer than `top`)"),
                    "headers": {"x-ms-continuation-token": {
                        "description": "Present when there are more pages",
                        "schema": {"type": "string"}}}},
            **_COMMON_ERRORS,
        },
    }


_PATHS: dict[str, Any] = {
    "/orchestrators/{name}": {"post": _start_operation("startOrchestration", False)},
    "/orchestrators/{name}/{instanceId}": {
        "post": _start_operation("startOrchestrationWithId", True)},
    "/instances": {
        "get": {
            "operationId": "listInstances",
            "summary": "Query instances, one page at a time",
            "tags": ["instances"],
            "parameters": [*_FILTERS, _param("showInput"),
                           {"name": "top", "in": "query", "required": False,
                            "description": "Page size",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                       "default": 100}},
                           {"name": "x-ms-continuation-token", "in": "header",
                            "required": False,
                            "description": "The continuation token of the previous page",
                            "schema": {"type": "string"}}],
            "responses": {
                "200": {**_json({"type": "array", "items": _ref("InstanceStatus")},
                                "One page of instances, oldest first"),
                        "headers": {"x-ms-continuation-token": {
                            "description": "Present when there are more pages",
                            "schema": {"type": "string"}}}},
                **_COMMON_ERRORS,
            },
        },
        "delete": {
            "operationId": "purgeInstances",
            "summary": "Purge the history of every finished instance matching the filters",
            "tags": ["instances"],
            "parameters": _FILTERS,
            "responses": {
                "200": _json(_ref("PurgeResult"), "Purged"),
                **_COMMON_ERRORS,
                "404": _error("No finished instance matched"),
            },
        },
    },
    "/instances/{instanceId}": {
        "get": {
            "operationId": "getInstanceStatus",
            "summary": "Read an instance's status",
            "tags": ["instances"],
            "parameters": [_param("instanceId"), _param("showInput"),
                           {"name": "showHistory", "in": "query", "required": False,
                            "schema": {"type": "boolean", "default": False}},
                           {"name": "showHistoryOutput", "in": "query", "required": False,
                            "description": "Include outputs in historyEvents",
                            "schema": {"type": "boolean", "default": False}}],
            "responses": {
                "200": _json(_ref("InstanceStatus"), "Completed, Failed or Terminated"),
                "202": {**_json(_ref("InstanceStatus"),
                                "Pending, Running, Suspended or ContinuedAsNew"),
                        "headers": _RETRY_HEADERS},
                **_COMMON_ERRORS,
                "404": _error("No such instance"),
            },
        },
        "delete": {
            "operationId": "purgeInstance",
            "summary": "Purge a finished instance and its history",
            "tags": ["instances"],
            "parameters": [_param("instanceId")],
            "responses": {
                "200": _json(_ref("PurgeResult"), "Purged"),
                **_COMMON_ERRORS,
                "404": _error("No such instance"),
                "409": _error("The instance has not finished"),
            },
        },
    },
    "/instances/{instanceId}/raiseEvent/{eventName}": {
        "post": {
            "operationId": "raiseEvent",
            "summary": "Send an external event to a running instance",
            "tags": ["instances"],
            "parameters": [_param("instanceId"),
                           {"name": "eventName", "in": "path", "required": True,
                            "schema": {"type": "string"}},
                           {"name": "Idempotency-Key", "in": "header", "required": False,
                            "description": "Retrying with the same key delivers the event "
                                           "at most once",
                            "schema": {"type": "string", "maxLength": 200}}],
            "requestBody": {"required": False, "description": "The event data (empty: null)",
                            "content": {"application/json": {"schema": {}}}},
            "responses": {**_SIGNAL_RESPONSES,
                          "413": _error("The body is larger than the configured limit"),
                          "415": _error("The body is not sent as application/json")},
        },
    },
    "/instances/{instanceId}/terminate": {
        "post": _signal_operation("terminateInstance", "Terminate a running instance")},
    "/instances/{instanceId}/suspend": {
        "post": _signal_operation("suspendInstance", "Suspend a running instance")},
    "/instances/{instanceId}/resume": {
        "post": _signal_operation("resumeInstance", "Resume a suspended instance")},
    "/entities": {"get": _list_entities("listEntities", by_name=False)},
    "/entities/{entityName}": {"get": _list_entities("listEntitiesByName", by_name=True)},
    "/entities/{entityName}/{entityKey}": {
        "get": {
            "operationId": "getEntityState",
            "summary": "Read an entity's state",
            "tags": ["entities"],
            "parameters": [_param("entityName"), _param("entityKey")],
            "responses": {
                "200": _json({}, "The entity's state (any JSON value)"),
                **_COMMON_ERRORS,
                "404": _error("The entity has no state (never operated on, or deleted)"),
            },
        },
        "post": {
            "operationId": "signalEntity",
            "summary": "Signal an operation to an entity (one-way)",
            "tags": ["entities"],
            "parameters": [_param("entityName"), _param("entityKey"),
                           {"name": "op", "in": "query", "required": True,
                            "description": "The operation to apply",
                            "schema": {"type": "string", "minLength": 1}},
                           {"name": "Idempotency-Key", "in": "header", "required": False,
                            "description": "Makes retries safe: a signal with the same key "
                                           "is applied at most once",
                            "schema": {"type": "string", "maxLength": 200}}],
            "requestBody": {"required": False,
                            "description": "The operation's input (empty: null)",
                            "content": {"application/json": {"schema": {}}}},
            "responses": {
                "202": {"description": "Accepted: the operation was queued for the entity"},
                **_COMMON_ERRORS,
                "404": _error("No entity with that name is registered"),
                "413": _error("The body is larger than the configured limit"),
                "415": _error("The body is not sent as application/json"),
            },
        },
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenApiDocument",
            "summary": "This document",
            "tags": ["meta"],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document"),
                          **_COMMON_ERRORS},
        },
    },
}

_COMPONENTS: dict[str, Any] = {
    "parameters": {
        "name": {"name": "name", "in": "path", "required": True,
                 "description": "The registered orchestrator name", "schema": {"type": "string"}},
        "instanceId": {"name": "instanceId", "in": "path", "required": True,
                       "schema": {"type": "string", "maxLength": 256}},
        "showInput": {"name": "showInput", "in": "query", "required": False,
                      "schema": {"type": "boolean", "default": True}},
        "runtimeStatus": {
            "name": "runtimeStatus", "in": "query", "required": False,
            "description": "Comma-separated runtime statuses", "style": "form",
            "explode": False, "schema": {"type": "array", "items": _ref("RuntimeStatus")}},
        "createdTimeFrom": {"name": "createdTimeFrom", "in": "query", "required": False,
                            "description": "Inclusive lower bound (ISO 8601; required to purge)",
                            "schema": _TIME},
        "createdTimeTo": {"name": "createdTimeTo", "in": "query", "required": False,
                          "description": "Exclusive upper bound (ISO 8601)", "schema": _TIME},
        "instanceIdPrefix": {"name": "instanceIdPrefix", "in": "query", "required": False,
                             "schema": {"type": "string"}},
        "entityName": {"name": "entityName", "in": "path", "required": True,
                       "description": "The registered entity name (case-insensitive)",
                       "schema": {"type": "string"}},
        "entityKey": {"name": "entityKey", "in": "path", "required": True,
                      "schema": {"type": "string"}},
    },
    "schemas": {
        "RuntimeStatus": {"type": "string", "enum": [
            "Pending", "Running", "Completed", "ContinuedAsNew", "Failed", "Terminated",
            "Suspended"]},
        "Error": {"type": "object", "required": ["status", "error", "message"], "properties": {
            "status": {"type": "integer"}, "error": {"type": "string"},
            "message": {"type": "string", "description": "What was wrong and what to do"}}},
        "CheckStatus": {"type": "object", "required": [
            "id", "statusQueryGetUri", "sendEventPostUri", "terminatePostUri", "suspendPostUri",
            "resumePostUri", "purgeHistoryDeleteUri"], "properties": {
            "id": {"type": "string"},
            **{key: {"type": "string"} for key in (
                "statusQueryGetUri", "sendEventPostUri", "terminatePostUri", "suspendPostUri",
                "resumePostUri", "purgeHistoryDeleteUri")}}},
        "InstanceStatus": {"type": "object", "required": [
            "name", "instanceId", "runtimeStatus", "input", "customStatus", "output",
            "createdTime", "lastUpdatedTime"], "properties": {
            "name": {"type": "string"}, "instanceId": {"type": "string"},
            "runtimeStatus": _ref("RuntimeStatus"), "input": {}, "customStatus": {},
            "output": {}, "createdTime": _TIME, "lastUpdatedTime": _TIME,
            "failureDetails": {"type": "object", "properties": {
                "errorType": {"type": "string"}, "errorMessage": {"type": "string"},
                "stackTrace": {"type": "string"}}},
            "historyEvents": {"type": "array", "items": _ref("HistoryEvent")}}},
        "HistoryEvent": {"type": "object", "required": ["eventType", "timestamp"],
                         "additionalProperties": True, "properties": {
                             "eventType": {"type": "string"}, "timestamp": _TIME}},
        "EntityStatus": {"type": "object", "required": ["entityId", "lastOperationTime"],
                         "properties": {
                             "entityId": {"type": "object", "required": ["name", "key"],
                                          "properties": {"name": {"type": "string"},
                                                         "key": {"type": "string"}}},
                             "lastOperationTime": _TIME,
                             "state": {"description": "Only with fetchState=true"}}},
        "PurgeResult": {"type": "object", "required": ["instancesDeleted"], "properties": {
            "instancesDeleted": {"type": "integer", "minimum": 1}}},
    },
    "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "Required when a token is configured; without one, only "
                                  "loopback clients are served"},
    },
}


def openapi_document(prefix: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the management API mounted under `prefix`."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aioflow HTTP management API",
            "version": "1",
            "description": "Start, query, signal and purge durable orchestrations "
                           "(Durable Functions' routes and JSON fields).",
        },
        "servers": [{"url": prefix or "/"}],
        "security": [{"bearer": []}, {}],
        "paths": copy.deepcopy(_PATHS),
        "components": copy.deepcopy(_COMPONENTS),
    }
