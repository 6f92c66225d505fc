"""The HTTP management API: its route table and handlers (Durable Functions' routes).

All paths are relative to the prefix the API is mounted under (by default
`/runtime/webhooks/durabletask`):

| Method | Path | Answers |
| --- | --- | --- |
| POST | `/orchestrators/{name}` | 202 check-status (or 200 output with `timeout`) |
| POST | `/orchestrators/{name}/{instanceId}` | the same, with a chosen instance id |
| GET | `/instances` | 200, one page; `x-ms-continuation-token` for the next |
| DELETE | `/instances` | 200 purged count; 404 if nothing matched |
| GET | `/instances/{instanceId}` | 202 running, 200 finished, 404 unknown |
| DELETE | `/instances/{instanceId}` | 200 purged; 404 unknown; 409 still running |
| POST | `/instances/{instanceId}/raiseEvent/{eventName}` | 202; 404; 410 finished |
| POST | `/instances/{instanceId}/terminate` | 202; 404; 410 finished |
| POST | `/instances/{instanceId}/suspend` | 202; 404; 410 finished |
| POST | `/instances/{instanceId}/resume` | 202; 404; 410 finished |
| GET | `/entities` | 200, one page of entities; `x-ms-continuation-token` for the next |
| GET | `/entities/{entityName}` | the same, for one entity name |
| GET | `/entities/{entityName}/{entityKey}` | 200 with the entity's state; 404 if it has none |
| POST | `/entities/{entityName}/{entityKey}?op=...` | 202: the operation was signalled |
| GET | `/openapi.json` | 200, the OpenAPI document of these routes |

The table is data (`ROUTES`, grouped by concept), so a new group of routes is one more tuple
of `Route`s and one more entry in the OpenAPI document (`aioflow.web.openapi`); a test checks
that the two agree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from aioflow.client import Client
from aioflow.entities import EntityId
from aioflow.errors import (
    InstanceExistsError,
    InstanceNotFoundError,
    InstanceNotRunningError,
    SerializationError,
    UnknownFunctionError,
)
from aioflow.web import params
from aioflow.web.errors import ApiError, json_error_middleware, json_response
from aioflow.web.keys import CLIENT_KEY, SETTINGS_KEY, ApiSettings
from aioflow.web.openapi import openapi_document
from aioflow.web.responses import (
    create_check_status_response,
    management_api_url,
    polling_headers,
    wait_for_completion_or_create_check_status_response,
)
from aioflow.web.shapes import entity_document, instance_document

__all__ = ["CONTINUATION_HEADER", "ROUTES", "Route", "management_api"]

CONTINUATION_HEADER = "x-ms-continuation-token"
_MAX_TOKEN_LENGTH = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the management API: `method` and `path` (relative to the prefix), the
    handler, and `name`, which is also its `operationId` in the OpenAPI document."""

    method: str
    path: str
    handler: Handler
    name: str


def _client(request: web.Request) -> Client:
    return request.config_dict[CLIENT_KEY]


def _settings(request: web.Request) -> ApiSettings:
    return request.config_dict[SETTINGS_KEY]


def _no_content(status: int = 202) -> web.Response:
    return web.Response(status=status)


# -- orchestrators ---------------------------------------------------------------------------
async def start_orchestration(request: web.Request) -> web.Response:
    settings = _settings(request)
    name = request.match_info["name"]
    instance_id = params.instance_id(request) if "instanceId" in request.match_info else None
    timeout = params.seconds(request, "timeout", default=None,
                             maximum=settings.max_wait_seconds)
    polling = params.seconds(request, "pollingInterval", default=1.0, minimum=0.001,
                             maximum=settings.max_wait_seconds)
    payload = await params.json_body(request, settings.max_body_size)
    management_api_url(request)  # a Host header we cannot build URLs from is refused first
    client = _client(request)
    try:
        started = await client.start_new(name, payload, instance_id=instance_id)
    except UnknownFunctionError as exc:
        raise ApiError(404, str(exc)) from None
    except InstanceExistsError as exc:
        raise ApiError(409, str(exc)) from None
    except SerializationError as exc:
        raise ApiError(400, f"the request body cannot be an orchestration input: {exc}") \
            from None
    if timeout is None:
        return create_check_status_response(request, started)
    return await wait_for_completion_or_create_check_status_response(
        request, started, timeout, polling_interval=polling or 1.0)


ORCHESTRATOR_ROUTES = (
    Route("POST", "/orchestrators/{name}", start_orchestration, "startOrchestration"),
    Route("POST", "/orchestrators/{name}/{instanceId}", start_orchestration,
          "startOrchestrationWithId"),
)


