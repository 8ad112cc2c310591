"""The library behind the ``video-embeddings`` command: ``index`` fills a LanceDB table
with the embeddings of a folder or bucket of videos through Geneva backfills, ``search``
ranks the table against a video, and ``write_sheet`` draws the contact sheet of a search.

The module is laid out in the order of the job: find the videos, fill the table (with
progress), then search. ``video_embeddings_cli`` parses the command line and prints;
``video_embeddings_sheet`` draws the sheets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa

from video_embeddings.decode import decode_with
from video_embeddings.frames import WHOLE_VIDEO, Segment
from video_embeddings.segments import Segmenter, segments_chunker
from video_embeddings.settings import granted_cpus
from video_embeddings_sheet import Undecodable, draw_sheet, read_thumbnails
from video_embeddings_udf import (
    EMBEDDING_DIM,
    BadVideo,
    ObjectFault,
    Settings,
    SystemFault,
    VideoEmbedding,
    aggregate_max,
    aggregate_mean,
    aggregate_segment,
    aggregate_weighted,
    embedding_column,
    failed_rows,
    matrices,
    mean_vector_udf,
    retry_failed,
    rows_filter,
)

if TYPE_CHECKING:
    import geneva.db
    import geneva.table
    import lance

__all__ = [
    "ANN_MIN_ROWS",
    "Found",
    "Hit",
    "IndexSummary",
    "SEGMENTS_SUFFIX",
    "SearchResult",
    "SegmentsSummary",
    "UserError",
    "clock",
    "find_videos",
    "index_segments",
    "index",
    "late_interaction",
    "search",
    "write_sheet",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi",
    ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".vob",
    ".flv", ".3gp", ".wmv", ".asf", ".ogv",
)  # fmt: skip
"""File extensions ``find_videos`` counts as videos: MP4 and QuickTime, Matroska and WebM,
AVI, MPEG transport streams (camcorders' .mts/.m2ts), MPEG program streams (.mpg, DVD
.vob), Flash video, 3GPP, Windows Media (.wmv, .asf) and Ogg video."""

ANN_MIN_ROWS = 5_000
"""From this many rows, ``index`` builds an ANN index on the mean-vector column. Below it an
exact scan reads every embedding per search (5,000 videos of 64 rows are 1.25 GiB), which
takes seconds; past it, search asks the index for candidates and ranks only those."""

ANN_CANDIDATES = 100
"""At least this many candidates (10 x k when larger) come from the ANN index before they
are ranked exactly by the chosen aggregation."""

SETTINGS_KEY = "video_embeddings.settings"
"""Schema metadata key holding the settings the table's embedding column was added with."""

MEAN_SUFFIX = "_mean"
"""The mean-vector column is the embedding column's name plus this suffix."""

SEGMENTS_SUFFIX = "_segments"
"""The segments view of a table is named after it with this suffix."""

STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}
"""Storage option that creates a table with stable row IDs, which Geneva needs to
refresh a segments view as rows are added."""

PROGRESS_INTERVAL_S = 2.0
PROGRESS_QUIET_S = 30.0

AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": aggregate_mean,
    "max": aggregate_max,
    "weighted": aggregate_weighted,
    "segment": aggregate_segment,
}


class UserError(Exception):
    """A failure the user can act on; the command prints it as one line and exits with 1."""


