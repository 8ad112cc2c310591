"""Which frames of a video the model sees, and how decoded frames are held on their way to
the model's size: a bounded run of full-size frames at a time, each run of one size."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from video_embeddings.outcomes import BadVideo
from video_embeddings.settings import MIB

if TYPE_CHECKING:
    import torch

__all__ = [
    "FRAME_CHUNK_BYTES",
    "WHOLE_VIDEO",
    "Segment",
    "check_segment",
    "frames_per_run",
    "in_order",
    "sample_indices",
    "sample_times",
    "segment_indices",
    "segment_times",
    "shrink_in_runs",
]

K = TypeVar("K", bound=Hashable)

Segment = tuple[float, float]
"""``(start_s, end_s)``: a stretch of a video, in seconds from the start of its stream."""

WHOLE_VIDEO: Segment = (0.0, math.inf)
"""The segment that is the whole video: its frames are sampled over the whole stream."""

FRAME_CHUNK_BYTES = 64 * MIB
"""Full-resolution frames one decode thread holds at once: each run is shrunk to the
model's crop before the next frame is kept (or one frame, if a frame is larger)."""


def frames_per_run(width: int, height: int) -> int:
    """Full-size RGB frames of ``width`` x ``height`` that fit in ``FRAME_CHUNK_BYTES``
    (at least one)."""
    return max(1, FRAME_CHUNK_BYTES // (3 * max(1, width) * max(1, height)))


def sample_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """``round(linspace(0, n - 1, num_frames))``: spread over the whole video, repeating
    frames when the video is shorter than ``num_frames``. Raises ``BadVideo`` for a
    stream without frames."""
    if num_video_frames < 1:
        raise BadVideo("video stream has no frames")
    return np.round(np.linspace(0, num_video_frames - 1, num_frames)).astype(int).tolist()


def sample_times(begin: float, end: float, num_video_frames: int, num_frames: int) -> list[float]:
    """Presentation times, in seconds, of the frames to sample from a stream shown from
    ``begin`` to ``end`` with ``num_video_frames`` frames: ``[begin, end)`` cut into that
    many equal slots, and the middle of slot ``i`` for each ``i`` of ``sample_indices``.

    Uniform in presentation time: on a variable-frame-rate video the frames are those on
    screen at evenly spaced times. At a constant frame rate slot ``i`` is frame ``i``'s
    display interval, so these are exactly the frames ``sample_indices`` picks. Raises
    ``BadVideo`` for a stream without frames or without a positive duration."""
    indices = sample_indices(num_video_frames, num_frames)
    if not end > begin:
        raise BadVideo(f"video stream has no duration (from {begin} s to {end} s)")
    slot = (end - begin) / num_video_frames
    return [begin + (i + 0.5) * slot for i in indices]


def segment_times(
    begin: float, end: float, num_video_frames: int, segment: Segment, num_frames: int
) -> list[float]:
    """``sample_times`` within ``segment`` of a stream shown from ``begin`` to ``end``
    seconds with ``num_video_frames`` frames: the segment is cut into as many slots as it
    holds frames at the stream's average rate, and the middles of the slots
    ``sample_indices`` picks are returned, in seconds. For ``WHOLE_VIDEO`` this is
    ``sample_times(begin, end, num_video_frames, num_frames)``. Raises ``BadVideo`` for a
    segment that starts at or after the stream's end."""
    first = begin + segment[0]
    last = min(end, begin + segment[1])
    if not last > first:
        raise BadVideo(f"segment {_span(segment)} is past the video's end ({end - begin:.3f} s)")
    slots = max(1, round(num_video_frames * (last - first) / (end - begin)))
    return sample_times(first, last, slots, num_frames)


def segment_indices(
    num_video_frames: int, duration: float, segment: Segment, num_frames: int
) -> list[int]:
    """``sample_indices`` within ``segment`` of a video of ``num_video_frames`` frames
    over ``duration`` seconds: the frames on screen during the segment, from frame
    ``floor(n * start / duration)`` to the last that starts before its end, sampled as
    ``sample_indices`` samples a whole video (so for ``WHOLE_VIDEO`` exactly
    ``sample_indices(n, num_frames)``). The frame rate is taken as constant. Raises
    ``BadVideo`` for a stream without frames, a segment past the last frame, or a segment
    of a video whose duration is unknown."""
    if segment == WHOLE_VIDEO:
        return sample_indices(num_video_frames, num_frames)
    if not duration > 0:
        raise BadVideo(f"segment {_span(segment)} of a video whose duration is unknown")
    rate = num_video_frames / duration
    first = math.floor(segment[0] * rate + _EPSILON)
    stop = max(first + 1, math.ceil(min(segment[1], duration) * rate - _EPSILON))
    if first >= num_video_frames:
        raise BadVideo(f"segment {_span(segment)} is past the video's end ({duration:.3f} s)")
    return [first + i for i in sample_indices(min(stop, num_video_frames) - first, num_frames)]


_EPSILON = 1e-6
"""Frames of slack when a time is turned into a frame number: 1.2 s x 25 fps is 29.999...
in floating point, and means frame 30."""


def check_segment(segment: Segment) -> None:
    """Raise ``BadVideo`` unless ``0 <= start < end`` (``end`` may be infinite: the
    video's end)."""
    start, end = segment
    if not (0 <= start < end and math.isfinite(start)):
        raise BadVideo(f"invalid segment {_span(segment)}: it needs 0 <= start < end")


def _span(segment: Segment) -> str:
    return f"[{segment[0]:g} s, {segment[1]:g} s)"


def shrink_in_runs(
    runs: Iterable[tuple[list[K], torch.Tensor]],
    shrink: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[K, torch.Tensor]:
    """``(keys, (N, C, H, W) frames)`` runs → ``{key: shrink(frame)}``. Consecutive runs
    of one frame size are joined up to ``FRAME_CHUNK_BYTES`` (a run alone may be larger)
    and ``shrink`` is called on each join, so that frames of any size, a size change
    mid-stream included, are each resized from their own size and few are held at full
    size. A run passed on alone is not copied. Without ``shrink`` the frames are kept as
    they are."""
    import torch

    kept: dict[K, torch.Tensor] = {}
    keys: list[K] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        joined = pending[0] if len(pending) == 1 else torch.cat(pending)
        kept.update(zip(keys, shrink(joined) if shrink else joined, strict=True))
        keys.clear()
        pending.clear()

    for run_keys, run in runs:
        held = sum(t.numel() * t.element_size() for t in pending)
        if pending and (
            pending[0].shape[1:] != run.shape[1:]
            or held + run.numel() * run.element_size() > FRAME_CHUNK_BYTES
        ):
            flush()
        keys.extend(run_keys)
        pending.append(run)
    if pending:
        flush()
    return kept


def in_order(kept: dict[K, torch.Tensor], keys: list[K]) -> torch.Tensor:
    """``(len(keys), C, H, W)``: the frames ``kept`` holds for ``keys``, in that order.
    Raises ``BadVideo`` for frames of different sizes, which only a ``shrink`` makes
    one tensor of."""
    import torch

    frames = [kept[key] for key in keys]
    sizes = sorted({tuple(frame.shape[-2:]) for frame in frames})
    if len(sizes) > 1:
        raise BadVideo(f"frame size changes mid-stream ({sizes}): shrink the frames to stack them")
    return torch.stack(frames)
