"""Benchmark: how many GETs / bytes reading a video from GCS costs, against a local
fake-gcs-server with a counting proxy in front.

Two sections (``--sections``, both by default):

- ``long``: the product path, ``decode_frames`` with 64 frames, on 20-minute 640x360 MP4s
  (``testsrc2``, x264 ``-preset ultrafast``) generated at run time, one with a key frame
  every 2 s (``-g 50``, what streaming encoders use) and one with x264's default (keyint
  250, 10 s at 25 fps). Each file is decoded read in part (the default BLOCK_SIZE, 16 MiB,
  smaller than the file: ``SEEK_BLOCK_SIZE`` blocks and seeks through the MP4's index)
  and read whole (BLOCK_SIZE larger than the file: torchcodec's exact scan), and the
  frames of both are compared with an exact scan of the local file. The encodes take
  about a minute on two cores.
- ``strategies``: the gcsfs cache strategies compared for torchcodec's exact scan, 16
  uniformly spread frames of the shared sample clips and a few remuxes of them: the
  measurements behind the choice of ``blockcache`` with ``concurrency=1``.

Seconds are on loopback, where a GET costs well under a millisecond; against real GCS each
GET adds tens of milliseconds, so the GET counts say more than the seconds.

    uv run python benchmarks/read_strategy.py [--out bench_results/read_strategy.json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before gcsfs import: avoids stalls

import av  # noqa: E402
import gcsfs  # noqa: E402
import torch  # noqa: E402
from torchcodec.decoders import VideoDecoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from gcs_emulator import CountingProxy, GcsEmulator, gcsfs_at  # noqa: E402

from video_embeddings.decode import SEEK_BLOCK_SIZE, decode_frames  # noqa: E402
from video_embeddings.frames import sample_indices  # noqa: E402
from video_embeddings.settings import Settings  # noqa: E402

VIDEOS_DIR = REPO / ".." / "shared" / "videos"
BUCKET = "bench"
MiB = 2**20
GiB = 2**30

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


def print_table(results: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """One row per result, ``columns`` as (header, result key, format); a bool as yes/no."""
    print(" ".join(format(h, f[:1] + f[1:].split(".")[0].rstrip("f")) for h, _, f in columns))
    for r in results:
        cells = [
            ("yes" if r[k] else "no") if isinstance(r[k], bool) else r[k] for _, k, _ in columns
        ]
        print(" ".join(format(v, f) for v, (_, _, f) in zip(cells, columns, strict=True)))


@contextmanager
def _quiet_gcsfs() -> Iterator[None]:
    """A strategy's failed GETs (416) are counted as its errors; gcsfs's tracebacks for
    them are not printed."""
    log = logging.getLogger("gcsfs")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def run_strategies(videos_dir: Path, frames: int, only: list[str] | None) -> dict[str, Any]:
    """The ``strategies`` section: every strategy on the shared clips and their remuxes."""
    files = sorted([*videos_dir.glob("*.mp4"), *videos_dir.glob("*.mkv")])
    if not files:
        raise FileNotFoundError(f"no videos found in {videos_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        files += derived_clips(videos_dir, Path(tmp))
        with GcsEmulator() as emu, CountingProxy(emu.endpoint) as proxy, _quiet_gcsfs():
            videos = {}
            for f in files:
                data = f.read_bytes()
                emu.upload(BUCKET, f.name, data)
                videos[f.name] = len(data)
            results = [
                run_strategy(name, src, videos, proxy.endpoint, proxy, frames)
                for name, src in STRATEGIES.items()
                if not only or name in only
            ]
    print(f"{len(videos)} videos, {sum(videos.values()) / MiB:.2f} MiB, {frames} frames each")
    print_table(results, _COLUMNS)
    return {"videos": videos, "frames": frames, "results": results}


LONG_SIZE = "640x360"
LONG_FPS = 25
LONG_GOPS: dict[str, list[str]] = {
    "2s": ["-g", str(2 * LONG_FPS)],  # what streaming encoders use
    "10s": [],  # x264's default keyint 250
}
"""The long files' key-frame intervals, and the x264 options that give them."""


def encode_long(path: Path, seconds: int, gop_args: list[str]) -> None:
    """``seconds`` of ``testsrc2`` (every frame differs) as an MP4, moov at the end."""
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi"]
    cmd += ["-i", f"testsrc2=size={LONG_SIZE}:rate={LONG_FPS}", "-t", str(seconds)]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", *gop_args, "-pix_fmt", "yuv420p"]
    subprocess.run([*cmd, str(path)], check=True)


