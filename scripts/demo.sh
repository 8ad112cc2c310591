#!/usr/bin/env bash
# Set up (see setup.sh), then run the main job: embed the videos under each SOURCE (folder,
# glob or gs://, s3:// prefix; generated clips when none) into ./demo-db and search it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
uv run python demo.py "$@"