def _one_line(error: BaseException) -> str:
    """The error's last line, without colour codes: a job's error from Ray carries the
    remote traceback before its own message."""
    lines = [line for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return " ".join(lines[-1].split()) if lines else type(error).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env_settings() -> Settings:
    """The settings of the environment; a bad value is the user's to fix."""
    try:
        return Settings.from_env()
    except ValueError as e:
        raise UserError(str(e)) from e


# --- find the videos --------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    videos: dict[str, int]
    """URL (or absolute local path) → size in bytes, from the listing."""
    skipped: int
    """Files under the sources without a video extension."""


def find_videos(sources: list[str]) -> Found:
    """Every file with a video extension under each folder, glob, file or URL prefix
    (``gs://bucket/videos/``), with its size from the listing, and how many other files
    were skipped. Local paths come back absolute, without ``file://``."""
    videos: dict[str, int] = {}
    skipped = 0
    for source in sources:
        if "://" not in source:
            source = os.path.abspath(source)  # symlinks kept: the URL is the path given
        fs, path = fsspec.core.url_to_fs(source)
        if fs.isdir(path):
            entries = fs.find(path, detail=True)
        elif any(c in path for c in "*?["):
            entries = fs.glob(path, detail=True)
        elif fs.exists(path):
            entries = {path: fs.info(path)}
        else:
            logger.warning("%s does not exist", source)
            entries = {}
        for name, info in sorted(entries.items()):
            if info.get("type") == "directory":
                continue
            if name.lower().endswith(VIDEO_EXTENSIONS):
                videos[fs.unstrip_protocol(name).removeprefix("file://")] = int(info["size"])
            else:
                skipped += 1
    return Found(videos, skipped)


# --- the table --------------------------------------------------------------------------


def _check_db(path: str, *, for_search: bool) -> None:
    """A local ``--db`` must be a LanceDB directory; ``index`` may also create one in a new
    or empty directory, but never writes tables into a folder of other files."""
    if "://" in path:
        return
    p = Path(path)
    if not p.exists() and not for_search:
        return
    if p.is_dir() and (any(p.glob("*.lance")) or (p / "__manifest").is_dir()):
        return
    if p.is_dir() and not for_search and not any(p.iterdir()):
        return
    raise UserError(f"--db {path} is not a LanceDB directory")


def _stored_settings(ds: lance.LanceDataset) -> Settings | None:
    """The table's output-defining settings, with this process's runtime knobs."""
    raw = (ds.schema.metadata or {}).get(SETTINGS_KEY.encode())
    if raw is None:
        return None
    try:
        return Settings.from_output_defining(json.loads(raw))
    except ValueError as e:  # a bad runtime knob in this environment
        raise UserError(str(e)) from e


def _table_schema(settings: Settings) -> pa.Schema:
    """One row per video: its URL and size; the settings ride along as schema metadata so
    that search embeds a query exactly as the table's videos were."""
    return pa.schema(
        [(settings.video_uri_col, pa.string()), ("size_bytes", pa.int64())],
        metadata={SETTINGS_KEY: json.dumps(settings.output_defining())},
    )


def _uris(ds: lance.LanceDataset, column: str, where: str | None = None) -> list[str]:
    return ds.to_table(columns=[column], filter=where).column(column).to_pylist()


def _has_ann_index(ds: lance.LanceDataset, column: str) -> bool:
    return any(column in d.field_names for d in ds.describe_indices())


def _build_ann_index(ds: lance.LanceDataset, column: str) -> None:
    """IVF_HNSW_SQ with cosine distance: it trains on any number of rows (IVF_PQ needs
    256), with lance's usual sqrt(rows) partitions."""
    partitions = max(1, round(math.sqrt(ds.count_rows())))
    logger.info("building the ANN index on %s (%d partitions)", column, partitions)
    ds.create_index(
        column, index_type="IVF_HNSW_SQ", metric="cosine", num_partitions=partitions, replace=True
    )


# --- index, with progress ---------------------------------------------------------------


@dataclass(frozen=True)
class SegmentsSummary:
    view: str
    seconds: float
    stride: float
    segments: int
    """Rows of the view."""
    added: int
    """Segments this run added."""
    bad_segments: int
    """Segments of this run that got the zero tensor."""
    object_faults: int
    """Segments of this run left NULL by an object fault; the next run tries them again."""
    videos_without_segments: list[str]
    """Embedded videos that have no segment: their duration could not be read."""
    ann_index: bool


@dataclass(frozen=True)
class IndexSummary:
    found: int
    skipped: int
    already_indexed: int
    added: int
    embedded: int
    bad_videos: dict[str, str]
    """URL → reason, for the videos of this run that got the zero tensor."""
    object_faults: dict[str, str]
    """URL → reason, for the videos of this run left NULL by an object fault; the next
    run tries them again."""
    rows: int
    ann_index: bool
    seconds: float
    segments: SegmentsSummary | None = None


def _check_model(model: str, *, hub_timeout_s: float = 10.0) -> None:
    """Fail in seconds, before a long job, when the checkpoint cannot even be found.

    A local directory, or a hub id whose config is in the Hugging Face cache, is read
    without the network. Any other hub id costs one request to the hub, without retries,
    before ``from_pretrained`` fetches its config: offline, the downloads' own retries
    would take about 25 s to give the same answer. That request and the cache lookup need
    only ``huggingface_hub``, so an id that cannot be fetched fails before transformers
    (and torch) are imported."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    def fail(why: str) -> UserError:
        return UserError(
            f"cannot load the model {model!r} ({why}); point VJEPA_MODEL at a "
            "local checkpoint directory, e.g. VJEPA_MODEL=/path/to/vjepa2-checkpoint"
        )

    def load_config(**options: Any) -> None:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(model, **options)
        except (OSError, ValueError) as e:
            raise fail(_one_line(e)) from e

    path = Path(model).expanduser()
    if path.is_dir():
        load_config()
        return
    if path.is_absolute() or path.exists() or model.startswith((".", "~")):
        raise fail("not a directory" if path.exists() else "no such directory")
    try:
        cached = huggingface_hub.try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            load_config(local_files_only=True)
            return
        huggingface_hub.HfApi().model_info(model, timeout=hub_timeout_s)
    except RepositoryNotFoundError as e:
        raise fail("no such model on the Hugging Face hub, or it is private") from e
    except (HfHubHTTPError, ValueError) as e:  # ValueError: not a valid repo id
        raise fail(_one_line(e)) from e
    except OSError as e:  # requests' connection errors and timeouts
        raise fail(
            "the Hugging Face hub cannot be reached and the model is not in its cache"
        ) from e
    load_config()


def _check_frames(settings: Settings) -> None:
    """NUM_FRAMES must be a whole number of the model's tubelets: say so before writing
    anything, not from every worker of the job."""
    from transformers import AutoConfig

    tubelet = int(getattr(AutoConfig.from_pretrained(settings.model), "tubelet_size", 1))
    if settings.num_frames % tubelet:
        raise UserError(
            f"NUM_FRAMES ({settings.num_frames}) must be a multiple of the model's tubelet "
            f"size ({tubelet})"
        )


def _local_resources() -> dict[str, Any]:
    """Backfill options for local Ray: without CUDA, no GPU reservation (or Ray would wait
    forever) and one applier with every CPU this process may use but what Geneva's own job
    actors reserve (its decode threads follow the grant, rounded up); with CUDA, one
    applier per GPU, the CPUs shared between them."""
    import torch
    from geneva.runners.ray.admission import (
        DRIVER_NUM_CPUS,
        FRAGMENT_WRITER_NUM_CPUS,
        JOBTRACKER_NUM_CPUS,
    )

    job_actors = DRIVER_NUM_CPUS + JOBTRACKER_NUM_CPUS + FRAGMENT_WRITER_NUM_CPUS
    cpus = max(0.1, granted_cpus() - job_actors)
    if not torch.cuda.is_available():
        return {"num_gpus": 0, "num_cpus": cpus, "concurrency": 1}
    gpus = torch.cuda.device_count()
    return {"num_cpus": cpus / gpus, "concurrency": gpus}


class _Progress:
    """Reports a backfill on stderr: videos done of total, videos/s, failures so far; a
    line whenever a count moves, and at least every ``PROGRESS_QUIET_S``.

    Done counts come from Geneva's job tracker (rows checkpointed). Failures so far are
    the object faults Geneva isolated (``rows_skipped_on_error``): the zero tensor of a bad
    video is an ordinary result that becomes visible when the job commits, and ``index``
    counts those then, with their reasons."""

    def __init__(self, total: int, noun: str = "videos") -> None:
        self.total, self.noun = total, noun
        self.start = time.monotonic()
        self.done = 0
        self.failed = 0
        self._reported: tuple[int, int, float] | None = None

    def update(self, snapshot: dict[str, dict[str, Any]]) -> None:
        rows = snapshot.get("rows_checkpointed", {})
        earlier = max(0, int(rows.get("total", 0)) - self.total)  # done by earlier runs
        self.done = min(self.total, max(self.done, int(rows.get("n", 0)) - earlier))
        self.failed = int(snapshot.get("rows_skipped_on_error", {}).get("n", self.failed))

    def report(self) -> None:
        now = time.monotonic()
        if self._reported is not None:
            done, failed, at = self._reported
            if (done, failed) == (self.done, self.failed) and now - at < PROGRESS_QUIET_S:
                return
        self._reported = (self.done, self.failed, now)
        elapsed = now - self.start
        logger.info(
            "embedding: %d/%d %s, %.2f %s/s, %d failures so far, %.0f s",
            self.done,
            self.total,
            self.noun,
            self.done / elapsed if elapsed > 0 else 0.0,
            self.noun,
            self.failed,
            elapsed,
        )

    def finish(self) -> None:
        """The job succeeded, so Geneva processed every pending row."""
        self.done = self.total
        self.report()


def _tracker_snapshot(future: Any) -> dict[str, dict[str, Any]]:
    """Geneva's job metrics, or nothing when the tracker does not answer this time:
    progress is best effort and never fails the job."""
    import ray

    if future.job_tracker is None:
        return {}
    try:
        return ray.get(future.job_tracker.get_all.remote(), timeout=PROGRESS_INTERVAL_S)
    except ray.exceptions.RayError:
        return {}


def _backfill(
    tbl: geneva.table.Table, column: str, options: dict[str, Any], progress: _Progress | None
) -> None:
    """Run Geneva's backfill of ``column`` (the rows where it is null) and wait for it,
    polling the job tracker for progress instead of drawing Geneva's own multi-line bars."""
    import ray

    future = tbl.backfill_async(column, **options).future
    while not ray.wait([future.ray_obj_ref], timeout=PROGRESS_INTERVAL_S)[0]:
        if progress is not None:
            progress.update(_tracker_snapshot(future))
            progress.report()
    try:
        ray.get(future.ray_obj_ref)
    except Exception as e:
        raise UserError(f"the backfill of {column} failed: {_one_line(e)}") from e
    if progress is not None:
        progress.finish()
    tbl.checkout_latest()


def _run_on(
    db: geneva.db.Connection, cluster: str | None, manifest: str | None
) -> AbstractContextManager[Any]:
    """Where the backfills run: a defined Geneva cluster, or Geneva's local Ray (stopped
    when the context ends)."""
    return db.context(cluster=cluster, manifest=manifest) if cluster else db.local_ray_context()


def _existing_table(db_path: str, table: str) -> geneva.table.Table | None:
    """The table if it exists; connecting never creates a directory that is not there."""
    import geneva

    if "://" not in db_path and not Path(db_path).exists():
        return None
    db = geneva.connect(db_path)
    return db.open_table(table) if table in db.table_names() else None


def _bad_video_reason(uri: str, settings: Settings) -> str:
    """Why a video got the zero tensor, found again on this machine by the UDF's own
    decode (the worker that embedded it logged the same reason)."""
    try:
        decode_with(settings, uri, [WHOLE_VIDEO])
    except BadVideo as e:
        return str(e)
    except Exception as e:
        return _one_line(e)
    return "the embedding job returned the zero tensor (see the worker logs)"


def index(
    sources: list[str],
    *,
    db_path: str,
    table: str = "videos",
    cluster: str | None = None,
    manifest: str | None = None,
    build_index: bool = False,
    retry_zeros: bool = False,
    segment_seconds: float | None = None,
    segment_stride: float | None = None,
) -> IndexSummary:
    """Add the videos under ``sources`` that the table lacks, embed every row that has no
    embedding yet through a Geneva backfill (local Ray, or ``cluster``), try again the rows
    an object fault left NULL (``retry_failed``) and, with ``retry_zeros``, the rows that
    hold the zero tensor; fill the mean-vector column for every row whose embedding is new,
    and keep the ANN index (past ``ANN_MIN_ROWS`` or when asked).

    With ``segment_seconds`` (or once the table has a segments view) the same is done for
    the segments view ``<table>_segments`` (``index_segments``)."""
    import geneva

    start = time.monotonic()
    found = find_videos(sources)
    if not found.videos:
        raise UserError(
            f"no videos found under {' '.join(sources)} (looked for "
            f"{', '.join(VIDEO_EXTENSIONS)}; skipped {found.skipped} other files)"
        )
    if cluster is not None:
        _refuse_local_sources(found.videos)
    _check_db(db_path, for_search=False)
    tbl = _existing_table(db_path, table)
    stored = _stored_settings(tbl.to_lance()) if tbl is not None else None
    settings = stored or _env_settings()
    new, pending = _new_and_pending(tbl, settings, found.videos)
    zeros = _zero_rows(tbl.to_lance(), settings) if retry_zeros and tbl is not None else {}
    if segment_seconds is not None:
        _check_segments(db_path, tbl, segment_seconds, segment_stride)
    if (pending or zeros or segment_seconds is not None) and cluster is None:
        _check_model(settings.model)  # before anything is written
        _check_frames(settings)

    db = geneva.connect(db_path)
    if tbl is None:
        tbl = db.create_table(table, schema=_table_schema(settings), storage_options=STABLE_ROW_IDS)
    if new:
        rows = {settings.video_uri_col: list(new), "size_bytes": list(new.values())}
        tbl.add(pa.table(rows, schema=_table_schema(settings)))
        logger.info("added %d new videos to table %s", len(new), table)
    emb_col, mean_col = settings.embedding_col, settings.embedding_col + MEAN_SUFFIX
    if emb_col not in tbl.schema.names:
        tbl.add_columns(embedding_column(settings))
    if mean_col not in tbl.schema.names:
        tbl.add_columns({mean_col: (mean_vector_udf(), [emb_col])})
    with _run_on(db, cluster, manifest):
        options = {} if cluster else _local_resources()
        if pending:
            _backfill(tbl, emb_col, options, _Progress(len(pending)))
        retry_failed(tbl, emb_col, **options)
        if zeros:
            logger.info("embedding again %d rows that hold the zero tensor", len(zeros))
            where = rows_filter(list(zeros), f"{emb_col} IS NOT NULL")
            _backfill(tbl, emb_col, {**options, "where": where}, None)
        _fill_means(tbl, settings, options, list(zeros))
        segments = index_segments(
            db, tbl, settings, options, segment_seconds, segment_stride, build_index=build_index
        )

    ds = tbl.to_lance()
    this_run = pending | set(zeros.values())
    bad = {
        u: _bad_video_reason(u, settings)
        for u in _zero_rows(ds, settings).values()
        if u in this_run
    }
    faults = {u: r for u, r in object_faults(tbl, settings).items() if u in this_run}
    if _wants_ann_index(ds, mean_col, build_index=build_index, changed=bool(this_run)):
        _build_ann_index(ds, mean_col)
    return IndexSummary(
        found=len(found.videos),
        skipped=found.skipped,
        already_indexed=len(found.videos) - len(new),
        added=len(new),
        embedded=len(this_run) - len(bad) - len(faults),
        bad_videos=bad,
        object_faults=faults,
        rows=ds.count_rows(),
        ann_index=_has_ann_index(ds, mean_col),  # create_index updates ds
        seconds=time.monotonic() - start,
        segments=segments,
    )


def _check_segments(
    db_path: str, tbl: geneva.table.Table | None, seconds: float, stride: float | None
) -> None:
    """Segments need a table with stable row IDs (every table ``index`` creates has them),
    and a view keeps the windows it was created with."""
    import geneva
    from geneva.db import dataset_uses_stable_row_ids

    if tbl is None:
        return
    if not dataset_uses_stable_row_ids(tbl.to_lance()):
        raise UserError(
            f"table {tbl.name} was created without stable row IDs, which a segments view needs "
            "to refresh as videos are added; index into a new --table or --db for segments"
        )
    view = _segments_view(geneva.connect(db_path), tbl.name)
    if view is not None:
        segmenter = _segmenter(view)
        if (segmenter.seconds, segmenter.stride) != (seconds, stride or seconds):
            raise UserError(
                f"the segments view {view.name} has {segmenter.seconds:g} s segments every "
                f"{segmenter.stride:g} s; index it with --segment-seconds {segmenter.seconds:g} "
                f"--segment-stride {segmenter.stride:g} (or neither), or into a new --table"
            )


def _segments_view(db: geneva.db.Connection, table: str) -> geneva.table.Table | None:
    """The segments view of ``table``, if it has one."""
    name = table + SEGMENTS_SUFFIX
    return db.open_table(name) if name in db.table_names() else None


def _segmenter(view: geneva.table.Table) -> Segmenter:
    """The ``Segmenter`` a segments view was created with, from the chunker Geneva keeps
    in the view's metadata."""
    from geneva.packager import ChunkerSpec, unmarshal_chunker

    spec = (view.schema.metadata or {})[b"geneva::view::chunker"]
    return unmarshal_chunker(ChunkerSpec.from_json(spec.decode())).func  # type: ignore[union-attr]


def index_segments(
    db: geneva.db.Connection,
    tbl: geneva.table.Table,
    settings: Settings,
    options: dict[str, Any],
    seconds: float | None,
    stride: float | None,
    *,
    build_index: bool,
) -> SegmentsSummary | None:
    """Create the segments view ``<table>_segments`` with windows of ``seconds`` every
    ``stride`` (default: ``seconds``) if asked and missing, refresh it (Geneva expands only
    the videos added since), embed its rows without an embedding with the table's UDF and
    settings, try again the rows an object fault left NULL, fill the mean vectors and keep
    the ANN index, as for videos. ``None`` when the table has no view and none is asked."""
    view = _segments_view(db, tbl.name)
    if view is None and seconds is None:
        return None
    emb_col, mean_col = settings.embedding_col, settings.embedding_col + MEAN_SUFFIX
    if view is None:
        assert seconds is not None
        view = _create_segments_view(
            db, tbl, segments_chunker(settings, seconds, stride or seconds)
        )
        udf, _ = embedding_column(settings)[emb_col]
        inputs = [settings.video_uri_col, "start_s", "end_s"]
        view.alter_columns({"path": emb_col, "udf": udf, "input_columns": inputs})
        view.alter_columns({"path": mean_col, "udf": mean_vector_udf(), "input_columns": [emb_col]})
    before = view.count_rows()
    view.refresh(concurrency=options.get("concurrency", 8))
    view.checkout_latest()
    pending = view.count_rows(f"{emb_col} IS NULL")
    if pending:
        _backfill(view, emb_col, options, _Progress(pending, "segments"))
    retry_failed(view, emb_col, **options)
    _fill_means(view, settings, options, [])
    return _segments_summary(tbl, view, settings, before, build_index=build_index)


def _create_segments_view(
    db: geneva.db.Connection, tbl: geneva.table.Table, chunker: Any
) -> geneva.table.Table:
    """``db.create_udtf_view`` of ``chunker`` over the table's URLs, named
    ``<table>_segments``.

    Geneva creates a view with stable row IDs from an empty Arrow table through
    ``lancedb.create_table`` without a schema, and lancedb 0.39 then infers the type of a
    list column named like an embedding from the first batch, which an empty table lacks
    (``StopIteration``). The connection's ``create_table`` is given the empty table's own
    schema for this one call."""
    create = db.create_table

    def with_schema(name: str, data: Any = None, schema: Any = None, **options: Any) -> Any:
        return create(name, data=data, schema=data.schema if schema is None else schema, **options)

    db.create_table = with_schema  # type: ignore[method-assign]
    try:
        return db.create_udtf_view(
            tbl.name + SEGMENTS_SUFFIX,
            source=tbl.search(None).select([chunker.input_columns[0]]),
            udtf=chunker,
        )
    finally:
        del db.create_table


def _segments_summary(
    tbl: geneva.table.Table,
    view: geneva.table.Table,
    settings: Settings,
    before: int,
    *,
    build_index: bool,
) -> SegmentsSummary:
    """Count what the run did to the view, and keep its ANN index."""
    emb_col, mean_col = settings.embedding_col, settings.embedding_col + MEAN_SUFFIX
    ds = view.to_lance()
    new = (
        ds.to_table(columns=[mean_col, emb_col], offset=before)
        if before
        else ds.to_table(columns=[mean_col, emb_col])
    )
    faults = new[emb_col].null_count
    means = new.filter(pa.compute.is_valid(new[mean_col]))[mean_col]
    zeros = int((~_vectors(means).any(axis=1)).sum()) if len(means) else 0
    with_segments = set(_uris(ds, settings.video_uri_col))
    embedded = set(_uris(tbl.to_lance(), settings.video_uri_col, f"{emb_col} IS NOT NULL"))
    zero_videos = set(_zero_rows(tbl.to_lance(), settings).values())
    if _wants_ann_index(ds, mean_col, build_index=build_index, changed=len(new) > 0):
        _build_ann_index(ds, mean_col)
    segmenter = _segmenter(view)
    return SegmentsSummary(
        view=view.name,
        seconds=segmenter.seconds,
        stride=segmenter.stride,
        segments=ds.count_rows(),
        added=ds.count_rows() - before,
        bad_segments=zeros,
        object_faults=faults,
        videos_without_segments=sorted(embedded - zero_videos - with_segments),
        ann_index=_has_ann_index(ds, mean_col),
    )


def _refuse_local_sources(videos: dict[str, int]) -> None:
    """A cluster's workers read each video themselves: a path on this machine would be
    missing there, and every row would get the zero tensor."""
    local = [uri for uri in videos if "://" not in uri or uri.startswith("file://")]
    if local:
        raise UserError(
            f"--cluster cannot read local files ({len(local)} found, e.g. {local[0]}): the "
            "cluster's workers do not see this machine's disk. Copy the videos to object "
            "storage (gs://, s3://) and index that prefix, or index without --cluster"
        )


def _fill_means(
    tbl: geneva.table.Table, settings: Settings, options: dict[str, Any], redone: list[int]
) -> None:
    """Backfill the mean vector of every row that has an embedding and no mean, and of
    the ``redone`` rows: a NULL embedding keeps a NULL mean until it is filled."""
    emb_col, mean_col = settings.embedding_col, settings.embedding_col + MEAN_SUFFIX
    ds = tbl.to_lance()
    missing = ds.to_table(
        columns=[], filter=f"{emb_col} IS NOT NULL AND {mean_col} IS NULL", with_row_address=True
    )
    rows = sorted({*missing["_rowaddr"].to_pylist(), *redone})
    if rows:
        where = rows_filter(rows, f"{emb_col} IS NOT NULL")
        _backfill(tbl, mean_col, {**options, "where": where}, None)


def _zero_rows(ds: lance.LanceDataset, settings: Settings) -> dict[int, str]:
    """Row address → URL of the rows whose embedding is the zero tensor of a bad video,
    found by their zero mean vector (4 KiB a row to read instead of the whole embedding)."""
    mean_col = settings.embedding_col + MEAN_SUFFIX
    if mean_col not in ds.schema.names:
        return {}
    table = ds.to_table(
        columns=[settings.video_uri_col, mean_col],
        filter=f"{mean_col} IS NOT NULL",
        with_row_address=True,
    )
    nonzero = np.asarray(_vectors(table[mean_col]).any(axis=1)).tolist()
    rows, uris = table["_rowaddr"].to_pylist(), table[settings.video_uri_col].to_pylist()
    return {r: u for r, u, ok in zip(rows, uris, nonzero, strict=True) if not ok}


def object_faults(tbl: geneva.table.Table, settings: Settings) -> dict[str, str]:
    """URL → reason for every row whose embedding an object fault left NULL: the latest
    of Geneva's error records for the row."""
    latest = failed_rows(tbl, settings.embedding_col)
    if not latest:
        return {}
    ds = tbl.to_lance()
    table = ds.to_table(
        columns=[settings.video_uri_col],
        filter=f"_rowaddr IN ({', '.join(map(str, latest))})",
        with_row_address=True,
    )
    return {
        u: latest[a].error_message
        for u, a in zip(
            table[settings.video_uri_col].to_pylist(), table["_rowaddr"].to_pylist(), strict=True
        )
    }


def _new_and_pending(
    tbl: geneva.table.Table | None, settings: Settings, videos: dict[str, int]
) -> tuple[dict[str, int], set[str]]:
    """The found videos the table lacks, and every URL that will need embedding: those,
    plus rows an earlier run left without an embedding."""
    if tbl is None:
        return videos, set(videos)
    ds = tbl.to_lance()
    indexed = set(_uris(ds, settings.video_uri_col))
    new = {uri: size for uri, size in videos.items() if uri not in indexed}
    pending = set(new)
    if settings.embedding_col in ds.schema.names:
        pending |= set(_uris(ds, settings.video_uri_col, f"{settings.embedding_col} IS NULL"))
    return new, pending


def _wants_ann_index(
    ds: lance.LanceDataset, column: str, *, build_index: bool, changed: bool
) -> bool:
    """Build (or rebuild, to cover new rows) the ANN index when asked, when the table has
    reached ``ANN_MIN_ROWS`` without one, or when new rows arrive in an indexed table."""
    if build_index:
        return True
    has_index = _has_ann_index(ds, column)
    return (ds.count_rows() >= ANN_MIN_ROWS and not has_index) or (changed and has_index)


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list vector column → ``(rows, 1024)`` float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, EMBEDDING_DIM)


