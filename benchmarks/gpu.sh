#!/bin/bash
# Run bench.py with the full ViT-L (random weights) on a GPU machine that has its own torch
# and transformers but not this project's pinned stack: no torchcodec, no FFmpeg, no geneva,
# no network. Everything it needs travels in two folders:
#   WHEELS (default .scratch/wheels): a torchcodec wheel built for that machine's torch with
#     CUDA, a PyAV wheel (torchcodec loads the FFmpeg libraries bundled in it), and wheels of
#     whatever of fsspec and pyarrow the machine lacks;
#   CLIPS (default .scratch/clips): 10 s 720p H.264 clips, made beforehand with
#     `ffmpeg -f lavfi -i testsrc2=size=1280x720:rate=30:duration=10 -c:v libx264
#      -preset veryfast -g 60 -pix_fmt yuv420p clip.mp4` (there is no ffmpeg there).
# Results go to $OUT/bench_gpu.json (default: the current folder).
set -euo pipefail
export PYTHONUNBUFFERED=1
wheels=${WHEELS:-.scratch/wheels}
clips=${CLIPS:-.scratch/clips}
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - "$wheels" "$w" <<'PY'
import glob, os, re, sys, zipfile
wheels, w = sys.argv[1:]
zipfile.ZipFile(glob.glob(f"{wheels}/av-*.whl")[0]).extractall(f"{w}/av")
os.makedirs(f"{w}/ff")
for f in os.listdir(f"{w}/av/av.libs"):
    m = re.match(r"^(lib[\w+]+?)-[0-9a-f]{8}\.so\.(\d+)", f)
    if m:
        os.symlink(f"{w}/av/av.libs/{f}", f"{w}/ff/{m.group(1)}.so.{m.group(2)}")
PY
export LD_LIBRARY_PATH=$w/ff:$w/av/av.libs:${LD_LIBRARY_PATH:-}
python3 -m pip install -q --no-index --no-deps --target "$w/site" "$wheels"/*.whl
export PYTHONPATH=$w/site
# bench.py imports video_embeddings_udf and the video_embeddings package from this checkout,
# so both travel with it; they need geneva and, to count the CPUs granted, ray.
if [ ! -f video_embeddings_udf.py ] || [ ! -f video_embeddings/__init__.py ]; then
    echo "run from the project root: video_embeddings_udf.py and video_embeddings/ are needed" >&2
    exit 1
fi
stub=$w/stub
if ! python3 -c "import geneva" 2>/dev/null; then
    # bench.py calls the UDF's batch path directly, as Geneva's applier does; only the
    # @udf decorator, the Skip policy it is given and the fatal-worker error that
    # SystemFault extends are needed from geneva, so a stand-in keeps the class as it is.
    mkdir -p "$stub/geneva/debug"
    cat > "$stub/geneva/__init__.py" <<'PY'
import types


def udf(**_options):
    def wrap(cls):
        def make(*args, **kwargs):
            return types.SimpleNamespace(func=cls(*args, **kwargs))

        make.__wrapped__ = cls
        return make

    return wrap
PY
    cat > "$stub/geneva/errors.py" <<'PY'
class FatalWorkerError(RuntimeError):
    pass


class FatalWorkerHardwareError(FatalWorkerError):
    pass
PY
    touch "$stub/geneva/debug/__init__.py"
    cat > "$stub/geneva/debug/error_store.py" <<'PY'
class Skip:
    def __init__(self, *exceptions, **_options):
        self.exceptions = exceptions
PY
fi
if ! python3 -c "import ray" 2>/dev/null; then
    # Outside a Ray worker the UDF only asks ray whether it is in one.
    mkdir -p "$stub/ray/_private"
    printf 'def is_initialized():\n    return False\n' > "$stub/ray/__init__.py"
    touch "$stub/ray/_private/__init__.py"
    echo 'WORKER_MODE = 1' > "$stub/ray/_private/worker.py"
fi
if [ -d "$stub" ]; then
    export PYTHONPATH=$PYTHONPATH:$stub
fi
timeout 560 python3 benchmarks/bench.py --model vitl-random --clips-dir "$clips" \
    --videos 256 --json "${OUT:-.}/bench_gpu.json" "$@"
