"""Sequential decoding with PyAV: every frame of the video stream, in the order FFmpeg's
decoder outputs them, for the files on which torchcodec 0.8.1's exact-seek index is wrong.

torchcodec indexes a file by its packets' timestamps and seeks to each sampled frame. That
index loses or shifts frames where timestamps do not identify frames: MPEG-TS and M2TS,
MPEG program streams, raw elementary streams, B-frames in AVI, timestamps coarser than the
frame rate (a 2000 fps MKV has millisecond timestamps). It also fails on a frame size
change mid-stream and on a damaged packet, which FFmpeg skips. Here the video is decoded
front to back twice: the first pass counts the frames FFmpeg outputs, the second keeps the
ones at the sampled positions, so the frames are FFmpeg's own, counted over the frames it
shows, as the ``ffmpeg`` CLI shows them (``-fps_mode passthrough``).

PyAV bundles its own FFmpeg libraries (``av`` 18: FFmpeg 8), under their own library names
and symbol versions, so it loads next to the system FFmpeg that torchcodec uses."""

from __future__ import annotations

import contextlib
import io
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import av
import numpy as np
from av.format import Flags
from av.sidedata.sidedata import Type as SideDataType
from av.video.stream import VideoStream

from video_embeddings.frames import WHOLE_VIDEO, Segment, in_order, segment_indices, shrink_in_runs
from video_embeddings.outcomes import BadVideo, SystemFault, decode_fault, memory_is_short

if TYPE_CHECKING:
    import torch
    from av.container import InputContainer
    from av.sidedata.sidedata import SideData
    from av.video.frame import VideoFrame

__all__ = [
    "FALLBACK_ERRORS",
    "ISO_MEDIA",
    "PROBE_PACKETS",
    "Probe",
    "Source",
    "count_frames",
    "decode_sequential",
    "is_fallback_error",
    "needs_sequential",
    "probe",
    "read_duration",
    "rotate",
]


class Source(Protocol):
    """A seekable binary file object whose ``seek`` returns the new position: an open
    file, ``io.BytesIO``, a ``StorageReader``."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...


FALLBACK_ERRORS = (
    "no frame on screen at",  # frames missing: a damaged stream (decode._frames)
    "Invalid pts in seconds",  # the header's span is longer than the frames that exist
    "frame pts is",  # the same, from torchcodec's batch call
    "Cannot allocate memory",  # a damaged packet asked for gigabytes (not a host fault)
    "Requested next frame while there are no more frames left to decode",  # MPEG-TS/PS
    "pre-allocated tensor",  # a frame size change mid-stream
    "Could not push packet to decoder",  # a damaged packet
    "Could not seek file to pts",  # a raw elementary stream (.h264, .hevc)
)
"""Parts of torchcodec 0.8.1 error messages that mean its exact-seek index failed on a
file FFmpeg can decode: decode such a file with ``decode_sequential`` instead."""

PROBE_PACKETS = 16
"""Packets of the video stream that ``probe`` reads and decodes (more if no frame has
decoded yet), to find the display matrix and a timestamp shared by two frames."""

ISO_MEDIA = "mov,mp4,m4a,3gp,3g2,mj2"
"""FFmpeg's demuxer for ISO base media files: MP4, MOV, M4V, 3GP."""

_UNRELIABLE_TIMESTAMPS = Flags.ts_discont | Flags.no_timestamps
"""Demuxers whose timestamps may jump (MPEG-TS, MPEG-PS, Ogg) or that have none (raw
``.h264``, ``.hevc``, ``.m2v`` elementary streams)."""


