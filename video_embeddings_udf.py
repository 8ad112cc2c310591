"""The Geneva UDF ``VideoEmbedding``: a video URL in, its V-JEPA2 embedding out.

The stages live in the ``video_embeddings`` package, one concern per module; this module
wires them together and maps each row's outcome to Geneva, in one place:

- embedded: the row's ``[NUM_FRAMES, 1024]`` matrix;
- ``BadVideo``: the zero tensor ``[[0.0] * 1024]`` (the reason is logged once);
- ``ObjectFault``: the call raises it; Geneva's row isolation (``on_error``) bisects the
  batch, leaves that row NULL and keeps the reason in its error records. The rows of the
  failed call are kept, so the halves Geneva calls again are not decoded twice;
- ``SystemFault``: the call raises, nothing is written, Geneva moves the task.

``retry_failed`` backfills the NULL rows again. Torch, transformers and torchcodec are
imported lazily, so importing this module (on the driver, at ``add_columns``) stays cheap.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from geneva import udf
from geneva.debug.error_store import Skip

from video_embeddings.aggregate import (
    aggregate_max,
    aggregate_mean,
    aggregate_segment,
    aggregate_weighted,
)
from video_embeddings.decode import decode_frames
from video_embeddings.frames import WHOLE_VIDEO, sample_indices
from video_embeddings.model import embed, pool_to_frames
from video_embeddings.outcomes import BadVideo, ObjectFault, OutageBudget, SystemFault
from video_embeddings.pipeline import Request, Runtime, embed_videos, load_runtime
from video_embeddings.preprocess import Preprocessing, preprocess, shrink
from video_embeddings.rows import (
    EMBEDDING_TYPE,
    VECTOR_TYPE,
    matrices,
    mean_vectors,
    to_arrow,
    zero_embedding,
)
from video_embeddings.settings import EMBEDDING_DIM, Settings
from video_embeddings.urls import check_uri, redact, resolve_uri
from video_embeddings.version import PIPELINE_VERSION, udf_version

if TYPE_CHECKING:
    from geneva.table import Table
    from geneva.transformer import UDF

__all__ = [
    "EMBEDDING_DIM",
    "EMBEDDING_TYPE",
    "UDF_MEMORY",
    "UDF_NUM_CPUS",
    "BadVideo",
    "ObjectFault",
    "Preprocessing",
    "Settings",
    "SystemFault",
    "VideoEmbedding",
    "aggregate_max",
    "aggregate_mean",
    "aggregate_segment",
    "aggregate_weighted",
    "check_uri",
    "decode_frames",
    "embed",
    "embedding_column",
    "failed_rows",
    "matrices",
    "mean_vector_udf",
    "pool_to_frames",
    "preprocess",
    "redact",
    "resolve_uri",
    "retry_failed",
    "rows_filter",
    "sample_indices",
    "shrink",
    "to_arrow",
    "zero_embedding",
]

logger = logging.getLogger(__name__)

UDF_MEMORY = 8 * 1024**3
"""Bytes of host memory a worker asks Ray for: model, decoded frames, read caches and
headroom."""
UDF_NUM_CPUS = 1
"""CPUs a worker asks Ray for unless ``backfill(num_cpus=...)`` says more; the decode
threads follow the grant, so give a GPU worker its pod's cores (docs/cluster.md)."""


