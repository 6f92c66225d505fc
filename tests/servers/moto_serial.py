"""Run moto's standalone server (as ``python -m moto.server`` does) handling one request at a
time: ``python tests/servers/moto_serial.py HOST PORT``.

moto's in-memory models are not thread-safe, and its server is threaded: concurrent
``TransactWriteItems`` calls fail with HTTP 500 ("dictionary changed size during iteration",
its transactions deep-copy the table) and concurrent conditional writes to one item are not
atomic. DynamoDB itself applies each write atomically, and the backend's fencing relies on
that, so the stand-in must too: a lock around the application serialises requests while
connections stay threaded (keep-alive clients do not block each other).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (  # type: ignore[import-untyped]
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


def main(host: str, port: int) -> None:
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serial(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    run_simple(host, port, serial, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
