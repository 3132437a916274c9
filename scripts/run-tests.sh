#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the whole test suite (tiny backbone by
# default, plus the tests marked slow and browser). Extra arguments go to pytest. Tests run
# the PyTorch runtime; the OpenVINO tests (tests/test_runtime.py) ask for theirs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DETECTOR_RUNTIME=torch
exec .venv/bin/python -m pytest "$@"