# -- instances -------------------------------------------------------------------------------
async def get_instance_status(request: web.Request) -> web.Response:
    instance_id = params.instance_id(request)
    show_history = params.boolean(request, "showHistory", False)
    show_history_output = params.boolean(request, "showHistoryOutput", False)
    show_input = params.boolean(request, "showInput", True)
    status = await _client(request).get_status(instance_id, show_history=show_history,
                                               show_input=show_input)
    if status is None:
        raise ApiError(404, f"no orchestration instance with id {instance_id!r} exists (it was "
                            f"never started, or its history was purged)")
    document = instance_document(status, show_history_output=show_history_output)
    if status.runtime_status.is_terminal:
        return json_response(document, status=200)
    return json_response(document, status=202, headers=polling_headers(request, instance_id))


def _filters(request: web.Request) -> dict[str, Any]:
    """The instance filters shared by listing and purging, as `Client` keyword arguments."""
    return {
        "runtime_status": params.runtime_statuses(request),
        "created_from": params.timestamp(request, "createdTimeFrom"),
        "created_to": params.timestamp(request, "createdTimeTo"),
        "instance_id_prefix": params.optional_text(request, "instanceIdPrefix") or None,
    }


async def list_instances(request: web.Request) -> web.Response:
    filters = _filters(request)
    top = params.page_size(request, "top")
    show_input = params.boolean(request, "showInput", True)
    token = request.headers.get(CONTINUATION_HEADER) or None
    if token is not None and (len(token) > _MAX_TOKEN_LENGTH or not token.isascii()):
        raise _bad_token(token)
    try:
        page = await _client(request).query_instances(
            **filters, page_size=top, continuation=token, show_input=show_input)
    except ValueError:
        if token is None:
            raise
        raise _bad_token(token) from None
    headers = {CONTINUATION_HEADER: page.continuation} if page.continuation else None
    return json_response([instance_document(s) for s in page.instances], headers=headers)


def _bad_token(token: str) -> ApiError:
    return ApiError(400, f"the {CONTINUATION_HEADER} header {token[:80]!r} is not a "
                         f"continuation token this API gave out; send back the "
                         f"{CONTINUATION_HEADER} header of the previous page unchanged")


async def purge_instances(request: web.Request) -> web.Response:
    filters = _filters(request)
    if filters["created_from"] is None:
        raise ApiError(400, "purging by filter needs the query parameter 'createdTimeFrom' "
                            "(use 0001-01-01T00:00:00Z to mean 'from the beginning'), so that "
                            "a bare DELETE cannot purge everything by accident")
    result = await _client(request).purge_instances(**filters)
    if result.deleted_instance_count == 0:
        raise ApiError(404, "no finished instance matches these filters; nothing was purged")
    return json_response({"instancesDeleted": result.deleted_instance_count})


async def purge_instance(request: web.Request) -> web.Response:
    instance_id = params.instance_id(request)
    client = _client(request)
    status = await client.get_status(instance_id, show_input=False)
    if status is None:
        raise ApiError(404, f"no orchestration instance with id {instance_id!r} exists")
    if not status.runtime_status.is_terminal:
        raise ApiError(409, f"instance {instance_id!r} is {status.runtime_status.value}; only "
                            f"finished instances are purged: terminate it first")
    result = await client.purge_instance_history(instance_id)
    if result.deleted_instance_count == 0:  # restarted under the same id in the meantime
        raise ApiError(409, f"instance {instance_id!r} is no longer finished; not purged")
    return json_response({"instancesDeleted": result.deleted_instance_count})


async def _signal(request: web.Request, send: Callable[[Client, str], Awaitable[None]]
                  ) -> web.Response:
    instance_id = params.instance_id(request)
    try:
        await send(_client(request), instance_id)
    except InstanceNotFoundError as exc:
        raise ApiError(404, str(exc)) from None
    except InstanceNotRunningError as exc:
        raise ApiError(410, str(exc)) from None
    return _no_content(202)


async def raise_event(request: web.Request) -> web.Response:
    event_name = request.match_info["eventName"]
    event_id = request.headers.get("Idempotency-Key") or None
    if event_id is not None and len(event_id) > 200:
        raise ApiError(400, "the Idempotency-Key header is longer than 200 characters")
    data = await params.json_body(request, _settings(request).max_body_size)

    async def send(client: Client, instance_id: str) -> None:
        try:
            await client.raise_event(instance_id, event_name, data, event_id=event_id)
        except SerializationError as exc:
            raise ApiError(400, f"the request body cannot be event data: {exc}") from None
    return await _signal(request, send)


async def terminate_instance(request: web.Request) -> web.Response:
    reason = params.optional_text(request, "reason") or ""
    return await _signal(request, lambda client, iid: client.terminate(iid, reason))


async def suspend_instance(request: web.Request) -> web.Response:
    reason = params.optional_text(request, "reason") or ""
    return await _signal(request, lambda client, iid: client.suspend(iid, reason))


async def resume_instance(request: web.Request) -> web.Response:
    reason = params.optional_text(request, "reason") or ""
    return await _signal(request, lambda client, iid: client.resume(iid, reason))


