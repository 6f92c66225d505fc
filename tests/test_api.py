"""The public API: registration, configuration and input errors users see first."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

import aioflow
from aioflow.serialization import from_json_value, to_json_value
from aioflow.testing.memory import MemoryBackend


def test_public_names_are_reexported_from_the_package_root() -> None:
    for name in ("App", "Worker", "Client", "OrchestrationContext", "RetryPolicy",
                 "RuntimeStatus", "OrchestrationStatus", "TaskFailedError", "connect", "run"):
        assert hasattr(aioflow, name), f"aioflow.{name} should be importable from the root"


def test_an_orchestrator_that_is_not_async_def_is_rejected_at_registration() -> None:
    app = aioflow.App()
    with pytest.raises(aioflow.ConfigurationError, match="must be an `async def`"):
        @app.orchestrator
        def not_async(ctx, x):  # type: ignore[no-untyped-def]
            return x


def test_two_different_functions_cannot_share_a_name() -> None:
    app = aioflow.App()

    @app.activity(name="work")
    def one(x: int) -> int:
        return x

    with pytest.raises(aioflow.ConfigurationError, match="already registered"):
        @app.activity(name="work")
        def two(x: int) -> int:
            return x


def test_registration_keeps_the_function_usable_and_tags_its_name() -> None:
    app = aioflow.App()

    @app.activity(name="renamed")
    def original(x: int) -> int:
        return x + 1

    assert original(1) == 2
    assert app.get_activity("renamed").fn is original


def test_unknown_names_list_what_is_registered() -> None:
    app = aioflow.App()

    @app.orchestrator
    async def known(ctx, x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(aioflow.UnknownFunctionError, match="registered orchestrators: known"):
        app.get_orchestrator("missing")


def test_connect_rejects_a_malformed_url_and_lists_the_known_schemes() -> None:
    with pytest.raises(aioflow.ConfigurationError) as info:
        aioflow.connect("not a url")
    assert "sqlite://" in str(info.value) and "memory://" in str(info.value)


def test_connect_rejects_an_unknown_scheme_naming_it() -> None:
    with pytest.raises(aioflow.ConfigurationError, match="'postgres'"):
        aioflow.connect("postgres://localhost/db")


def test_connect_picks_the_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOFLOW_BACKEND", "memory://from-env")
    backend = aioflow.connect("sqlite:///ignored.db")
    assert isinstance(backend, MemoryBackend), "AIOFLOW_BACKEND should override the URL in code"


async def test_start_new_rejects_input_that_is_not_json() -> None:
    app = aioflow.App()

    @app.orchestrator
    async def flow(ctx, x):  # type: ignore[no-untyped-def]
        return x

    client = aioflow.Client(MemoryBackend(), app=app)
    with pytest.raises(aioflow.SerializationError, match="input of orchestration 'flow'"):
        await client.start_new(flow, object())
    page = await client.query_instances()
    assert page.instances == [], "a rejected start must not leave an instance behind"


async def test_start_new_rejects_an_unknown_orchestrator_when_the_client_knows_the_app() -> None:
    client = aioflow.Client(MemoryBackend(), app=aioflow.App())
    with pytest.raises(aioflow.UnknownFunctionError, match="'nope'"):
        await client.start_new("nope")


@pytest.mark.parametrize("bad", ["", "a|b", "tab\there", "x" * 257])
async def test_start_new_rejects_bad_instance_ids(bad: str) -> None:
    client = aioflow.Client(MemoryBackend())
    with pytest.raises(ValueError):
        await client.start_new("flow", instance_id=bad)


async def test_raise_event_on_an_unknown_instance_says_so() -> None:
    client = aioflow.Client(MemoryBackend())
    with pytest.raises(aioflow.InstanceNotFoundError, match="'ghost'"):
        await client.raise_event("ghost", "go")


def test_retry_policy_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="max_number_of_attempts"):
        aioflow.RetryPolicy(first_retry_interval=1, max_number_of_attempts=0)
    with pytest.raises(ValueError, match="backoff_coefficient"):
        aioflow.RetryPolicy(first_retry_interval=1, max_number_of_attempts=2,
                            backoff_coefficient=0.5)
    policy = aioflow.RetryPolicy(first_retry_interval=dt.timedelta(seconds=2),
                                 max_number_of_attempts=5, backoff_coefficient=2,
                                 max_retry_interval=5)
    assert [policy.delay_after(n) for n in (1, 2, 3)] == [2, 4, 5]


@dataclasses.dataclass
class Point:
    x: int
    when: dt.datetime


def test_payloads_round_trip_to_annotated_types() -> None:
    value = Point(1, dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    stored = to_json_value(value)
    assert stored == {"x": 1, "when": "2026-01-02T00:00:00+00:00"}
    assert from_json_value(stored, Point) == value
    assert from_json_value([stored], list[Point]) == [value]
    assert from_json_value(stored, Point | None) == value
