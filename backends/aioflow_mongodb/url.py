"""`open_backend(url)`: the ``mongodb:`` / ``mongodb+srv:`` URL schemes (entry point
``aioflow.backends: mongodb``).

A standard MongoDB connection string, with the database named in its path or by a parameter::

    mongodb://localhost:27017/aioflow
    mongodb://user:secret@db1:27017,db2:27017/aioflow?replicaSet=rs0
    mongodb+srv://user:secret@cluster0.example.net/?database=aioflow&retryWrites=true
    mongodb://localhost/aioflow?collection_prefix=orders_&serverSelectionTimeoutMS=5000

Two parameters are aioflow's own and are removed before the string reaches the driver:

* ``database``: the database to use. It takes precedence over the path, which then keeps its
  driver meaning only (the default authentication database).
* ``collection_prefix``: prefix of the collection names (default ``aioflow_``), so several
  applications can share one database.

Every other parameter is a PyMongo/MongoDB connection option and is checked by PyMongo here,
before anything connects (except for ``mongodb+srv://``, whose options arrive by DNS).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pymongo.errors import ConfigurationError as PyMongoConfigurationError
from pymongo.uri_parser import parse_uri

from aioflow.errors import ConfigurationError

from .backend import MongoBackend

__all__ = ["open_backend", "split_uri"]

_SCHEMES = ("mongodb", "mongodb+srv")
_OWN = ("database", "collection_prefix")
_FORM = ("write mongodb://HOST[:PORT][,HOST2...]/DATABASE[?options] (or mongodb+srv://...), "
         "e.g. mongodb://localhost:27017/aioflow")


def split_uri(uri: str, *, database_required: bool = True) -> tuple[str, str, dict[str, Any]]:
    """Split a backend URL into (the connection string for PyMongo, the database name,
    `MongoBackend` keyword arguments). Raises `ConfigurationError` saying what is wrong
    (also when it names no database, unless `database_required` is false: then it is "")."""
    if not isinstance(uri, str):
        raise ConfigurationError(f"a MongoDB backend URL must be a str, not {type(uri).__name__}")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise ConfigurationError(f"malformed MongoDB URL {uri!r}: {exc}; {_FORM}") from exc
    if parts.scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"not a MongoDB backend URL: {uri!r} (the scheme must be mongodb or mongodb+srv); "
            f"{_FORM}")
    if not parts.netloc or parts.netloc.endswith("@"):
        raise ConfigurationError(f"MongoDB URL {uri!r} names no host; {_FORM}")
    own: dict[str, str] = {}
    kept: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OWN:
            if name in own:
                raise ConfigurationError(f"parameter {name!r} is given twice in {uri!r}")
            own[name] = value
        else:
            kept.append((name, value))
    path_db = unquote(parts.path.lstrip("/"))
    database = own.get("database") or path_db
    if not database and database_required:
        raise ConfigurationError(
            f"MongoDB URL {uri!r} names no database: put it in the path "
            f"(mongodb://host/DATABASE) or add ?database=NAME")
    options: dict[str, Any] = {}
    if "collection_prefix" in own:
        options["prefix"] = own["collection_prefix"]
    client_uri = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), ""))
    if parts.scheme.lower() == "mongodb":
        try:
            parse_uri(client_uri)
        except (PyMongoConfigurationError, ValueError) as exc:
            raise ConfigurationError(f"invalid MongoDB URL {uri!r}: {exc}") from exc
    return client_uri, database, options


def open_backend(url: str) -> MongoBackend:
    """Create a `MongoBackend` from a ``mongodb://`` or ``mongodb+srv://`` URL (see the module
    docstring). Cheap and synchronous: nothing connects until the backend is first used; an
    unreachable server then raises `MongoUnavailableError` after the server-selection timeout
    (PyMongo's default is 30 s; set ``serverSelectionTimeoutMS`` in the URL to change it)."""
    split_uri(url)  # every error now, before anything is created
    return MongoBackend(url)
