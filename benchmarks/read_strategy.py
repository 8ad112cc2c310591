"""Benchmark: how many GETs / bytes each gcsfs read strategy costs when torchcodec decodes a video.

Why: the UDF hands a gcsfs file object to torchcodec, whose demuxer seeks around the file (moov
atom, then sample data). Each cache miss is an HTTP GET, and against real GCS that latency
dominates. This uploads the sample clips to a local fake-gcs-server, decodes 16 uniformly spread
frames through each strategy and counts the requests with a proxy.

    uv run python benchmarks/read_strategy.py [--out bench_results/read_strategy.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before gcsfs import: avoids stalls

import gcsfs  # noqa: E402
from torchcodec.decoders import VideoDecoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from gcs_emulator import CountingProxy, GcsEmulator  # noqa: E402

from video_embeddings.decode import sample_indices  # noqa: E402

VIDEOS_DIR = REPO / ".." / "shared" / "videos"
BUCKET = "bench"
MiB = 2**20

Source = Callable[[gcsfs.GCSFileSystem, str], Any]  # returns a file object or bytes


def _opener(**kwargs: Any) -> Source:
    return lambda fs, path: fs.open(path, "rb", **kwargs)


STRATEGIES: dict[str, Source] = {
    "default (adaptive)": _opener(),
    "none": _opener(cache_type="none"),
    "readahead 16MiB": _opener(cache_type="readahead", block_size=16 * MiB),
    "readahead 1MiB": _opener(cache_type="readahead", block_size=1 * MiB),
    # gcsfs splits reads >= 10 MiB into `concurrency` (default 4) parallel ranged GETs; fsspec's
    # BlockCache does not clamp the last block to the file size, so the split ranges start past
    # EOF and GCS answers 416 for files < ~10.7 MiB. concurrency=1 avoids the split.
    "blockcache 16MiB": _opener(cache_type="blockcache", block_size=16 * MiB),
    "blockcache 16MiB c=1": _opener(cache_type="blockcache", block_size=16 * MiB, concurrency=1),
    "blockcache 1MiB": _opener(cache_type="blockcache", block_size=1 * MiB),
    "all": _opener(cache_type="all"),
    "first 16MiB": _opener(cache_type="first", block_size=16 * MiB),
    "fs.cat -> bytes": lambda fs, path: fs.cat(path),
}


def derived_clips(videos_dir: Path, tmp: Path) -> list[Path]:
    """Remuxes (no re-encode) that change the seek pattern: bikes.mp4 with moov at the end
    (ffmpeg's default) and at the front (+faststart), and a ~25 MiB loop of bigbuckbunny.mp4 so
    that one file is larger than the 16 MiB block size."""
    jobs = {
        "bikes_moov_end.mp4": ["-i", "bikes.mp4"],
        "bikes_faststart.mp4": ["-i", "bikes.mp4", "-movflags", "+faststart"],
        "bigbuckbunny_x24.mp4": ["-stream_loop", "23", "-i", "bigbuckbunny.mp4"],
    }
    out = []
    for name, args in jobs.items():
        if not (videos_dir / args[args.index("-i") + 1]).exists():
            continue
        args[args.index("-i") + 1] = str(videos_dir / args[args.index("-i") + 1])
        cmd = ["ffmpeg", "-v", "error", "-y", *args, "-c", "copy", str(tmp / name)]
        subprocess.run(cmd, check=True)
        out.append(tmp / name)
    return out


def decode(source: Any, frames: int) -> int:
    """Build an exact-seek decoder on the source and pull the frames the UDF would sample."""
    decoder = VideoDecoder(source, seek_mode="exact")
    indices = sample_indices(decoder.metadata.num_frames, frames)
    return decoder.get_frames_at(indices).data.shape[0]


def run_strategy(
    name: str,
    source: Source,
    videos: dict[str, int],
    endpoint: str,
    proxy: CountingProxy,
    frames: int,
) -> dict[str, Any]:
    """Decode every video with one strategy; count media GETs and bytes per video."""
    fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint, skip_instance_cache=True)
    per_video: list[dict[str, Any]] = []
    start = time.perf_counter()
    for video, size in videos.items():
        proxy.reset()
        t0 = time.perf_counter()
        error, decoded = None, 0
        try:
            src = source(fs, f"gs://{BUCKET}/{video}")
            try:
                decoded = decode(io.BytesIO(src) if isinstance(src, bytes) else src, frames)
            finally:
                if not isinstance(src, bytes):
                    src.close()
        except Exception as e:  # a strategy that breaks is a result, not a crash
            error = f"{type(e).__name__}: {e}"[:200]
        # Only this object's downloads: a request left in flight by the previous video (a
        # failed parallel read) can still land after the reset.
        reqs = [r for r in proxy.snapshot() if f"/o/{quote(video, safe='')}" in r.path]
        gets = [r for r in reqs if r.is_media_get]
        per_video.append({
            "video": video, "file_bytes": size, "frames": decoded, "gets": len(gets),
            "other_requests": len(reqs) - len(gets), "bytes_read": sum(r.bytes_out for r in gets),
            "ranges": [r.range for r in gets],
            "seconds": time.perf_counter() - t0, "error": error,
        })  # fmt: skip
    total_gets = sum(v["gets"] for v in per_video)
    return {
        "strategy": name,
        "videos": len(per_video),
        "total_gets": total_gets,
        "gets_per_video": total_gets / len(per_video),
        "max_gets_per_video": max(v["gets"] for v in per_video),
        "bytes_ratio": sum(v["bytes_read"] for v in per_video) / sum(videos.values()),
        "seconds": time.perf_counter() - start,
        "errors": sum(v["error"] is not None for v in per_video),
        "per_video": per_video,
    }


_COLUMNS = [  # (header, result key, format)
    ("strategy", "strategy", "<22"),
    ("videos", "videos", ">6"),
    ("GETs", "total_gets", ">6"),
    ("GETs/vid", "gets_per_video", ">8.2f"),
    ("max", "max_gets_per_video", ">4"),
    ("read/file", "bytes_ratio", ">9.2f"),
    ("seconds", "seconds", ">8.2f"),
    ("errors", "errors", ">6"),
]


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per strategy; read/file = bytes downloaded / bytes in the files."""
    print(" ".join(format(h, f[:1] + f[1:].split(".")[0].rstrip("f")) for h, _, f in _COLUMNS))
    for r in results:
        print(" ".join(format(r[k], f) for _, k, f in _COLUMNS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/read_strategy.json"))
    parser.add_argument("--frames", type=int, default=16, help="frames decoded per video")
    parser.add_argument("--videos-dir", type=Path, default=VIDEOS_DIR)
    parser.add_argument("--only", nargs="*", help="run only these strategy names")
    args = parser.parse_args(argv)

    files = sorted([*args.videos_dir.glob("*.mp4"), *args.videos_dir.glob("*.mkv")])
    if not files:
        print(f"no videos found in {args.videos_dir}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        files += derived_clips(args.videos_dir, Path(tmp))
        with GcsEmulator() as emu, CountingProxy(emu.endpoint) as proxy:
            videos = {}
            for f in files:
                data = f.read_bytes()
                emu.upload(BUCKET, f.name, data)
                videos[f.name] = len(data)
            results = [
                run_strategy(name, src, videos, proxy.endpoint, proxy, args.frames)
                for name, src in STRATEGIES.items()
                if not args.only or name in args.only
            ]
    print(f"{len(videos)} videos, {sum(videos.values()) / MiB:.2f} MiB, {args.frames} frames each")
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"videos": videos, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
