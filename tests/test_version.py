"""The UDF's version follows what changes the rows, and only that; the runtime knobs are
read on the worker from its own environment."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from video_embeddings.settings import RUNTIME_KNOBS, Settings
from video_embeddings.version import (
    PIPELINE_CODE_SHA256,
    PIPELINE_VERSION,
    pipeline_code_sha256,
    udf_version,
)
from video_embeddings_udf import VideoEmbedding, embedding_column


def test_pipeline_code_has_not_changed_without_a_new_version() -> None:
    """The code that turns a video into rows hashes to the recorded value. When this
    fails, bump PIPELINE_VERSION and record the new hash beside it: an existing column
    must not mix rows of the old and the new code."""
    assert pipeline_code_sha256() == PIPELINE_CODE_SHA256


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other/checkpoint"},
        {"num_frames": 32},
        {"output": "tokens"},
        {"dtype": "bfloat16"},
        {"max_pixels": 1920 * 1080},
        {"allowed_uri_prefixes": ("gs://",)},
    ],
)
def test_version_follows_the_output_defining_settings(change: dict[str, object]) -> None:
    base = Settings()
    changed = dataclasses.replace(base, **change)  # type: ignore[arg-type]
    assert udf_version(changed) != udf_version(base)


def test_runtime_knobs_change_neither_version() -> None:
    base = Settings()
    tuned = dataclasses.replace(
        base,
        block_size=1 << 20,
        decode_device="cpu",
        decode_workers=3,
        embed_batch=4,
        compile=True,
        row_deadline_s=60.0,
    )
    assert {f for f in dataclasses.asdict(base) if getattr(base, f) != getattr(tuned, f)} == set(
        RUNTIME_KNOBS
    )
    assert udf_version(tuned) == udf_version(base)


def test_embedding_column_carries_the_explicit_version() -> None:
    settings = Settings(num_frames=16)
    (udf, columns), *_ = embedding_column(settings).values()
    assert udf.version == udf_version(settings) and udf.version.startswith(f"v{PIPELINE_VERSION}-")
    assert columns == [settings.video_uri_col]


def test_runtime_knobs_come_from_the_unpickling_workers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The column's UDF, unpickled where DECODE_WORKERS and EMBED_BATCH are set, takes
    those; the output-defining settings stay the column's."""
    frozen = Settings(model="some/model", num_frames=16, decode_workers=2, embed_batch=2)
    data = pickle.dumps(VideoEmbedding(frozen).func)  # type: ignore[attr-defined]
    monkeypatch.setenv("DECODE_WORKERS", "7")
    monkeypatch.setenv("EMBED_BATCH", "12")
    monkeypatch.setenv("NUM_FRAMES", "64")  # output-defining: the column's value wins
    worker = pickle.loads(data).settings
    assert (worker.decode_workers, worker.embed_batch) == (7, 12)
    assert (worker.model, worker.num_frames) == ("some/model", 16)


def test_a_column_pickled_by_the_earlier_release_still_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Columns added before the split pickled ``{"settings": Settings, "_runtime": None}``,
    a ``Settings`` without the newer fields: they unpickle with those fields' defaults."""
    old = Settings(model="some/model", num_frames=16)
    object.__delattr__(old, "row_deadline_s")  # a field the earlier release did not have
    udf = VideoEmbedding(Settings()).func  # type: ignore[attr-defined]
    state = {"settings": old, "_runtime": None}
    monkeypatch.setenv("EMBED_BATCH", "3")
    type(udf).__setstate__(udf, state)
    assert (udf.settings.model, udf.settings.num_frames) == ("some/model", 16)
    assert udf.settings.row_deadline_s == Settings.row_deadline_s
    assert udf.settings.embed_batch == 3
