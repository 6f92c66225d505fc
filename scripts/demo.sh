#!/usr/bin/env bash
# Install aioflow into .venv and run a durable workflow on the embedded SQLite backend.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/python examples/function_chaining.py
