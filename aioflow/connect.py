"""`connect(url)`: pick a backend by URL, through the `aioflow.backends` entry-point group."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from aioflow.backend import Backend
from aioflow.errors import ConfigurationError

__all__ = ["DEFAULT_URL", "ENV_VAR", "connect"]

ENV_VAR = "AIOFLOW_BACKEND"
DEFAULT_URL = "sqlite:///aioflow.db"

# Built-in backends, also found when aioflow runs from a source tree without being installed.
_BUILTIN = {
    "sqlite": "aioflow_sqlite:open_backend",
    "memory": "aioflow.testing.memory:open_backend",
    "mongodb": "aioflow_mongodb:open_backend",
    "dynamodb": "aioflow_dynamodb:open_backend",
}


def _factories() -> dict[str, str | Any]:
    found: dict[str, str | Any] = dict(_BUILTIN)
    for ep in entry_points(group="aioflow.backends"):
        found[ep.name] = ep
    return found


def connect(url: str | None = None) -> Backend:
    """Open the backend named by `url` (the connection itself is made on first use).

    The `AIOFLOW_BACKEND` environment variable, when set, takes precedence over `url`, so a
    deployment can switch backends by configuration alone; with neither, the default is
    `sqlite:///aioflow.db` (a file in the working directory). Schemes are looked up in the
    `aioflow.backends` entry-point group: `sqlite://`, `memory://` and any installed plugin.
    """
    chosen = os.environ.get(ENV_VAR) or url or DEFAULT_URL
    if not isinstance(chosen, str) or "://" not in chosen:
        raise ConfigurationError(
            f"malformed backend URL {chosen!r}: expected SCHEME://..., for example "
            f"'sqlite:///aioflow.db'; known schemes: {_known()}")
    scheme = chosen.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    factories = _factories()
    target = factories.get(scheme) or factories.get(base)
    if target is None:
        raise ConfigurationError(
            f"no backend for URL scheme {scheme!r} (in {chosen!r}); known schemes: {_known()}. "
            f"Install the plugin that provides it (entry-point group 'aioflow.backends')")
    factory = _load(target)
    return factory(chosen)  # type: ignore[no-any-return]


def _load(target: str | Any) -> Callable[[str], Backend]:
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    return target.load()  # type: ignore[no-any-return]


def _known() -> str:
    return ", ".join(f"{s}://" for s in sorted(_factories()))
