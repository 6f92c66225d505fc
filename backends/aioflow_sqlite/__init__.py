"""aioflow_sqlite: the SQLite backend for aioflow (embedded, zero set-up, multi-process).

Select it with ``sqlite:///path/to/aioflow.db`` (entry point ``aioflow.backends: sqlite``) or
construct `SqliteBackend(path)` directly. See `aioflow_sqlite.backend` for what it guarantees
(transactions, multi-process use, durability modes) and `aioflow_sqlite.url` for the URL form.
"""

from .backend import SYNCHRONOUS_MODES, SqliteBackend
from .url import open_backend, parse_url

__all__ = ["SYNCHRONOUS_MODES", "SqliteBackend", "open_backend", "parse_url"]