@dataclass(frozen=True)
class Probe:
    """What the container's header and the first frame say about the video stream FFmpeg
    would decode (``av_find_best_stream``, torchcodec's choice too)."""

    format_name: str
    """FFmpeg's demuxer: "mpegts" (M2TS too), "mpeg" (program stream, VOB),
    "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "flv", "asf", "ogg", "h264"..."""
    stream_index: int
    codec: str
    """FFmpeg's decoder name, e.g. "h264", "mpeg2video", "mpeg4"."""
    width: int
    height: int
    """Frame size in the header, before rotation; frames may change size later."""
    has_b_frames: bool
    """The decoder reorders frames (B-frames), so packets are not in display order."""
    unreliable_timestamps: bool
    """The demuxer's timestamps may jump (MPEG-TS/PS, Ogg) or are missing (raw streams)."""
    duplicate_timestamps: bool
    """Two of the first ``PROBE_PACKETS`` packets share a timestamp: the container's clock
    is coarser than the frame rate."""
    indexed: bool
    """An MP4/MOV/3GP whose header indexes every frame (its sample count equals the
    entries of its sample tables): frames can be found by seeking, without a scan. Not a
    fragmented MP4, whose header indexes no frame."""
    key_frames: int
    """Key frames in the index of an ``indexed`` file, else 0."""
    constant_rate: bool
    """The index of an ``indexed`` file gives every frame the same duration (its
    timestamps step evenly), so frames can be found by time alone; else False."""
    trimmed: bool
    """The index marks frames to discard: an edit list starts the video after frames the
    decoder needs (an MP4 cut without re-encoding), which torchcodec 0.8.1 shows in place
    of the first frames kept."""
    rotation: int
    """Counter-clockwise quarter turns, in degrees (0, 90, 180 or 270), that the stream's
    display matrix applies to the decoded frame (for a matrix that does not mirror, FFmpeg's
    ``av_display_rotation_get``, PyAV's ``frame.rotation``); a rotation between quarter
    turns is rounded to the nearest."""
    hflip: bool
    """The display matrix also mirrors the frame left-right, after the rotation."""
    duration: float
    """Seconds the stream lasts by its container's header (``stream_duration``); 0.0 when
    the header does not say."""


def probe(source: Source, *, max_pixels: int) -> Probe:
    """Read the header of the video in ``source`` (a seekable binary file object) and its
    first ``PROBE_PACKETS`` packets, of which only those up to the first frame are decoded
    (the first frame carries the display matrix), then seek ``source`` back to 0.

    Raises ``BadVideo`` for a file FFmpeg cannot open, without a video stream FFmpeg can
    decode, or with frames over ``max_pixels`` (in the header: refused before any is
    decoded); a storage error from ``source`` propagates as raised."""
    with _decoding(source) as frames:
        container, stream = frames.container, frames.stream
        context = stream.codec_context
        _check_size(context.width, context.height, max_pixels)
        first = _first_frame(frames)
        if first is not None:
            _check_size(first.width, first.height, max_pixels)
        rotation, hflip = _orientation(first) if first is not None else (0, False)
        indexed = container.format.name == ISO_MEDIA and 0 < stream.frames == len(
            stream.index_entries
        )
        result = Probe(
            format_name=container.format.name,
            stream_index=stream.index,
            codec=context.name,
            width=context.width,
            height=context.height,
            has_b_frames=bool(context.has_b_frames),
            unreliable_timestamps=bool(Flags(container.format.flags) & _UNRELIABLE_TIMESTAMPS),
            duplicate_timestamps=len(set(frames.timestamps)) < len(frames.timestamps),
            indexed=indexed,
            key_frames=sum(e.is_keyframe for e in stream.index_entries) if indexed else 0,
            constant_rate=indexed and _even_steps(stream),
            trimmed=any(e.is_discard for e in stream.index_entries),
            rotation=rotation,
            hflip=hflip,
            duration=stream_duration(container, stream),
        )
    _raise_storage_error(source)
    source.seek(0)
    return result


def read_duration(source: Source) -> float:
    """``stream_duration`` of the best video stream of ``source``, from its container's
    header alone: nothing is decoded, and only the header's bytes are read (an MP4's
    ``moov`` box, wherever it lies). Raises ``BadVideo`` for a file FFmpeg cannot open or
    without a video stream; a storage error from ``source`` propagates as raised."""
    with _decoding(source) as frames:
        duration = stream_duration(frames.container, frames.stream)
    _raise_storage_error(source)
    return duration


def stream_duration(container: InputContainer, stream: VideoStream) -> float:
    """Seconds of ``stream``: its own duration in the header (``duration x time_base``),
    else its Matroska ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``, which FFmpeg and mkvmerge
    write per track: the end of its last frame, so less its start time), else the
    container's (``AVFormatContext.duration``, which FFmpeg estimates from the first and
    last timestamps of an MPEG-TS/PS; it also counts other streams and a late start), else
    0.0."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        with contextlib.suppress(ValueError):
            hours, minutes, seconds = tag.split(":")
            end = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            start = (
                stream.start_time * stream.time_base
                if stream.start_time and stream.time_base
                else 0
            )
            return end - float(start)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _even_steps(stream: VideoStream) -> bool:
    """Whether the timestamps of ``stream``'s index entries step evenly."""
    stamps = [e.timestamp for e in stream.index_entries]
    return len({b - a for a, b in zip(stamps, stamps[1:], strict=False)}) <= 1


