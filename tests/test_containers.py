"""Containers and streams on which torchcodec 0.8.1's exact seek loses or shifts frames, and
the sequential PyAV decode that gives FFmpeg's own frames for them.

Every file is generated with the ``ffmpeg`` CLI (or patched from what it made): 160x120 or
so, 3 s. The reference frames are the CLI's own: ``ffmpeg -i FILE -fps_mode passthrough``
written as RGB (autorotated, as players show them), counted, and sampled at
``round(linspace(0, n - 1, 16))``. ``passthrough`` keeps the frames the decoder outputs;
the CLI's default constant-rate output would duplicate a frame into the gap a damaged
packet leaves and drop frames that share a millisecond timestamp.

Both sides are shrunk by the project's ``shrink`` (shortest edge 32, centre crop 32x32,
bicubic with antialias) before they are compared. The decoders are bit-exact, and the RGB
conversion is FFmpeg's ``format`` filter on both sides, so the frames are equal here; the
tolerance, 2 levels per pixel, leaves room for swscale's CPU-specific code paths in the
CLI's FFmpeg and PyAV's, and is far below the difference between neighbouring frames,
which every source here makes large (a moving test pattern, a gray level per frame).
"""

from __future__ import annotations

import io
import random
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_VIDEOS

from video_embeddings import decode, frames
from video_embeddings.decode import decode_frames
from video_embeddings.frames import sample_indices
from video_embeddings.outcomes import BadVideo
from video_embeddings.preprocess import Preprocessing, shrink
from video_embeddings.sequential import (
    Probe,
    count_frames,
    decode_sequential,
    is_fallback_error,
    needs_sequential,
    probe,
    rotate,
)
from video_embeddings.settings import KIB, MIB
from video_embeddings.storage import StorageReader

NUM_FRAMES = 16
MAX_PIXELS = 4096 * 2160
TOLERANCE = 2
"""Largest difference, in levels of 255, between a shrunk frame and the shrunk reference."""

SHRINK = partial(
    shrink,
    p=Preprocessing(
        shortest_edge=32, crop=(32, 32), scale=1.0, mean=None, std=None, interpolation=3
    ),
    device="cpu",
)
"""``(N, 3, H, W)`` uint8 → ``(N, 3, 32, 32)``: each frame resized from its own size."""

PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")
TESTSRC = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "3"]
X264_B = ["-c:v", "libx264", "-bf", "3"]


def ffmpeg(*args: str | Path) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True)


def encode(out: Path, *args: str | Path) -> Path:
    ffmpeg(*TESTSRC, *args, out)
    return out


def size_change(d: Path) -> Path:
    """Two TS segments, 160x120 then 320x240, concatenated byte for byte."""
    first = encode(d / "first half.ts", "-t", "1.5", *X264_B)
    second = d / "second half.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-t", "1.5", *X264_B,
           "-output_ts_offset", "1.5", second)  # fmt: skip
    out = d / "size change.ts"
    out.write_bytes(first.read_bytes() + second.read_bytes())
    return out


def damaged(d: Path) -> Path:
    """100 frames of H.264 in MP4, 300 bytes in the middle of ``mdat`` overwritten: FFmpeg
    loses a frame (or a few) and conceals errors in others."""
    clean = d / "undamaged.mp4"
    ffmpeg(*TESTSRC[:4], "-t", "4", *X264_B, "-threads", "1", clean)
    data = bytearray(clean.read_bytes())
    start, end = _box(data, b"mdat")
    middle = (start + end) // 2
    data[middle : middle + 300] = bytes((7 * i + 13) % 256 for i in range(300))
    out = d / "damaged.mp4"
    out.write_bytes(data)
    return out


def remuxed(d: Path, name: str, before: tuple[str, ...], after: tuple[str, ...]) -> Path:
    """The test pattern with B-frames, copied into ``name`` with options ``before`` and
    ``after`` the input: a cut (``-ss`` before it), a timestamp offset (after it)."""
    plain = encode(d / f"{name} plain.mp4", *X264_B)
    out = d / name
    ffmpeg(*before, "-i", plain, "-c", "copy", *after, out)
    return out


