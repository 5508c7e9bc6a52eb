#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install pyro-cwm into it.
#   scripts/setup-venv.sh          runtime dependencies only
#   scripts/setup-venv.sh dev      with the test and lint tools
# Where no NVIDIA GPU is present, torch is installed first as a CPU build
# (TORCH_SPEC, default torch==2.13.0; set TORCH_INDEX_URL to a CPU wheel index if your
# pip would otherwise fetch a CUDA build). With a GPU, pip picks torch from the range
# declared in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
extra=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing torch with CUDA support"
    else
        echo "setup: no GPU found, installing the CPU build of torch (${TORCH_SPEC:-torch==2.13.0})"
        "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
fi

if [ "$extra" = "dev" ]; then
    "${pip[@]}" -e ".[dev]"
else
    "${pip[@]}" -e .
fi
