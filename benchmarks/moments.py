"""Benchmark: what embedding a long video's segments (moments) costs, in GETs, bytes and
segments per second, streaming ``gs://`` from a GCS emulator behind a counting proxy.

Input: a ``--minutes`` long (default 20) 640x360 ``testsrc2`` MP4 at 25 fps, x264
``-preset ultrafast`` with a key frame every 2 s (``-g 50``), moov at the end, generated at
run time (about 30 s for 20 minutes on two cores), cut into ``SEGMENT_SECONDS`` (10 s)
windows by ``segment_windows`` over the duration the segments chunker reads from the
header: 120 segments for 20 minutes. A tiny random V-JEPA2 (hidden 1024, one layer, 64 px
crop) stands in for the model, with ``NUM_FRAMES`` 64. Rows, each on the same file:

- ``udf``: ``VideoEmbedding``'s batch call on the segment rows (URL, ``start_s``,
  ``end_s``), as Geneva's applier makes it, ``--batch-rows`` rows a call (default 120:
  one call). The pipeline decodes ``SEGMENTS_PER_DECODE`` consecutive rows of the video
  together. Its segments/s is the end-to-end rate;
- ``decode only``: the UDF's decode stage alone on the same groups of
  ``SEGMENTS_PER_DECODE`` segments, on all its engines at once (``DecodeEngines``, one
  thread per CPU), frames shrunk to the model's crop as the UDF does;
- ``naive``: ``decode_segments`` once per segment, one after another, without shrink: what
  one segment per decode would read (its GETs and bytes are the point, not its speed);
- ``whole video``: ``decode_frames``, 64 frames over the whole video, for reference.

Seconds are on loopback, where a GET costs well under a millisecond; against real GCS each
GET adds tens of milliseconds, so the GET counts say more than the seconds.

    uv run python benchmarks/moments.py [--minutes 20] [--out bench_results/moments.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before gcsfs import: avoids stalls

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
from bench import make_checkpoint  # noqa: E402
from gcs_emulator import CountingProxy, GcsEmulator, gcsfs_at  # noqa: E402
from read_strategy import LONG_FPS, LONG_SIZE, encode_long, key_frames  # noqa: E402

import video_embeddings_udf as vu  # noqa: E402
from video_embeddings.decode import decode_frames, decode_segments  # noqa: E402
from video_embeddings.frames import Segment  # noqa: E402
from video_embeddings.pipeline import SEGMENTS_PER_DECODE, Runtime  # noqa: E402
from video_embeddings.preprocess import shrink  # noqa: E402
from video_embeddings.rows import matrices  # noqa: E402
from video_embeddings.segments import Segmenter, segment_windows  # noqa: E402
from video_embeddings.settings import SEGMENT_SECONDS, Settings  # noqa: E402

BUCKET = "bench"
NUM_FRAMES = 64
GOP_ARGS = ["-g", str(2 * LONG_FPS)]  # a key frame every 2 s, what streaming encoders use
MiB = 2**20


def describe_machine() -> dict[str, Any]:
    import torchcodec
    import transformers

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchcodec": torchcodec.__version__,
        "transformers": transformers.__version__,
    }


def measure(
    proxy: CountingProxy,
    name: str,
    size: int,
    segments: int,
    decodes: int,
    action: Callable[[], Any],
) -> dict[str, Any]:
    """Run ``action`` and count the media GETs and bytes of object ``name`` it caused."""
    proxy.reset()
    t0 = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    reqs = [r for r in proxy.snapshot() if f"/o/{quote(name, safe='')}" in r.path]
    gets = [r for r in reqs if r.is_media_get]
    read = sum(r.bytes_out for r in gets)
    return {
        "segments": segments, "decodes": decodes, "gets": len(gets),
        "gets_per_segment": len(gets) / segments, "other_requests": len(reqs) - len(gets),
        "bytes_read": read, "read_mib": read / MiB, "bytes_ratio": read / size,
        "largest_get": max((r.bytes_out for r in gets), default=0), "seconds": seconds,
        "segments_per_s": segments / seconds, "ranges": [r.range for r in gets],
    }  # fmt: skip


def groups(segments: list[Segment]) -> list[list[Segment]]:
    """The segments as the pipeline groups one video's consecutive rows per decode."""
    step = SEGMENTS_PER_DECODE
    return [segments[i : i + step] for i in range(0, len(segments), step)]


def udf_batches(udf: Any, uri: str, segments: list[Segment], batch_rows: int) -> int:
    """``VideoEmbedding``'s batch call on the segment rows, ``batch_rows`` a call, as
    Geneva's applier makes it; the rows that got the zero tensor (could not be embedded)."""
    zero_rows = 0
    for i in range(0, len(segments), batch_rows):
        rows = segments[i : i + batch_rows]
        uris = pa.array([uri] * len(rows), pa.string())
        starts = pa.array([s for s, _ in rows], pa.float64())
        ends = pa.array([e for _, e in rows], pa.float64())
        out = udf(uris, starts, ends)
        assert len(out) == len(rows)
        zero_rows += sum(not m.any() for m in matrices(out))
    return zero_rows


def decode_only(uri: str, segments: list[Segment], settings: Settings, rt: Runtime) -> None:
    """The UDF's decode stage alone: each group of segments on the engine lent, all
    engines at once, frames shrunk to the model's input, no row deadline."""
    on_device = functools.partial(shrink, p=rt.model.preprocessing, device=rt.model.device)

    def one(group: list[Segment]) -> None:
        clips = rt.engines.decode(uri, group, settings, on_device, deadline=math.inf)
        assert len(clips) == len(group)

    with ThreadPoolExecutor(rt.engines.size) as pool:
        list(pool.map(one, groups(segments)))