# --- search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    row: int
    uri: str
    start_s: float | None = None
    """Where the hit starts in its video, in seconds: a segment's; ``None`` for a video."""
    end_s: float | None = None


@dataclass(frozen=True)
class SearchResult:
    query_uri: str
    query_row: int | None
    aggregate: str
    ann: bool
    """Whether candidates came from the ANN index (else every row was scored)."""
    hits: list[Hit]
    moments: bool = False
    """Whether the hits are segments of the segments view (else videos)."""
    query_start_s: float | None = None
    query_end_s: float | None = None


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def late_interaction(query: np.ndarray, rows: np.ndarray) -> float:
    """Multivector score (MaxSim): for each query row, the best cosine with any of the
    video's rows, averaged over the query rows; 1.0 for the video itself."""
    return float((_unit_rows(query) @ _unit_rows(rows).T).max(axis=1).mean())


def _scorer(query: np.ndarray, aggregate: str) -> Callable[[np.ndarray], float]:
    """Score a video's rows against the query: cosine of the two aggregated vectors (each
    already L2-normalised by its helper), or late interaction for ``none``."""
    if aggregate == "none":
        return lambda rows: late_interaction(query, rows)
    agg = AGGREGATES[aggregate]
    target = agg(query)
    return lambda rows: float(agg(rows) @ target)


