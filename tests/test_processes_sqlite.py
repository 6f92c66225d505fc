"""Worker processes sharing one SQLite file, with and without being killed by SIGKILL."""

from __future__ import annotations

from pathlib import Path

import pytest

from aioflow.testing.conformance import MultiProcessSuite


class TestSqliteWorkerProcesses(MultiProcessSuite):
    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'processes.db'}"