def naive(uri: str, segments: list[Segment]) -> None:
    """One ``decode_segments`` per segment, one after another, frames at full size."""
    for segment in segments:
        decode_segments(uri, [segment], num_frames=NUM_FRAMES)


_COLUMNS = [  # (header, result key, format)
    ("measure", "measure", "<12"),
    ("segs", "segments", ">4"),
    ("decodes", "decodes", ">7"),
    ("GETs", "gets", ">5"),
    ("GETs/seg", "gets_per_segment", ">8.2f"),
    ("largest GET", "largest_get", ">11"),
    ("read MiB", "read_mib", ">8.1f"),
    ("read/file", "bytes_ratio", ">9.3f"),
    ("seconds", "seconds", ">8.2f"),
    ("segs/s", "segments_per_s", ">7.2f"),
]


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per result; a column's number format comes from ``_COLUMNS``."""
    print(" ".join(format(h, f[:1] + f[1:].split(".")[0].rstrip("f")) for h, _, f in _COLUMNS))
    for r in results:
        print(" ".join(format(r[k], f) for _, k, f in _COLUMNS))


def run(minutes: float, batch_rows: int) -> dict[str, Any]:
    seconds = round(minutes * 60)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / f"testsrc2_{LONG_SIZE}_{seconds}s_gop2s.mp4"
        t0 = time.perf_counter()
        encode_long(path, seconds, GOP_ARGS)
        size = path.stat().st_size
        file = {
            "name": path.name, "bytes": size, "mib": size / MiB, "seconds": seconds,
            "key_frames": key_frames(path), "encode_seconds": time.perf_counter() - t0,
        }  # fmt: skip
        settings = Settings(
            model=str(make_checkpoint("tiny", tmp / "model")), num_frames=NUM_FRAMES
        )
        udf = vu.VideoEmbedding(settings).func  # type: ignore[attr-defined]
        rt: Runtime = udf._ready()
        uri = f"gs://{BUCKET}/{path.name}"
        with (
            GcsEmulator() as emu,
            CountingProxy(emu.endpoint) as proxy,
            gcsfs_at(proxy.endpoint),
        ):
            emu.upload(BUCKET, path.name, path.read_bytes())
            duration = Segmenter(settings, SEGMENT_SECONDS, SEGMENT_SECONDS).duration(uri)
            segments = segment_windows(duration, SEGMENT_SECONDS, SEGMENT_SECONDS)
            udf_batches(udf, uri, segments[:1], 1)  # warm-up: the model's first call
            n, batches = len(segments), math.ceil(len(segments) / SEGMENTS_PER_DECODE)
            zero_rows = 0

            def embed_all() -> None:
                nonlocal zero_rows
                zero_rows = udf_batches(udf, uri, segments, batch_rows)

            results = [
                {"measure": "udf", **measure(proxy, path.name, size, n, batches, embed_all)},
                {
                    "measure": "decode only",
                    **measure(
                        proxy, path.name, size, n, batches,
                        lambda: decode_only(uri, segments, settings, rt),
                    ),
                },
                {
                    "measure": "naive",
                    **measure(proxy, path.name, size, n, n, lambda: naive(uri, segments)),
                },
                {
                    "measure": "whole video",
                    **measure(
                        proxy, path.name, size, 1, 1,
                        lambda: decode_frames(uri, num_frames=NUM_FRAMES),
                    ),
                },
            ]  # fmt: skip
    print(
        f"{minutes:g}-minute {LONG_SIZE} testsrc2 MP4 at {LONG_FPS} fps, {size / MiB:.1f} MiB, "
        f"{file['key_frames']} key frames; {n} segments of {SEGMENT_SECONDS:g} s "
        f"(duration {duration:g} s), {NUM_FRAMES} frames each, {SEGMENTS_PER_DECODE} per "
        f"decode; UDF calls of {batch_rows} rows; {rt.engines.size} decode threads"
    )
    print_table(results)
    e2e_over_decode = results[0]["segments_per_s"] / results[1]["segments_per_s"]
    print(f"end to end / decode only: {e2e_over_decode:.2f}")
    if zero_rows:
        print(f"WARNING: {zero_rows} of {n} segment rows got the zero tensor")
    return {
        **describe_machine(), "minutes": minutes, "file": file, "duration": duration,
        "segment_seconds": SEGMENT_SECONDS, "num_frames": NUM_FRAMES,
        "segments_per_decode": SEGMENTS_PER_DECODE, "batch_rows": batch_rows,
        "decode_threads": {"cpu": rt.engines.cpu, "nvdec": rt.engines.nvdec},
        "block_size": settings.block_size, "zero_rows": zero_rows,
        "decode_only_shrinks": True, "naive_shrinks": False,
        "e2e_over_decode_only": e2e_over_decode,
        "results": results,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/moments.json"))
    parser.add_argument("--minutes", type=float, default=20.0, help="the video's length")
    parser.add_argument("--batch-rows", type=int, default=120, help="rows per UDF call")
    args = parser.parse_args(argv)
    for name in ("video_embeddings_udf", "video_embeddings"):  # keep model-load lines out
        logging.getLogger(name).setLevel(logging.ERROR)
    out = run(args.minutes, args.batch_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
