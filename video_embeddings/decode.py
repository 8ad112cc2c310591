"""Sampling and decoding: which frames a video gives the model, decoded by torchcodec on
the CPU or on NVDEC, and shrunk to the model's input as they are decoded."""

from __future__ import annotations

import importlib
import logging
import queue
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from video_embeddings.outcomes import BadVideo, SystemFault, is_system_fault
from video_embeddings.settings import (
    DEFAULT_ALLOWED_URI_PREFIXES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_BYTES,
    MIB,
    Settings,
)
from video_embeddings.storage import StorageReader, open_video
from video_embeddings.urls import redact

if TYPE_CHECKING:
    import torch

__all__ = [
    "FRAME_CHUNK_BYTES",
    "NVDEC_STREAMS",
    "DecodeEngines",
    "decode_frames",
    "decode_with",
    "sample_indices",
]

logger = logging.getLogger(__name__)

FRAME_CHUNK_BYTES = 64 * MIB
"""Full-resolution frames one decode thread holds at once: each chunk is shrunk to the
model's crop before the next is decoded."""

NVDEC_STREAMS = 8
"""Clips decoded at once on NVDEC: torchcodec's direct backend peaked at 8 threads on an
H100 (27.5 clips/s, docs/performance.md)."""


def sample_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """``round(linspace(0, n - 1, num_frames))``: spread over the whole video, repeating
    frames when the video is shorter than ``num_frames``. Raises ``BadVideo`` for a
    stream without frames."""
    if num_video_frames < 1:
        raise BadVideo("video stream has no frames")
    return np.round(np.linspace(0, num_video_frames - 1, num_frames)).astype(int).tolist()


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


def _new_decoder(video_decoder: type, source: StorageReader, device: str) -> Any:
    """``seek_mode="exact"`` scans the container once, so the frame count and the frames
    are right on MKV/WebM without a duration and on variable-frame-rate files. On CUDA,
    torchcodec's direct NVDEC backend ("beta") keeps pace with the model; its default
    FFmpeg CUDA path does not (docs/performance.md)."""
    if device == "cpu":
        return video_decoder(source, seek_mode="exact")
    from torchcodec.decoders import set_cuda_backend

    with set_cuda_backend("beta"):
        return video_decoder(source, seek_mode="exact", device=device)


def _frames_in_chunks(
    decoder: Any, indices: list[int], shrink: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Decode ``indices`` a chunk at a time, shrinking each chunk before the next, so a
    thread never holds more than ``FRAME_CHUNK_BYTES`` of full-resolution frames (or one
    frame, if a frame is larger)."""
    import torch

    meta = decoder.metadata
    frame_bytes = 3 * (meta.width or 1) * (meta.height or 1)
    step = max(1, FRAME_CHUNK_BYTES // frame_bytes)
    parts = []
    for start in range(0, len(indices), step):
        frames = decoder.get_frames_at(indices[start : start + step]).data
        parts.append(shrink(frames) if shrink else frames)
    return torch.cat(parts)


def decode_frames(
    uri: str,
    *,
    num_frames: int,
    block_size: int = Settings.block_size,
    allowed_prefixes: Sequence[str] = DEFAULT_ALLOWED_URI_PREFIXES,
    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    shrink: Callable[[torch.Tensor], torch.Tensor] | None = None,
    deadline: float | None = None,
) -> torch.Tensor:
    """Stream ``uri`` into torchcodec on ``device`` and return its sampled frames,
    ``(T, C, H, W)`` uint8 as decoded (``T = num_frames``), passed chunk by chunk
    through ``shrink`` when given: what the model sees, to debug an embedding.

    One attempt, no retries. Raises ``BadVideo`` for a video that cannot be processed
    (undecodable, no video stream, frames over ``max_pixels``, object over ``max_bytes``,
    a URL ``allowed_prefixes`` refuses), ``SystemFault`` for exhausted memory, a CUDA
    error or a missing FFmpeg, and a storage error (``FileNotFoundError``,
    ``PermissionError``, ``TimeoutError``, an HTTP error) as the filesystem raised it.
    Past ``deadline`` (``time.monotonic()`` seconds) reads raise ``ObjectFault``.

    A header that declares a huge frame count or duration changes nothing: the exact scan
    counts the frames that exist, and only those are sampled. A frame larger than
    ``max_pixels`` is refused before any is decoded."""
    video_decoder = _video_decoder_class()
    with open_video(
        uri, block_size=block_size, allowed_prefixes=allowed_prefixes, max_bytes=max_bytes
    ) as file:
        reader = StorageReader(file, deadline=deadline)
        try:
            decoder = _new_decoder(video_decoder, reader, device)
            _check_frame_size(decoder.metadata, max_pixels)
            indices = sample_indices(decoder.metadata.num_frames or 0, num_frames)
            return _frames_in_chunks(decoder, indices, shrink)
        except (ValueError, RuntimeError) as e:
            if reader.error is not None:
                raise reader.error from None
            if is_system_fault(e):
                raise SystemFault(" ".join(str(e).split())) from e
            raise BadVideo(" ".join(str(e).split())) from e  # one log line


def decode_with(settings: Settings, uri: str, **options: Any) -> torch.Tensor:
    """``decode_frames`` with the frame count, block size, URL policy and size limits of
    ``settings``; ``options`` are ``device``, ``shrink`` and ``deadline``."""
    return decode_frames(
        uri,
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
        self, uri: str, settings: Settings, shrink: Callable[..., Any], *, deadline: float
    ) -> torch.Tensor:
        """Decode on the engine lent; a clip NVDEC cannot take (AV1 on an H100, say) is
        decoded again on the CPU before it counts as a bad video."""
        device = self._free.get()
        try:
            if device == "cuda":
                try:
                    return decode_with(
                        settings, uri, device="cuda", shrink=shrink, deadline=deadline
                    )
                except BadVideo as e:
                    self._note_nvdec_failure(uri, e, settings)
            return decode_with(settings, uri, device="cpu", shrink=shrink, deadline=deadline)
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
