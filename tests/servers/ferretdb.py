"""A real MongoDB wire-protocol server for the MongoDB backend's tests.

`mongodb_server` (session-scoped) yields a `MongoServer` whose `uri` points at:

* the server named by ``AIOFLOW_TEST_MONGODB_URI`` when that variable is set (any MongoDB or
  compatible server; nothing is built or started), or else
* FerretDB v1.24.2 (SQLite handler, pure Go) embedded in our helper program
  ``tools/ferretdb``, built with ``go build`` into ``~/.cache/aioflow/ferretdb/`` (the
  binary's name carries a hash of the helper's sources and the Go version, so a change
  rebuilds it) and started on a free 127.0.0.1 port with a fresh data directory; it is stopped
  (SIGTERM) at the end of the session.

The tests need the server: if it cannot be built, started or reached, the fixture raises an
error that says what failed and how to fix it. It never skips.

Each test uses its own database (`MongoServer.new_database_name`), so tests do not see each
other's data and a database left behind by a failed test does not disturb the next one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

ENV_URI = "AIOFLOW_TEST_MONGODB_URI"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "tools" / "ferretdb"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aioflow" / "ferretdb"
BUILD_TIMEOUT = 900.0
START_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """The test server could not be built, started or reached."""


@dataclass(frozen=True)
class MongoServer:
    """A running server: `uri` has no database path; add one per test."""

    uri: str
    external: bool

    @staticmethod
    def new_database_name(label: str = "test") -> str:
        return f"aioflow_{label}_{uuid.uuid4().hex[:12]}"

    def url(self, database: str, **options: str) -> str:
        """A backend URL for `database` on this server."""
        base = self.uri.split("?", 1)
        query = "&".join([*base[1:], *(f"{k}={v}" for k, v in options.items())])
        return f"{base[0].rstrip('/')}/{database}" + (f"?{query}" if query else "")

    def drop(self, database: str) -> None:
        with MongoClient(self.uri, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(database)


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    go = shutil.which("go")
    if go is not None:
        version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                                 timeout=60).stdout.strip()
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def build_ferretdb() -> Path:
    """The helper binary, built now if the cache has no build of the current sources."""
    go = shutil.which("go")
    if go is None:
        raise ServerError(
            "the MongoDB backend tests need FerretDB, which is built from tools/ferretdb with "
            "Go, but 'go' is not on PATH: install Go >= 1.24, or set "
            f"{ENV_URI}=mongodb://host:port to test against a MongoDB server instead")
    binary = CACHE_DIR / f"ferretdb-aioflow-{_source_hash()}"
    if binary.exists():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(binary.name + f".{os.getpid()}.tmp")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    began = time.monotonic()
    try:
        done = subprocess.run([go, "build", "-trimpath", "-o", str(partial), "."],
                              cwd=SOURCE_DIR, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"building FerretDB (tools/ferretdb) took over {BUILD_TIMEOUT:.0f} s"
                          ) from exc
    if done.returncode != 0:
        raise ServerError(
            f"building FerretDB from tools/ferretdb failed (go build exit {done.returncode}); "
            f"it needs the Go module proxy to fetch github.com/FerretDB/FerretDB v1.24.2 on the "
            f"first build. Output:\n{done.stdout}{done.stderr}")
    partial.replace(binary)  # atomic: a concurrent session sees the whole file or none
    print(f"\nbuilt FerretDB helper in {time.monotonic() - began:.0f} s: {binary}")
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(uri: str, timeout: float) -> None:
    with MongoClient(uri, serverSelectionTimeoutMS=int(timeout * 1000)) as client:
        client.admin.command("ping")


@dataclass
class _Process:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:] or "(empty log)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_ferretdb(binary: Path) -> tuple[str, _Process]:
    """Start the helper on a free port with a fresh data directory; wait until it answers."""
    last = ""
    for _ in range(3):  # a free port can be taken between choosing and binding it
        data_dir = Path(tempfile.mkdtemp(prefix="aioflow-ferretdb-"))
        log = data_dir / "server.log"
        port = _free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(binary), "-listen", f"127.0.0.1:{port}", "-data", str(data_dir / "db")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        server = _Process(proc, data_dir, log)
        uri = f"mongodb://127.0.0.1:{port}/"
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                ping(uri, timeout=1.0)
                return uri, server
            except PyMongoError:
                time.sleep(0.1)
        last = server.tail()
        server.stop()
    raise ServerError(f"FerretDB ({binary}) did not answer a ping within {START_TIMEOUT:.0f} s "
                      f"on 127.0.0.1; its log:\n{last}")


@pytest.fixture(scope="session")
def mongodb_server() -> Iterator[MongoServer]:
    external = os.environ.get(ENV_URI)
    if external:
        try:
            ping(external, timeout=10.0)
        except PyMongoError as exc:
            raise ServerError(f"{ENV_URI}={external!r} does not answer a ping: {exc}") from exc
        yield MongoServer(external, external=True)
        return
    uri, server = start_ferretdb(build_ferretdb())
    try:
        yield MongoServer(uri, external=False)
    finally:
        server.stop()


@pytest.fixture
def mongodb_database(mongodb_server: MongoServer) -> Iterator[str]:
    """A fresh database name for one test, dropped afterwards."""
    name = mongodb_server.new_database_name()
    yield name
    try:
        mongodb_server.drop(name)
    except PyMongoError:
        pass  # a test that broke the server reports that itself
