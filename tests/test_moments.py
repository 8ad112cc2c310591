"""Moments: segments of a video as the rows of a Geneva chunker view, embedded by the same
UDF, and searched by ``search --moments``.

The windows and the frames each segment samples are checked by value on index-coded clips
(frame i painted at level i * INDEX_STRIDE) in MP4 (frames found by time), MKV (by index)
and MPEG-TS (front to back). The end-to-end test indexes a 3-minute file made of six 30 s
parts of different ``lavfi`` sources through the command, with real Geneva views and
backfills on local Ray and the tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from conftest import frame_indices, make_index_clip
from PIL import Image

from video_embeddings.decode import decode_segments
from video_embeddings.frames import (
    WHOLE_VIDEO,
    sample_indices,
    sample_times,
    segment_indices,
    segment_times,
)
from video_embeddings.outcomes import BadVideo
from video_embeddings.segments import Segmenter, segment_windows
from video_embeddings.settings import Settings
from video_embeddings_sheet import LABEL_W, PAD, STRIP_H, THUMB_H, THUMB_W
from video_embeddings_udf import VideoEmbedding, matrices

CLI = str(Path(sys.executable).with_name("video-embeddings"))

PARTS = ["testsrc2", "mandelbrot", "life", "smptehdbars", "cellauto", "rgbtestsrc"]
"""The lavfi sources of the long test file, 30 s each, in this order."""
PART_S = 30
SIZE = "192x108"


# --- windows ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "seconds", "stride", "windows"),
    [
        (180.0, 10, 10, [(10.0 * i, 10.0 * i + 10) for i in range(18)]),
        (23.0, 10, 10, [(0.0, 10.0), (10.0, 23.0)]),  # a 3 s tail joins its neighbour
        (27.0, 10, 10, [(0.0, 10.0), (10.0, 20.0), (20.0, 27.0)]),  # a 7 s tail stays
        (25.0, 10, 10, [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]),  # half a window stays
        (23.0, 10, 5, [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (15.0, 23.0)]),
        (7.5, 10, 10, [(0.0, 7.5)]),  # shorter than a window: one segment
        (0.0, 10, 10, []),
        (0.3, 0.1, 0.1, [(0.0, 0.1), (0.1, 0.2), (0.2, 0.3)]),  # no drift from adding 0.1
        (10.0, 3, 9.5, [(0.0, 3.0), (9.5, 10.0)]),  # a gap: the tail stays apart
        (10.0, 2, 12, [(0.0, 2.0)]),
        (float("inf"), 10, 10, []),
    ],
)
def test_windows_cover_the_video_and_a_short_tail_joins_its_neighbour(
    duration: float, seconds: float, stride: float, windows: list[tuple[float, float]]
) -> None:
    got = segment_windows(duration, seconds, stride)
    assert len(got) == len(windows)
    assert np.ravel(got).tolist() == pytest.approx(np.ravel(windows).tolist())


# --- which frames a segment samples -----------------------------------------------------


@pytest.mark.parametrize(("seconds", "stride"), [(0, 10), (10, 0), (10, -1), (10, float("nan"))])
def test_windows_need_a_length_and_a_stride(seconds: float, stride: float) -> None:
    with pytest.raises(ValueError, match="above 0"):
        segment_windows(60.0, seconds, stride)


def test_the_whole_video_samples_as_before() -> None:
    assert segment_indices(60, 2.4, WHOLE_VIDEO, 8) == sample_indices(60, 8)
    assert segment_times(0.0, 2.4, 60, WHOLE_VIDEO, 8) == sample_times(0.0, 2.4, 60, 8)
    assert segment_indices(60, 0.0, WHOLE_VIDEO, 8) == sample_indices(60, 8)


def test_a_segment_samples_uniformly_within_its_own_time() -> None:
    """At 25 fps, [1.2 s, 2.4 s) holds frames 30 to 59: by index those are sampled as a
    whole video of 30 frames is, and by time at the middles of their display slots."""
    assert segment_indices(60, 2.4, (1.2, 2.4), 4) == [30, 40, 49, 59]
    assert segment_times(0.0, 2.4, 60, (1.2, 2.4), 4) == pytest.approx(
        [1.2 + (i + 0.5) / 25 for i in (0, 10, 19, 29)]
    )
    # a segment that ends past the video ends with it; one past the end is a bad segment
    assert segment_indices(60, 2.4, (2.0, 9.0), 2) == [50, 59]
    assert segment_indices(60, 2.4, (2.39, 2.4), 2) == [59, 59]  # the last frame's sliver
    with pytest.raises(BadVideo, match="past the video's end"):
        segment_times(0.0, 2.4, 60, (2.4, 3.0), 4)
    with pytest.raises(BadVideo, match="past the video's end"):
        segment_indices(60, 2.4, (2.4, 3.0), 4)
    with pytest.raises(BadVideo, match="duration is unknown"):
        segment_indices(60, 0.0, (0.0, 1.0), 4)


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """60 index-coded frames at 25 fps (2.4 s): MP4, MKV with a duration, MPEG-TS; an MKV
    whose video starts at 5 s, and one with 10 s of audio (container durations that are
    not the video's)."""
    d = tmp_path_factory.mktemp("coded")
    mp4 = make_index_clip(d / "sixty.mp4", 60)
    clips = {"mp4": mp4}
    remuxes = {
        "mkv": [],
        "ts": [],
        "late.mkv": ["-output_ts_offset", "5"],
        "audio.mkv": ["-f", "lavfi", "-i", "sine=d=10", "-map", "0:v", "-map", "1:a"],
    }
    for kind, options in remuxes.items():
        out = d / f"sixty.{kind}"
        cmd = ["ffmpeg", "-v", "error", "-y", "-i", str(mp4), *options, "-c:v", "copy"]
        subprocess.run([*cmd, str(out)], check=True)
        clips[kind] = out
    return clips


@pytest.mark.parametrize("kind", ["mp4", "mkv", "ts", "late.mkv", "audio.mkv"])
def test_each_segment_gets_its_own_frames_in_one_decode(coded: dict[str, Path], kind: str) -> None:
    """Two halves and the whole video in one decode, on each of the three decodes (by
    time, by index after an exact scan, front to back), read whole and in small blocks."""
    segments = [(0.0, 1.2), (1.2, 2.4), WHOLE_VIDEO]
    for block_size in (1 << 24, 1 << 12):
        first, second, whole = decode_segments(
            str(coded[kind]), segments, num_frames=4, block_size=block_size
        )
        assert frame_indices(first.numpy()) == [0, 10, 19, 29]
        assert frame_indices(second.numpy()) == [30, 40, 49, 59]
        assert frame_indices(whole.numpy()) == sample_indices(60, 4)
    with pytest.raises(BadVideo, match="past the video's end"):
        decode_segments(str(coded[kind]), [(2.4, 3.0)], num_frames=4)


@pytest.mark.parametrize(
    "segment", [(1.0, 1.0), (1.0, 0.5), (-1.0, 1.0), (math.nan, 1.0), (0.0, math.nan)]
)
@pytest.mark.parametrize("kind", ["mp4", "ts"])
def test_a_segment_that_is_not_a_span_is_a_bad_video(
    coded: dict[str, Path], kind: str, segment: tuple[float, float]
) -> None:
    with pytest.raises(BadVideo, match="invalid segment"):
        decode_segments(str(coded[kind]), [(0.0, 1.0), segment], num_frames=4)


def test_the_segmenter_reads_the_duration_from_the_header(
    coded: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The chunker's function: 2.4 s in 1 s windows (the 0.4 s tail joins the last), the
    embedding columns NULL; a file that is not a video, and a missing one, get none."""
    segmenter = Segmenter(Settings(), seconds=1.0, stride=1.0)
    rows = segmenter(str(coded["mp4"]))
    assert [(r["segment"], r["start_s"], r["end_s"]) for r in rows] == [
        (0, 0.0, 1.0),
        (1, 1.0, 2.4),
    ]
    assert (
        {r["video_embedding"] for r in rows} == {r["video_embedding_mean"] for r in rows} == {None}
    )
    assert segmenter(str(coded["ts"]))[-1]["end_s"] == pytest.approx(2.4, abs=0.05)
    for kind in ("late.mkv", "audio.mkv"):  # the video's own duration, from its tag
        assert segmenter(str(coded[kind]))[-1]["end_s"] == pytest.approx(2.4, abs=0.01)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    assert segmenter(str(text)) == []
    assert segmenter(str(tmp_path / "gone.mp4")) == []
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"no segments for {text}",
        f"no segments for {tmp_path / 'gone.mp4'}",
    ]


# --- end to end: index, search moments --------------------------------------------------


def encode_parts(path: Path, parts: list[str], work: Path) -> Path:
    """One MP4 of ``parts``, ``PART_S`` seconds of each lavfi source at 25 fps, each part
    encoded once (into ``work``) and the parts concatenated without re-encoding."""
    pieces = []
    for i, source in enumerate(parts):
        piece = work / f"{path.stem}-part{i}.mp4"
        cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi"]
        cmd += ["-i", f"{source}=size={SIZE}:rate=25", "-t", str(PART_S)]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-pix_fmt", "yuv420p"]
        subprocess.run([*cmd, str(piece)], check=True)
        pieces.append(piece)
    listing = work / f"{path.stem}.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in pieces))
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing)]
    subprocess.run([*cmd, "-c", "copy", str(path)], check=True)
    return path


def cut(source: Path, start: float, seconds: float, path: Path) -> Path:
    """``seconds`` of ``source`` from ``start``, re-encoded: a query clip."""
    cmd = ["ffmpeg", "-v", "error", "-y", "-ss", str(start), "-i", str(source)]
    cmd += ["-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", str(path)]
    subprocess.run(cmd, check=True)
    return path


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def segments_view(db: Path) -> list[dict[str, Any]]:
    """The view's rows in row order: URL, segment, times and embedding."""
    rows = lancedb.connect(str(db)).open_table("videos_segments").to_arrow().to_pylist()
    return [
        {**r, "video_embedding": np.asarray(r["video_embedding"], dtype=np.float32)} for r in rows
    ]


@pytest.fixture(scope="module")
def moments(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[Path, Path, dict[str, str], dict[str, Any]]:
    """The 3-minute file indexed with --segment-seconds 10 and --build-index (an ANN index
    on the mean vectors of the videos and of the segments): its folder, the db, the
    environment, and the summary."""
    d = tmp_path_factory.mktemp("moments")
    videos = d / "videos"
    videos.mkdir()
    encode_parts(videos / "six_parts.mp4", PARTS, d)
    env = {**os.environ, "VJEPA_MODEL": str(tiny_model_dir), "NUM_FRAMES": "8"}
    db = d / "db"
    args = ["index", str(videos), "--db", str(db), "--segment-seconds", "10", "--build-index"]
    args.append("--json")
    return videos, db, env, json.loads(run_cli(*args, env=env).stdout)


@pytest.mark.slow
def test_segments_of_a_long_video_are_embedded_and_found_by_a_clip_of_one_part(
    moments: tuple[Path, Path, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """18 segments of 10 s, each embedded as 8 rows; the segments of a still part are
    alike (mean-vector cosine above 0.999) and unlike every other part's (below 0.99).
    A 10 s clip cut from inside the mandelbrot part (33-43 s) finds a segment of that part
    first; the file's own 40-50 s, asked with --from/--to, finds exactly that segment at
    a score of 1."""
    videos, db, env, summary = moments
    seg = summary["segments"]
    assert (seg["view"], seg["seconds"], seg["stride"]) == ("videos_segments", 10.0, 10.0)
    assert (seg["segments"], seg["added"], seg["bad_segments"], seg["object_faults"]) == (
        18,
        18,
        0,
        0,
    )
    assert seg["videos_without_segments"] == [] and seg["ann_index"] is True
    rows = segments_view(db)
    uri = str(videos / "six_parts.mp4")
    assert [(r["video_uri"], r["segment"], r["start_s"], r["end_s"]) for r in rows] == [
        (uri, i, 10.0 * i, 10.0 * i + 10) for i in range(18)
    ]
    assert all(r["video_embedding"].shape == (8, 1024) for r in rows)
    means = np.stack([r["video_embedding"].mean(axis=0) for r in rows])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    cosines = means @ means.T
    part = np.arange(18) // 3
    for still in (3, 5):  # smptehdbars and rgbtestsrc: one picture for 30 s
        inside = cosines[np.ix_(part == still, part == still)]
        outside = cosines[np.ix_(part == still, part != still)]
        assert inside.min() > 0.999 and outside.max() < 0.99, (inside, outside)

    query = cut(videos / "six_parts.mp4", 33, 10, tmp_path / "query.mp4")
    args = ["search", str(query), "--db", str(db), "--moments", "-k", "3", "--json"]
    found = json.loads(run_cli(*args, env=env).stdout)
    assert found["moments"] is True and found["ann"] is True  # candidates from the ANN index
    top = found["hits"][0]
    assert set(top) >= {"rank", "score", "uri", "start_s", "end_s"}
    assert (top["rank"], top["uri"]) == (1, uri)
    assert PART_S <= top["start_s"] < top["end_s"] <= 2 * PART_S

    args = ["search", uri, "--from", "40", "--to", "50", "--db", str(db), "--moments", "--json"]
    itself = json.loads(run_cli(*args, env=env).stdout)
    assert (itself["query_start_s"], itself["query_end_s"]) == (40.0, 50.0)
    first = itself["hits"][0]
    assert (first["start_s"], first["end_s"]) == (40.0, 50.0)
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert itself["hits"][1]["score"] < first["score"] - 1e-3

    printed = run_cli(*args[:-1], "-k", "2", env=env).stdout.splitlines()
    assert printed[1].split() == ["rank", "score", "start", "end", "url"]
    assert printed[2].split() == ["1", f"{first['score']:.4f}", "00:40", "00:50", uri]


@pytest.mark.slow
def test_the_sheet_draws_each_moment_from_its_own_segment(
    moments: tuple[Path, Path, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """The query's strip is drawn from its own segment, 90-100 s (the bars part): its
    first thumbnail is FFmpeg's frame of the bars, not the video's first frame."""
    videos, db, env, _ = moments
    uri = str(videos / "six_parts.mp4")
    sheet = tmp_path / "sheet.png"
    args = ["search", uri, "--from", "90", "--to", "100", "--db", str(db), "--moments"]
    run_cli(*args, "-k", "2", "--sheet", str(sheet), env=env)
    image = np.asarray(Image.open(sheet).convert("RGB")).astype(float)
    assert image.shape[0] == 3 * STRIP_H
    cell = image[PAD : PAD + THUMB_H, LABEL_W + PAD : LABEL_W + PAD + THUMB_W]

    def ffmpeg_frame(at: float) -> np.ndarray:
        out = tmp_path / f"frame-{at:g}.png"
        cmd = ["ffmpeg", "-v", "error", "-y", "-ss", str(at), "-i", uri, "-frames:v", "1"]
        subprocess.run([*cmd, str(out)], check=True)
        frame = Image.open(out).convert("RGB")
        frame.thumbnail((THUMB_W, THUMB_H))
        return np.asarray(frame).astype(float)

    bars, start = ffmpeg_frame(91.0), ffmpeg_frame(0.0)
    assert np.abs(cell - bars).mean() < 8 < np.abs(cell - start).mean()


@pytest.mark.slow
def test_the_view_refreshes_incrementally(
    moments: tuple[Path, Path, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """Indexing the folder again with one more 30 s video, without the flag (the view
    keeps its windows), adds only that video's three segments and embeds only them: the
    backfill counts 3 segments, and the 18 already there keep their embeddings."""
    videos, db, env, _ = moments
    before = segments_view(db)
    encode_parts(videos / "one_part.mp4", ["life"], tmp_path)
    args = ["index", str(videos), "--db", str(db), "--json"]
    done = run_cli(*args, env=env)
    more = json.loads(done.stdout)
    assert (more["added"], more["segments"]["added"], more["segments"]["segments"]) == (1, 3, 21)
    assert "embedding: 3/3 segments" in done.stderr
    assert "/18 segments" not in done.stderr and "/21 segments" not in done.stderr
    after = segments_view(db)
    new = [(r["video_uri"], r["start_s"], r["end_s"]) for r in after[18:]]
    assert new == [(str(videos / "one_part.mp4"), 10.0 * i, 10.0 * i + 10) for i in range(3)]
    for old, kept in zip(before, after[:18], strict=True):
        np.testing.assert_array_equal(old["video_embedding"], kept["video_embedding"])
    life = [r["video_embedding"] for r in after[18:]]
    assert all(e.shape == (8, 1024) and e.any() for e in life)


def test_a_segment_past_the_end_gets_the_zero_tensor_and_its_neighbours_their_rows(
    coded: dict[str, Path], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Three segments of one video in one UDF call share a decode; the third lies past the
    2.4 s video, so the shared decode fails and each is decoded alone: the first two get
    the rows they get alone, the third the zero tensor with its reason."""
    udf = VideoEmbedding(dataclasses.replace(settings, num_frames=4)).func  # type: ignore[attr-defined]
    uri = str(coded["mp4"])

    def embed(starts: list[float], ends: list[float]) -> list[np.ndarray]:
        uris = pa.array([uri] * len(starts))
        return matrices(udf(uris, pa.array(starts, pa.float64()), pa.array(ends, pa.float64())))

    together = embed([0.0, 1.2, 5.0], [1.2, 2.4, 6.0])
    alone = [embed([0.0], [1.2])[0], embed([1.2], [2.4])[0]]
    for got, want in zip(together[:2], alone, strict=True):
        assert got.shape == (4, 1024) and got.any()
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-3)
    np.testing.assert_array_equal(together[2], np.zeros((1, 1024)))
    assert any(
        f"zero embedding for {uri} [5 s, 6 s): segment [5 s, 6 s) is past the video's end"
        in r.getMessage()
        for r in caplog.records
    )
