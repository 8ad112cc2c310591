"""Decoding a video's sampled frames: by seeking through an MP4's index, by torchcodec's
exact scan, or front to back with PyAV, whichever gives FFmpeg's own frames for the file;
on the CPU or on NVDEC, and shrunk to the model's input as they are decoded."""

from __future__ import annotations

import importlib
import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from video_embeddings.frames import (
    WHOLE_VIDEO,
    Segment,
    check_segment,
    frames_per_run,
    in_order,
    segment_indices,
    segment_times,
    shrink_in_runs,
)
from video_embeddings.outcomes import BadVideo, SystemFault, decode_fault
from video_embeddings.sequential import (
    ISO_MEDIA,
    Probe,
    decode_sequential,
    is_fallback_error,
    needs_sequential,
    probe,
    rotate,
)
from video_embeddings.settings import (
    DEFAULT_ALLOWED_URI_PREFIXES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_BYTES,
    KIB,
    Settings,
)
from video_embeddings.storage import StorageReader, open_video
from video_embeddings.urls import redact

if TYPE_CHECKING:
    import torch

__all__ = [
    "NVDEC_STREAMS",
    "SEEK_BLOCK_SIZE",
    "KEY_FRAMES_PER_SAMPLE",
    "DecodeEngines",
    "SEGMENT_BLOCKS",
    "decode_frames",
    "decode_segments",
    "decode_with",
]

logger = logging.getLogger(__name__)

NVDEC_STREAMS = 8
"""Clips decoded at once on NVDEC: torchcodec's direct backend peaked at 8 threads on an
H100 (27.5 clips/s, docs/performance.md)."""

SEGMENT_BLOCKS = 32
"""A decode of segments that seeks reads the stretch they cover in about this many blocks
(at least ``SEEK_BLOCK_SIZE``, at most ``BLOCK_SIZE``). About two blocks are read in vain
per decode, the one past the last segment's end and the one holding the index (an MP4's
``moov`` at the end of the file), so the bytes read stay within a sixteenth more than the
segments need, in a few GETs per segment."""

SEEK_BLOCK_SIZE = 256 * KIB
"""Read size for a video read in part: each sampled frame needs the bytes from its key
frame on, a few hundred KiB at 2 s between key frames; larger blocks read more of what
lies between (docs/reading.md has the figures)."""

KEY_FRAMES_PER_SAMPLE = 4
"""Key frames per sampled frame from which a long MP4 is read in ``SEEK_BLOCK_SIZE``
blocks. Each sampled frame costs the bytes from its key frame on, half the distance
between key frames on average, so that reads about ``1 / (2 * KEY_FRAMES_PER_SAMPLE)``
of the file, one GET per block. With fewer key frames the samples cover most of the file
anyway and ``BLOCK_SIZE`` blocks take fewer GETs (a 20-minute MP4 with a key frame every
10 s: 0.34x the bytes in 351 GETs of 256 KiB, slower than 1.0x in 16 MiB blocks)."""

Shrink = Callable[["torch.Tensor"], "torch.Tensor"]


def decode_frames(uri: str, *, num_frames: int, **options: Any) -> torch.Tensor:
    """The video's sampled frames, ``(T, C, H, W)`` uint8 (``T = num_frames``), spread over
    the whole video: ``decode_segments`` of ``WHOLE_VIDEO``, with the same ``options``."""
    return decode_segments(uri, [WHOLE_VIDEO], num_frames=num_frames, **options)[0]


