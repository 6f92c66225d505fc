"""`open_backend(url)`: the ``sqlite:`` URL scheme (entry point ``aioflow.backends: sqlite``).

URL form (the SQLAlchemy convention)::

    sqlite:///relative/path.db          relative to the current directory
    sqlite:////absolute/path.db         four slashes: an absolute path
    sqlite:///C:/path/on/windows.db
    sqlite:///path.db?synchronous=FULL&busy_timeout=10

Query parameters:

* ``synchronous``: ``NORMAL`` (default: durable against process crashes), ``FULL`` or
  ``EXTRA`` (durable against power loss too; one fsync per commit).
* ``busy_timeout``: seconds a write waits for another process's write lock (default 30).

``sqlite:///:memory:`` is rejected: an in-memory SQLite database is private to one connection,
so it cannot be shared by workers or processes and loses everything on restart. Use the
``memory://`` backend for tests.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from aioflow.errors import ConfigurationError

from .backend import SYNCHRONOUS_MODES, SqliteBackend

__all__ = ["open_backend", "parse_url"]

_PARAMETERS = ("busy_timeout", "synchronous")

_FORMS = (
    "write sqlite:///relative/path.db (three slashes) or sqlite:////absolute/path.db "
    "(four slashes)"
)


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a ``sqlite:`` URL into the database path and `SqliteBackend` keyword arguments.

    Raises `ConfigurationError` saying what is wrong with the URL and what to write instead.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"malformed SQLite backend URL {url!r}: {exc}; {_FORMS}") from exc
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(
            f"not a SQLite backend URL: {url!r} (the scheme must be 'sqlite'); {_FORMS}"
        )
    if parts.netloc:
        raise ConfigurationError(
            f"SQLite backend URL {url!r} has a host part {parts.netloc!r}, but SQLite opens a "
            f"local file; {_FORMS}"
        )
    if parts.fragment:
        raise ConfigurationError(
            f"SQLite backend URL {url!r} has a fragment '#{parts.fragment}'; remove it"
        )
    if not parts.path.startswith("/") or len(parts.path) < 2:
        raise ConfigurationError(f"SQLite backend URL {url!r} names no database file; {_FORMS}")
    path = unquote(parts.path[1:])
    if path == ":memory:" or path.startswith("file::memory:"):
        raise ConfigurationError(
            f"SQLite backend URL {url!r} asks for an in-memory database, which the SQLite "
            f"backend does not support: an in-memory SQLite database is private to one "
            f"connection, so no other worker or process could share it and nothing would "
            f"survive a restart. Use memory:// (the in-memory test backend) for tests, or a "
            f"file: sqlite:///path/to/aioflow.db"
        )

    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _PARAMETERS:
            raise ConfigurationError(
                f"unknown parameter {key!r} in SQLite backend URL {url!r}; valid parameters: "
                f"{', '.join(_PARAMETERS)}"
            )
        if key in options:
            raise ConfigurationError(
                f"parameter {key!r} is given twice in SQLite backend URL {url!r}"
            )
        if key == "synchronous":
            mode = value.upper()
            if mode not in SYNCHRONOUS_MODES:
                raise ConfigurationError(
                    f"invalid synchronous={value!r} in SQLite backend URL {url!r}; valid "
                    f"values: {', '.join(SYNCHRONOUS_MODES)}"
                )
            options[key] = mode
        else:
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not seconds >= 0 or seconds == float("inf"):
                raise ConfigurationError(
                    f"invalid busy_timeout={value!r} in SQLite backend URL {url!r}; give "
                    f"seconds, a number >= 0 (e.g. busy_timeout=10)"
                )
            options[key] = seconds
    return path, options


def open_backend(url: str) -> SqliteBackend:
    """Create a `SqliteBackend` from a ``sqlite:`` URL (see the module docstring).

    Synchronous and cheap: nothing is opened until the backend is first used (or entered with
    ``async with``); a database file that cannot be opened raises `ConfigurationError` then.
    """
    path, options = parse_url(url)
    return SqliteBackend(path, **options)
