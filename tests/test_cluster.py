"""Backfills on a real multi-node Ray cluster on this machine, ``video-embeddings index
--cluster`` among them, and what losing a node or the driver costs.

The cluster (tests/ray_cluster.py) is a head and two worker nodes, separate raylets that
each advertise one GPU they do not have. The UDF keeps its ``num_gpus=1``, so Ray must
place its appliers on those two nodes, where it runs on the CPU after its one warning,
which names the Ray node. The nodes run a Python with the locked third-party packages and
without the project (``zip_only``), as a KubeRay cluster built from the manifest does: the
zip the manifest ships is the only way their workers get ``video_embeddings_udf`` and the
``video_embeddings`` package. Geneva connects the way a user connects to a cluster that
is already running: the definition ``upload_manifest.existing_cluster`` builds, the
manifest ``upload_manifest.py --preinstalled`` defines, and ``conn.context(cluster=,
manifest=)`` in a driver process of its own (tests/cluster_driver.py, or the command).

The videos are read from gs:// through a GCS emulator with a fault proxy in front: every
download of an object is a row the UDF computed, so counting them at the proxy counts the
UDF's calls. A stall aimed at one object holds a backfill at that row, so the tests know
which rows were checkpointed when they kill a node or the driver.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, unquote_plus

import geneva
import numpy as np
import pyarrow as pa
import pytest
from conftest import embed_fn, make_index_clip
from gcs_emulator import FaultProxy, GcsEmulator, gcsfs_at
from ray_cluster import LoopbackCluster, alive

import upload_manifest
from video_embeddings_udf import (
    EMBEDDING_DIM,
    Settings,
    VideoEmbedding,
    aggregate_mean,
    embedding_column,
    matrices,
)

pytestmark = pytest.mark.slow  # a Ray cluster of three nodes

BUCKET = "videos"
CLIPS = ["bikes.mp4", "scene_cuts.mp4", "h265_video.mp4", "av1_video.mkv", "carphone_distorted.mp4"]
MISSING = "bad/missing.mp4"  # never uploaded
NOT_A_VIDEO = "bad/not a video.mp4"
AUDIO = "bad/audio only.wav"
BAD = [MISSING, NOT_A_VIDEO, AUDIO]
NAMES = [f"clips/{c}" for c in CLIPS] + BAD
"""The objects of the table ``videos``."""
ROWS_PER_RUN = 8
"""Rows of the tables the losing tests backfill; the stall holds the job at STALLED_ROW."""
STALLED_ROW = 4
CLUSTER = "loopback"
MANIFEST = "preinstalled"
EMPTY_MANIFEST = "empty-zip"
"""A preinstalled manifest whose zip holds nothing of the project."""
CPU_WARNING = "no CUDA device"
DRIVER_TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("video-embeddings"))
PROJECT_MODULES = ["video_embeddings_udf", "video_embeddings", "video_embeddings_table"]
"""What a node must not import but from the manifest's zip (the first two are the zip)."""
NODE_PACKAGES = ["geneva", "torch", "torchcodec"]
"""What the nodes must import: the locked packages a preinstalled manifest relies on."""
IMPORT_CHECK = """
import importlib, sys
for name in sys.argv[1].split(","):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        print("missing" if e.name == name else f"broken ({e.name})", name)
    else:
        print("found", name)
"""


def url(name: str) -> str:
    return f"gs://{BUCKET}/{name}"


def losing_names(prefix: str) -> list[str]:
    return [f"{prefix}/clip-{i:02d}.mp4" for i in range(ROWS_PER_RUN)]


@pytest.fixture(scope="module")
def gcs(shared_videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultProxy]:
    """The emulator with the shared clips, two bad inputs and, for each losing test, 8
    index clips of different lengths (so every row's embedding differs); a fault proxy
    in front that injects nothing until a test says so, and gcsfs pointed at the proxy."""
    clips = tmp_path_factory.mktemp("index-clips")
    with (
        GcsEmulator() as emulator,
        FaultProxy(emulator.endpoint, stall_s=120) as proxy,
        gcsfs_at(proxy.endpoint),
    ):
        for name in CLIPS:
            emulator.upload(BUCKET, f"clips/{name}", (shared_videos / name).read_bytes())
        emulator.upload(BUCKET, AUDIO, (shared_videos / "sine_mono_s16.wav").read_bytes())
        emulator.upload(BUCKET, NOT_A_VIDEO, b"this is not a video\n" * 50)
        for prefix in ("node", "driver"):
            for i, name in enumerate(losing_names(prefix)):
                clip = make_index_clip(
                    clips / f"{prefix}-{i}.mp4", 20 + i + 10 * (prefix == "node")
                )
                emulator.upload(BUCKET, name, clip.read_bytes())
        yield proxy


