"""The typed application keys aioflow sets on an `aiohttp.web.Application`, and its settings.

After `aioflow.web.setup(app, ...)`, handlers reach aioflow through the request:

    client = request.config_dict[aioflow.web.CLIENT_KEY]

(`request.app[CLIENT_KEY]` works in handlers of the application itself; `config_dict` also
works in its sub-applications.) The client and worker are set when the application starts,
so they are there for every request (the backend is closed once it has shut down).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from aioflow.client import Client
from aioflow.web.auth import Authorizer
from aioflow.worker import Worker

__all__ = ["CLIENT_KEY", "SETTINGS_KEY", "WORKER_KEY", "ApiSettings"]

DEFAULT_PREFIX = "/runtime/webhooks/durabletask"


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the management API was set up (see `aioflow.web.setup` for each field).

    `prefix` is None when the management API is not mounted.
    """

    prefix: str | None
    authorizer: Authorizer
    public_url: str | None
    retry_after: int
    max_body_size: int
    max_wait_seconds: float


CLIENT_KEY = web.AppKey("aioflow.client", Client)
"""The `aioflow.Client` of the application (set at start-up)."""

WORKER_KEY = web.AppKey("aioflow.worker", Worker)
"""The `aioflow.Worker` running in the application (set at start-up when it runs one)."""

SETTINGS_KEY = web.AppKey("aioflow.web.settings", ApiSettings)
"""The `ApiSettings` that `setup` was given."""