def decode_segments(
    uri: str,
    segments: Sequence[Segment],
    *,
    num_frames: int,
    block_size: int = Settings.block_size,
    allowed_prefixes: Sequence[str] = DEFAULT_ALLOWED_URI_PREFIXES,
    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    shrink: Shrink | None = None,
    deadline: float | None = None,
) -> list[torch.Tensor]:
    """Stream ``uri`` into a decoder once and return the sampled frames of each of
    ``segments`` (``(start_s, end_s)`` from the stream's start, or ``WHOLE_VIDEO``), each
    ``(T, C, H, W)`` uint8 (``T = num_frames``), upright (the stream's display matrix
    applied) and passed run by run through ``shrink`` when given: what the model sees, to
    debug an embedding.

    In an MP4/MOV, which records every frame's duration, the frames are those on screen
    at ``segment_times``: uniform in presentation time. Elsewhere they are the frames at
    ``segment_indices``, for the whole video ``round(linspace(0, n - 1, T))`` of the ``n``
    frames; at a constant frame rate both are the same frames. Three decodes, chosen by
    container and stream (``sequential.probe``):

    - an MP4/MOV larger than ``block_size`` whose header indexes every frame is read by
      seeking through that index to each frame (torchcodec's ``seek_mode="approximate"``),
      forward only, in blocks of ``_seek_block_size``: only the stretches the segments
      cover, and of those only part where key frames are dense. If that fails, the video
      is read whole as below;
    - MPEG-TS/PS, Ogg, raw streams, B-frames in AVI and timestamps shared by frames are
      decoded front to back by ``sequential.decode_sequential``, which counts frames
      instead of trusting timestamps;
    - anything else is scanned whole by torchcodec (``seek_mode="exact"``), and decoded
      front to back after all when torchcodec fails on it (``FALLBACK_ERRORS``: a damaged
      packet, a size change).

    One attempt, no retries. Raises ``BadVideo`` for a video that cannot be processed
    (undecodable, no video stream, frames over ``max_pixels``, object over ``max_bytes``,
    a URL ``allowed_prefixes`` refuses, a segment past the video's end or not ``0 <=
    start < end``), ``SystemFault``
    for exhausted memory, a CUDA error or a missing FFmpeg, and a storage error
    (``FileNotFoundError``, ``PermissionError``, ``TimeoutError``, an HTTP error) as the
    filesystem raised it. Past ``deadline`` (``time.monotonic()`` seconds) reads raise
    ``ObjectFault``.

    A header that declares a huge frame count or duration changes nothing: the header is
    trusted only where its frame count equals its index's, and the exact scan counts the
    frames that exist. A frame larger than ``max_pixels`` is refused before any is
    decoded."""
    for segment in segments:
        check_segment(segment)
    video_decoder = _video_decoder_class()
    whole = (video_decoder, segments, num_frames, max_pixels, device, shrink)
    options: dict[str, Any] = {
        "allowed_prefixes": allowed_prefixes, "max_bytes": max_bytes, "deadline": deadline
    }  # fmt: skip
    with _reading(uri, block_size, **options) as reader:
        if reader.size <= block_size:
            return _decode_whole(uri, reader, _probe(reader, max_pixels), *whole)
    probe_block_size = min(block_size, SEEK_BLOCK_SIZE)
    with _reading(uri, probe_block_size, **options) as reader:
        p = _probe(reader, max_pixels)
        seeks = p.constant_rate and not needs_sequential(p)
        seek_block_size = _seek_block_size(reader.size, p, segments, num_frames, block_size)
        if seeks and seek_block_size == probe_block_size:
            frames = _seek_to_samples(uri, reader, p, *whole)
            if frames is not None:
                return frames
            seeks = False
        if not seeks and probe_block_size == block_size:
            reader.seek(0)
            return _decode_whole(uri, reader, p, *whole)
    if seeks:
        with _reading(uri, seek_block_size, **options) as reader:
            frames = _seek_to_samples(uri, reader, p, *whole)
            if frames is not None:
                return frames
            if seek_block_size == block_size:
                reader.seek(0)
                return _decode_whole(uri, reader, p, *whole)
    with _reading(uri, block_size, **options) as reader:
        return _decode_whole(uri, reader, p, *whole)


