#!/usr/bin/env bash
# Sets up everything on a fresh machine, then starts the Gradio app (arguments go to app.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
exec .venv/bin/python app.py "$@"
