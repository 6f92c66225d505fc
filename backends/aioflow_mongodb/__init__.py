"""aioflow_mongodb: the MongoDB backend for aioflow, on PyMongo's asyncio API.

Select it with ``mongodb://host/DATABASE`` or ``mongodb+srv://...`` (entry point
``aioflow.backends: mongodb``), or construct `MongoBackend` from a URI, an existing
`pymongo.AsyncMongoClient` or an `AsyncDatabase`. It needs no multi-document transactions, so it
runs on a standalone server, replica sets, sharded clusters and compatible servers. See
`aioflow_mongodb.backend` for the design and guarantees and `aioflow_mongodb.url` for the URL.
"""

from .backend import INDEXES, MongoBackend, MongoUnavailableError
from .url import open_backend, split_uri

__all__ = ["INDEXES", "MongoBackend", "MongoUnavailableError", "open_backend", "split_uri"]
