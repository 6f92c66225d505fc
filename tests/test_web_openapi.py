"""The OpenAPI document describes exactly the routes the management API serves.

The document is written by hand (as data, in aioflow/web/openapi.py) and the routes are a
separate table (aioflow/web/routes.py), so these tests are what keeps them in step: a route
added without its description, or a description left behind by a removed route, fails here.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web

from aioflow.web import DEFAULT_PREFIX, ROUTES, openapi_document
from aioflow.web.keys import ApiSettings
from aioflow.web.routes import management_api

DOCUMENT = openapi_document(DEFAULT_PREFIX)
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


async def allow_all(request: web.Request) -> bool:
    return True


def served_routes() -> set[tuple[str, str]]:
    settings = ApiSettings(prefix=DEFAULT_PREFIX, authorizer=allow_all, public_url=None,
                           retry_after=1, max_body_size=1, max_wait_seconds=1)
    api = management_api(settings)
    return {(route.method.lower(), route.resource.canonical)
            for route in api.router.routes() if route.resource is not None}


def described_routes() -> set[tuple[str, str]]:
    return {(method, path) for path, item in DOCUMENT["paths"].items()
            for method in item if method in METHODS}


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, operation) for path, item in DOCUMENT["paths"].items()
            for method, operation in item.items() if method in METHODS]


def resolve(node: Any) -> Any:
    """Follow a local `$ref` (`#/components/...`) to what it names."""
    if isinstance(node, dict) and "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def test_every_served_route_is_described_and_every_described_route_is_served() -> None:
    served, described = served_routes(), described_routes()
    assert served - described == set(), "routes missing from the OpenAPI document"
    assert described - served == set(), "the OpenAPI document describes routes nobody serves"


def test_operation_ids_are_the_route_names_and_unique() -> None:
    by_route = {(route.method.lower(), route.path): route.name for route in ROUTES}
    ids = [operation["operationId"] for *_, operation in operations()]
    assert len(ids) == len(set(ids))
    for method, path, operation in operations():
        assert operation["operationId"] == by_route[(method, path)], (method, path)


@pytest.mark.parametrize(("method", "path"), sorted(described_routes()))
def test_each_operation_declares_its_path_parameters_and_its_answers(method: str,
                                                                     path: str) -> None:
    operation = DOCUMENT["paths"][path][method]
    declared = {p["name"] for p in map(resolve, operation.get("parameters", []))
                if p["in"] == "path"}
    assert declared == set(re.findall(r"\{(\w+)\}", path))
    assert operation["summary"] and operation["responses"]
    for status, response in operation["responses"].items():
        assert re.fullmatch(r"[1-5]\d\d", status) and resolve(response)["description"]
        if int(status) >= 400:
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def test_every_reference_resolves() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                assert resolve(node) is not None
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(DOCUMENT)


def test_the_document_names_its_server_and_the_status_names_match_the_runtime() -> None:
    from aioflow import RuntimeStatus

    assert DOCUMENT["openapi"] == "3.1.0" and DOCUMENT["servers"] == [{"url": DEFAULT_PREFIX}]
    enum = DOCUMENT["components"]["schemas"]["RuntimeStatus"]["enum"]
    assert enum == [status.value for status in RuntimeStatus]
    assert openapi_document("/other")["servers"] == [{"url": "/other"}]