def _first_frame(frames: _Frames) -> VideoFrame | None:
    """Demux ``PROBE_PACKETS`` packets (more if no frame has decoded yet), decoding them
    only until the first frame comes out; ``None`` if none does."""
    first: VideoFrame | None = None
    for packet in frames.packets():
        if first is None:
            first = next(iter(frames.decode(packet)), None)
        if first is not None and frames.count >= PROBE_PACKETS:
            return first
    return first or next(iter(frames.decode(None)), None)


def needs_sequential(p: Probe) -> bool:
    """Whether torchcodec's exact seek is known to give wrong frames for this stream: a
    demuxer with unreliable timestamps (MPEG-TS, M2TS, MPEG-PS, Ogg, raw elementary
    streams), B-frames in AVI, timestamps shared by frames, or frames an edit list
    discards.

    Rotation is not a reason: ``rotate`` turns torchcodec's frames upright. A size change
    or a damaged packet shows only when decoding; torchcodec then raises an error that
    ``is_fallback_error`` recognises."""
    avi_b_frames = p.format_name == "avi" and p.has_b_frames
    return p.unreliable_timestamps or avi_b_frames or p.duplicate_timestamps or p.trimmed


def is_fallback_error(error: BaseException) -> bool:
    """Whether torchcodec's ``error`` is one of ``FALLBACK_ERRORS``: its index failed on a
    file that ``decode_sequential`` can decode."""
    text = str(error)
    return any(part in text for part in FALLBACK_ERRORS)


