"""The checkpoint's video processor, read from its config, as tensor operations on the
model's device: resize the shortest edge, centre-crop, rescale and normalise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from video_embeddings.outcomes import BadVideo

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_RESIZED_PIXELS", "RESIZE_CHUNK_PIXELS", "Preprocessing", "preprocess", "shrink"]

MAX_RESIZED_PIXELS = 4 * 1024 * 1024
"""Pixels one frame may have after the shortest-edge resize and before the crop: aspect
ratios up to 64:1 at the model's 256 px. A frame beyond is a bad video, refused before
any resize allocates."""
RESIZE_CHUNK_PIXELS = 16 * 1024 * 1024
"""Resized pixels ``shrink`` holds at once: 48 MiB as uint8 RGB, 144 frames of a 16:9
video's 455x256 resize, four of a 64:1 one."""


@dataclass(frozen=True)
class Preprocessing:
    """The checkpoint's video processor, read from its config, as tensor operations:
    resize the shortest edge, centre-crop, rescale and normalise, exactly as it does."""

    shortest_edge: int
    crop: tuple[int, int]
    scale: float
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: int

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocessing:
        """Read a V-JEPA2-style processor; refuse one this module would not match."""
        size, crop = processor.size, processor.crop_size
        if not (processor.do_resize and processor.do_center_crop and size.get("shortest_edge")):
            raise ValueError(
                f"Invalid video processor (resize {dict(size)!r}, crop {dict(crop)!r}): "
                "supported is a shortest-edge resize followed by a centre crop."
            )
        if size["shortest_edge"] < max(crop["height"], crop["width"]):
            raise ValueError(
                f"Invalid video processor: it resizes to {size['shortest_edge']} px, below "
                f"its {crop['height']}x{crop['width']} crop, which would need padding."
            )
        normalize = bool(processor.do_normalize)
        return cls(
            shortest_edge=size["shortest_edge"],
            crop=(crop["height"], crop["width"]),
            scale=float(processor.rescale_factor) if processor.do_rescale else 1.0,
            mean=tuple(processor.image_mean) if normalize else None,
            std=tuple(processor.image_std) if normalize else None,
            interpolation=int(processor.resample),
        )


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The processor's output size: shortest edge to ``shortest_edge``, the long edge
    scaled and truncated to an integer."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def shrink(frames: torch.Tensor, p: Preprocessing, *, device: str) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 → ``(N, C, crop, crop)`` uint8 on ``device``: the processor's
    resize and centre crop, done per chunk of frames as they are decoded, a few frames at
    a time so that the resized frames held at once stay under ``RESIZE_CHUNK_PIXELS``.

    Raises ``BadVideo`` when one resized frame would exceed ``MAX_RESIZED_PIXELS``: a
    2x8192 frame resizes its short edge to 256 and its long edge to 1,048,576 pixels."""
    import torch
    from torchvision.transforms.v2 import functional as F

    height, width = frames.shape[-2:]
    size = _resized_shape(height, width, p.shortest_edge)
    if size[0] * size[1] > MAX_RESIZED_PIXELS:
        raise BadVideo(
            f"frame size {width}x{height} would resize to {size[1]}x{size[0]} before the "
            f"crop, over {MAX_RESIZED_PIXELS} pixels: its aspect ratio is too extreme"
        )
    top = int((size[0] - p.crop[0]) / 2.0)
    left = int((size[1] - p.crop[1]) / 2.0)
    step = max(1, RESIZE_CHUNK_PIXELS // (size[0] * size[1]))
    parts = []
    for start in range(0, len(frames), step):
        chunk = frames[start : start + step].to(device, non_blocking=True)
        chunk = F.resize(chunk, list(size), interpolation=p.interpolation, antialias=True)
        parts.append(chunk[..., top : top + p.crop[0], left : left + p.crop[1]])
    return torch.cat(parts).contiguous()


def preprocess(clips: torch.Tensor, p: Preprocessing, *, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T, C, crop, crop)`` uint8 → the model's input in ``dtype``: rescaled and
    normalised with mean and std folded into one step, as the processor folds them."""
    import torch

    x = clips.to(torch.float32)
    if p.mean is not None and p.std is not None:
        shape = (1, 1, -1, 1, 1)
        mean = torch.tensor(p.mean, device=x.device).view(shape) / p.scale
        std = torch.tensor(p.std, device=x.device).view(shape) / p.scale
        x = (x - mean) / std
    elif p.scale != 1.0:
        x = x * p.scale
    return x.to(dtype)
