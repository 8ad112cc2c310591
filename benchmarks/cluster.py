"""Benchmark: backfill throughput on a real multi-node Ray cluster, with one applier and
with two. One run, one machine.

Why: a cluster user adds GPUs to go faster; this shows what a second applier gives when
Geneva drives the backfill through the Ray client, the way it drives a real cluster. The
cluster is the tests' (tests/ray_cluster.py): a head and two worker nodes on loopback,
each advertising one GPU, so the UDF's ``num_gpus=1`` puts one applier on each. Without
a GPU both run on the CPU and share this machine's cores, so the ratio says what the
cluster plumbing costs and overlaps, not what two GPUs would give.

Each backfill is timed from its call to its commit, after the driver has connected: the
appliers' start (loading the model) is included. The table holds ``--videos`` rows,
cycling through the shared sample clips.

    uv run python benchmarks/cluster.py [--videos 40] [--frames 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
from ray_cluster import LoopbackCluster  # noqa: E402

SHARED_VIDEOS = REPO.parent / "shared" / "videos"
SHARED_CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "scene_cuts.mp4", "nasa_13013.mp4"]
CPU_WARNING = "no CUDA device"
"""What the UDF logs, once per applier, where it finds no GPU: which nodes ran appliers."""
ROWS_PER_TASK = 4
"""Rows per Geneva task and per UDF call, so that the rows spread over both appliers."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=40, help="rows per backfill")
    parser.add_argument("--frames", type=int, default=16, help="NUM_FRAMES")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    with (
        tempfile.TemporaryDirectory(prefix="ray-") as root,  # short: Ray's sockets live there
        tempfile.TemporaryDirectory() as work,
    ):
        cluster = LoopbackCluster(Path(root))
        # Ray reads its authentication mode when it is imported, so this comes first.
        os.environ.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        with cluster:
            cluster.add_nodes("gpu-a", "gpu-b", num_cpus=2, num_gpus=1)
            result = run(cluster, Path(work), args.videos, args.frames)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {f'{value:.3g}' if isinstance(value, float) else value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run(cluster: LoopbackCluster, work: Path, videos: int, frames: int) -> dict[str, Any]:
    import geneva
    import pyarrow as pa
    from bench import describe_machine, make_checkpoint

    import upload_manifest
    from video_embeddings.settings import Settings
    from video_embeddings_udf import embedding_column

    for name in ("video_embeddings_udf", "video_embeddings"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = Settings(model=str(make_checkpoint("tiny", work / "model")), num_frames=frames)
    uris = [str(SHARED_VIDEOS / SHARED_CLIPS[i % len(SHARED_CLIPS)]) for i in range(videos)]
    db = geneva.connect(str(work / "db"))
    for appliers in (1, 2):
        tbl = db.create_table(f"appliers_{appliers}", pa.table({"video_uri": uris}))
        tbl.add_columns(embedding_column(settings))
    upload_manifest.define_manifest(db, upload_manifest.build_manifest("bench", preinstalled=True))
    db.define_cluster("bench", upload_manifest.existing_cluster("bench", cluster.address))

    result: dict[str, Any] = {**describe_machine(), "videos": videos, "frames": frames}
    with db.context(cluster="bench", manifest="bench"):
        for appliers in (1, 2):
            tbl = db.open_table(f"appliers_{appliers}")
            before = cluster.worker_logs_with(CPU_WARNING)
            start = time.perf_counter()
            tbl.backfill(
                "video_embedding",
                concurrency=appliers,
                task_size=ROWS_PER_TASK,
                checkpoint_size=ROWS_PER_TASK,
            )
            result[f"videos/s, {appliers} applier(s)"] = videos / (time.perf_counter() - start)
            after = cluster.worker_logs_with(CPU_WARNING)
            used = sorted(name for name, logs in after.items() if logs - before[name])
            result[f"nodes used, {appliers} applier(s)"] = ", ".join(used)
    result["2 appliers / 1"] = result["videos/s, 2 applier(s)"] / result["videos/s, 1 applier(s)"]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