def _embed_query(uri: str, settings: Settings, segment: Segment) -> np.ndarray:
    """The query's rows, ``(frames, 1024)`` float32: the video's, or its ``segment``'s,
    computed by the table's own UDF with the table's settings (the zero tensor when the
    UDF cannot process it). The one place this module calls the UDF."""
    udf_instance = VideoEmbedding(settings).func  # type: ignore[attr-defined]
    uris = pa.array([uri], pa.string())  # a Geneva batch of one row
    if segment == WHOLE_VIDEO:
        return matrices(udf_instance(uris))[0]
    starts, ends = pa.array([segment[0]], pa.float64()), pa.array([segment[1]], pa.float64())
    return matrices(udf_instance(uris, starts, ends))[0]


def _query_settings(ds: lance.LanceDataset) -> Settings:
    """The table's settings; ``VJEPA_MODEL``, when set, says where to load that model
    from on this machine (a local copy of the checkpoint the table was indexed with)."""
    env = _env_settings()
    stored = _stored_settings(ds)
    if stored is None:
        logger.warning("the table has no stored settings; using the environment's")
        return env
    if env.model != Settings.model:
        return dataclasses.replace(stored, model=env.model)
    return stored


def _query_from_row(
    ds: lance.LanceDataset, settings: Settings, row: int
) -> tuple[str, np.ndarray, Segment]:
    """The URL, stored embedding and segment (``WHOLE_VIDEO`` for a video) of a row; a
    row without a usable embedding is an error."""
    total = ds.count_rows()
    if not 0 <= row < total:
        raise UserError(f"--row {row} is out of range: the table has rows 0 to {total - 1}")
    value = ds.take([row], columns=[settings.video_uri_col, settings.embedding_col])
    uri = value[settings.video_uri_col][0].as_py()
    if not value[settings.embedding_col].is_valid()[0].as_py():
        raise UserError(f"row {row} ({uri}) has no embedding yet; run video-embeddings index")
    matrix = matrices(value[settings.embedding_col].combine_chunks())[0]
    if not matrix.any():
        raise UserError(f"row {row} ({uri}) could not be embedded (it has the zero tensor)")
    if "start_s" not in ds.schema.names:
        return uri, matrix, WHOLE_VIDEO
    times = ds.take([row], columns=["start_s", "end_s"]).to_pylist()[0]
    return uri, matrix, (times["start_s"], times["end_s"])


