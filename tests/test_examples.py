"""Every script in examples/ runs to a correct end: CI proves the documented patterns work.

Each example is run as its own process, the way a user runs it (`python examples/NAME.py`), from
an empty working directory, and must exit with status 0 and print its success line. The examples
check their own outcomes and exit non-zero when one is wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

CASES = [
    pytest.param("function_chaining.py", [],
                 ["[activity] ship_order", "OK: order-1001 validated -> reserved -> charged"],
                 id="function_chaining"),
    pytest.param("fan_out_fan_in.py", [],
                 ["OK: counted 123 words in 14 documents"],
                 id="fan_out_fan_in"),
    pytest.param("monitor.py", [],
                 ["[ALERT] acme/rockets", "alerts sent: 1",
                  "OK: acme/rockets alerted exactly once"],
                 id="monitor"),
    pytest.param("human_interaction.py", [],
                 ["(72 virtual hours later)",
                  "OK: EXP-1 approved and processed; EXP-2 timed out and escalated"],
                 id="human_interaction-time-skipping"),
    pytest.param("human_interaction.py", ["--timeout-seconds", "1"],
                 ["the 1 s deadline passes (SQLite, real time)",
                  "OK: EXP-1 approved and processed; EXP-2 timed out and escalated"],
                 id="human_interaction-real-timeout"),
    pytest.param("event_driven.py", [],
                 ["[client] found instance", "input 'order-42'",
                  "OK: found order-42 by its input, raised the event"],
                 id="event_driven"),
    pytest.param("aggregator.py", [],
                 ["[counter] sensor-7/temperature-alarms: 1000",
                  "OK: 1000 concurrent signals counted exactly once; budgets still total 500"],
                 id="aggregator"),
    pytest.param("async_http_api.py", ["--self-test"],
                 ["POST /api/reports -> 202", "POST .../raiseEvent/ApprovalEvent -> 202",
                  "OK: report polled to completion, EXP-7 approved by event, EXP-8 terminated"],
                 id="async_http_api-self-test"),
]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIOFLOW_BACKEND"}
    # Import aioflow and the built-in backends from this source tree even when not installed.
    paths = [str(ROOT), str(ROOT / "backends")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_every_example_script_is_covered() -> None:
    covered = {str(p.values[0]) for p in CASES}
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == covered, f"examples without a test (or tests without a script): " \
                               f"{sorted(scripts ^ covered)}"


@pytest.mark.parametrize(("script", "args", "expected"), CASES)
def test_example_runs_and_reports_success(script: str, args: list[str], expected: list[str],
                                          tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=_environment(),
        capture_output=True, text=True, timeout=60)
    output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, f"{script} exited with {result.returncode}\n{output}"
    for line in expected:
        assert line in result.stdout, f"{script} did not print {line!r}\n{output}"
    assert not list(tmp_path.iterdir()), \
        f"{script} left files in its working directory: {list(tmp_path.iterdir())}"