def _seek_block_size(
    size: int, p: Probe, segments: Sequence[Segment], num_frames: int, block_size: int
) -> int:
    """The block size for reading the video ``p`` describes by seeking: ``SEEK_BLOCK_SIZE``
    where it has at least ``KEY_FRAMES_PER_SAMPLE`` key frames per sampled frame in the
    stretches ``segments`` cover (each sample then needs a small part of the file); else,
    for the whole video, ``block_size`` (the samples cover most of the file) and, for
    segments, a ``SEGMENT_BLOCKS``-th of the bytes they cover, between the two sizes."""
    covered = _covered(segments, p.duration)
    if p.key_frames * covered >= KEY_FRAMES_PER_SAMPLE * num_frames * len(segments):
        return min(block_size, SEEK_BLOCK_SIZE)
    if covered >= 1:
        return block_size
    return min(block_size, max(SEEK_BLOCK_SIZE, int(size * covered / SEGMENT_BLOCKS)))


def _covered(segments: Sequence[Segment], duration: float) -> float:
    """The fraction of a video of ``duration`` seconds that ``segments`` cover (overlaps
    counted twice); 1.0 when the duration is unknown."""
    if not duration > 0:
        return 1.0
    return sum(max(0.0, min(end, duration) - start) for start, end in segments) / duration


def _seek_to_samples(
    uri: str,
    reader: StorageReader,
    p: Probe,
    video_decoder: type,
    segments: Sequence[Segment],
    num_frames: int,
    max_pixels: int,
    device: str,
    shrink: Shrink | None,
) -> list[torch.Tensor] | None:
    """The sampled frames of each segment of an indexed MP4/MOV, found by seeking through
    its index (torchcodec's approximate mode): the reads go forward, one block at a time,
    so no block is read twice. ``None`` if that fails: reading the whole file then
    decides."""
    logger.debug(
        "finding the frames of %s by seeking, in %d-byte blocks", redact(uri), reader.block_size
    )
    try:
        decoder = _new_decoder(video_decoder, reader, device, "approximate")
        if decoder.metadata.begin_stream_seconds_from_header:
            # torchcodec's approximate mode takes a stream to start at 0 s
            raise BadVideo(
                f"the stream starts at {decoder.metadata.begin_stream_seconds_from_header} s"
            )
        return _decode_sampled(decoder, reader, p, segments, num_frames, max_pixels, shrink)
    except BadVideo as e:
        logger.info("reading %s whole: seeking failed (%s)", redact(uri), e)
        return None


@contextmanager
def _reading(
    uri: str,
    block_size: int,
    *,
    allowed_prefixes: Sequence[str],
    max_bytes: int,
    deadline: float | None,
) -> Iterator[StorageReader]:
    """``uri`` opened for reading in ``block_size`` blocks, through a ``StorageReader``."""
    with open_video(
        uri, block_size=block_size, allowed_prefixes=allowed_prefixes, max_bytes=max_bytes
    ) as file:
        yield StorageReader(file, deadline=deadline)


def _decode_whole(
    uri: str,
    reader: StorageReader,
    p: Probe,
    video_decoder: type,
    segments: Sequence[Segment],
    num_frames: int,
    max_pixels: int,
    device: str,
    shrink: Shrink | None,
) -> list[torch.Tensor]:
    """The sampled frames of each segment of the video ``p`` describes, read from its
    start: front to back where ``needs_sequential`` or torchcodec's scan fails, else by
    torchcodec's exact scan, which reads the whole file and then seeks back to each
    sampled frame's key frame: a file over ``CACHE_BYTES`` may read blocks twice."""
    if needs_sequential(p):
        logger.debug("decoding %s front to back (%s, %s)", redact(uri), p.format_name, p.codec)
    else:
        try:
            decoder = _new_decoder(video_decoder, reader, device, "exact")
            return _decode_sampled(decoder, reader, p, segments, num_frames, max_pixels, shrink)
        except BadVideo as e:
            if not is_fallback_error(e):
                raise
            logger.info("decoding %s front to back: torchcodec failed (%s)", redact(uri), e)
        reader.seek(0)
    return decode_sequential(
        reader,
        num_frames=num_frames,
        shrink=shrink,
        max_pixels=max_pixels,
        segments=segments,
        duration=p.duration,
    )


def _probe(reader: StorageReader, max_pixels: int) -> Probe:
    """``sequential.probe``, with a failed read raised as the storage error it was."""
    try:
        return probe(reader, max_pixels=max_pixels)
    except BadVideo:
        if reader.error is not None:
            raise reader.error from None
        raise