def rotate(frames: torch.Tensor, degrees: int, hflip: bool) -> torch.Tensor:
    """``(..., H, W)`` → the same frames upright: turned ``degrees`` counter-clockwise (a
    multiple of 90; 90 or 270 gives ``(..., W, H)``), then mirrored left-right if
    ``hflip``, as players apply the display matrix (``Probe.rotation``, ``Probe.hflip``).
    Same dtype and device; ``frames`` itself when there is nothing to do."""
    import torch

    if degrees % 360:
        frames = torch.rot90(frames, degrees // 90 % 4, dims=(-2, -1))
    return frames.flip(-1) if hflip else frames


def decode_sequential(
    source: Source,
    *,
    num_frames: int,
    shrink: Callable[[torch.Tensor], torch.Tensor] | None,
    max_pixels: int,
    segments: Sequence[Segment] = (WHOLE_VIDEO,),
    duration: float = 0.0,
) -> list[torch.Tensor]:
    """Decode the best video stream of ``source`` (a seekable binary file object) front to
    back and return ``num_frames`` frames for each of ``segments``, each
    ``(num_frames, C, crop, crop)`` uint8 as ``shrink`` returns them: for the whole video
    the frames at ``round(linspace(0, n - 1, num_frames))`` of the ``n`` frames FFmpeg's
    decoder outputs, for a segment of a video of ``duration`` seconds those of
    ``segment_indices``; each upright (its display matrix applied), in RGB, and resized
    by ``shrink`` from its own size.

    ``shrink`` takes ``(N, 3, H, W)`` uint8 on the CPU, a run of kept frames of one size
    (``shrink_in_runs``), and returns ``(N, C, crop, crop)``; without it the frames are
    returned at their size, ``(num_frames, 3, H, W)``.

    Damaged packets are skipped as FFmpeg skips them, and so are the frames they would have
    given; a demuxing error ends the stream there. One frame is enough: fewer frames than
    ``num_frames`` repeat, as ``sample_indices`` repeats them. Raises ``BadVideo`` when no
    frame decodes, for a file FFmpeg cannot open, and for a frame over ``max_pixels``
    (header or decoded) before it is converted; ``SystemFault`` when memory runs out; a
    storage error from ``source`` (one that a ``StorageReader`` remembers included)
    propagates as raised."""
    count = count_frames(source, max_pixels=max_pixels)
    indices = [segment_indices(count, duration, s, num_frames) for s in segments]
    wanted = {i for each in indices for i in each}
    with _decoding(source) as frames:
        kept = shrink_in_runs(_wanted(frames, wanted), shrink)
    _raise_storage_error(source)
    source.seek(0)
    missing = sorted(wanted - kept.keys())
    if missing:
        raise BadVideo(
            f"the second decoding pass gave fewer frames than the first ({count}): "
            f"frame {missing[0]} is missing"
        )
    return [in_order(kept, each) for each in indices]


def count_frames(source: Source, *, max_pixels: int) -> int:
    """The number of frames FFmpeg's decoder outputs for the best video stream of
    ``source`` (a seekable binary file object), decoded front to back without converting
    a frame: ``decode_sequential``'s first pass. Raises ``BadVideo`` when none decodes
    (with the last decoding error) and for a frame over ``max_pixels``, in the header or
    decoded; errors as ``decode_sequential``."""
    with _decoding(source) as frames:
        context = frames.stream.codec_context
        _check_size(context.width, context.height, max_pixels)
        count = 0
        for frame in frames:
            _check_size(frame.width, frame.height, max_pixels)
            count += 1
    _raise_storage_error(source)
    if count == 0:
        detail = f" ({frames.last_error})" if frames.last_error else ""
        raise BadVideo(f"video stream has no frames{detail}")
    return count


class _Frames:
    """The frames FFmpeg's decoder outputs for ``stream``, decoded as the ``ffmpeg`` CLI
    decodes: a packet the decoder refuses is skipped (its error kept in ``last_error``),
    and a demuxing error ends the input, after which the decoder is drained. It counts the
    packets demuxed in ``count`` and keeps the timestamps of the first
    ``PROBE_PACKETS`` in ``timestamps``."""

    def __init__(self, container: InputContainer, stream: VideoStream) -> None:
        self.container, self.stream = container, stream
        self.last_error: str | None = None
        self.count = 0
        self.timestamps: list[int] = []

    def __iter__(self) -> Iterator[VideoFrame]:
        for packet in self.packets():
            yield from self.decode(packet)
        yield from self.decode(None)

    def packets(self) -> Iterator[av.Packet]:
        """The stream's packets, up to the end of the input or a demuxing error, without
        the empty packet ``demux`` ends with."""
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as e:
                self._note(e)
                return
            if packet.size == 0:
                continue
            self.count += 1
            if packet.pts is not None and self.count <= PROBE_PACKETS:
                self.timestamps.append(packet.pts)
            yield packet

    def decode(self, packet: av.Packet | None) -> list[VideoFrame]:
        """The frames ``packet`` completes (``None`` drains the decoder); none if the
        decoder refuses it."""
        try:
            return self.stream.decode(packet)
        except av.FFmpegError as e:
            self._note(e)
            return []

    def _note(self, error: av.FFmpegError) -> None:
        """Keep ``error``; raise ``SystemFault`` if it is FFmpeg's ENOMEM and the worker
        is short of memory (else the packet asked for too much, and is skipped)."""
        if isinstance(error, MemoryError) and memory_is_short():
            raise SystemFault(f"out of memory while decoding: {error.strerror}") from error
        self.last_error = error.strerror


def _wanted(frames: _Frames, wanted: set[int]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``([position], (1, 3, H, W) uint8)`` for each frame at a position in ``wanted``, in
    RGB and upright; decoding stops after the last one."""
    import torch

    last = max(wanted)
    for position, frame in enumerate(frames):
        if position in wanted:
            rgb = torch.from_numpy(_rgb(frame)).permute(2, 0, 1)
            yield [position], rotate(rgb, *_orientation(frame))[None]
        if position == last:
            return


def _rgb(frame: VideoFrame) -> np.ndarray:
    """``frame`` in RGB, ``(H, W, 3)`` uint8, converted by the ``format`` filter as the
    ``ffmpeg`` CLI and torchcodec convert it: bit for bit their output, where PyAV's own
    ``to_ndarray(format="rgb24")`` differs on interlaced, 10-bit and 4:1:1 frames."""
    graph = av.filter.Graph()
    source = graph.add(
        "buffer",
        video_size=f"{frame.width}x{frame.height}",
        pix_fmt=frame.format.name,
        time_base="1/1000",  # timestamps play no part in a format conversion
    )
    convert = graph.add("format", "rgb24")
    sink = graph.add("buffersink")
    source.link_to(convert)
    convert.link_to(sink)
    graph.configure()
    graph.vpush(frame)
    return graph.vpull().to_ndarray()


def _orientation(frame: VideoFrame) -> tuple[int, bool]:
    """``frame``'s display matrix as (counter-clockwise degrees, mirrored after): FFmpeg's
    ``av_display_rotation_get`` of the matrix with any mirroring taken out, rounded to a
    quarter turn. (0, False) without a matrix.

    The matrix maps a decoded pixel ``(x, y)`` to ``(a x + c y, b x + d y)`` on screen; a
    negative determinant mirrors, and mirroring left-right after the rotation negates
    ``a`` and ``c``."""
    # PyAV's stub types side_data as a TypedDict; it is a SideDataContainer of SideData
    side_data = cast("Iterable[SideData]", frame.side_data)
    matrix = next((s for s in side_data if s.type == SideDataType.DISPLAYMATRIX), None)
    if matrix is None:
        return 0, False
    a, b, _, c, d, *_ = struct.unpack("=9i", bytes(matrix))
    hflip = a * d - b * c < 0
    if hflip:
        a, c = -a, -c
    quarter_turns = round(-math.degrees(math.atan2(b, a)) / 90)
    return quarter_turns % 4 * 90, hflip


@contextmanager
def _decoding(source: Source) -> Iterator[_Frames]:
    """The frames of the best video stream of ``source``, opened by FFmpeg from its start;
    ``BadVideo`` if FFmpeg cannot open it.

    On the way out the decoder is flushed before it is freed. ``flush_buffers`` waits for
    FFmpeg's frame threads with the GIL released; freeing the decoder waits for them with
    the GIL held, and a frame thread that logs an error then waits for the GIL in PyAV's
    log callback: a deadlock. (torchvision installs that callback when it is imported: it
    sets ``av.logging`` to ERROR.)"""
    source.seek(0)
    try:
        container = av.open(_Seekable(source), mode="r", metadata_errors="replace")
    except av.FFmpegError as e:
        raise _fault(e, source) from e
    with container:
        stream = _video_stream(container)
        try:
            yield _Frames(container, stream)
        finally:
            stream.codec_context.flush_buffers()


class _Seekable:
    """``source`` with the ``tell`` PyAV needs to seek in it: without one (a
    ``StorageReader`` has none) PyAV reads the file as a stream, and an MP4 whose index is
    at its end cannot be read."""

    def __init__(self, source: Source) -> None:
        self.read, self.seek = source.read, source.seek

    def tell(self) -> int:
        return self.seek(0, io.SEEK_CUR)


def _video_stream(container: InputContainer) -> VideoStream:
    """The stream ``av_find_best_stream`` picks, as torchcodec does, set up for slice
    threads; ``BadVideo`` without one FFmpeg can decode.

    Not frame threads: with them a decoding error surfaces on a later packet, and PyAV
    drops the frames that call had decoded (2 of 48 frames of an MP4 cut in half, which
    the ``ffmpeg`` CLI decodes). Slice threads decoded a 10 s 720p H.264 stream in 0.63 s
    against 0.46 s on two cores; the decode threads already run one video per core."""
    stream = container.streams.best("video")
    if not isinstance(stream, VideoStream):
        raise BadVideo("No valid stream: the file has no video stream")
    if stream.codec_context is None:
        raise BadVideo(f"No valid stream: no decoder for video stream {stream.index}")
    stream.thread_type = "SLICE"
    return stream


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse a frame larger than MAX_PIXELS, as ``decode`` refuses it from the header."""
    if width * height > max_pixels:
        raise BadVideo(
            f"frame size {width}x{height} ({width * height} pixels) is over "
            f"MAX_PIXELS ({max_pixels})"
        )


def _fault(error: av.FFmpegError, source: Source) -> Exception:
    """What an FFmpeg error opening ``source`` means: the storage error ``source``
    remembers, if any; ``SystemFault`` for exhausted memory; else ``BadVideo``, in one
    line."""
    remembered = getattr(source, "error", None)
    if isinstance(remembered, Exception):
        return remembered
    return type(decode_fault(error))(" ".join(str(error.strerror).split()))


def _raise_storage_error(source: Source) -> None:
    """Raise the storage error a ``StorageReader`` remembers: FFmpeg reads a failed read as
    the end of the file, and the frames decoded so far must not pass for the video's."""
    remembered = getattr(source, "error", None)
    if isinstance(remembered, Exception):
        raise remembered