def _query_from_uri(uri: str, settings: Settings, segment: Segment) -> tuple[str, np.ndarray]:
    """The query video's URL and the embedding of its ``segment``. Its frames are read
    first, so that a video that cannot be decoded fails in a second with the reason,
    before the model loads."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    try:
        read_thumbnails(uri, 1, segment)
    except Undecodable as e:
        raise UserError(f"cannot decode the query video {uri}: {e}") from e
    _check_model(settings.model)
    try:
        matrix = _embed_query(uri, settings, segment)
    except (ObjectFault, SystemFault) as e:
        raise UserError(f"cannot embed the query video {uri}: {_one_line(e)}") from e
    if not matrix.any():
        raise UserError(f"cannot decode the query video {uri}: the model got no frames from it")
    return uri, matrix


def _candidates(
    ds: lance.LanceDataset,
    settings: Settings,
    query: np.ndarray,
    k: int,
    *,
    ann: bool,
    moments: bool,
) -> Iterator[pa.RecordBatch]:
    """Batches of (URL, embedding, row, and for ``moments`` start and end) to score: the
    ANN index's nearest mean vectors, or every embedded row."""
    uri_col, emb_col = settings.video_uri_col, settings.embedding_col
    columns = [uri_col, emb_col, "_rowoffset", *(["start_s", "end_s"] if moments else [])]
    if ann:
        nearest = {
            "column": emb_col + MEAN_SUFFIX,
            "q": aggregate_mean(query),
            "k": max(10 * k, ANN_CANDIDATES),
            "metric": "cosine",
        }
        yield from ds.to_table(nearest=nearest, columns=[*columns, "_distance"]).to_batches()
    else:
        yield from ds.to_batches(columns=columns, filter=f"{emb_col} IS NOT NULL")


