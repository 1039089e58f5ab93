#!/usr/bin/env bash
# The test command: a fresh virtual environment with every extra the tests use, then pytest.
# (The README shows this line; .ci/run runs this file.) Two pytest-xdist workers use both cores;
# pass -n 0 to run in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv && . .venv/bin/activate && pip install ".[test,onnx,sklearn,mpi,plot,docs]" && pytest -n 2 "$@"