def key_frames(path: Path) -> int:
    """Key frames in the file's video stream, from its packets (nothing decoded)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(p.is_keyframe for p in container.demux(stream) if p.size)


def exact_frames(path: Path, frames: int) -> torch.Tensor:
    """torchcodec's exact scan of the local file, at ``sample_indices``: the reference."""
    decoder = VideoDecoder(str(path), seek_mode="exact")
    indices = sample_indices(decoder.metadata.num_frames or 0, frames)
    return decoder.get_frames_at(indices).data


def run_long_file(
    name: str, size: int, reference: torch.Tensor, proxy: CountingProxy, frames: int
) -> list[dict[str, Any]]:
    """``decode_frames`` on one long object, read in part and read whole."""
    rows = []
    for path, block_size in (("in part", Settings.block_size), ("whole", GiB)):
        assert path == "whole" or block_size < size, "the file must exceed BLOCK_SIZE"
        proxy.reset()
        t0 = time.perf_counter()
        decoded = decode_frames(f"gs://{BUCKET}/{name}", num_frames=frames, block_size=block_size)
        seconds = time.perf_counter() - t0
        reqs = [r for r in proxy.snapshot() if f"/o/{quote(name, safe='')}" in r.path]
        gets = [r for r in reqs if r.is_media_get]
        read = sum(r.bytes_out for r in gets)
        rows.append({
            "path": path, "block_size": block_size, "gets": len(gets),
            "other_requests": len(reqs) - len(gets), "bytes_read": read,
            "bytes_ratio": read / size, "largest_get": max(r.bytes_out for r in gets),
            "seconds": seconds, "frames_equal_exact": bool(torch.equal(decoded, reference)),
        })  # fmt: skip
    return rows


_LONG_COLUMNS = [  # (header, result key, format)
    ("GOP", "gop", "<4"),
    ("MiB", "file_mib", ">6.1f"),
    ("path", "path", "<8"),
    ("GETs", "gets", ">5"),
    ("largest GET", "largest_get", ">11"),
    ("read/file", "bytes_ratio", ">9.3f"),
    ("seconds", "seconds", ">7.2f"),
    ("=exact", "frames_equal_exact", ">6"),
]


def run_long(minutes: float, frames: int) -> dict[str, Any]:
    """The ``long`` section: one file per key-frame interval, each read in part and whole."""
    seconds = round(minutes * 60)
    files: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for gop, gop_args in LONG_GOPS.items():
            path = Path(tmp) / f"testsrc2_{LONG_SIZE}_{seconds}s_gop{gop}.mp4"
            t0 = time.perf_counter()
            encode_long(path, seconds, gop_args)
            keys = key_frames(path)
            paths[gop] = path
            files[gop] = {
                "name": path.name, "bytes": path.stat().st_size, "key_frames": keys,
                "seconds_between_key_frames": seconds / keys,
                "encode_seconds": time.perf_counter() - t0,
            }  # fmt: skip
        with (
            GcsEmulator() as emu,
            CountingProxy(emu.endpoint) as proxy,
            gcsfs_at(proxy.endpoint),
        ):
            for path in paths.values():
                emu.upload(BUCKET, path.name, path.read_bytes())
            for gop, path in paths.items():
                size = files[gop]["bytes"]
                reference = exact_frames(path, frames)
                for row in run_long_file(path.name, size, reference, proxy, frames):
                    results.append({"gop": gop, "file_mib": size / MiB, **row})
    print(
        f"{minutes:g}-minute {LONG_SIZE} testsrc2 MP4s at {LONG_FPS} fps, {frames} frames, "
        f"read in part in {SEEK_BLOCK_SIZE // 1024} KiB blocks"
    )
    for gop, f in files.items():
        print(
            f"  GOP {gop}: {f['bytes'] / MiB:.1f} MiB, {f['key_frames']} key frames "
            f"(every {f['seconds_between_key_frames']:.2f} s)"
        )
    print_table(results, _LONG_COLUMNS)
    return {
        "minutes": minutes, "frames": frames, "seek_block_size": SEEK_BLOCK_SIZE,
        "files": files, "results": results,
    }  # fmt: skip


SECTIONS = ("long", "strategies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/read_strategy.json"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--long-minutes", type=float, default=20.0, help="long files' length")
    parser.add_argument("--long-frames", type=int, default=64, help="frames per long file")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (strategies)")
    parser.add_argument("--videos-dir", type=Path, default=VIDEOS_DIR)
    parser.add_argument("--only", nargs="*", help="run only these strategy names")
    args = parser.parse_args(argv)

    out: dict[str, Any] = {}
    if "long" in args.sections:
        out["long"] = run_long(args.long_minutes, args.long_frames)
    if "strategies" in args.sections:
        try:
            out["strategies"] = run_strategies(args.videos_dir, args.frames, args.only)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
