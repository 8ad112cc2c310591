"""V-JEPA2: load the checkpoint once per worker, embed clips with the encoder only, and
pool its tokens to one row per frame."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from video_embeddings.preprocess import Preprocessing
from video_embeddings.settings import EMBEDDING_DIM, Settings

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Model", "embed", "embed_clips", "load_model", "pool_to_frames"]

logger = logging.getLogger(__name__)


@dataclass
class Model:
    """A loaded checkpoint and how to feed it."""

    encode: Callable[[torch.Tensor], Any]
    """``model.get_vision_features``, compiled or not."""
    preprocessing: Preprocessing
    tubelet_size: int
    device: str
    dtype: torch.dtype


def load_model(settings: Settings, *, device: str) -> Model:
    """Load ``settings.model`` with ``AutoModel`` and ``AutoVideoProcessor``, SDPA
    attention, in eval mode on ``device``; bfloat16 on CUDA and float32 on the CPU unless
    ``VJEPA_DTYPE`` says otherwise. Raises ``ValueError`` for a checkpoint whose rows
    would not fit the column, and what ``from_pretrained`` raises for one it cannot load."""
    import torch
    from transformers import AutoModel, AutoVideoProcessor

    dtype = getattr(torch, settings.dtype or ("bfloat16" if device == "cuda" else "float32"))
    model = AutoModel.from_pretrained(settings.model, dtype=dtype, attn_implementation="sdpa")
    processor = AutoVideoProcessor.from_pretrained(settings.model)
    _check_checkpoint(settings, model.config, processor)
    preprocessing = Preprocessing.from_processor(processor)  # refuse before compiling
    model = model.to(device).eval()
    encode = model.get_vision_features
    if settings.compile:
        encode = _compiled(
            encode, settings, crop=model.config.crop_size, device=device, dtype=dtype
        )
    return Model(encode, preprocessing, model.config.tubelet_size, device, dtype)


def _compiled(
    encode: Callable[[torch.Tensor], torch.Tensor],
    settings: Settings,
    *,
    crop: int,
    device: str,
    dtype: torch.dtype,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` under ``torch.compile``, compiled now at the one batch shape it will see
    (``embed_clips`` pads short batches), not in the middle of a job."""
    import torch

    started = time.perf_counter()
    compiled = torch.compile(encode)
    shape = (settings.embed_batch, settings.num_frames, 3, crop, crop)
    with torch.inference_mode():
        compiled(torch.zeros(shape, device=device, dtype=dtype))
    logger.info("compiled the encoder in %.0fs", time.perf_counter() - started)
    return compiled


def _check_checkpoint(settings: Settings, config: Any, processor: Any) -> None:
    """Refuse a checkpoint whose rows would not fit the column or whose positions would
    be silently wrong."""
    if config.hidden_size != EMBEDDING_DIM:
        raise ValueError(
            f"Invalid VJEPA_MODEL ({settings.model!r}): hidden size {config.hidden_size}; "
            f"the column stores {EMBEDDING_DIM}-wide rows."
        )
    if processor.crop_size["height"] != config.crop_size:
        raise ValueError(
            f"Invalid VJEPA_MODEL ({settings.model!r}): its processor crops to "
            f"{processor.crop_size['height']} px but the model expects {config.crop_size}."
        )
    if settings.num_frames % config.tubelet_size:
        raise ValueError(
            f"Invalid NUM_FRAMES ({settings.num_frames}). It must be a multiple of the "
            f"model's tubelet size ({config.tubelet_size})."
        )


def embed(
    encode: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor
) -> torch.Tensor:
    """Encoder only (never the predictor): ``(B, T, C, crop, crop)`` →
    ``(B, tokens, hidden)`` float32, tokens time-major, ``T / tubelet`` tubelets of
    ``(crop / patch)²`` patches. ``encode`` is ``model.get_vision_features``, compiled or
    not."""
    import torch

    with torch.inference_mode():
        return encode(pixel_values).float()


def pool_to_frames(tokens: torch.Tensor, *, num_frames: int, tubelet_size: int) -> torch.Tensor:
    """``(..., tokens, hidden)`` → ``(..., num_frames, hidden)``: each frame's row is the
    mean of its tubelet's spatial patch tokens, so frames ``2k`` and ``2k + 1`` share a row."""
    tubelets = num_frames // tubelet_size
    shape = (*tokens.shape[:-2], tubelets, -1, tokens.shape[-1])
    per_tubelet = tokens.reshape(shape).mean(dim=-2)
    return per_tubelet.repeat_interleave(tubelet_size, dim=-2)


def embed_clips(clips: list[torch.Tensor], model: Model, settings: Settings) -> np.ndarray:
    """Embed a batch of ``(T, C, crop, crop)`` uint8 clips together: ``(B, rows, 1024)``
    float32 on the host, ``rows`` = ``NUM_FRAMES`` (or every token with
    ``EMBEDDING_OUTPUT=tokens``)."""
    import torch

    from video_embeddings.preprocess import preprocess

    x = torch.stack(clips)
    if settings.compile and len(clips) < settings.embed_batch:  # one compiled shape only
        x = torch.cat([x, x.new_zeros((settings.embed_batch - len(clips), *x.shape[1:]))])
    pixel_values = preprocess(x, model.preprocessing, dtype=model.dtype)
    tokens = embed(model.encode, pixel_values)[: len(clips)]
    if settings.output == "frames":
        tokens = pool_to_frames(
            tokens, num_frames=settings.num_frames, tubelet_size=model.tubelet_size
        )
    return tokens.cpu().numpy()
