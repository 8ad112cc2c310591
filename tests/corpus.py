"""The bad-input corpus: broken files, wrong kinds of file, odd but valid videos, odd object
names, an 8K frame and hostile headers, each with the result the UDF must give for it.

Everything is generated with FFmpeg (or cut or patched from what FFmpeg made), so the corpus
needs no shared files. The README's "Reliability" table lists the same entries.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUGE_FRAME_COUNT = 2**31 - 1
HUGE_DURATION_MS = 1e15
"""About 31,700 years; 1e18 ms would overflow FFmpeg's microseconds, and FFmpeg would ignore it."""


@dataclass(frozen=True)
class Entry:
    """One corpus object and what the UDF gives for it."""

    name: str
    """Object name (odd on purpose: spaces, non-ASCII, '#', '?')."""
    reason: str | None
    """For a zero tensor: a part of its one log line. None: the video embeds."""
    same_as: str | None = None
    """An entry whose embedding this one must equal exactly."""


SIXTY = "odd/sixty frames.mp4"
TEN = "odd/ten frames.mp4"

ENTRIES = [
    Entry("broken/zero bytes.mp4", "Invalid data"),
    Entry("broken/random bytes.mp4", "Invalid data"),
    Entry("broken/text named .mp4", "Invalid data"),
    Entry("broken/cut at half.mp4", "Invalid data"),
    Entry("broken/moov at end, cut off.mp4", "Invalid data"),
    Entry("wrong/audio only.m4a", "No valid stream"),
    Entry("wrong/still image.png", None),
    Entry("wrong/unknown codec.mp4", "No valid stream"),
    Entry(SIXTY, None),
    Entry("odd/one frame.mp4", None),
    Entry(TEN, None),
    Entry("odd/variable frame rate.mp4", None),
    Entry("odd/rotated 90.mp4", None),  # upright: differs from the unrotated clip
    Entry("odd/10-bit.mp4", None),
    Entry("odd/yuv444.mp4", None),
    Entry("odd/no duration.mkv", None, same_as=SIXTY),
    Entry("odd/no duration.webm", None),
    Entry("odd/two streams, second default.mp4", None, same_as=TEN),
    Entry("names/spaces and ünïcödé.mp4", None, same_as=SIXTY),
    Entry("names/clip #12", None, same_as=SIXTY),
    Entry("names/clip?generation=7", None, same_as=SIXTY),
    Entry("memory/8k 7680x4320.mp4", "over MAX_PIXELS"),
    Entry("hostile/2147483647 frames declared.mp4", None, same_as=SIXTY),
    Entry("hostile/1e15 ms duration declared.mkv", None, same_as=SIXTY),
    Entry("missing.mp4", "object does not exist"),
]