@udf(
    data_type=EMBEDDING_TYPE,
    num_gpus=1,
    num_cpus=UDF_NUM_CPUS,
    memory=UDF_MEMORY,
    on_error=[Skip(ObjectFault)],
    input_columns=["video_uri"],  # not inferred: Geneva would name `*segment` a column too
)
class VideoEmbedding:
    """Embed the video at each URL as ``[NUM_FRAMES, 1024]`` per-frame rows (or the raw
    ``[tokens, 1024]`` with ``EMBEDDING_OUTPUT=tokens``), a Geneva batch at a time.

    Settings are read here, on the driver at ``add_columns``; Geneva pickles the instance
    into the table, so they are frozen then. The model loads on the first call."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._runtime: Runtime | None = None
        self._budget = OutageBudget()
        self._isolating: dict[str, np.ndarray | BadVideo | ObjectFault] = {}
        """The outcomes of the last call that raised an ``ObjectFault``, by URL, while
        Geneva calls its halves again."""

    def __call__(self, video_uri: pa.Array, *segment: pa.Array) -> pa.Array:
        """One row per URL: the embedding of the whole video, or with ``segment``, the
        ``start_s`` and ``end_s`` columns of a segments view (float64 seconds from the
        video's start), of that segment, ``[start_s, end_s)``. (Geneva passes the input
        columns by position and takes a call whose every parameter is a ``pa.Array`` for
        a batch call.)"""
        starts, ends = segment if segment else (None, None)
        requests = self._requests(video_uri, starts, ends)
        keys = [str(u) if s == WHOLE_VIDEO else f"{u} {s}" for u, s in requests]
        return self._column(keys, self._outcomes(requests, keys))

    def _outcomes(
        self, requests: list[Request], keys: list[str]
    ) -> list[np.ndarray | BadVideo | ObjectFault]:
        """Each row's outcome, by its ``keys``: kept from the failed call Geneva is
        bisecting, else computed, and counted by the skip budget (which raises on an
        outage)."""
        if not all(k in self._isolating for k in keys):
            self._isolating.clear()  # a new batch: the last one's isolation is over
        todo = [(k, r) for r, k in zip(requests, keys, strict=True) if k not in self._isolating]
        fresh = embed_videos([r for _, r in todo], self._ready(), self.settings) if todo else []
        self._budget.record(fresh)
        computed = dict(zip((k for k, _ in todo), fresh, strict=True))
        return [computed[k] if k in computed else self._isolating[k] for k in keys]

    def _column(
        self, keys: list[str], outcomes: list[np.ndarray | BadVideo | ObjectFault]
    ) -> pa.Array:
        """The Arrow column of the call, or the first ``ObjectFault`` raised for Geneva to
        isolate (the outcomes are kept for the halves it calls next)."""
        fault = next((o for o in outcomes if isinstance(o, ObjectFault)), None)
        if fault is not None:  # Geneva calls even a failed row of one again, alone
            self._isolating.update(zip(keys, outcomes, strict=True))
            raise fault
        for key in keys:
            self._isolating.pop(key, None)
        return to_arrow([o if isinstance(o, np.ndarray) else zero_embedding() for o in outcomes])

    def _ready(self) -> Runtime:
        if self._runtime is None:
            self._runtime = load_runtime(self.settings)
        return self._runtime

    def _requests(
        self,
        uris: pa.Array | pa.ChunkedArray,
        starts: pa.Array | pa.ChunkedArray | None,
        ends: pa.Array | pa.ChunkedArray | None,
    ) -> list[Request]:
        """Each row's resolved URL and segment (``WHOLE_VIDEO`` without times; a NULL time
        stands for the video's start or end)."""
        base = self.settings.video_base_path
        values = [
            v.decode(errors="replace") if isinstance(v, bytes) else v for v in uris.to_pylist()
        ]
        resolved = [None if v is None else resolve_uri(v, base_path=base) for v in values]
        if starts is None or ends is None:
            return [(u, WHOLE_VIDEO) for u in resolved]
        segments = [
            (WHOLE_VIDEO[0] if s is None else s, WHOLE_VIDEO[1] if e is None else e)
            for s, e in zip(starts.to_pylist(), ends.to_pylist(), strict=True)
        ]
        return list(zip(resolved, segments, strict=True))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the output-defining settings and the pipeline's version only: a loaded
        model never travels with the UDF, and the runtime knobs are the worker's own.
        Geneva's automatic version hashes this state."""
        return {"settings": self.settings.output_defining(), "pipeline": PIPELINE_VERSION}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """On a worker: the column's settings, with the runtime knobs of this worker's
        environment (``RUNTIME_KNOBS``). A column added by an earlier release pickled a
        whole ``Settings``; its fields are read the same way."""
        frozen = state["settings"]
        values = frozen if isinstance(frozen, dict) else vars(frozen)
        self.__init__(Settings.from_output_defining(values))  # type: ignore[misc]