def _decode_sampled(
    decoder: Any,
    reader: StorageReader,
    p: Probe,
    segments: Sequence[Segment],
    num_frames: int,
    max_pixels: int,
    shrink: Shrink | None,
) -> list[torch.Tensor]:
    """The sampled frames of each segment from torchcodec's ``decoder`` over ``reader``,
    turned upright as ``p`` says and shrunk run by run: those on screen at
    ``segment_times`` in an MP4/MOV, which records every frame's duration, else those at
    ``segment_indices``. Frames shared by segments are decoded once."""
    try:
        meta = decoder.metadata
        _check_frame_size(meta, max_pixels)
        by_time = p.format_name == ISO_MEDIA
        count = meta.num_frames or 0
        if by_time:
            begin, end = meta.begin_stream_seconds, meta.end_stream_seconds
            keys: list[list[Any]] = [
                segment_times(begin, end, count, s, num_frames) for s in segments
            ]
        else:  # the stream's span as the scan found it, else as its header says
            span = (meta.end_stream_seconds or 0.0) - (meta.begin_stream_seconds or 0.0)
            duration = span if span > 0 else p.duration
            keys = [segment_indices(count, duration, s, num_frames) for s in segments]
        wanted = sorted({key for each in keys for key in each})
        upright = (
            (run_keys, rotate(run, p.rotation, p.hflip))
            for run_keys, run in _frames(decoder, wanted, by_time=by_time)
        )
        kept = shrink_in_runs(upright, shrink)
        return [in_order(kept, each) for each in keys]
    except (ValueError, RuntimeError, IndexError) as e:
        if reader.error is not None:
            raise reader.error from None
        raise decode_fault(e) from e


def _frames(
    decoder: Any, keys: list[Any], *, by_time: bool
) -> Iterator[tuple[list[Any], torch.Tensor]]:
    """``(keys, (N, C, H, W) frames)`` runs, in order: for each key the frame on screen at
    ``key`` seconds if ``by_time``, else frame number ``key``.

    After an exact scan torchcodec finds frames in its own index, a run of
    ``FRAME_CHUNK_BYTES`` at a time. In approximate mode it seeks to each time and decodes
    up to it, one frame at a time: its batch call would turn times into frame numbers at
    the header's average rate. Where torchcodec gives a frame that starts after the time
    asked (frames missing: a damaged stream, a header that declares more), a
    ``RuntimeError`` with one of ``FALLBACK_ERRORS`` is raised, so the video is decoded
    front to back instead."""
    if decoder.metadata.num_frames_from_content is None:  # no exact scan: approximate mode
        for seconds in keys:
            frame = decoder.get_frame_played_at(seconds)
            _check_on_screen(seconds, frame.pts_seconds)
            yield [seconds], frame.data[None]
        return
    meta = decoder.metadata
    step = frames_per_run(meta.width or 1, meta.height or 1)
    for start in range(0, len(keys), step):
        chunk = keys[start : start + step]
        if not by_time:
            yield chunk, decoder.get_frames_at(chunk).data
            continue
        batch = decoder.get_frames_played_at(chunk)
        for seconds, pts in zip(chunk, batch.pts_seconds.tolist(), strict=True):
            _check_on_screen(seconds, pts)
        yield chunk, batch.data


def _check_on_screen(seconds: float, frame_start: float) -> None:
    if frame_start > seconds + 1e-6:
        raise RuntimeError(
            f"no frame on screen at {seconds:.6f} s: the next frame found starts at "
            f"{frame_start:.6f} s"
        )


def _video_decoder_class() -> type:
    """Import torchcodec's decoder; a missing FFmpeg is a ``SystemFault`` with one line
    that says what to install instead of torchcodec's long traceback."""
    try:
        return importlib.import_module("torchcodec.decoders").VideoDecoder
    except (OSError, RuntimeError):
        raise SystemFault(
            "torchcodec could not load FFmpeg's shared libraries (versions 4 to 7); "
            "install them, e.g. `apt-get install ffmpeg` on Debian/Ubuntu."
        ) from None


