#!/usr/bin/env bash
# Create .venv and install prefalign into it, keeping whatever torch the machine already has.
#
# torch is installed *before* the project so that pip sees the floor in pyproject.toml already
# satisfied and never swaps in the registry's newest (CUDA, multi-GB) build:
#   1. torch importable by python3 already (a GPU user's CUDA/ROCm build) -> the venv sees it
#      through --system-site-packages and nothing is installed;
#   2. TORCH_SPEC set (e.g. "torch==2.6.0+cu124" with PIP_INDEX_URL) -> exactly that;
#   3. otherwise torch==2.13.0 if the local wheel cache has it (probed with --no-index);
#   4. otherwise, on a machine with an NVIDIA/AMD GPU, the registry's torch;
#   5. otherwise stop and say how to bring a CPU build, rather than pull CUDA wheels for a CPU.
set -euo pipefail
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,demo}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] using the torch already installed for $PY: $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    $PIP install "$TORCH_SPEC"
  elif $PIP install --no-index --no-deps "torch==2.13.0" >/dev/null 2>&1; then
    # the wheel came from the local cache; now its small pure-Python dependencies
    $PIP install "torch==2.13.0"
    echo "[setup] installed torch 2.13.0 from the local wheel cache"
  elif command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then
    $PIP install torch
  else
    echo "[setup] no torch here and no local wheel: install a CPU build of torch first" >&2
    echo "        (or set TORCH_SPEC, with PIP_INDEX_URL pointing at a CPU wheel index)." >&2
    exit 1
  fi
fi

$PIP install -e ".[${EXTRAS}]"
touch "$VENV/.installed"
