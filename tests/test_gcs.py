"""Streaming from gs:// through gcsfs, against a real GCS emulator on loopback, with a
counting proxy in front so the GETs and bytes of each video are measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import geneva
import numpy as np
import pyarrow as pa
import pytest
from conftest import embed_fn
from gcs_emulator import CountingProxy, GcsEmulator

import video_embeddings_udf as vu
from video_embeddings_udf import Settings, embedding_column

BUCKET = "videos"
CLIPS = [
    "bikes.mp4",
    "av1_video.mkv",
    "nasa_13013.mp4",
    "bigbuckbunny.mp4",
    "carphone_distorted.mp4",
]
ODD_NAME = "clips/my clip é #1.mp4"


@pytest.fixture(scope="module")
def gcs(shared_videos: Path) -> Iterator[CountingProxy]:
    """The emulator holding the shared clips under ``clips/``, a counting proxy in front,
    and gcsfs (here and in Ray workers, through the environment) pointed at the proxy."""
    with (
        GcsEmulator() as emulator,
        CountingProxy(emulator.endpoint) as proxy,
        pytest.MonkeyPatch.context() as patch,
    ):
        for name in CLIPS:
            emulator.upload(BUCKET, f"clips/{name}", (shared_videos / name).read_bytes())
        emulator.upload(BUCKET, ODD_NAME, (shared_videos / "bikes.mp4").read_bytes())
        patch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        patch.setenv("FSSPEC_GCS_TOKEN", "anon")  # read by fsspec in the Ray workers
        patch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        yield proxy


@pytest.mark.parametrize("name", CLIPS)
def test_stream_from_gcs_one_get_per_small_video(
    gcs: CountingProxy, settings: Settings, shared_videos: Path, name: str
) -> None:
    """A clip smaller than BLOCK_SIZE is read in exactly one GET of exactly its bytes, and
    embeds to the same rows as the local file."""
    fn = embed_fn(settings)
    local = np.stack(fn(str(shared_videos / name)))
    gcs.reset()
    remote = np.stack(fn(f"gs://{BUCKET}/clips/{name}"))
    np.testing.assert_array_equal(remote, local)
    assert gcs.gets() == 1
    assert gcs.bytes_out == (shared_videos / name).stat().st_size


def test_blocks_are_fetched_once_each(gcs: CountingProxy, shared_videos: Path) -> None:
    """With 256 KiB blocks, a 1 MB clip costs one GET per block and no byte twice, even
    though the probe and the frame seeks revisit the file."""
    size = (shared_videos / "bigbuckbunny.mp4").stat().st_size
    block = 256 * 1024
    gcs.reset()
    frames = vu.decode_frames(
        f"gs://{BUCKET}/clips/bigbuckbunny.mp4", num_frames=64, block_size=block
    )
    assert frames.shape == (64, 3, 720, 1280)
    assert gcs.gets() == -(-size // block)
    assert gcs.bytes_out == size


@pytest.mark.slow
def test_backfill_from_gcs_with_base_path(
    gcs: CountingProxy, settings: Settings, tmp_path: Path, local_ray: None
) -> None:
    """A Geneva backfill on local Ray, with the URL and embedding columns named by
    VIDEO_URI_COL and VIDEO_EMBEDDING_COL, reads bare names relative to
    VIDEO_BASE_PATH=gs://…, including a name with a space, non-ASCII and '#'; a missing
    object gets the zero tensor; every other row equals a direct call; and searching with
    a video's own matrix ranks that video first."""
    s = Settings(
        model=settings.model,
        num_frames=16,
        video_base_path=f"gs://{BUCKET}/clips",
        video_uri_col="path",
        embedding_col="emb",
    )
    names = ["bikes.mp4", "av1_video.mkv", ODD_NAME.removeprefix("clips/"), "missing.mp4"]
    db = geneva.connect(str(tmp_path / "db"))
    tbl = db.create_table("videos", pa.table({"path": names}))
    tbl.add_columns(embedding_column(s))
    tbl.backfill("emb", num_gpus=0)
    stored = {r["path"]: np.array(r["emb"]) for r in tbl.to_arrow().to_pylist()}
    assert sorted(stored) == sorted(names)
    direct = embed_fn(s)
    for name in names[:3]:
        assert stored[name].shape == (16, 1024)
        np.testing.assert_allclose(stored[name], np.stack(direct(name)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored[ODD_NAME.removeprefix("clips/")], stored["bikes.mp4"])
    np.testing.assert_array_equal(stored["missing.mp4"], np.zeros((1, 1024), np.float32))
    hits = tbl.search(stored["av1_video.mkv"]).limit(10).to_pandas()
    assert hits["path"].iloc[0] == "av1_video.mkv" and len(hits) == len(names)
    hits = tbl.search(stored["bikes.mp4"]).limit(10).to_pandas()
    assert set(hits["path"].iloc[:2]) == {"bikes.mp4", ODD_NAME.removeprefix("clips/")}
