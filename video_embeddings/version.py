"""The UDF's version: what Geneva keys its checkpoints by, so that a column never mixes
rows computed by different code or settings.

It is ``PIPELINE_VERSION`` plus a hash of the output-defining settings (model, frames,
output mode, dtype, the limits and URL policy that decide a zero tensor). The runtime
knobs are not in it. ``PIPELINE_CODE_SHA256`` records a hash of the code that turns a
video into its rows; a test fails when that code changes and the constants do not.
"""

from __future__ import annotations

import hashlib
import inspect
import json

from video_embeddings import decode, frames, model, preprocess, rows, sequential
from video_embeddings.settings import Settings

__all__ = ["PIPELINE_CODE_SHA256", "PIPELINE_VERSION", "pipeline_code_sha256", "udf_version"]

PIPELINE_VERSION = 3
"""Bump it, and update ``PIPELINE_CODE_SHA256``, whenever the rows a video gets change:
sampling, decoding, preprocessing, the model call or the pooling."""

PIPELINE_CODE_SHA256 = "fb1e8fdec8a4c255c58eb6547df0fda85c0c6dd5d95eb21cb4e7f7c36446fb83"
"""``pipeline_code_sha256()`` when ``PIPELINE_VERSION`` was last set, or when that code
last changed without changing the rows of any video (segments were added beside them)."""

_OUTPUT_CODE = (
    frames.frames_per_run,
    frames.sample_indices,
    frames.sample_times,
    frames.segment_indices,
    frames.segment_times,
    frames.shrink_in_runs,
    frames.in_order,
    decode.decode_frames,
    decode.decode_segments,
    decode._decode_whole,
    decode._decode_sampled,
    decode._new_decoder,
    decode._seek_to_samples,
    decode._frames,
    decode._check_on_screen,
    sequential.probe,
    sequential.needs_sequential,
    sequential.rotate,
    sequential.decode_sequential,
    sequential._wanted,
    sequential._rgb,
    sequential._orientation,
    preprocess.Preprocessing.from_processor,
    preprocess._resized_shape,
    preprocess.shrink,
    preprocess.preprocess,
    model.load_model,
    model.embed,
    model.pool_to_frames,
    model.embed_clips,
    rows.zero_embedding,
)
"""The functions whose code decides a video's rows."""


def pipeline_code_sha256() -> str:
    """SHA-256 of the source of ``_OUTPUT_CODE``, in order."""
    digest = hashlib.sha256()
    for function in _OUTPUT_CODE:
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


def udf_version(settings: Settings) -> str:
    """``v<PIPELINE_VERSION>-<12 hex digits of the output-defining settings' SHA-256>``."""
    values = json.dumps(settings.output_defining(), sort_keys=True)
    return f"v{PIPELINE_VERSION}-{hashlib.sha256(values.encode()).hexdigest()[:12]}"
