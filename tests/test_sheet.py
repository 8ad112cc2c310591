"""Contact sheets without an index run: the strips of real clips, and a video that can no
longer be read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import frame_indices, make_index_clip
from PIL import Image

from video_embeddings.frames import WHOLE_VIDEO
from video_embeddings_sheet import (
    LABEL_W,
    PAD,
    SHEET_W,
    STRIP_H,
    THUMB_H,
    THUMB_W,
    THUMBNAILS,
    Undecodable,
    draw_sheet,
    read_thumbnails,
)


def test_thumbnails_span_the_video_from_first_to_last_frame(tmp_path: Path) -> None:
    clip = make_index_clip(tmp_path / "sixty.mp4", 60)
    thumbs = read_thumbnails(str(clip))
    assert len(thumbs) == THUMBNAILS
    frames = np.stack([np.asarray(t.convert("L"))[None] for t in thumbs])
    assert frame_indices(frames) == [0, 20, 39, 59]  # round(linspace(0, 59, 4))


def test_unreadable_video_raises_undecodable_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(Undecodable, match="Invalid data found"):
        read_thumbnails(str(bad))


def test_png_sheet_has_one_strip_per_entry_and_survives_a_missing_video(
    tmp_path: Path,
) -> None:
    clip = make_index_clip(tmp_path / "ten.mp4", 10)
    out = tmp_path / "sheet.png"
    entries = [("query", str(clip)), ("#1", str(clip)), ("#2", str(tmp_path / "gone.mp4"))]
    draw_sheet([(title, uri, WHOLE_VIDEO) for title, uri in entries], out)
    image = Image.open(out)
    assert image.size == (SHEET_W, 3 * STRIP_H)
    pixels = np.asarray(image.convert("L")).astype(int)

    def cells(strip: int) -> np.ndarray:  # the thumbnail cells of one strip, side by side
        top = strip * STRIP_H + PAD
        lefts = [LABEL_W + PAD + j * (THUMB_W + PAD) for j in range(THUMBNAILS)]
        return np.hstack([pixels[top : top + THUMB_H, x : x + THUMB_W] for x in lefts])

    np.testing.assert_array_equal(cells(0), cells(1))  # the same video: the same thumbnails
    assert cells(1).std() > 0 and cells(2).std() == 0  # the missing video: empty cells


def test_thumbnails_are_decoded_as_the_udf_decodes(tmp_path: Path) -> None:
    """An MPEG-TS with B-frames (front to back, which torchcodec's scan cannot read) gives
    its thumbnails, and a clip with a 90-degree display matrix is drawn upright: 160x120
    frames become 120x160, which fit the 160x90 cell as 67x90."""
    source = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "2"]
    ts, plain, rotated = tmp_path / "b.ts", tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    for out in (ts, plain):
        subprocess.run(["ffmpeg", "-v", "error", "-y", *source, "-c:v", "libx264", "-bf", "3",
                        str(out)], check=True)  # fmt: skip
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(plain), "-c", "copy",
                    "-metadata:s:v", "rotate=90", str(rotated)], check=True)  # fmt: skip
    assert [t.size for t in read_thumbnails(str(ts))] == [(120, 90)] * THUMBNAILS
    assert [t.size for t in read_thumbnails(str(rotated))] == [(67, 90)] * THUMBNAILS
