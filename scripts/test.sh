#!/usr/bin/env bash
# Set up (see setup.sh), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
uv run ruff check .
uv run ruff format --check .
uv run mypy
uv run pytest -p no:cacheprovider "$@"
