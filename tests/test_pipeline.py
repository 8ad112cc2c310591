"""The batched pipeline: rows of a Geneva batch decoded in parallel, preprocessed as tensor
operations, embedded EMBED_BATCH at a time, and returned as one Arrow array."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import embed_fn
from transformers import AutoVideoProcessor
from transformers.models.vjepa2 import VJEPA2VideoProcessor

import video_embeddings.frames
import video_embeddings_udf as vu
from video_embeddings.decode import DecodeEngines
from video_embeddings.frames import WHOLE_VIDEO
from video_embeddings.outcomes import SystemFault
from video_embeddings_udf import EMBEDDING_TYPE, Preprocessing, Settings

CLIPS = ["bikes.mp4", "nasa_13013.mp4", "bt709_full_range.mp4", "carphone_distorted.mp4"]


def test_batch_matches_rows_one_at_a_time(settings: Settings, shared_videos: Path) -> None:
    """A batch mixing good videos, a bad file, a missing object and a null URL gives, in
    row order, each good row's own one-row result and the zero tensor for the others,
    with EMBED_BATCH and the decode threads not dividing the batch evenly."""
    good = [str(shared_videos / name) for name in CLIPS]
    bad = [str(shared_videos / "sine_mono_s16.wav"), str(shared_videos / "missing.mp4"), None]
    uris = [good[0], bad[0], good[1], good[2], bad[1], bad[2], good[3]]
    s = Settings(model=settings.model, num_frames=16, embed_batch=3, decode_workers=2)
    out = vu.VideoEmbedding(s).func(pa.array(uris, pa.string()))
    assert out.type == EMBEDDING_TYPE and len(out) == len(uris)
    single = embed_fn(Settings(model=settings.model, num_frames=16, embed_batch=1))
    for uri, row in zip(uris, out.to_pylist(), strict=True):
        rows = np.array(row, dtype=np.float32)
        if uri in good:
            assert rows.shape == (16, 1024)
            np.testing.assert_allclose(rows, single(uri), rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(rows, np.zeros((1, 1024), np.float32))


@pytest.mark.parametrize("crop", [64, 256])
def test_tensor_preprocessing_matches_the_checkpoint_processor(
    tmp_path: Path, shared_videos: Path, crop: int
) -> None:
    """shrink + preprocess give the Hugging Face video processor's output, read from a
    saved processor config (the tiny 64 px one and V-JEPA2's own 256 px one), within
    1e-5 on real clips of several sizes and aspect ratios."""
    VJEPA2VideoProcessor(crop_size=crop).save_pretrained(tmp_path)
    processor = AutoVideoProcessor.from_pretrained(tmp_path)
    p = Preprocessing.from_processor(processor)
    assert p.crop == (crop, crop) and p.shortest_edge == int(crop * 256 / 224)
    for name in CLIPS:
        frames = vu.decode_frames(str(shared_videos / name), num_frames=8, block_size=1 << 24)
        expected = processor(frames, return_tensors="pt")["pixel_values_videos"]
        clips = vu.shrink(frames, p, device="cpu")[None]
        assert clips.dtype == torch.uint8 and clips.shape == (1, 8, 3, crop, crop)
        got = vu.preprocess(clips, p, dtype=torch.float32)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-5


def test_frames_are_shrunk_a_chunk_at_a_time(
    shared_videos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the chunk budget at three 480x270 frames, decoding 16 frames hands ``shrink``
    chunks of at most 3 full-size frames, and the result equals decoding all at once."""
    video = str(shared_videos / "nasa_13013.mp4")
    whole = vu.decode_frames(video, num_frames=16, block_size=1 << 24)
    assert tuple(whole.shape[-2:]) == (270, 480)
    monkeypatch.setattr(video_embeddings.frames, "FRAME_CHUNK_BYTES", 3 * 3 * 480 * 270)
    seen: list[int] = []

    def record(frames: torch.Tensor) -> torch.Tensor:
        seen.append(len(frames))
        return frames

    chunked = vu.decode_frames(video, num_frames=16, block_size=1 << 24, shrink=record)
    assert seen == [3, 3, 3, 3, 3, 1]
    assert torch.equal(chunked, whole)


def test_to_arrow_builds_the_column_from_arrays() -> None:
    """Per-video arrays of different lengths become the column's type with the same
    values as converting through Python lists."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((n, 1024), dtype=np.float32) for n in (64, 1, 8)]
    rows[1] = vu.zero_embedding()
    out = vu.to_arrow(rows)
    assert out.equals(pa.array([r.tolist() for r in rows], type=EMBEDDING_TYPE))
    assert vu.to_arrow([]).equals(pa.array([], type=EMBEDDING_TYPE))


def test_pooling_a_batch_equals_pooling_each_clip() -> None:
    """pool_to_frames on (B, tokens, hidden) equals pooling each clip alone."""
    tokens = torch.randn(3, 4 * 16, 1024)
    batched = vu.pool_to_frames(tokens, num_frames=8, tubelet_size=2)
    assert batched.shape == (3, 8, 1024)
    for clip in range(3):
        alone = vu.pool_to_frames(tokens[clip], num_frames=8, tubelet_size=2)
        assert torch.equal(batched[clip], alone)


def test_nvdec_unavailable_falls_back_to_the_cpu(
    shared_videos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """This machine's torchcodec is the CPU-only PyPI build, so an NVDEC decode really
    fails with "Unsupported device". In auto mode the clip is decoded on the CPU with the
    same frames, NVDEC is dropped after one warning, and the CPU engine goes on alone."""
    video = str(shared_videos / "bikes.mp4")
    s = Settings(num_frames=8)
    engines = DecodeEngines(nvdec=1, cpu=1)
    expected = vu.decode_frames(video, num_frames=8, block_size=s.block_size)
    deadline = time.monotonic() + 60
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        (first,) = engines.decode(video, [WHOLE_VIDEO], s, lambda f: f, deadline=deadline)
        (second,) = engines.decode(video, [WHOLE_VIDEO], s, lambda f: f, deadline=deadline)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert [r.getMessage() for r in caplog.records] == [
        "this torchcodec build has no CUDA decoder: decoding on the CPU"
    ]
    assert caplog.records[0].name == "video_embeddings.decode"
    strict = DecodeEngines(nvdec=1, cpu=0)
    strict_settings = Settings(num_frames=8, decode_device="cuda")
    with pytest.raises(SystemFault, match=r"VIDEO_DECODE_DEVICE=cuda, but this torchcodec"):
        strict.decode(video, [WHOLE_VIDEO], strict_settings, lambda f: f, deadline=deadline)