def zeroed(d: Path) -> Path:
    """4 s with a key frame every second (index at the front), a quarter of the file
    from 30% on overwritten with zeros: FFmpeg decodes the frames before and after."""
    clean = encode(d / "unzeroed.mp4", "-t", "4", *X264_B, "-g", "25", "-movflags", "+faststart")
    data = bytearray(clean.read_bytes())
    start = len(data) * 3 // 10
    data[start : start + len(data) // 4] = bytes(len(data) // 4)
    out = d / "zeroed middle.mp4"
    out.write_bytes(data)
    return out


def cut_in_half(d: Path) -> Path:
    """The first half of an MP4 whose index is at the front: the header declares all
    75 frames; FFmpeg decodes those whose bytes are there."""
    whole = encode(d / "whole.mp4", *X264_B, "-movflags", "+faststart")
    data = whole.read_bytes()
    out = d / "cut in half.mp4"
    out.write_bytes(data[: len(data) // 2])
    return out


def rotated(d: Path, degrees: int) -> Path:
    """FFmpeg 5.1 writes a display matrix from the ``rotate`` tag when copying."""
    plain = encode(d / "plain.mp4", *X264_B)
    out = d / f"rotated {degrees}.mp4"
    ffmpeg("-i", plain, "-c", "copy", "-metadata:s:v", f"rotate={degrees}", out)
    return out


def with_matrix(d: Path, name: str, matrix: tuple[int, int, int, int]) -> Path:
    """An MP4 whose track header matrix is ``[a b; c d]`` (``matrix``): FFmpeg 5.1's CLI
    cannot write a mirroring one (``-display_hflip`` came in 6.0), so it is patched in."""
    a, b, c, dd = matrix
    plain = encode(d / f"{name} plain.mp4", *X264_B)
    data = bytearray(plain.read_bytes())
    tkhd = data.index(b"tkhd") - 4
    matrix_at = tkhd + 8 + (4 + 20 if data[tkhd + 8] == 0 else 4 + 32) + 16
    struct.pack_into(">9i", data, matrix_at, a << 16, b << 16, 0, c << 16, dd << 16, 0, 0, 0,
                     1 << 30)  # fmt: skip
    out = d / f"{name}.mp4"
    out.write_bytes(data)
    return out


def fast(d: Path) -> Path:
    """2000 fps in MKV, whose timestamps are milliseconds: frames share timestamps. Each
    frame is a gradient shifted by 37 gray levels, so neighbours are easy to tell apart."""
    out = d / "2000 fps.mkv"
    ffmpeg("-f", "lavfi", "-i",
           "nullsrc=size=160x120:rate=2000,geq=lum='mod(X+2*Y+37*N,256)':cb=128:cr=128",
           "-t", "0.1", *X264_B, out)  # fmt: skip
    return out


def _box(data: bytes | bytearray, kind: bytes) -> tuple[int, int]:
    """The payload span of the top-level MP4 box ``kind``."""
    at = 0
    while at < len(data):
        size, name = struct.unpack_from(">I4s", data, at)
        if name == kind:
            return at + 8, at + size
        at += size
    raise ValueError(f"no {kind!r} box")


def encoded(filename: str, *args: str) -> Callable[[Path], Path]:
    """A builder: the test pattern encoded with ``args`` into ``filename``."""
    return lambda d: encode(d / filename, *args)


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    route: str
    """How the integrated decode takes the file: "sequential" (``needs_sequential``),
    "fallback" (torchcodec raises one of ``FALLBACK_ERRORS``), or "torchcodec" (its
    frames, turned upright by ``rotate``, are used)."""


MPEG2 = ["-c:v", "mpeg2video", "-bf", "2"]
TEN_BIT = ["-c:v", "libx265", "-x265-params", "log-level=error", "-pix_fmt", "yuv420p10le"]
CASES = {
    "h264 B-frames.ts": Case(encoded("h264.ts", *X264_B), "sequential"),
    "mpeg2.ts": Case(encoded("mpeg2.ts", *MPEG2), "sequential"),
    "h264 B-frames.avi": Case(encoded("h264.avi", *X264_B), "sequential"),
    "size change.ts": Case(size_change, "sequential"),
    "damaged.mp4": Case(damaged, "fallback"),
    "zeroed middle.mp4": Case(zeroed, "fallback"),
    "cut in half.mp4": Case(cut_in_half, "fallback"),
    "starts at 5 s.mp4": Case(
        partial(remuxed, name="starts at 5 s.mp4", before=(), after=("-output_ts_offset", "5")),
        "torchcodec",
    ),
    "cut at 1 s.mp4": Case(
        partial(remuxed, name="cut at 1 s.mp4", before=("-ss", "1"), after=()), "sequential"
    ),
    "rotated 90.mp4": Case(partial(rotated, degrees=90), "torchcodec"),
    "rotated 180.mp4": Case(partial(rotated, degrees=180), "torchcodec"),
    "rotated 270.mp4": Case(partial(rotated, degrees=270), "torchcodec"),
    "mirrored.mp4": Case(partial(with_matrix, name="mirrored", matrix=(-1, 0, 0, 1)), "torchcodec"),
    "transposed.mp4": Case(
        partial(with_matrix, name="transposed", matrix=(0, 1, 1, 0)), "torchcodec"
    ),
    "program stream.mpg": Case(encoded("ps.mpg", *MPEG2), "sequential"),
    "h264.m2ts": Case(
        encoded("h264.m2ts", *X264_B, "-f", "mpegts", "-mpegts_m2ts_mode", "1"), "sequential"
    ),
    "interlaced h264.ts": Case(
        encoded("interlaced.ts", *X264_B, "-flags", "+ildct+ilme"), "sequential"
    ),
    "xvid B-frames.avi": Case(
        encoded("xvid.avi", "-c:v", "mpeg4", "-bf", "2", "-vtag", "XVID"), "sequential"
    ),
    "flv1.flv": Case(encoded("flv1.flv", "-c:v", "flv1"), "torchcodec"),
    "h264.flv": Case(encoded("h264.flv", *X264_B), "torchcodec"),
    "h263.3gp": Case(encoded("h263.3gp", "-s", "176x144", "-c:v", "h263"), "torchcodec"),
    "wmv2.wmv": Case(encoded("wmv2.wmv", "-c:v", "wmv2"), "torchcodec"),
    "theora.ogv": Case(encoded("theora.ogv", "-c:v", "libtheora", "-q:v", "7"), "sequential"),
    "prores.mov": Case(encoded("prores.mov", "-c:v", "prores_ks"), "torchcodec"),
    "2000 fps.mkv": Case(fast, "sequential"),
    "raw h264.h264": Case(encoded("raw.h264", *X264_B, "-f", "h264"), "sequential"),
    "raw mpeg2.m2v": Case(encoded("raw.m2v", *MPEG2, "-f", "mpeg2video"), "sequential"),
    "10-bit hevc.mp4": Case(encoded("10bit.mp4", *TEN_BIT), "torchcodec"),
    "h264.mkv": Case(encoded("h264.mkv", *X264_B), "torchcodec"),
    "vp9.webm": Case(
        encoded("vp9.webm", "-c:v", "libvpx-vp9", "-deadline", "realtime"), "torchcodec"
    ),
    "av1.mkv": Case(lambda _: SHARED_VIDEOS / "av1_video.mkv", "torchcodec"),
}
TORCHCODEC_COLOURS = {"10-bit hevc.mp4"}
"""Files torchcodec converts to RGB differently from the CLI (its own swscale settings for
10-bit 4:2:0: up to 84 levels at the test pattern's chroma edges after the shrink, 2 on
average), so that neighbouring frames (3 to 5 levels apart on average) are closer than
the tolerance: for these, each frame must be nearer its own reference than either
neighbour."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case's file, built once for the module."""
    built = {}
    for name, case in CASES.items():
        d = tmp_path_factory.mktemp("containers")
        built[name] = case.build(d)
    return built


def cli_frames(path: Path, stream_index: int = 0) -> list[np.ndarray]:
    """Every frame the ``ffmpeg`` CLI shows for the stream, ``(H, W, 3)`` uint8 RGB, each
    at its own size: written as PPM images, whose headers give the sizes."""
    data = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", path, "-map", f"0:{stream_index}",
         "-fps_mode", "passthrough", "-autoscale", "0", "-f", "image2pipe", "-c:v", "ppm",
         "-pix_fmt", "rgb24", "-"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    frames, at = [], 0
    while at < len(data):
        header = PPM_HEADER.match(data, at)
        assert header, data[at : at + 20]
        width, height = int(header[1]), int(header[2])
        at = header.end()
        frames.append(
            np.frombuffer(data, np.uint8, width * height * 3, at).reshape(height, width, 3)
        )
        at += width * height * 3
    return frames


def reference(name: str, path: Path, stream_index: int = 0) -> list[np.ndarray]:
    """The CLI's frames. After a size change the CLI scales frames to the first frame's
    size, even with ``-autoscale 0``; the size-change file's frames are its two segments'."""
    if name == "size change.ts":
        halves = [path.with_name("first half.ts"), path.with_name("second half.ts")]
        return [frame for half in halves for frame in cli_frames(half)]
    return cli_frames(path, stream_index)


def shrunk(frames: list[np.ndarray]) -> torch.Tensor:
    """``(H, W, 3)`` frames of any sizes → ``(N, 3, 32, 32)``, each shrunk on its own."""
    return torch.cat([SHRINK(torch.from_numpy(f.copy()).permute(2, 0, 1)[None]) for f in frames])


CONCEALED = {"zeroed middle.mp4": 4}
"""Sampled frames that may differ from the CLI's: the frames after the zeroed bytes, up to
the next key frame, are made up by FFmpeg's error concealment, which differs between
PyAV's FFmpeg 8 and the CLI's 5.1. The frame count must still be the CLI's."""


def assert_frames_match(got: torch.Tensor, want: torch.Tensor, concealed: int = 0) -> None:
    diff = (got.int() - want.int()).abs()
    worst = diff.flatten(1).amax(1).tolist()
    assert sum(w > TOLERANCE for w in worst) <= concealed, f"max difference per frame: {worst}"


def sampled_reference(name: str, path: Path, p: Probe) -> tuple[int, torch.Tensor]:
    frames = reference(name, path, p.stream_index)
    return len(frames), shrunk([frames[i] for i in sample_indices(len(frames), NUM_FRAMES)])


@pytest.mark.parametrize("name", CASES)
def test_sequential_decode_gives_ffmpegs_frames(name: str, corpus: dict[str, Path]) -> None:
    path = corpus[name]
    with path.open("rb") as f:
        p = probe(f, max_pixels=MAX_PIXELS)
        count = count_frames(f, max_pixels=MAX_PIXELS)
        got = decode_sequential(f, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]
    n, want = sampled_reference(name, path, p)
    assert count == n
    if name == "size change.ts":
        assert count == len(cli_frames(path))
    if name == "damaged.mp4":
        assert 90 <= count < 100  # frames were lost, the rest decode
    assert got.shape == (NUM_FRAMES, 3, 32, 32) and got.dtype == torch.uint8
    assert_frames_match(got, want, CONCEALED.get(name, 0))


@pytest.mark.parametrize("name", CASES)
def test_routing(name: str, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Read whole, each file takes its route: "sequential" files go front to back without
    torchcodec (``needs_sequential``), "fallback" ones after torchcodec's exact scan
    failed, and the others are torchcodec's alone."""
    steps: list[str] = []
    new_decoder, sequential_decode = decode._new_decoder, decode.decode_sequential

    def recording_decoder(video_decoder: type, source: object, device: str, mode: str) -> object:
        steps.append(mode)
        return new_decoder(video_decoder, source, device, mode)  # type: ignore[arg-type]

    def recording_sequential(*args: object, **kwargs: object) -> list[torch.Tensor]:
        steps.append("sequential")
        return sequential_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decode, "_new_decoder", recording_decoder)
    monkeypatch.setattr(decode, "decode_sequential", recording_sequential)
    decode_frames(str(corpus[name]), num_frames=NUM_FRAMES, shrink=SHRINK)
    expected = {
        "sequential": ["sequential"],
        "fallback": ["exact", "sequential"],
        "torchcodec": ["exact"],
    }
    assert steps == expected[CASES[name].route]


@pytest.mark.parametrize("read", ["whole", "in part"])
@pytest.mark.parametrize("name", CASES)
def test_decode_frames_gives_ffmpegs_frames(
    name: str, read: str, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's ``decode_frames`` gives the CLI's frames for every file, upright.
    "in part": a block size below the file's size, and no minimum of key frames, make
    every constant-rate indexed MP4 read by seeking (torchcodec's approximate mode), which
    is checked."""
    monkeypatch.setattr(decode, "KEY_FRAMES_PER_SAMPLE", 0)
    seek_modes: list[str] = []
    new_decoder = decode._new_decoder

    def recording(video_decoder: type, source: StorageReader, device: str, mode: str) -> object:
        seek_modes.append(mode)
        return new_decoder(video_decoder, source, device, mode)

    monkeypatch.setattr(decode, "_new_decoder", recording)
    path = corpus[name]
    block_size = 16 * MIB if read == "whole" else 8 * KIB
    assert read == "whole" or path.stat().st_size > block_size
    got = decode_frames(str(path), num_frames=NUM_FRAMES, block_size=block_size, shrink=SHRINK)
    with path.open("rb") as f:
        p = probe(f, max_pixels=MAX_PIXELS)
    seeks = read == "in part" and p.constant_rate and not needs_sequential(p)
    assert (seek_modes[:1] == ["approximate"]) == seeks, seek_modes
    assert got.shape == (NUM_FRAMES, 3, 32, 32) and got.dtype == torch.uint8
    if name not in TORCHCODEC_COLOURS:
        assert_frames_match(got, sampled_reference(name, path, p)[1], CONCEALED.get(name, 0))
        return
    every = shrunk(reference(name, path, p.stream_index)).int()
    for frame, i in zip(got.int(), sample_indices(len(every), NUM_FRAMES), strict=True):
        distance = (every - frame).abs().flatten(1).float().mean(1)
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(every)]
        assert distance[i] < distance[neighbours].min(), (i, distance[i - 1 : i + 2])


@pytest.mark.parametrize(
    ("name", "rotation", "hflip"),
    [
        ("rotated 90.mp4", 90, False),
        ("rotated 180.mp4", 180, False),
        ("rotated 270.mp4", 270, False),
        ("mirrored.mp4", 0, True),
        ("transposed.mp4", 270, True),
        ("h264 B-frames.ts", 0, False),
    ],
)
def test_probe_reads_the_display_matrix(
    name: str, rotation: int, hflip: bool, corpus: dict[str, Path]
) -> None:
    with corpus[name].open("rb") as f:
        p = probe(f, max_pixels=MAX_PIXELS)
        assert f.tell() == 0
    assert (p.rotation, p.hflip) == (rotation, hflip)


def test_probe(corpus: dict[str, Path]) -> None:
    with corpus["h264.m2ts"].open("rb") as f:
        ts = probe(f, max_pixels=MAX_PIXELS)
    assert (ts.format_name, ts.codec, ts.width, ts.height) == ("mpegts", "h264", 160, 120)
    assert ts.has_b_frames and ts.unreliable_timestamps and not ts.duplicate_timestamps
    with corpus["2000 fps.mkv"].open("rb") as f:
        mkv = probe(f, max_pixels=MAX_PIXELS)
    assert mkv.format_name == "matroska,webm" and mkv.duplicate_timestamps
    with corpus["flv1.flv"].open("rb") as f:
        flv = probe(f, max_pixels=MAX_PIXELS)
    assert not (flv.has_b_frames or flv.unreliable_timestamps or needs_sequential(flv))


def test_probe_picks_torchcodecs_stream(tmp_path: Path, corpus: dict[str, Path]) -> None:
    """Two video streams, the second the default: both pick it (``av_find_best_stream``)."""
    from torchcodec.decoders import VideoDecoder

    first = encode(tmp_path / "first.mp4", *X264_B)
    out = tmp_path / "two streams.mp4"
    ffmpeg("-i", first, "-i", corpus["h264.flv"],
           "-map", "0:v", "-map", "1:v", "-c", "copy", "-disposition:v:0", "0",
           "-disposition:v:1", "default", out)  # fmt: skip
    with out.open("rb") as f:
        p = probe(f, max_pixels=MAX_PIXELS)
    assert p.stream_index == 1 == VideoDecoder(str(out)).stream_index


def test_one_frame_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "one frame.mp4"
    ffmpeg(*TESTSRC[:4], "-frames:v", "1", "-c:v", "libx264", path)
    with path.open("rb") as f:
        got = decode_sequential(f, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]
    assert_frames_match(got, shrunk(cli_frames(path) * NUM_FRAMES))


def test_no_frame_decodes(tmp_path: Path) -> None:
    """Every packet damaged: the stream has no frames, and the video gets the zero tensor."""
    data = bytearray(encode(tmp_path / "undamaged.mp4", *X264_B).read_bytes())
    start, end = _box(data, b"mdat")
    data[start:end] = bytes(end - start)
    path = tmp_path / "all damaged.mp4"
    path.write_bytes(data)
    with path.open("rb") as f, pytest.raises(BadVideo, match="video stream has no frames"):
        decode_sequential(f, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]


def test_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", path)
    with path.open("rb") as f, pytest.raises(BadVideo, match="No valid stream"):
        probe(f, max_pixels=MAX_PIXELS)


def test_probe_refuses_a_large_frame_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "8k.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=gray:size=7680x4320:rate=25", "-frames:v", "2",
           "-c:v", "libx264", "-preset", "ultrafast", path)  # fmt: skip
    with path.open("rb") as f, pytest.raises(BadVideo, match="7680x4320 .* over MAX_PIXELS"):
        probe(f, max_pixels=4096 * 2160)


def test_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "text.mp4"
    path.write_bytes(b"this is not a video\n" * 100)
    with path.open("rb") as f, pytest.raises(BadVideo, match="Invalid data"):
        decode_sequential(f, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]


def test_frame_over_max_pixels_after_a_size_change(corpus: dict[str, Path]) -> None:
    """The header says 160x120; the 320x240 frames later are refused."""
    with corpus["size change.ts"].open("rb") as f:
        p = probe(f, max_pixels=MAX_PIXELS)
        assert (p.width, p.height) == (160, 120)
        with pytest.raises(BadVideo, match="320x240 .* over MAX_PIXELS"):
            decode_sequential(f, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=160 * 120)[0]


def test_shrink_gets_runs_of_one_size(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most ``CHUNK_BYTES`` of full-size frames go to ``shrink`` at once, all of one
    size: here two 160x120 frames a call, and 320x240 frames one by one."""
    monkeypatch.setattr(frames, "FRAME_CHUNK_BYTES", 2 * 3 * 160 * 120)
    calls: list[tuple[int, ...]] = []

    def recording(frames: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(frames.shape))
        return SHRINK(frames)

    with corpus["size change.ts"].open("rb") as f:
        decode_sequential(f, num_frames=NUM_FRAMES, shrink=recording, max_pixels=MAX_PIXELS)[0]
    assert calls == [(2, 3, 120, 160)] * 4 + [(1, 3, 240, 320)] * 8


@pytest.mark.parametrize("name", ["damaged.mp4", "rotated 90.mp4", "h264 B-frames.avi"])
def test_through_a_storage_reader(name: str, corpus: dict[str, Path]) -> None:
    """A ``StorageReader`` (no ``tell``) over the object reads as the file does: PyAV seeks
    in it, so an MP4 whose index is at its end decodes."""
    data = corpus[name].read_bytes()
    assert name != "damaged.mp4" or data.index(b"moov") > data.index(b"mdat")
    with corpus[name].open("rb") as f:
        want = decode_sequential(f, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]
    reader = StorageReader(io.BytesIO(data))
    assert probe(reader, max_pixels=MAX_PIXELS) == probe(io.BytesIO(data), max_pixels=MAX_PIXELS)
    got = decode_sequential(reader, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]
    assert torch.equal(got, want)


def test_storage_error_is_not_a_bad_video(corpus: dict[str, Path]) -> None:
    """A read that fails halfway is raised as the storage error, not taken for the end of
    the video (FFmpeg reads a failed read as the end of the file)."""
    data = corpus["h264 B-frames.ts"].read_bytes()

    class Failing(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > len(data) // 2:
                raise TimeoutError("read timed out")
            return super().read(size)

    reader = StorageReader(Failing(data))
    with pytest.raises(TimeoutError, match="read timed out"):
        decode_sequential(reader, num_frames=NUM_FRAMES, shrink=SHRINK, max_pixels=MAX_PIXELS)[0]


def test_fallback_errors() -> None:
    assert is_fallback_error(RuntimeError("Could not push packet to decoder: Invalid data"))
    assert not is_fallback_error(RuntimeError("CUDA error: out of memory"))


def test_rotate() -> None:
    """Counter-clockwise quarter turns, then a left-right mirror, on ``(..., H, W)``."""
    frames = torch.arange(6, dtype=torch.uint8).reshape(1, 1, 2, 3)  # [[0 1 2] [3 4 5]]
    assert rotate(frames, 90, False)[0, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert rotate(frames, 270, False)[0, 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    assert rotate(frames, 180, True)[0, 0].tolist() == [[3, 4, 5], [0, 1, 2]]


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, from the repository root, at most 120 s."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow  # two fresh interpreters importing torch: about 20 s
def test_pyav_and_torchcodec_in_one_process(corpus: dict[str, Path]) -> None:
    """PyAV's FFmpeg (bundled, FFmpeg 8) and the system FFmpeg torchcodec loads (5.1 here)
    decode the same frames in one process, whichever is imported first."""
    script = """
import sys
if sys.argv[1] == "av first":
    import av
    from torchcodec.decoders import VideoDecoder
else:
    from torchcodec.decoders import VideoDecoder
    import av
import numpy as np
with av.open(sys.argv[2]) as container:
    pyav = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
tc = VideoDecoder(sys.argv[2], seek_mode="exact").get_frames_at([0, 37, 74]).data
assert len(pyav) == 75
assert np.array_equal(tc.permute(0, 2, 3, 1).numpy(), np.stack([pyav[i] for i in (0, 37, 74)]))
"""
    for order in ("av first", "torchcodec first"):
        done = run_python(script, order, str(corpus["h264.flv"]))
        assert done.returncode == 0, done.stderr[-2000:]


def test_no_deadlock_when_pyav_logs_to_python(corpus: dict[str, Path]) -> None:
    """With PyAV's Python log callback on (importing torchvision turns it on), freeing a
    decoder whose frame threads are still busy deadlocks unless it was flushed first:
    ``probe`` stops decoding early, every time."""
    script = """
import sys
import av
av.logging.set_level(av.logging.ERROR)  # what importing torchvision does
from video_embeddings.sequential import probe
for _ in range(50):
    with open(sys.argv[1], "rb") as f:
        probe(f, max_pixels=10**8)
"""
    done = run_python(script, str(corpus["h264 B-frames.avi"]))
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("seed", range(4))
def test_corrupt_fragmented_mp4_is_never_a_system_fault(tmp_path: Path, seed: int) -> None:
    """A fragmented MP4 with a tenth of it overwritten by random bytes makes FFmpeg's
    demuxer ask for gigabytes ("Cannot allocate memory") for some seeds. With memory to
    spare that is the file's fault: the frames FFmpeg decodes are sampled, or the zero
    tensor if none, and the job is never failed for it."""
    clean = encode(tmp_path / "fragmented.mp4", *X264_B, "-g", "25",
                   "-movflags", "frag_keyframe+empty_moov")  # fmt: skip
    data = bytearray(clean.read_bytes())
    start, length = len(data) * 4 // 10, len(data) // 10
    data[start : start + length] = random.Random(seed).randbytes(length)
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(data)
    count = len(cli_frames(path))
    try:
        got = decode_frames(str(path), num_frames=NUM_FRAMES, shrink=SHRINK)
    except BadVideo:
        assert count == 0
    else:
        assert got.shape == (NUM_FRAMES, 3, 32, 32) and count > 0


def test_seeking_needs_a_constant_frame_rate(clips: dict[str, Path]) -> None:
    """Found by time alone only where the index steps evenly: torchcodec's single-frame
    lookup takes each frame's duration from the codec's nominal rate, which on a
    variable-frame-rate MP4 is wrong."""
    with clips["mp4"].open("rb") as f:
        assert probe(f, max_pixels=MAX_PIXELS).constant_rate
    with clips["vfr"].open("rb") as f:
        assert not probe(f, max_pixels=MAX_PIXELS).constant_rate
