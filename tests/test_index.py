"""Parts of ``index`` that need no Ray: what it refuses before writing, and the mean-vector
column's UDF body."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_index_clip

from video_embeddings.rows import EMBEDDING_TYPE, mean_vectors
from video_embeddings_table import UserError, find_videos, index
from video_embeddings_udf import aggregate_mean


def test_cluster_refuses_local_sources_before_writing(tmp_path: Path) -> None:
    """A cluster's workers cannot read this machine's files: ``index --cluster`` says so
    and creates nothing."""
    make_index_clip(tmp_path / "a.mp4", 4)
    db = tmp_path / "db"
    with pytest.raises(UserError, match=r"--cluster cannot read local files \(1 found"):
        index([str(tmp_path)], db_path=str(db), cluster="gpu-cluster")
    assert not db.exists()


def test_mean_vector_follows_its_embedding() -> None:
    """A video's rows give their normalised mean, the zero tensor gives zeros, and a NULL
    embedding gives a NULL mean (never a zero vector that would look like a bad video)."""
    rng = np.random.default_rng(0)
    video = rng.standard_normal((4, 1024)).astype(np.float32)
    column = pa.array([video.tolist(), None, [[0.0] * 1024]], type=EMBEDDING_TYPE)
    means = mean_vectors(column).to_pylist()
    by_hand = video.mean(axis=0) / np.linalg.norm(video.mean(axis=0))
    np.testing.assert_allclose(means[0], by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means[0], aggregate_mean(video), rtol=1e-6)
    assert means[1] is None
    assert means[2] == [0.0] * 1024


def test_every_common_video_extension_is_found(tmp_path: Path) -> None:
    """A folder of camcorder, broadcast and old-dataset files is indexed, whatever the
    letter case; other files are counted as skipped."""
    names = ["a.MTS", "b.m2ts", "c.ts", "d.mpg", "e.MPEG", "f.vob", "g.flv", "h.3gp"]
    names += ["i.wmv", "j.asf", "k.ogv", "l.mp4", "m.MOV", "n.mkv", "o.webm", "p.avi", "q.m4v"]
    for name in [*names, "notes.txt", "thumb.jpg"]:
        (tmp_path / name).write_bytes(b"")
    found = find_videos([str(tmp_path)])
    assert sorted(found.videos) == sorted(str(tmp_path / n) for n in names)
    assert found.skipped == 2
