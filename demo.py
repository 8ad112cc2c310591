"""The main job on one machine: embed videos into a local LanceDB table through a Geneva
backfill on local Ray, then search the table with each video's own embedding.

    uv run python demo.py [SOURCE ...] [--db DIR]

A SOURCE is a folder, a glob or an fsspec URL prefix (``gs://bucket/videos/``). With none,
a few small clips are generated with FFmpeg.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path

import fsspec
import numpy as np

import video_embeddings_udf as vu

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
GENERATED = {
    "testsrc.mp4": "testsrc=size=320x240:rate=25",
    "mandelbrot.mp4": "mandelbrot=size=320x240:rate=25",
    "life.mp4": "life=size=320x240:rate=25:mold=10:ratio=0.1",
    "smptebars.mp4": "smptehdbars=size=320x240:rate=25",
}


def find_videos(sources: list[str]) -> list[str]:
    """Every file with a video extension under each folder, glob or URL prefix."""
    found: list[str] = []
    for source in sources:
        if "://" not in source:
            source = str(Path(source).resolve())  # print local paths without "..": clearer
        fs, path = fsspec.core.url_to_fs(source)
        if fs.isdir(path):
            paths = fs.find(path)
        else:
            paths = fs.glob(path) if any(c in path for c in "*?[") else [path]
        found += sorted(
            fs.unstrip_protocol(p) for p in paths if p.lower().endswith(VIDEO_EXTENSIONS)
        )
    return [p.removeprefix("file://") for p in found]


def generate_clips(folder: Path) -> list[str]:
    """A few 4-second synthetic clips, so the job runs with nothing but FFmpeg."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in GENERATED.items():
        if not (folder / name).exists():
            subprocess.run(
                [
                    "ffmpeg",
                    "-v",
                    "error",
                    "-y",
                    "-f",
                    "lavfi",
                    "-i",
                    source,
                    "-t",
                    "4",
                    "-pix_fmt",
                    "yuv420p",
                    str(folder / name),
                ],
                check=True,
            )
    return [str((folder / name).resolve()) for name in GENERATED]


def run(uris: list[str], *, db_path: str, table: str, settings: vu.Settings) -> list[list[str]]:
    """Create the table, add the embedding column, backfill it, and return, for each
    video, the URLs that searching with its own embedding ranks first."""
    import geneva
    import pyarrow as pa
    import torch

    db = geneva.connect(db_path)
    tbl = db.create_table(table, pa.table({settings.video_uri_col: uris}), mode="overwrite")
    tbl.add_columns(vu.embedding_column(settings))
    tbl.backfill(settings.embedding_col, num_gpus=1 if torch.cuda.is_available() else 0)
    rows = tbl.to_arrow().to_pylist()
    results = []
    for row in rows:
        hits = tbl.search(np.array(row[settings.embedding_col])).limit(3).to_pandas()
        results.append([row[settings.video_uri_col], *hits[settings.video_uri_col]])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", help="folders, globs or URL prefixes of videos")
    parser.add_argument("--db", default="demo-db", help="LanceDB directory (default: demo-db)")
    parser.add_argument("--table", default="videos", help="table name (default: videos)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    uris = find_videos(args.sources) if args.sources else generate_clips(Path("demo-clips"))
    if not uris:
        parser.error(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {args.sources}")
    results = run(uris, db_path=args.db, table=args.table, settings=vu.Settings.from_env())
    print(f"\nembedded {len(uris)} videos into {args.db}/{args.table}; nearest by own embedding:")
    for query, *hits in results:
        print(f"  {query}\n    -> " + "\n       ".join(hits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