# ``@udf`` leaves a wrapper function at the class's name. Pointing the class's qualified name
# at ``VideoEmbedding.__wrapped__`` lets pickle find the class by reference instead of
# copying it by value with a per-process id, so Geneva's UDF version (a hash of the pickled
# instance, i.e. of the settings, and of ``__call__``'s code) is the same in every process.
VideoEmbedding.__wrapped__.__qualname__ = "VideoEmbedding.__wrapped__"  # type: ignore[attr-defined]


def embedding_column(settings: Settings | None = None) -> dict[str, tuple[UDF, list[str]]]:
    """The ``add_columns`` spec for the embedding column, reading ``VIDEO_URI_COL``, with
    the UDF's version set explicitly to ``udf_version(settings)``."""
    settings = settings or Settings.from_env()
    embedding = VideoEmbedding(settings)
    embedding.version = udf_version(settings)  # type: ignore[attr-defined]
    return {settings.embedding_col: (embedding, [settings.video_uri_col])}


def mean_vector_udf() -> UDF:
    """The mean-vector column's UDF, ``mean_vectors`` over the embedding column: cheap, so
    one CPU suffices wherever the job runs. It lives in the package, so a worker that
    has only the manifest's zip can unpickle it."""
    return udf(data_type=VECTOR_TYPE, num_cpus=1)(mean_vectors)


def failed_rows(tbl: Table, column: str) -> dict[int, Any]:
    """The rows of ``column`` that Geneva's error records list as failed (object faults)
    and that are still NULL: row address → the row's latest error record (its
    ``error_type``, ``error_message``, ``timestamp``), in ascending address order."""
    records = sorted(_errors(tbl, column), key=lambda e: e.timestamp)
    latest = {e.row_address: e for e in records if e.row_address is not None}
    if not latest:
        return {}
    nulls = tbl.to_lance().to_table(columns=[], filter=f"{column} IS NULL", with_row_address=True)
    return {row: latest[row] for row in sorted(set(latest) & set(nulls["_rowaddr"].to_pylist()))}


def _errors(tbl: Table, column: str) -> list[Any]:
    """Geneva's error records for ``column``; none before Geneva has written any."""
    try:
        return tbl.get_errors(column_name=column)
    except ValueError:  # Geneva's errors table does not exist yet
        return []


def retry_failed(tbl: Table, column: str, **backfill_options: Any) -> int:
    """Backfill ``column`` again on the rows ``failed_rows`` lists, the way Geneva
    documents it (``get_errors``, then ``backfill(where="_rowaddr IN (...)")``), and
    return how many rows were tried. ``backfill_options`` go to ``Table.backfill``."""
    rows = list(failed_rows(tbl, column))
    if rows:
        logger.info("retrying %d rows of %s that could not be read", len(rows), column)
        tbl.backfill(column, where=rows_filter(rows, f"{column} IS NULL"), **backfill_options)
        tbl.checkout_latest()
    return len(rows)


def rows_filter(rows: list[int], condition: str) -> str:
    """A backfill ``where`` for the rows at these addresses that meet ``condition``.

    Geneva keys a backfill's checkpoints by the text of its filter, so the list also
    holds an address no row has (fragment 2**32 - 1), taken from the clock: a retry of
    rows that failed the same way before computes them again instead of reusing the
    last attempt's NULLs. ``condition`` names a column because lance 12 cannot count
    rows by ``_rowaddr`` alone."""
    attempt = (0xFFFFFFFF << 32) | (time.time_ns() & 0xFFFFFFFF)
    return f"{condition} AND _rowaddr IN ({', '.join(map(str, [*rows, attempt]))})"