def search(
    db_path: str,
    *,
    table: str = "videos",
    query_uri: str | None = None,
    query_row: int | None = None,
    query_segment: Segment = WHOLE_VIDEO,
    k: int = 10,
    aggregate: str = "mean",
    moments: bool = False,
) -> SearchResult:
    """Rank the table's videos, or with ``moments`` the segments of its segments view,
    against a query (a URL embedded with the table's settings, whole or its
    ``query_segment``, or a row of what is ranked) by the cosine of the chosen
    aggregation, or by late interaction for ``none``. Rows with the zero tensor are never
    hits."""
    import lancedb

    if aggregate != "none" and aggregate not in AGGREGATES:
        raise ValueError(
            f"Invalid aggregate ({aggregate!r}). Supported values are "
            f"{', '.join(AGGREGATES)}, none."
        )
    _check_db(db_path, for_search=True)
    db = lancedb.connect(db_path)
    try:
        settings = _query_settings(db.open_table(table).to_lance())
    except ValueError as e:
        raise UserError(f"no table {table!r} in {db_path}; run video-embeddings index") from e
    ranked = table + SEGMENTS_SUFFIX if moments else table
    try:
        ds = db.open_table(ranked).to_lance()
    except ValueError as e:
        raise UserError(
            f"no segments view {ranked!r} in {db_path}; run video-embeddings index with "
            "--segment-seconds"
        ) from e
    if query_row is not None:
        uri, query, query_segment = _query_from_row(ds, settings, query_row)
    else:
        assert query_uri is not None
        uri, query = _query_from_uri(query_uri, settings, query_segment)

    score = _scorer(query, aggregate)
    ann = _has_ann_index(ds, settings.embedding_col + MEAN_SUFFIX)
    scored: list[tuple[float, int, str, float | None, float | None]] = []
    for batch in _candidates(ds, settings, query, k, ann=ann, moments=moments):
        uris = batch.column(settings.video_uri_col).to_pylist()
        rows = batch.column("_rowoffset").to_pylist()
        starts = batch.column("start_s").to_pylist() if moments else [None] * len(rows)
        ends = batch.column("end_s").to_pylist() if moments else [None] * len(rows)
        embeddings = matrices(batch.column(settings.embedding_col))
        for u, r, start, end, matrix in zip(uris, rows, starts, ends, embeddings, strict=True):
            if matrix.any():  # the zero tensor of a bad video is never a hit
                scored.append((score(matrix), r, u, start, end))
    scored.sort(key=lambda s: (-s[0], s[1] != query_row, s[1]))  # ties: the query's own row first
    hits = [Hit(i + 1, *entry) for i, entry in enumerate(scored[:k])]
    segment = (None, None) if query_segment == WHOLE_VIDEO else query_segment
    return SearchResult(uri, query_row, aggregate, ann, hits, moments, *segment)


def write_sheet(result: SearchResult, path: Path) -> None:
    """The contact sheet of a search, PNG or HTML by ``path``'s suffix: the query's strip
    on top, then one strip per hit with its rank, score and name, and for a segment its
    time range, its thumbnails drawn from that segment."""
    query = _segment(result.query_start_s, result.query_end_s)
    entries = [(f"query{_time_range(query)}", result.query_uri, query)]
    for h in result.hits:
        segment = _segment(h.start_s, h.end_s)
        title = f"#{h.rank}  score {h.score:.4f}{_time_range(segment)}"
        entries.append((title, h.uri, segment))
    try:
        draw_sheet(entries, path)
    except OSError as e:
        raise UserError(f"cannot write the contact sheet {path}: {e.strerror or e}") from e


def _segment(start_s: float | None, end_s: float | None) -> Segment:
    return WHOLE_VIDEO if start_s is None or end_s is None else (start_s, end_s)


def _time_range(segment: Segment) -> str:
    """``  mm:ss-mm:ss`` for a segment, nothing for a whole video."""
    return "" if segment == WHOLE_VIDEO else f"  {clock(segment[0])}-{clock(segment[1])}"


def clock(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour), seconds rounded down."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
