#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the whole test suite (tiny backbone by
# default, plus the tests marked slow and browser). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python -m pytest "$@"
