"""End to end: a real LanceDB table, a real Geneva backfill on local Ray, then search."""

from __future__ import annotations

from pathlib import Path

import geneva
import numpy as np
import pyarrow as pa
from conftest import embed_fn

from video_embeddings_udf import Settings, embedding_column


def test_backfill_embeds_every_row_and_search_finds_each_video(
    local_ray: None,
    tmp_path: Path,
    settings: Settings,
    shared_videos: Path,
    clips: dict[str, Path],
) -> None:
    """add_columns + backfill(num_gpus=0) on local Ray fills every row: readable videos
    with the same [64, 1024] rows as a direct call, bad ones with the zero tensor. The
    URL column is named by VIDEO_URI_COL, and searching with a video's own matrix ranks
    that video first."""
    good = [
        str(shared_videos / "bikes.mp4"),
        str(shared_videos / "h265_video.mp4"),
        str(clips["mkv"]),
        str(clips["short"]),
    ]
    bad = [str(shared_videos / "sine_mono_s16.wav"), str(tmp_path / "missing.mp4")]
    s = Settings(model=settings.model, video_uri_col="path", embedding_col="emb")
    db = geneva.connect(str(tmp_path / "db"))
    tbl = db.create_table("videos", pa.table({"path": good + bad}))
    tbl.add_columns(embedding_column(s))
    tbl.backfill("emb", num_gpus=0)

    stored = {row["path"]: np.array(row["emb"]) for row in tbl.to_arrow().to_pylist()}
    assert sorted(stored) == sorted(good + bad)
    direct = embed_fn(s)
    for uri in good:
        assert stored[uri].shape == (64, 1024)
        np.testing.assert_allclose(stored[uri], np.stack(direct(uri)), rtol=1e-5, atol=1e-6)
    for uri in bad:
        np.testing.assert_array_equal(stored[uri], np.zeros((1, 1024), dtype=np.float32))

    for uri in good:
        hits = tbl.search(stored[uri]).limit(10).to_pandas()
        assert hits["path"].iloc[0] == uri
        assert len(hits) == len(good + bad)
