#!/usr/bin/env bash
# Set up (see setup.sh), then run the main job: index the videos under each SOURCE (folder,
# glob or gs://, s3:// prefix; a few clips generated with FFmpeg into ./demo-clips when none)
# into ./demo-db, and search it with the first video, writing the contact sheet demo-sheet.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0

if [ "$#" -eq 0 ]; then
    mkdir -p demo-clips
    for source in "testsrc=size=320x240:rate=25" "mandelbrot=size=320x240:rate=25" \
        "life=size=320x240:rate=25:mold=10:ratio=0.1" "smptehdbars=size=320x240:rate=25"; do
        clip="demo-clips/${source%%=*}.mp4"
        [ -f "$clip" ] || ffmpeg -v error -f lavfi -i "$source" -t 4 -pix_fmt yuv420p "$clip"
    done
    set -- demo-clips
fi
uv run video-embeddings index "$@" --db demo-db
uv run video-embeddings search --row 0 --db demo-db -k 4 --sheet demo-sheet.png