INSTANCE_ROUTES = (
    Route("GET", "/instances", list_instances, "listInstances"),
    Route("DELETE", "/instances", purge_instances, "purgeInstances"),
    Route("GET", "/instances/{instanceId}", get_instance_status, "getInstanceStatus"),
    Route("DELETE", "/instances/{instanceId}", purge_instance, "purgeInstance"),
    Route("POST", "/instances/{instanceId}/raiseEvent/{eventName}", raise_event, "raiseEvent"),
    Route("POST", "/instances/{instanceId}/terminate", terminate_instance, "terminateInstance"),
    Route("POST", "/instances/{instanceId}/suspend", suspend_instance, "suspendInstance"),
    Route("POST", "/instances/{instanceId}/resume", resume_instance, "resumeInstance"),
)


# -- entities --------------------------------------------------------------------------------
def _entity_name(request: web.Request) -> str | None:
    name = request.match_info.get("entityName")
    if name is None:
        return None
    try:
        return EntityId(name, "k").name
    except ValueError as exc:
        raise ApiError(400, f"path parameter 'entityName': {exc}") from None


def _entity_id(request: web.Request) -> EntityId:
    try:
        return EntityId(request.match_info["entityName"], request.match_info["entityKey"])
    except ValueError as exc:
        raise ApiError(400, f"bad entity id in the path: {exc}") from None


async def signal_entity(request: web.Request) -> web.Response:
    entity_id = _entity_id(request)
    operation = params.optional_text(request, "op")
    if not operation:
        raise ApiError(400, "query parameter 'op' is required: the name of the operation to "
                            "signal, e.g. ?op=add")
    signal_id = request.headers.get("Idempotency-Key") or None
    if signal_id is not None and len(signal_id) > 200:
        raise ApiError(400, "the Idempotency-Key header is longer than 200 characters")
    data = await params.json_body(request, _settings(request).max_body_size)
    try:
        await _client(request).signal_entity(entity_id, operation, data, signal_id=signal_id)
    except UnknownFunctionError as exc:
        raise ApiError(404, str(exc)) from None
    except SerializationError as exc:
        raise ApiError(400, f"the request body cannot be an operation input: {exc}") from None
    return _no_content(202)


async def get_entity(request: web.Request) -> web.Response:
    entity_id = _entity_id(request)
    state = await _client(request).read_entity_state(entity_id)
    if not state.exists:
        raise ApiError(404, f"entity {entity_id} has no state (it was never operated on, or "
                            f"it was deleted)")
    return json_response(state.state)


async def list_entities(request: web.Request) -> web.Response:
    name = _entity_name(request)
    low = params.timestamp(request, "lastOperationTimeFrom")
    high = params.timestamp(request, "lastOperationTimeTo")
    fetch_state = params.boolean(request, "fetchState", False)
    top = params.page_size(request, "top")
    token = request.headers.get(CONTINUATION_HEADER) or None
    if token is not None and (len(token) > _MAX_TOKEN_LENGTH or not token.isascii()):
        raise _bad_token(token)
    try:
        page = await _client(request).query_entities(
            name=name, last_operation_from=low, last_operation_to=high, page_size=top,
            continuation=token)
    except ValueError:
        if token is None:
            raise
        raise _bad_token(token) from None
    headers = {CONTINUATION_HEADER: page.continuation} if page.continuation else None
    return json_response([entity_document(e, fetch_state=fetch_state) for e in page.entities],
                         headers=headers)


ENTITY_ROUTES = (
    Route("GET", "/entities", list_entities, "listEntities"),
    Route("GET", "/entities/{entityName}", list_entities, "listEntitiesByName"),
    Route("GET", "/entities/{entityName}/{entityKey}", get_entity, "getEntityState"),
    Route("POST", "/entities/{entityName}/{entityKey}", signal_entity, "signalEntity"),
)


# -- the API's own description ---------------------------------------------------------------
async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(_settings(request).prefix or ""))


DOCUMENT_ROUTES = (
    Route("GET", "/openapi.json", get_openapi, "getOpenApiDocument"),
)

ROUTES: tuple[Route, ...] = (ORCHESTRATOR_ROUTES + INSTANCE_ROUTES + ENTITY_ROUTES
                             + DOCUMENT_ROUTES)
"""Every route of the management API (add new groups of routes here)."""


# -- the sub-application ---------------------------------------------------------------------
def _authorization_middleware(settings: ApiSettings) -> Callable[..., Awaitable[Any]]:
    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not await settings.authorizer(request):
            raise ApiError(403, "the management API's authorizer refused this request")
        return await handler(request)
    return authorize


def management_api(settings: ApiSettings, routes: Iterable[Route] = ROUTES) -> web.Application:
    """The management API as an aiohttp application, to mount under `settings.prefix`.

    Every request goes through `settings.authorizer` first, and every error is answered as
    JSON (`json_error_middleware`). The client is found in the parent application
    (`CLIENT_KEY`), so mount it with `setup`, which does both.
    """
    api = web.Application(middlewares=[json_error_middleware,
                                       _authorization_middleware(settings)])
    for route in routes:
        api.router.add_route(route.method, route.path, route.handler, name=route.name)
    return api
