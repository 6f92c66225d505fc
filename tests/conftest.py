"""Shared test set-up: tests never inherit a backend choice from the environment."""

import pytest


@pytest.fixture(autouse=True)
def _no_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOFLOW_BACKEND", raising=False)