def _new_decoder(video_decoder: type, source: StorageReader, device: str, seek_mode: str) -> Any:
    """torchcodec's decoder over ``source``. ``seek_mode="exact"`` scans the container
    once, so the frame count and timestamps are right on MKV/WebM without a duration and
    on variable-frame-rate files; ``"approximate"`` trusts the header, for an indexed MP4.
    On CUDA, torchcodec's direct NVDEC backend ("beta") keeps pace with the model; its
    default FFmpeg CUDA path does not (docs/performance.md). Errors as torchcodec raises
    them."""
    try:
        if device == "cpu":
            return video_decoder(source, seek_mode=seek_mode)
        from torchcodec.decoders import set_cuda_backend

        with set_cuda_backend("beta"):
            return video_decoder(source, seek_mode=seek_mode, device=device)
    except (ValueError, RuntimeError) as e:
        if source.error is not None:
            raise source.error from None
        raise decode_fault(e) from e


def decode_with(
    settings: Settings, uri: str, segments: Sequence[Segment], **options: Any
) -> list[torch.Tensor]:
    """``decode_segments`` with the frame count, block size, URL policy and size limits of
    ``settings``; ``options`` are ``device``, ``shrink`` and ``deadline``."""
    return decode_segments(
        uri,
        segments,
        num_frames=settings.num_frames,
        block_size=settings.block_size,
        allowed_prefixes=settings.allowed_uri_prefixes,
        max_bytes=settings.max_video_bytes,
        max_pixels=settings.max_pixels,
        **options,
    )


def _check_frame_size(metadata: Any, max_pixels: int) -> None:
    """Refuse, from the stream's header, frames larger than MAX_PIXELS."""
    width, height = metadata.width or 0, metadata.height or 0
    if width * height > max_pixels:
        raise BadVideo(
            f"frame size {width}x{height} ({width * height} pixels) is over "
            f"MAX_PIXELS ({max_pixels})"
        )


class DecodeEngines:
    """Lends each decode whichever engine is free, so NVDEC streams and CPU threads feed
    the same batches; the faster engine comes back sooner and so takes more clips."""

    def __init__(self, *, nvdec: int, cpu: int) -> None:
        self.nvdec, self.cpu, self.size = nvdec, cpu, nvdec + cpu
        self._free: queue.SimpleQueue[str] = queue.SimpleQueue()
        for device in ["cuda"] * nvdec + ["cpu"] * cpu:
            self._free.put(device)
        self._nvdec_missing = False

    def decode(
        self,
        uri: str,
        segments: Sequence[Segment],
        settings: Settings,
        shrink: Callable[..., Any],
        *,
        deadline: float,
    ) -> list[torch.Tensor]:
        """Decode on the engine lent; a clip NVDEC cannot take (AV1 on an H100, say) is
        decoded again on the CPU before it counts as a bad video."""
        device = self._free.get()
        try:
            if device == "cuda":
                try:
                    return decode_with(
                        settings, uri, segments, device="cuda", shrink=shrink, deadline=deadline
                    )
                except BadVideo as e:
                    self._note_nvdec_failure(uri, e, settings)
            return decode_with(
                settings, uri, segments, device="cpu", shrink=shrink, deadline=deadline
            )
        finally:
            if not (device == "cuda" and self._nvdec_missing):
                self._free.put(device)

    def _note_nvdec_failure(self, uri: str, error: BadVideo, settings: Settings) -> None:
        if "Unsupported device" not in str(error):
            logger.info("NVDEC cannot decode %s (%s); decoding it on the CPU", redact(uri), error)
            return
        if settings.decode_device == "cuda":
            raise SystemFault(
                "VIDEO_DECODE_DEVICE=cuda, but this torchcodec build cannot decode on CUDA; "
                "install torchcodec's CUDA build or set VIDEO_DECODE_DEVICE=auto."
            ) from None
        if not self._nvdec_missing:
            self._nvdec_missing = True
            logger.warning("this torchcodec build has no CUDA decoder: decoding on the CPU")
