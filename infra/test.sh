#!/usr/bin/env bash
# Set up (infra/setup.sh), then lint, check formatting, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
pytest -q --durations=15 "$@"
