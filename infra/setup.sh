#!/usr/bin/env bash
# Set up shoal in ./.venv on a fresh machine (idempotent: a second run is quick).
#
# torch is installed first and pinned to 2.13.0: on a CPU machine that is the
# local CPU wheel, and shoal's own torch range is satisfied by it, so nothing
# pulls a multi-GB CUDA build. On a GPU machine, install the CUDA torch you
# want into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
python -m pip install -q --disable-pip-version-check -e ".[test]"
python -c "import orchestrator, actors, collectives, storage, torch, ray" # fail loudly if the install did not work
echo "shoal is installed in $(pwd)/.venv (activate with: . .venv/bin/activate)"
