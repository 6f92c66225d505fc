"""aioflow in aiohttp services: worker lifecycle, client access, the HTTP management API.

Needs the `aiohttp` extra (`pip install 'aioflow-durable[aiohttp]'`).

```python
from aiohttp import web
import aioflow, aioflow.web

flow = aioflow.App()   # register orchestrators and activities on it

async def start_order(request: web.Request) -> web.Response:
    client = request.config_dict[aioflow.web.CLIENT_KEY]
    instance_id = await client.start_new("process_order", await request.json())
    return aioflow.web.create_check_status_response(request, instance_id)

app = web.Application()
app.router.add_post("/orders", start_order)
aioflow.web.setup(app, flow, "sqlite:///orders.db")   # worker + /runtime/webhooks/durabletask
web.run_app(app, host="127.0.0.1")
```

The management API follows Durable Functions' HTTP API: the same routes (see
`aioflow.web.routes`), status codes and camelCase JSON fields, an OpenAPI document at
`<prefix>/openapi.json`, and JSON errors for every bad request.
"""

from __future__ import annotations

try:
    import aiohttp  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "aioflow.web needs aiohttp, which is not installed: pip install "
        "'aioflow-durable[aiohttp]'") from exc

from aioflow.web.auth import Authorizer, LoopbackOrToken, is_loopback
from aioflow.web.errors import ApiError, json_error_middleware
from aioflow.web.keys import CLIENT_KEY, DEFAULT_PREFIX, SETTINGS_KEY, WORKER_KEY, ApiSettings
from aioflow.web.lifecycle import setup
from aioflow.web.openapi import openapi_document
from aioflow.web.responses import (
    create_check_status_response,
    http_management_payload,
    management_api_url,
    wait_for_completion_or_create_check_status_response,
)
from aioflow.web.routes import CONTINUATION_HEADER, ROUTES, Route, management_api

__all__ = [
    "CLIENT_KEY",
    "CONTINUATION_HEADER",
    "DEFAULT_PREFIX",
    "ROUTES",
    "SETTINGS_KEY",
    "WORKER_KEY",
    "ApiError",
    "ApiSettings",
    "Authorizer",
    "LoopbackOrToken",
    "Route",
    "create_check_status_response",
    "http_management_payload",
    "is_loopback",
    "json_error_middleware",
    "management_api",
    "management_api_url",
    "openapi_document",
    "setup",
    "wait_for_completion_or_create_check_status_response",
]
