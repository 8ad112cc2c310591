"""A long video from gs://, read in part: a 20-minute MP4 costs a fraction of its bytes
and gives the same frames as a scan of the whole file.

The video is generated with the ``ffmpeg`` CLI: ``testsrc2`` at 640x360 and 25 fps for
1200 s (30000 frames), H.264 ``-preset ultrafast`` with a key frame every 2 s
(``-g 50``, what streaming encoders use), moov at the end (no faststart); about 275 MB.
It is served by the GCS emulator behind the counting proxy, which records each GET's
range and body bytes.

The resolution is what makes the byte bound meaningful: each sampled frame costs the
256 KiB blocks from its key frame on, about two blocks for a 2 s GOP of ~450 KB here, so
the 64 frames read about 0.125x of the file. At 320x180 a GOP is smaller than a block
and the same 64 frames read about 0.25x of a file a third as large: the blocks, not the
GOPs, set the cost there.

The reference frames are torchcodec's exact scan of the local file at
``round(linspace(0, n - 1, 64))``, computed here with numpy, not the package's helper.
At a constant frame rate these are the frames that the read-in-part path seeks to by
presentation time; both sides are torchcodec on the same FFmpeg, so they must be equal
bit for bit. ``testsrc2`` moves every frame (a scrolling pattern and a frame counter), so
a frame one off from the right one differs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from gcs_emulator import CountingProxy, GcsEmulator, Request, gcsfs_at
from torchcodec.decoders import VideoDecoder

from video_embeddings import decode
from video_embeddings.decode import SEEK_BLOCK_SIZE, decode_frames, decode_segments
from video_embeddings.pipeline import SEGMENTS_PER_DECODE
from video_embeddings.segments import segment_windows
from video_embeddings.settings import Settings

pytestmark = pytest.mark.slow  # the 20-minute encode alone takes 25-35 s on two cores

BUCKET = "long-videos"
NAME = "long/testsrc2_640x360_20min_g50.mp4"
URI = f"gs://{BUCKET}/{NAME}"
NUM_FRAMES = 64
SECONDS = 1200
FPS = 25

PART_RATIO = 0.15
"""Bytes read in part / object size: measured 0.125 (131 blocks of 256 KiB)."""
MAX_PART_GETS = 160
"""GETs for the read in part: measured 131, one per 256 KiB block, each block once: two
for the header (the first block, and the last, which holds the 127 KB moov) and about
two per sampled frame, whose bytes lie between its key frame and itself, within one
~450 KB GOP that touches two or three blocks. Neighbouring samples are 19 s apart, so
they never share a GOP. The bound allows two and a half blocks per frame."""


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20-minute 640x360 MP4 with a key frame every 2 s, encoded with ffmpeg."""
    path = tmp_path_factory.mktemp("long") / "testsrc2_20min_g50.mp4"
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi"]
    cmd += ["-i", f"testsrc2=size=640x360:rate={FPS}", "-t", str(SECONDS)]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p"]
    subprocess.run([*cmd, str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def gcs(long_video: Path) -> Iterator[CountingProxy]:
    """The long video in the emulator, a counting proxy in front, and gcsfs pointed at the
    proxy (no cached gcsfs instance may point at another module's proxy)."""
    with (
        GcsEmulator() as emulator,
        CountingProxy(emulator.endpoint) as proxy,
        gcsfs_at(proxy.endpoint),
    ):
        emulator.upload(BUCKET, NAME, long_video.read_bytes())
        yield proxy


@pytest.fixture(scope="module")
def reference(long_video: Path) -> torch.Tensor:
    """torchcodec's exact scan of the local file, frames ``round(linspace(0, n - 1, 64))``."""
    decoder = VideoDecoder(str(long_video), seek_mode="exact")
    n = decoder.metadata.num_frames
    assert n == SECONDS * FPS
    indices = np.round(np.linspace(0, n - 1, NUM_FRAMES)).astype(int).tolist()
    return decoder.get_frames_at(indices).data


def media_gets(proxy: CountingProxy) -> list[Request]:
    """The content downloads of the long video (metadata requests left out)."""
    path = f"/o/{quote(NAME, safe='')}"
    return [r for r in proxy.snapshot() if r.is_media_get and path in r.path]


def block_range(r: Request) -> tuple[int, int]:
    """``(first, last)`` byte of a GET's ``Range: bytes=first-last`` header."""
    assert r.range is not None and r.range.startswith("bytes="), r.range
    first, last = r.range.removeprefix("bytes=").split("-")
    return int(first), int(last)


def assert_same_frames(frames: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal bit for bit; on failure, name the samples that differ."""
    assert frames.shape == reference.shape, (frames.shape, reference.shape)
    differ = [i for i, (a, b) in enumerate(zip(frames, reference, strict=True)) if not a.equal(b)]
    assert not differ, f"samples {differ} differ from the exact scan's"


def test_long_video_is_read_in_part(
    gcs: CountingProxy, long_video: Path, reference: torch.Tensor
) -> None:
    """With the default BLOCK_SIZE (16 MiB, far below the 275 MB object), 64 frames of
    the 20-minute video are read in ``SEEK_BLOCK_SIZE`` (256 KiB) blocks: every GET asks
    for one block at a block boundary and none twice (the block cache holds them all),
    at most MAX_PART_GETS of them, reading at most 0.15x of the object (0.125x measured);
    the frames equal the exact scan's bit for bit. A whole-file read (1.0x), 16 MiB
    blocks (about 64 x 16 MiB), a frame one off, or a shifted seek all fail here."""
    assert Settings.block_size == 16 * 2**20
    size = long_video.stat().st_size
    gcs.reset()
    frames = decode_frames(URI, num_frames=NUM_FRAMES)
    gets = media_gets(gcs)
    read = sum(r.bytes_out for r in gets)
    assert read <= PART_RATIO * size, f"read {read / size:.3f}x of {size} bytes"
    assert len(gets) <= MAX_PART_GETS, len(gets)
    ranges = [block_range(r) for r in gets]
    assert len(set(ranges)) == len(ranges), "a block was fetched twice"
    for first, last in ranges:
        assert first % SEEK_BLOCK_SIZE == 0
        assert last - first + 1 == SEEK_BLOCK_SIZE or last == size - 1, (first, last)
    assert frames.shape == (NUM_FRAMES, 3, 360, 640)
    assert_same_frames(frames, reference)


def test_long_video_read_whole_gives_the_same_frames(
    gcs: CountingProxy, long_video: Path, reference: torch.Tensor
) -> None:
    """With BLOCK_SIZE larger than the object (1 GiB), the video takes the exact-scan
    path: the object is fetched whole, in one GET of at least 0.99x its bytes (the scan
    reads everything, which is what reading in part saves), and the frames equal both
    the local exact scan's and so the read-in-part path's, bit for bit."""
    size = long_video.stat().st_size
    gcs.reset()
    frames = decode_frames(URI, num_frames=NUM_FRAMES, block_size=2**30)
    gets = media_gets(gcs)
    read = sum(r.bytes_out for r in gets)
    assert read >= 0.99 * size, f"read {read / size:.3f}x of {size} bytes"
    assert len(gets) == 1, [r.range for r in gets]
    assert_same_frames(frames, reference)


def test_sparse_key_frames_are_read_once_in_large_blocks(
    gcs: CountingProxy,
    long_video: Path,
    reference: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With fewer key frames than ``KEY_FRAMES_PER_SAMPLE`` per sampled frame (raised
    here so that the 600 key frames are too few), the MP4 is still found by seeking, but
    in BLOCK_SIZE blocks read forward: each 16 MiB block once, except the last, which
    holds the index (moov) read first and is read again for the last samples after the
    64 MiB cache let it go. So at most the object, one block and the probe's 256 KiB
    blocks, where the exact scan would read the object and then seek back through blocks
    its cache no longer holds (2.0x measured)."""
    monkeypatch.setattr(decode, "KEY_FRAMES_PER_SAMPLE", 1000)
    size = long_video.stat().st_size
    gcs.reset()
    frames = decode_frames(URI, num_frames=NUM_FRAMES)
    gets = media_gets(gcs)
    large = [block_range(r) for r in gets if r.bytes_out > SEEK_BLOCK_SIZE]
    blocks = -(-size // Settings.block_size)
    starts = [first for first, _ in large]
    assert sorted(set(starts)) == [i * Settings.block_size for i in range(blocks)]
    assert len(starts) <= blocks + 1, starts  # the last block may come twice
    read = sum(r.bytes_out for r in gets)
    limit = size + Settings.block_size + 4 * SEEK_BLOCK_SIZE
    assert read <= limit, f"read {read / size:.3f}x of {size} bytes"
    assert_same_frames(frames, reference)


SEGMENT_SECONDS = 10
SEGMENTS_RATIO = 1.15
"""Bytes read for every segment of the video / object size."""


def test_every_segment_of_the_long_video_costs_about_one_pass(
    gcs: CountingProxy, long_video: Path
) -> None:
    """The 120 segments of 10 s, decoded as the UDF decodes them (``SEGMENTS_PER_DECODE``
    of them per decode), read at most ``SEGMENTS_RATIO`` of the object: each decode reads
    its own stretch of the file, forward, plus the index and a block past its end. One
    decode per segment would read each segment's GOP before it again and the index 120
    times. The frames of the first, a middle and the last segment are the exact scan's at
    the frames ``round(linspace(0, 249, 64))`` of each segment's 250 (shrunk 8x here, to
    hold 7,680 frames)."""
    size = long_video.stat().st_size
    windows = segment_windows(SECONDS, SEGMENT_SECONDS, SEGMENT_SECONDS)
    assert len(windows) == 120

    def shrink(frames: torch.Tensor) -> torch.Tensor:
        return frames[:, :, ::8, ::8].clone()

    gcs.reset()
    clips: list[torch.Tensor] = []
    for first in range(0, len(windows), SEGMENTS_PER_DECODE):
        group = windows[first : first + SEGMENTS_PER_DECODE]
        clips += decode_segments(URI, group, num_frames=NUM_FRAMES, shrink=shrink)
    read = sum(r.bytes_out for r in media_gets(gcs))
    assert read <= SEGMENTS_RATIO * size, f"read {read / size:.3f}x of {size} bytes"

    decoder = VideoDecoder(str(long_video), seek_mode="exact")
    per_segment = SEGMENT_SECONDS * FPS
    picks = np.round(np.linspace(0, per_segment - 1, NUM_FRAMES)).astype(int)
    for k in (0, 57, 119):
        expected = decoder.get_frames_at((k * per_segment + picks).tolist()).data
        assert_same_frames(clips[k], shrink(expected))
