"""Local stand-ins for AWS, started by the test run: moto (DynamoDB) and ElasticMQ (SQS).

* DynamoDB: moto's standalone server from PyPI (``moto[server]``, Apache-2.0), run as its own
  process (`moto_serial`: moto's server app, one request at a time, as DynamoDB applies each
  write atomically). Amazon's DynamoDB Local is not used: its licence is the
  vendor's own, not an open-source one, which this project's package rules exclude.
* SQS: ElasticMQ (``org.elasticmq:elasticmq-server_2.13``, Apache-2.0) from Maven Central,
  fetched with Maven (`elasticmq-pom.xml` beside this file) into
  ``~/.cache/aioflow/elasticmq/VERSION`` on first use and run with Java 17.

Both listen on 127.0.0.1 on free ports, are waited for until they answer, and are stopped at
the end of the session. A server that cannot start is a test failure naming what failed (never
a skip). `aws_servers` is the same as a plain context manager (the benchmark uses it). Both
set dummy AWS credentials in the environment (inherited by worker processes), so nothing ever
reaches real AWS with real credentials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ELASTICMQ_VERSION = "1.6.11"
REGION = "eu-west-1"
_HERE = Path(__file__).resolve().parent
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aioflow"
_START_TIMEOUT = 90.0


class ServerError(RuntimeError):
    """A local server could not be fetched or started (the message says why)."""


@dataclass(frozen=True)
class AwsEndpoints:
    """Where the local servers listen, and helpers to point a backend at them."""

    dynamodb_url: str
    sqs_url: str
    region: str = REGION

    def options(self, prefix: str | None = None) -> dict[str, object]:
        """`DynamoDBBackend` keyword arguments for a fresh, private table and queues."""
        prefix = prefix or unique_prefix()
        return {"region": self.region, "table_prefix": prefix, "queue_prefix": prefix,
                "endpoint_url": self.dynamodb_url, "sqs_endpoint_url": self.sqs_url}

    def url(self, prefix: str | None = None, **extra: str) -> str:
        """A ``dynamodb:`` URL for a fresh, private table and queues."""
        prefix = prefix or unique_prefix()
        query = (f"region={self.region}&table_prefix={prefix}&queue_prefix={prefix}"
                 f"&endpoint_url={self.dynamodb_url}&sqs_endpoint_url={self.sqs_url}")
        for key, value in extra.items():
            query += f"&{key}={value}"
        return f"dynamodb://?{query}"


def unique_prefix() -> str:
    """A table/queue prefix no other test uses: tests never see each other's data."""
    return "t" + uuid.uuid4().hex[:16]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fail(what: str, log: Path | None = None) -> None:
    tail = ""
    if log is not None and log.exists():
        tail = "\n--- server log (tail) ---\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-30:])
    raise ServerError(f"{what}{tail}")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, name: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail(f"{name} exited with status {proc.returncode} while starting", log)
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (with an error page for a bare GET): it is up
        except OSError:
            time.sleep(0.2)
    _fail(f"{name} did not answer on {url} within {_START_TIMEOUT:.0f} s", log)


def elasticmq_classpath() -> Path:
    """The directory of ElasticMQ's jars, fetched with Maven on first use."""
    target = _CACHE / "elasticmq" / ELASTICMQ_VERSION
    if (target / f"elasticmq-server_2.13-{ELASTICMQ_VERSION}.jar").exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServerError("Maven ('mvn') is needed to fetch the ElasticMQ SQS server for the "
                          "DynamoDB backend; install Maven (apt-get install maven)")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(_HERE / "elasticmq-pom.xml"),
         f"-Delasticmq.version={ELASTICMQ_VERSION}", "dependency:copy-dependencies",
         f"-DoutputDirectory={partial}"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        _fail(f"fetching ElasticMQ {ELASTICMQ_VERSION} with Maven failed "
              f"(status {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        # Throwaway in-memory servers: nothing to flush, and moto's development server can
        # take ~10 s to act on SIGTERM, so they are killed outright.
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def aws_servers(logs: Path) -> Iterator[AwsEndpoints]:
    """Run moto (DynamoDB) and ElasticMQ (SQS) on 127.0.0.1 while the block runs, with dummy
    AWS credentials in the environment. Raises `ServerError` if either cannot start."""
    java = shutil.which("java")
    if java is None:
        raise ServerError("Java 17 ('java') is needed to run the ElasticMQ SQS server for the "
                          "DynamoDB backend; install it (apt-get install openjdk-17-jre-headless)")
    jars = elasticmq_classpath()
    sqs_port, ddb_port = free_port(), free_port()
    config = logs / "elasticmq.conf"
    config.write_text(
        'include classpath("application.conf")\n'
        f'node-address {{ protocol = http, host = "127.0.0.1", port = {sqs_port}, '
        'context-path = "" }\n'
        f'rest-sqs {{ enabled = true, bind-port = {sqs_port}, bind-hostname = "127.0.0.1", '
        'sqs-limits = strict }\n'
        'rest-stats { enabled = false }\n'
        f'aws {{ region = "{REGION}", accountId = "000000000000" }}\n')
    saved = {k: os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
        "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION})
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(key, None)
    try:
        with _process([java, "-Xmx512m", f"-Dconfig.file={config}", "-cp", f"{jars}/*",
                       "org.elasticmq.server.Main"], logs / "elasticmq.log") as sqs, \
             _process([sys.executable, str(_HERE / "moto_serial.py"), "127.0.0.1",
                       str(ddb_port)], logs / "moto.log") as ddb:
            _wait_http(f"http://127.0.0.1:{ddb_port}/moto-api/", ddb, logs / "moto.log",
                       "moto (DynamoDB)")
            _wait_http(f"http://127.0.0.1:{sqs_port}/", sqs, logs / "elasticmq.log",
                       "ElasticMQ (SQS)")
            yield AwsEndpoints(f"http://127.0.0.1:{ddb_port}", f"http://127.0.0.1:{sqs_port}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def aws_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsEndpoints]:
    """moto (DynamoDB) and ElasticMQ (SQS) running on 127.0.0.1 for the whole session. A server
    that cannot start fails the tests that need it (never skips them)."""
    servers = aws_servers(tmp_path_factory.mktemp("aws-servers"))
    try:
        endpoints = servers.__enter__()
    except ServerError as exc:
        pytest.fail(f"the local AWS servers for the DynamoDB backend tests did not start: {exc}",
                    pytrace=False)
    try:
        yield endpoints
    finally:
        servers.__exit__(None, None, None)