@pytest.fixture(scope="module")
def cluster(gcs: FaultProxy) -> Iterator[LoopbackCluster]:
    """Head plus nodes gpu-a and gpu-b (2 CPUs and 1 advertised GPU each), all running a
    Python without the project, whose workers read gs:// from the proxy, as nodes set up
    by their administrator would."""
    storage = {
        "STORAGE_EMULATOR_HOST": gcs.endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
    }
    with (
        tempfile.TemporaryDirectory(prefix="ray-") as root,  # short: Ray's sockets live there
        LoopbackCluster(Path(root), storage, zip_only=True) as ray_cluster,
    ):
        ray_cluster.add_nodes("gpu-a", "gpu-b", num_cpus=2, num_gpus=1)
        yield ray_cluster
        assert ray_cluster.processes()  # the cluster was still running, until stop()
    assert not ray_cluster.processes()


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, cluster: LoopbackCluster) -> dict[str, str]:
    """The environment of every command: the cluster's, and the UDF's settings."""
    return {**cluster.env, "VJEPA_MODEL": str(tiny_model_dir), "NUM_FRAMES": "16"}


@pytest.fixture(scope="module")
def udf_settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def db(
    tmp_path_factory: pytest.TempPathFactory, cluster: LoopbackCluster, env: dict[str, str]
) -> Path:
    """A Geneva database set up as a user sets one up for a running cluster: the table
    ``videos``, then ``upload_manifest.py --preinstalled`` (the manifest, and the column
    with the settings of ``env``), then the cluster's definition."""
    path = tmp_path_factory.mktemp("db")
    conn = geneva.connect(str(path))
    conn.create_table("videos", pa.table({"video_uri": [url(n) for n in NAMES]}))
    command = [sys.executable, str(REPO / "upload_manifest.py"), "--bucket", str(path)]
    command += ["--preinstalled", "--manifest-name", MANIFEST]
    done = subprocess.run(
        command, env={**env, "GENEVA_TABLE_NAME": "videos"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "installs nothing" in done.stdout
    conn.define_cluster(CLUSTER, upload_manifest.existing_cluster(CLUSTER, cluster.address))
    return path


def table_with_column(db: Path, name: str, names: list[str], settings: Settings) -> None:
    """Another table of the database, with the same column."""
    tbl = geneva.connect(str(db)).create_table(
        name, pa.table({"video_uri": [url(n) for n in names]})
    )
    tbl.add_columns(embedding_column(settings))


def start_driver(
    db: Path, table: str, env: dict[str, str], *, concurrency: int, manifest: str = MANIFEST
) -> subprocess.Popen[str]:
    command = [sys.executable, str(REPO / "tests" / "cluster_driver.py"), str(db), table]
    command += ["video_embedding", "--cluster", CLUSTER, "--manifest", manifest]
    command += ["--concurrency", str(concurrency)]
    # a lost client's job is cleaned up after this grace period (Ray's default: 30 s)
    env = {**env, "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "5"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(driver: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for the driver; its exit status and what it said of the backfill."""
    try:
        out, err = driver.communicate(timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.communicate()
        raise
    said = [line for line in (out + err).splitlines() if line.startswith("backfill ")]
    return driver.returncode, said[-1] if said else err[-2000:]


def downloads(proxy: FaultProxy) -> Counter[str]:
    """Completed downloads per object name: one per row the UDF computed."""
    return Counter(
        unquote_plus(r.path.split("/o/")[1].split("?")[0])
        for r in proxy.snapshot()
        if r.is_media_get and r.status in (200, 206)
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def applier_logs(cluster: LoopbackCluster) -> dict[str, set[Path]]:
    """Per node, the logs of the worker processes that hold the UDF's CPU warning: one
    per applier that loaded the model there."""
    return cluster.worker_logs_with(CPU_WARNING)


def new_appliers(cluster: LoopbackCluster, before: dict[str, set[Path]]) -> dict[str, set[Path]]:
    """The applier logs per node that were not there ``before``."""
    return {name: logs - before[name] for name, logs in applier_logs(cluster).items()}


def pid_of(log: Path) -> int:
    """A worker's pid, which ends its log's name: ``worker-<id>-<job>-<pid>.err``."""
    return int(log.stem.rsplit("-", 1)[1])


def stored(db: Path, table: str) -> dict[str, np.ndarray]:
    rows = geneva.connect(str(db)).open_table(table).to_arrow().to_pylist()
    assert len(rows) == len({r["video_uri"] for r in rows})  # no row twice
    return {r["video_uri"]: np.array(r["video_embedding"], np.float32) for r in rows}


def test_the_nodes_cannot_import_the_project(cluster: LoopbackCluster) -> None:
    """The nodes' Python, run as the nodes run (in the cluster's folder, with the nodes'
    environment), imports the locked packages and none of the project's modules; and each
    raylet starts its workers with that Python."""
    names = ",".join(PROJECT_MODULES + NODE_PACKAGES)
    done = subprocess.run(
        [str(cluster.python), "-c", IMPORT_CHECK, names],
        cwd=cluster.root,
        env=cluster.node_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    expected = [f"missing {n}" for n in PROJECT_MODULES] + [f"found {n}" for n in NODE_PACKAGES]
    assert done.stdout.splitlines() == expected
    assert cluster.python != Path(sys.executable)
    for node in cluster.nodes.values():
        raylet = Path(f"/proc/{node.raylet_pid()}/cmdline").read_bytes().split(b"\0")
        worker = next(a for a in raylet if a.startswith(b"--python_worker_command="))
        assert worker.split(b"=", 1)[1].split()[0] == str(cluster.python).encode()


def test_without_the_zip_the_cluster_cannot_unpickle_the_udf(
    db: Path, env: dict[str, str], udf_settings: Settings, tmp_path: Path
) -> None:
    """A backfill through a manifest like the others' whose zip holds a placeholder and
    none of the project fails on the cluster: Geneva's job driver cannot unpickle
    ``VideoEmbedding``. So what the other tests' nodes run of the project comes from
    the zip."""
    table_with_column(db, "no_zip", ["clips/bikes.mp4"], udf_settings)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "empty"\nversion = "0"\n')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "placeholder.txt").write_text("not the project\n")
    manifest = upload_manifest.build_manifest(EMPTY_MANIFEST, preinstalled=True)
    with contextlib.chdir(tmp_path / "src"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        geneva.connect(str(db)).define_manifest(EMPTY_MANIFEST, manifest)

    code, said = finish(start_driver(db, "no_zip", env, concurrency=1, manifest=EMPTY_MANIFEST))
    assert code == 1
    assert "Failed to unmarshal UDF for column 'video_embedding'" in said


def test_backfill_runs_on_the_gpu_nodes_and_matches_the_in_process_result(
    cluster: LoopbackCluster, gcs: FaultProxy, db: Path, env: dict[str, str], udf_settings: Settings
) -> None:
    """A backfill with two appliers over the shared clips and three bad inputs: Ray places
    one applier on each node that advertises a GPU and none on the head; each logs the
    CPU warning naming its own node. Every row equals a direct in-process call of the
    UDF (zeros for the bad inputs) and every object is downloaded once."""
    fn = embed_fn(udf_settings)
    expected = {url(n): np.stack(fn(url(n))) for n in NAMES}
    before = applier_logs(cluster)
    gcs.reset()

    started = time.monotonic()
    code, said = finish(start_driver(db, "videos", env, concurrency=2))
    seconds = time.monotonic() - started
    assert code == 0, said

    ran = new_appliers(cluster, before)
    assert {name: len(logs) for name, logs in ran.items()} == {"head": 0, "gpu-a": 1, "gpu-b": 1}
    for name in ("gpu-a", "gpu-b"):
        log = next(iter(ran[name])).read_text()
        assert f"{CPU_WARNING} on Ray node {cluster.nodes[name].node_id}" in log
    result = stored(db, "videos")
    assert result.keys() == expected.keys()
    for uri, rows in expected.items():
        np.testing.assert_array_equal(result[uri], rows)
    for bad in BAD:
        assert not result[url(bad)].any()
    assert downloads(gcs) == Counter({n: 1 for n in NAMES if n != MISSING})
    print(f"\ncluster backfill, 2 appliers: {len(NAMES)} rows in {seconds:.1f} s, driver included")


def test_index_command_with_cluster_fills_both_columns_on_the_gpu_nodes(
    cluster: LoopbackCluster, gcs: FaultProxy, db: Path, env: dict[str, str], udf_settings: Settings
) -> None:
    """``video-embeddings index gs://videos/clips/ --cluster --manifest`` into a new table
    of the database the manifest was defined in: the command creates the table, and both
    backfills, the embeddings and their mean vectors, run on the zip-only nodes. Every
    row equals the in-process result and its mean is ``aggregate_mean`` of it; each clip
    is downloaded once; the appliers ran on the GPU nodes, none on the head."""
    names = [f"clips/{c}" for c in CLIPS]
    fn = embed_fn(udf_settings)
    expected = {url(n): np.stack(fn(url(n))) for n in names}
    before = applier_logs(cluster)
    gcs.reset()

    command = [CLI, "index", url("clips/"), "--db", str(db), "--table", "cli"]
    command += ["--cluster", CLUSTER, "--manifest", MANIFEST, "--json"]
    started = time.monotonic()
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads(done.stdout)
    assert (summary["found"], summary["added"], summary["embedded"]) == (5, 5, 5)
    assert (summary["bad_videos"], summary["object_faults"], summary["rows"]) == ({}, {}, 5)
    ran = new_appliers(cluster, before)
    assert not ran["head"]
    assert ran["gpu-a"] or ran["gpu-b"]
    for name in ("gpu-a", "gpu-b"):
        for log in ran[name]:
            assert f"{CPU_WARNING} on Ray node {cluster.nodes[name].node_id}" in log.read_text()
    rows = geneva.connect(str(db)).open_table("cli").to_arrow().to_pylist()
    assert sorted(r["video_uri"] for r in rows) == sorted(expected)
    for row in rows:
        embedding = np.array(row["video_embedding"], np.float32)
        assert embedding.shape == (16, EMBEDDING_DIM)
        np.testing.assert_array_equal(embedding, expected[row["video_uri"]])
        mean = np.array(row["video_embedding_mean"], np.float32)
        np.testing.assert_array_equal(mean, aggregate_mean(embedding))
    assert downloads(gcs) == Counter({n: 1 for n in names})
    print(f"\nindex --cluster: {len(names)} rows, both columns, in {seconds:.1f} s")


def test_index_with_segments_on_the_cluster_embeds_each_segment_on_the_gpu_nodes(
    cluster: LoopbackCluster, gcs: FaultProxy, db: Path, env: dict[str, str], udf_settings: Settings
) -> None:
    """``index --segment-seconds 5 --cluster``: the segments view is created, refreshed
    (its chunker reads each clip's duration on the cluster) and backfilled on the
    zip-only GPU nodes. The clips of 10, 10, 1, 5 and 4 s give 2, 2, 1, 1 and 1 segments,
    and each segment's rows equal the in-process UDF's for that segment."""
    before = applier_logs(cluster)
    command = [CLI, "index", url("clips/"), "--db", str(db), "--table", "moments"]
    command += ["--segment-seconds", "5", "--cluster", CLUSTER, "--manifest", MANIFEST]
    done = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    segments = json.loads(done.stdout)["segments"]
    assert (segments["segments"], segments["added"], segments["bad_segments"]) == (7, 7, 0)
    assert (segments["object_faults"], segments["videos_without_segments"]) == (0, [])
    ran = new_appliers(cluster, before)
    assert not ran["head"]
    assert ran["gpu-a"] or ran["gpu-b"]

    rows = geneva.connect(str(db)).open_table("moments_segments").to_arrow().to_pylist()
    spans = {(r["video_uri"], r["start_s"], r["end_s"]) for r in rows}
    assert {(uri.rsplit("/", 1)[1], start, round(end, 2)) for uri, start, end in spans} == {
        ("bikes.mp4", 0.0, 5.0),
        ("bikes.mp4", 5.0, 10.0),
        ("scene_cuts.mp4", 0.0, 5.0),
        ("scene_cuts.mp4", 5.0, 10.0),
        ("h265_video.mp4", 0.0, 1.0),
        ("av1_video.mkv", 0.0, 5.0),
        ("carphone_distorted.mp4", 0.0, 4.0),
    }
    udf = VideoEmbedding(udf_settings).func  # type: ignore[attr-defined]
    expected = matrices(
        udf(
            pa.array([r["video_uri"] for r in rows]),
            pa.array([r["start_s"] for r in rows], pa.float64()),
            pa.array([r["end_s"] for r in rows], pa.float64()),
        )
    )
    for row, want in zip(rows, expected, strict=True):
        got = np.array(row["video_embedding"], np.float32)
        assert got.shape == (16, EMBEDDING_DIM)
        np.testing.assert_array_equal(got, want)


def run_until_stalled(
    db: Path, table: str, names: list[str], gcs: FaultProxy, env: dict[str, str]
) -> subprocess.Popen[str]:
    """Start a one-applier backfill over ``names`` with every read from STALLED_ROW's
    object on stalled; return its driver once that read has begun and the rows before
    it, and only those, are checkpointed."""
    gcs.reset()
    gcs.outage_from(quote(names[STALLED_ROW], safe=""), "stall")
    driver = start_driver(db, table, env, concurrency=1)
    wait_until(lambda: gcs.requests_for(names[STALLED_ROW]) > 0, "the stalled read")
    wait_until(lambda: len(checkpointed(db, table)) >= STALLED_ROW, "the rows before it")
    assert checkpointed(db, table) == [(row, row + 1) for row in range(STALLED_ROW)]
    return driver


def checkpointed(db: Path, table: str) -> list[tuple[int, int]]:
    """The row ranges Geneva has checkpointed, from the names of the files it writes to
    the table's checkpoint folder (``..._range-<start>-<end>.lance`` in geneva 0.17).
    Geneva writes them on a thread of their own, so the read of the next row can begin
    before the last checkpoint is stored."""
    folder = db / f"{table}.lance" / "_ckp"
    names = [p.name for p in folder.glob("*.lance")] if folder.is_dir() else []
    found = (re.search(r"_range-(\d+)-(\d+)\.lance$", name) for name in names)
    return sorted((int(m[1]), int(m[2])) for m in found if m)


def assert_every_row_once_and_right(
    db: Path, table: str, names: list[str], gcs: FaultProxy, udf_settings: Settings
) -> None:
    """Every row is stored once with exactly the in-process result, and each object was
    downloaded once over all the runs: no row that was checkpointed before the loss was
    computed again, and no row twice."""
    assert downloads(gcs) == Counter({n: 1 for n in names})
    fn = embed_fn(udf_settings)
    result = stored(db, table)
    assert result.keys() == {url(n) for n in names}
    for name in names:
        np.testing.assert_array_equal(result[url(name)], np.stack(fn(url(name))))


def test_losing_the_worker_node_mid_backfill_loses_and_repeats_no_row(
    cluster: LoopbackCluster, gcs: FaultProxy, db: Path, env: dict[str, str], udf_settings: Settings
) -> None:
    """With rows 0-3 checkpointed and row 4's read stalled, the raylet of the node that
    runs the one applier is killed. The job finishes on the other GPU node (Ray starts
    the applier again there), or fails with a clear error and a rerun completes the
    column. No row is lost, stored twice or wrong, and rows 0-3 are not computed again."""
    names = losing_names("node")
    table_with_column(db, "node_loss", names, udf_settings)
    before = applier_logs(cluster)
    driver = run_until_stalled(db, "node_loss", names, gcs, env)
    assert downloads(gcs) == Counter({n: 1 for n in names[:STALLED_ROW]})
    (lost,) = (name for name, logs in new_appliers(cluster, before).items() if logs)
    cluster.kill_raylet(cluster.nodes[lost])
    gcs.outage = None

    code, said = finish(driver)
    print(f"\nafter losing node {lost}, the driver exited {code}: {said}")
    if code == 0:
        (other,) = {"gpu-a", "gpu-b"} - {lost}
        assert new_appliers(cluster, before)[other]
    else:
        assert said.startswith("backfill failed: ")
        code, said = finish(start_driver(db, "node_loss", env, concurrency=1))
        assert code == 0, said
    assert_every_row_once_and_right(db, "node_loss", names, gcs, udf_settings)


def test_losing_the_driver_between_checkpoints_loses_and_repeats_no_row(
    cluster: LoopbackCluster, gcs: FaultProxy, db: Path, env: dict[str, str], udf_settings: Settings
) -> None:
    """With rows 0-3 checkpointed and row 4's read stalled, the driver process is killed.
    The cluster drops its job once the client's grace period is over (the applier
    exits); a new driver then reruns the backfill. No row is lost, stored twice or wrong,
    and rows 0-3 are not computed again."""
    names = losing_names("driver")
    table_with_column(db, "driver_loss", names, udf_settings)
    before = applier_logs(cluster)
    driver = run_until_stalled(db, "driver_loss", names, gcs, env)
    assert downloads(gcs) == Counter({n: 1 for n in names[:STALLED_ROW]})
    (log,) = set().union(*new_appliers(cluster, before).values())
    driver.kill()
    driver.wait()
    wait_until(lambda: not alive(pid_of(log)), "the cluster to drop the lost driver's job")
    gcs.outage = None

    code, said = finish(start_driver(db, "driver_loss", env, concurrency=1))
    assert code == 0, said
    assert_every_row_once_and_right(db, "driver_loss", names, gcs, udf_settings)
