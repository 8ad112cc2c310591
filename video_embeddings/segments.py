"""Segments of a video, the rows of a segments view: fixed windows over the video's
duration, read from its container's header. ``segments_chunker`` is the Geneva chunker
that expands each row of a videos table into them (``Connection.create_udtf_view``)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from video_embeddings.decode import SEEK_BLOCK_SIZE
from video_embeddings.frames import Segment
from video_embeddings.outcomes import BadVideo, ObjectFault
from video_embeddings.rows import EMBEDDING_TYPE, VECTOR_TYPE
from video_embeddings.sequential import read_duration
from video_embeddings.settings import Settings
from video_embeddings.storage import StorageReader, open_video, read_with_retries
from video_embeddings.urls import redact, resolve_uri

if TYPE_CHECKING:
    from geneva.transformer import Chunker

__all__ = ["Segmenter", "segment_windows", "segments_chunker"]

logger = logging.getLogger(__name__)


def segment_windows(duration: float, seconds: float, stride: float) -> list[Segment]:
    """``[start, end)`` windows of ``seconds`` every ``stride`` seconds over ``[0,
    duration)``: full windows while one fits, then a last window to the end, which joins
    the one before when it would be shorter than half a window and no gap lies between
    them (``stride <= seconds``). A video shorter than a window is one segment; one
    without a finite duration has none. Raises ``ValueError`` unless ``seconds`` and
    ``stride`` are finite and above 0."""
    if not (0 < seconds < math.inf and 0 < stride < math.inf):
        raise ValueError(f"segments need seconds and stride above 0 ({seconds}, {stride})")
    if not 0 < duration < math.inf:
        return []
    windows: list[Segment] = []
    start = 0.0
    while start + seconds < duration:
        windows.append((start, start + seconds))
        start = len(windows) * stride
    if start >= duration:
        return windows
    if windows and duration - start < seconds / 2 and stride <= seconds:
        windows[-1] = (windows[-1][0], duration)
    else:
        windows.append((start, duration))
    return windows


@dataclass(frozen=True)
class Segmenter:
    """The chunker's function: a video's URL in, its segment rows out, with the embedding
    and mean-vector columns NULL for the backfill to fill.

    Outcomes: a video FFmpeg cannot open, or without a duration, has no segments (its row
    of the videos table holds the zero tensor and the reason); a storage fault is retried
    until ``ROW_DEADLINE_S``, then that video has no segments and the reason is logged
    (``index`` lists it); a ``SystemFault`` is raised and fails the refresh."""

    settings: Settings
    seconds: float
    stride: float

    def __call__(self, video_uri: str | None) -> list[dict[str, Any]]:
        if video_uri is None:
            return []
        uri = resolve_uri(video_uri, base_path=self.settings.video_base_path)
        try:
            duration = self.duration(uri)
        except BadVideo as e:
            logger.warning("no segments for %s: %s", redact(uri), redact(str(e)))
            return []
        except ObjectFault as e:
            logger.error("no segments for %s this run: %s", redact(uri), redact(str(e)))
            return []
        empty = {self.settings.embedding_col: None, self.settings.embedding_col + "_mean": None}
        return [
            {"segment": i, "start_s": start, "end_s": end, **empty}
            for i, (start, end) in enumerate(segment_windows(duration, self.seconds, self.stride))
        ]

    def duration(self, uri: str) -> float:
        """The video's duration in seconds from its container's header
        (``sequential.read_duration``), storage faults retried; ``BadVideo`` without one."""
        deadline = time.monotonic() + self.settings.row_deadline_s

        def read() -> float:
            with open_video(
                uri,
                block_size=SEEK_BLOCK_SIZE,
                allowed_prefixes=self.settings.allowed_uri_prefixes,
                max_bytes=self.settings.max_video_bytes,
            ) as file:
                return read_duration(StorageReader(file, deadline=deadline))

        duration = read_with_retries(read, what=uri, deadline=deadline)
        if not duration > 0:
            raise BadVideo("the container does not say how long the video lasts")
        return duration


def segments_chunker(settings: Settings, seconds: float, stride: float) -> Chunker:
    """The Geneva chunker of the segments view: each video row becomes rows ``segment``
    (int32, from 0), ``start_s`` and ``end_s`` (float64 seconds), its URL inherited.

    It also declares the embedding and mean-vector columns, NULL, which ``alter_columns``
    then turns into the UDF columns: Geneva 0.17's refresh reads every view column that
    its chunker does not declare from the source table, so a column added to the view
    with ``add_columns`` would break the next refresh."""
    from geneva import chunker

    schema = pa.schema(
        [
            ("segment", pa.int32()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            (settings.embedding_col, EMBEDDING_TYPE),
            (settings.embedding_col + "_mean", VECTOR_TYPE),
        ]
    )
    return chunker(  # type: ignore[return-value]
        Segmenter(settings, seconds, stride),
        output_schema=schema,
        input_columns=[settings.video_uri_col],
        inherit_input_columns=True,
    )
