#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: FFmpeg's shared libraries (torchcodec needs 4-7),
# uv, and the locked environment. Safe to run again: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v ffmpeg >/dev/null || ! ldconfig -p | grep -q 'libavcodec\.so\.'; then
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q ffmpeg
fi
# Headless Chromium, in which the tests load the HTML contact sheet.
if ! command -v chromium >/dev/null; then
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null; then
    python3 -m pip --version >/dev/null 2>&1 || as_root apt-get install -y -q python3-pip
    # Debian's own Python refuses user installs unless told (PEP 668); uv is self-contained.
    python3 -m pip install --quiet --user uv 2>/dev/null \
        || python3 -m pip install --quiet --user --break-system-packages uv
fi
uv sync --locked
