"""`setup`: plug aioflow into an `aiohttp.web.Application`.

```python
app = web.Application()
aioflow.web.setup(app, flow, "sqlite:///orders.db")
```

What `setup` guarantees:

* The backend is opened, and the worker started, when the application starts (through
  `app.cleanup_ctx`), before it serves a request; on shutdown the worker stops gracefully (its
  running step is committed, see `Worker.stop`) before the backend is closed.
* Handlers reach the client through `request.config_dict[CLIENT_KEY]` (and the worker through
  `WORKER_KEY`), typed.
* The management API is mounted as a sub-application under `prefix`, behind the authoriser,
  and answers every error with a JSON body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web
from yarl import URL

from aioflow.app import App
from aioflow.backend import Backend
from aioflow.client import Client
from aioflow.connect import connect
from aioflow.errors import ConfigurationError
from aioflow.web.auth import Authorizer, LoopbackOrToken
from aioflow.web.keys import CLIENT_KEY, DEFAULT_PREFIX, SETTINGS_KEY, WORKER_KEY, ApiSettings
from aioflow.web.routes import management_api
from aioflow.worker import Worker

__all__ = ["DEFAULT_PREFIX", "setup"]


def setup(
    app: web.Application,
    flow: App,
    backend: Backend | str | None = None,
    *,
    prefix: str | None = DEFAULT_PREFIX,
    run_worker: bool = True,
    token: str | None = None,
    authorizer: Authorizer | None = None,
    public_url: str | None = None,
    retry_after: int = 1,
    max_body_size: int = 1024 * 1024,
    max_wait_seconds: float = 300.0,
    worker_options: Mapping[str, Any] | None = None,
) -> None:
    """Run aioflow inside `app`: a client for handlers, a worker, the management API.

    * `flow`: the `aioflow.App` whose orchestrators and activities the service runs (and
      whose orchestrators the API may start by name).
    * `backend`: a URL for `aioflow.connect` (opened at start-up, closed at shutdown), or an
      open `Backend`, which stays open for its owner to close. None means `connect()`'s
      default (the `AIOFLOW_BACKEND` environment variable, else `sqlite:///aioflow.db`).
    * `prefix`: where the management API is mounted, or None not to mount it.
    * `run_worker`: False when workers run elsewhere and this service only manages instances.
    * `token` / `authorizer`: who may use the management API (see `aioflow.web.auth`). The
      default serves loopback clients only; with `token`, every client must send
      `Authorization: Bearer <token>`. Give at most one of the two.
    * `public_url`: the URL clients reach this service at (e.g. `https://api.example.com`)
      when behind a reverse proxy; check-status URLs are built from it instead of the
      request's `Host`.
    * `retry_after`: the `Retry-After` seconds of 202 answers.
    * `max_body_size`: the largest request body (input or event data) accepted, in bytes.
    * `max_wait_seconds`: the largest `timeout` a start request may ask to wait.
    * `worker_options`: keyword arguments for `aioflow.Worker`.

    Raises `ConfigurationError` for a bad option (or a second call), and `RuntimeError` if
    `app` has already started.
    """
    if app.frozen:
        raise RuntimeError("aioflow.web.setup must be called before the application starts "
                           "(it adds a start-up context and a sub-application)")
    if SETTINGS_KEY in app:
        raise ConfigurationError("aioflow.web.setup was already called on this application")
    if token is not None and authorizer is not None:
        raise ConfigurationError("pass either token= (bearer-token checking by the default "
                                 "authorizer) or authorizer= (your own), not both")
    if prefix is not None and (not prefix.startswith("/") or prefix.endswith("/")
                               or "{" in prefix or len(prefix) < 2):
        raise ConfigurationError(f"prefix must look like '/runtime/webhooks/durabletask' "
                                 f"(start with '/', no trailing '/', no placeholders), not "
                                 f"{prefix!r}")
    if public_url is not None:
        url = URL(public_url)
        if url.scheme not in ("http", "https") or not url.host or url.query_string:
            raise ConfigurationError(f"public_url must be an absolute http(s) URL without a "
                                     f"query, like 'https://api.example.com', not "
                                     f"{public_url!r}")
    if not isinstance(retry_after, int) or retry_after < 0:
        raise ConfigurationError(f"retry_after must be a whole number of seconds >= 0, not "
                                 f"{retry_after!r}")
    if max_body_size < 1 or not max_wait_seconds >= 0:
        raise ConfigurationError("max_body_size must be at least 1 and max_wait_seconds >= 0")
    settings = ApiSettings(
        prefix=prefix, authorizer=authorizer or LoopbackOrToken(token),
        public_url=public_url, retry_after=retry_after, max_body_size=max_body_size,
        max_wait_seconds=float(max_wait_seconds))
    # Open (lazily: no I/O yet) and build everything now, so a bad URL or worker option fails
    # here rather than at start-up.
    owned = backend is None or isinstance(backend, str)
    store = connect(backend) if backend is None or isinstance(backend, str) else backend
    client = Client(store, app=flow)
    worker = Worker(flow, store, **(worker_options or {})) if run_worker else None
    app[SETTINGS_KEY] = settings
    app.cleanup_ctx.append(_runtime(client, worker, close_backend=owned))
    if prefix is not None:
        app.add_subapp(prefix, management_api(settings))


def _runtime(client: Client, worker: Worker | None, *, close_backend: bool
             ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def aioflow_runtime(app: web.Application) -> AsyncIterator[None]:
        try:
            if worker is not None:
                await worker.start()
                app[WORKER_KEY] = worker
            app[CLIENT_KEY] = client
            yield
        finally:
            try:
                if worker is not None:
                    await worker.stop()
            finally:
                if close_backend:
                    await client.close()
    return aioflow_runtime