def build(d: Path, clips: dict[str, Path]) -> dict[str, bytes]:
    """Every entry's bytes but ``missing.mp4``'s (never uploaded), built in ``d`` from the
    conftest clips."""
    sixty = clips["mp4"].read_bytes()
    moov_at_end = ffmpeg(d / "moov_at_end.mp4", "-i", clips["mp4"], "-c", "copy")
    faststart = ffmpeg(d / "faststart.mp4", "-i", clips["mp4"], "-c", "copy",
                       "-movflags", "+faststart")  # fmt: skip
    assert moov_at_end.index(b"moov") > moov_at_end.index(b"mdat")
    src = ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-frames:v", "20"]
    return {
        "broken/zero bytes.mp4": b"",
        "broken/random bytes.mp4": np.random.default_rng(0).bytes(50_000),
        "broken/text named .mp4": b"this is not a video\n" * 100,
        "broken/cut at half.mp4": faststart[: len(faststart) // 2],
        "broken/moov at end, cut off.mp4": moov_at_end[: moov_at_end.index(b"moov") - 4],
        "wrong/audio only.m4a": ffmpeg(d / "audio.m4a", "-f", "lavfi", "-i", "sine=d=1"),
        "wrong/still image.png": ffmpeg(d / "still.png", *src[:4], "-frames:v", "1"),
        "wrong/unknown codec.mp4": _unknown_codec(faststart),
        SIXTY: sixty,
        "odd/one frame.mp4": clips["one"].read_bytes(),
        TEN: clips["short"].read_bytes(),
        "odd/variable frame rate.mp4": clips["vfr"].read_bytes(),
        "odd/rotated 90.mp4": ffmpeg(
            d / "rotated.mp4", "-i", clips["mp4"], "-c", "copy", "-metadata:s:v:0", "rotate=90"
        ),  # fmt: skip
        "odd/10-bit.mp4": ffmpeg(
            d / "10bit.mp4",
            *src,
            "-c:v",
            "libx265",
            "-x265-params",
            "log-level=error",
            "-pix_fmt",
            "yuv420p10le",
        ),  # fmt: skip
        "odd/yuv444.mp4": ffmpeg(d / "444.mp4", *src, "-c:v", "libx264", "-pix_fmt", "yuv444p"),
        "odd/no duration.mkv": clips["mkv"].read_bytes(),
        "odd/no duration.webm": _piped(*src, "-c:v", "libvpx-vp9", "-f", "webm"),
        "odd/two streams, second default.mp4": ffmpeg(
            d / "two.mp4",
            "-i",
            clips["mp4"],
            "-i",
            clips["short"],
            "-map",
            "0:v",
            "-map",
            "1:v",
            "-c",
            "copy",
            "-disposition:v:0",
            "0",
            "-disposition:v:1",
            "default",
        ),  # fmt: skip
        "names/spaces and ünïcödé.mp4": sixty,
        "names/clip #12": sixty,
        "names/clip?generation=7": sixty,
        "memory/8k 7680x4320.mp4": eight_k(d / "8k.mp4"),
        "hostile/2147483647 frames declared.mp4": _patch_box(
            sixty, b"stts", 8, ">I", HUGE_FRAME_COUNT
        ),  # fmt: skip
        "hostile/1e15 ms duration declared.mkv": _huge_mkv_duration(
            ffmpeg(d / "duration.mkv", "-i", clips["mp4"], "-c", "copy")
        ),
    }


def ffmpeg(out: Path, *args: str | Path) -> bytes:
    """Run FFmpeg with ``args`` writing ``out``, and return the file's bytes."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args), str(out)], check=True)
    return out.read_bytes()


def eight_k(out: Path, frames: int = 2) -> bytes:
    """A very short 7680x4320 H.264 clip (a flat gray, so it is a few KB)."""
    return ffmpeg(out, "-f", "lavfi", "-i", "color=gray:size=7680x4320:rate=25",
                  "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast")  # fmt: skip


def _piped(*args: str) -> bytes:
    """FFmpeg's output written to a pipe, so an MKV/WebM header has no duration."""
    cmd = ["ffmpeg", "-v", "error", *args, "pipe:1"]
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def _patch_box(data: bytes, box: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with ``value`` packed ``offset`` bytes into the first ``box`` MP4 box's
    payload (for ``stts``: offset 8 is the first entry's sample count)."""
    out = bytearray(data)
    struct.pack_into(fmt, out, data.index(box) + 4 + offset, value)
    return bytes(out)


def _unknown_codec(mp4: bytes) -> bytes:
    """The video's sample entry (``avc1`` inside ``stsd``) renamed to a codec that does not
    exist, so FFmpeg finds no decoder for the stream."""
    at = mp4.index(b"avc1", mp4.index(b"stsd"))
    return mp4[:at] + b"zzzz" + mp4[at + 4 :]


def _huge_mkv_duration(mkv: bytes) -> bytes:
    """``mkv`` with its Segment Duration (EBML id 0x4489, an 8-byte float) set to 1e15 ms."""
    out = bytearray(mkv)
    struct.pack_into(">d", out, mkv.index(b"\x44\x89\x88") + 3, HUGE_DURATION_MS)
    return bytes(out)
