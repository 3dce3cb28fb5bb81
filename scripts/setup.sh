#!/usr/bin/env bash
# Create .venv and install policy_accel with its test tools. Idempotent: a finished install is kept.
# torch goes first and pinned: on this CPU-only setup pip takes the local CPU wheel, while a bare
# "torch" requirement on a fresh venv could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ -f .venv/.installed ] && [ .venv/.installed -nt pyproject.toml ]; then
  exit 0
fi
echo "[setup] creating .venv with $PYTHON"
"$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
echo "[setup] installing torch==2.13.0 (CPU)"
.venv/bin/pip install --quiet "torch==2.13.0"
echo "[setup] installing policy_accel[dev]"
.venv/bin/pip install --quiet -e ".[dev]"
echo "[setup] installing robomimic==0.3.0 without its dependencies (see pyproject.toml)"
.venv/bin/pip install --quiet --no-deps "robomimic==0.3.0"
touch .venv/.installed
echo "[setup] done"
