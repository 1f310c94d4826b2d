#!/usr/bin/env bash
# Make .venv and install varlen with its dev extra. Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# Without a GPU pin the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
