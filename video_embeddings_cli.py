"""The ``video-embeddings`` command: the main job for a person.

    video-embeddings index SOURCE... --db DIR [--table videos] [--build-index]
                           [--retry-zeros] [--segment-seconds S [--segment-stride S]]
                           [--cluster NAME [--manifest NAME]] [--json] [--verbose]
    video-embeddings search (QUERY [--from S --to S] | --row N) --db DIR [--table videos]
                            [--moments] [-k 10]
                            [--aggregate mean|max|weighted|segment|none]
                            [--sheet out.png|out.html] [--json] [--verbose]

``main`` parses the arguments, sets up the process's output (``_quiet`` unless
``--verbose``), calls one function of ``video_embeddings_table`` and prints its result to
stdout. That module is imported only once the arguments are parsed, so ``--help`` and usage
errors answer at once, and so that the environment ``_quiet`` sets is in place before the
libraries that read it (and the Ray processes that inherit it) start.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from video_embeddings.settings import SEGMENT_SECONDS

if TYPE_CHECKING:
    from video_embeddings_table import IndexSummary, SearchResult

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "max", "weighted", "segment", "none")

OWN_LOGGERS = (
    "video_embeddings",
    "video_embeddings_cli",
    "video_embeddings_sheet",
    "video_embeddings_table",
    "video_embeddings_udf",
)
"""The package's loggers: the only ones that reach stderr below ERROR without --verbose."""

QUIET_ENV = {
    "TQDM_DISABLE": "1",  # Geneva's progress bars (tqdm reads TQDM_* when imported)
    "LANCE_LOG": "error",  # lance's Rust log, e.g. "DataReplacement ... not stable yet"
    "HF_HUB_VERBOSITY": "error",  # these two libraries log through their own handlers
    "TRANSFORMERS_VERBOSITY": "error",
}
"""Set (unless already set) before the libraries are imported and Ray starts, so that the
Ray processes, which inherit the environment, are as quiet as this one."""


def _sheet_path(value: str) -> Path:
    if Path(value).suffix.lower() not in (".png", ".html"):
        raise argparse.ArgumentTypeError(f"{value!r} must end in .png or .html")
    return Path(value)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _seconds(value: str) -> float:
    """A time in the video: 0 or more seconds."""
    number = _number_of_seconds(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 or more seconds")
    return number


def _length(value: str) -> float:
    """A segment's length or stride: above 0 seconds."""
    number = _number_of_seconds(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be above 0 seconds")
    return number


def _number_of_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="video-embeddings",
        description="Embed videos into a LanceDB table with V-JEPA2, and search it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "index",
        help="embed the videos under each SOURCE into a table",
        description="Add the videos under each SOURCE that the table lacks, then embed "
        "every row without an embedding through a Geneva backfill (local Ray unless "
        "--cluster). Builds an ANN index on the mean vectors from 5,000 rows, or at once "
        "with --build-index.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="folder, glob, file or URL prefix")
    p.add_argument("--db", required=True, help="LanceDB directory (created if missing)")
    p.add_argument("--table", default="videos", help="table name (default: videos)")
    p.add_argument("--cluster", help="run the backfill on this defined Geneva cluster")
    p.add_argument("--manifest", help="Geneva manifest for --cluster")
    p.add_argument("--build-index", action="store_true", help="build the ANN index now")
    p.add_argument(
        "--retry-zeros",
        action="store_true",
        help="embed again the rows that hold the zero tensor (after a fix or a new FFmpeg)",
    )
    p.add_argument(
        "--segment-seconds",
        type=_length,
        nargs="?",
        const=SEGMENT_SECONDS,
        metavar="S",
        help="also embed the videos' segments of S seconds (default 10), in the view "
        "<table>_segments, for search --moments",
    )
    p.add_argument(
        "--segment-stride",
        type=_length,
        metavar="S",
        help="start a segment every S seconds (default: --segment-seconds; less overlaps)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_verbose(p)

    s = commands.add_parser(
        "search",
        help="rank the table's videos against a query video",
        description="Rank the table's videos by cosine similarity to a query video (a "
        "URL, embedded with the table's settings, or --row N), optionally drawing a "
        "contact sheet of the hits.",
    )
    query = s.add_mutually_exclusive_group(required=True)
    query.add_argument("query", nargs="?", metavar="QUERY", help="URL or path of a video")
    query.add_argument(
        "--row", type=int, help="use this row (0-based; a segment with --moments) instead"
    )
    s.add_argument("--from", dest="start_s", type=_seconds, metavar="S", help="query from S s")
    s.add_argument("--to", dest="end_s", type=_seconds, metavar="S", help="query up to S s")
    s.add_argument(
        "--moments",
        action="store_true",
        help="rank the segments of <table>_segments (made by index --segment-seconds)",
    )
    s.add_argument("--db", required=True, help="LanceDB directory made by index")
    s.add_argument("--table", default="videos", help="table name (default: videos)")
    s.add_argument("-k", type=_positive, default=10, help="number of hits (default: 10)")
    s.add_argument(
        "--aggregate",
        choices=AGGREGATIONS,
        default="mean",
        help="how a video's rows become one vector, or none for late interaction",
    )
    s.add_argument("--sheet", type=_sheet_path, help="write a contact sheet (.png or .html)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_verbose(s)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log what the libraries report (Geneva, Ray, its workers, lance)",
    )


def _setup_output(*, verbose: bool, starts_ray: bool) -> None:
    """Logs go to stderr, one line each. With ``verbose`` every library logs at INFO and
    Ray forwards its workers' output; without it, only this package's loggers log below
    ERROR (progress, outcome) and the libraries' notices are silenced (``_quiet``)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in (*OWN_LOGGERS, __name__):  # __main__ when run as a script
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        _quiet(starts_ray=starts_ray)


def _quiet(*, starts_ray: bool) -> None:
    """Silence what a user of the command cannot act on: Python warnings become log
    records of ``py.warnings`` (below ERROR, so dropped), libraries read ``QUIET_ENV``,
    and Ray starts without forwarding its workers' output to this process's stdout and
    stderr (the Geneva traceback of a completion-marker commit, lance's Rust warnings,
    the UDF's per-row lines, whose reasons the summary lists) and with its own logger
    at ERROR (its token-auth notice, its "Started a local Ray instance" line).

    Geneva's ``local_ray_context()`` passes ``log_to_driver=True`` to ``ray.init``, which
    overrides Ray's ``RAY_LOG_TO_DRIVER`` environment variable, so the options are set
    on ``ray.init`` itself, for whichever caller starts or joins Ray in this process
    (only for a command that ``starts_ray``: search never does, and Ray takes seconds to
    import)."""
    logging.captureWarnings(True)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not starts_ray:
        return

    import ray

    init = ray.init
    if getattr(init, "quiet", False):  # main already ran in this process
        return

    @functools.wraps(init)
    def quiet_init(*args: Any, **kwargs: Any) -> Any:
        return init(*args, **{**kwargs, "log_to_driver": False, "logging_level": logging.ERROR})

    quiet_init.quiet = True  # type: ignore[attr-defined]
    ray.init = quiet_init


def _print_summary(summary: IndexSummary, db: str, table: str) -> None:
    print(f"indexed {summary.found} videos into {db} (table {table}) in {summary.seconds:.1f} s")
    print(f"  embedded: {summary.embedded}")
    print(f"  bad videos (zero tensor): {len(summary.bad_videos)}")
    for uri, reason in summary.bad_videos.items():
        print(f"    {uri}: {reason}")
    print(
        f"  object faults (left empty, tried again on the next run): {len(summary.object_faults)}"
    )
    for uri, reason in summary.object_faults.items():
        print(f"    {uri}: {reason}")
    print(f"  skipped: {summary.skipped} files without a video extension")
    print(f"  already in the table: {summary.already_indexed}")
    print(f"  rows: {summary.rows}, ANN index: {'yes' if summary.ann_index else 'no'}")
    seg = summary.segments
    if seg is not None:
        print(f"  segments ({seg.seconds:g} s every {seg.stride:g} s) in {seg.view}:")
        print(f"    added: {seg.added}, bad (zero tensor): {seg.bad_segments}, ", end="")
        print(f"object faults: {seg.object_faults}")
        print(
            f"    embedded videos without segments (duration unreadable): "
            f"{len(seg.videos_without_segments)}"
        )
        for uri in seg.videos_without_segments:
            print(f"      {uri}")
        print(f"    rows: {seg.segments}, ANN index: {'yes' if seg.ann_index else 'no'}")


def _print_hits(result: SearchResult) -> None:
    from video_embeddings_table import clock

    row = f" (row {result.query_row})" if result.query_row is not None else ""
    span = ""
    if result.query_start_s is not None and result.query_end_s is not None:
        span = f" from {clock(result.query_start_s)} to {clock(result.query_end_s)}"
    how = "ANN candidates" if result.ann else "every row"
    ranked = "moments" if result.moments else "videos"
    print(
        f"query: {result.query_uri}{span}{row}; ranked: {ranked}; "
        f"aggregate: {result.aggregate}; scored: {how}"
    )
    times = f"  {'start':>5}  {'end':>5}" if result.moments else ""
    print(f"{'rank':>4}  {'score':>7}{times}  url")
    for hit in result.hits:
        if hit.start_s is not None and hit.end_s is not None:
            times = f"  {clock(hit.start_s):>5}  {clock(hit.end_s):>5}"
        print(f"{hit.rank:>4}  {hit.score:>7.4f}{times}  {hit.uri}")


def _index(args: argparse.Namespace) -> None:
    from video_embeddings_table import index

    summary = index(
        args.sources,
        db_path=args.db,
        table=args.table,
        cluster=args.cluster,
        manifest=args.manifest,
        build_index=args.build_index,
        retry_zeros=args.retry_zeros,
        segment_seconds=args.segment_seconds,
        segment_stride=args.segment_stride,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    else:
        _print_summary(summary, args.db, args.table)


def _search(args: argparse.Namespace) -> None:
    from video_embeddings.frames import WHOLE_VIDEO
    from video_embeddings_table import search, write_sheet

    result = search(
        args.db,
        table=args.table,
        query_uri=args.query,
        query_row=args.row,
        query_segment=WHOLE_VIDEO if args.start_s is None else (args.start_s, args.end_s),
        k=args.k,
        aggregate=args.aggregate,
        moments=args.moments,
    )
    if args.sheet:
        write_sheet(result, args.sheet)
        logger.info("wrote the contact sheet %s", args.sheet)
    if args.json:
        sheet = str(args.sheet) if args.sheet else None
        print(json.dumps({**dataclasses.asdict(result), "sheet": sheet}, indent=2))
    else:
        _print_hits(result)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "index" and args.manifest and not args.cluster:
        parser.error("--manifest needs --cluster")
    if args.command == "index" and args.segment_stride is not None and args.segment_seconds is None:
        parser.error("--segment-stride needs --segment-seconds")
    if args.command == "search" and (args.start_s is None) != (args.end_s is None):
        parser.error("--from and --to go together")
    if args.command == "search" and args.start_s is not None:
        if args.query is None:
            parser.error("--from and --to need a QUERY video")
        if not args.end_s > args.start_s:
            parser.error("--to must be after --from")
    _setup_output(verbose=args.verbose, starts_ray=args.command == "index")
    # Under `uv run`, Ray would rebuild the uv environment for each worker, and refuses a
    # project outside the working directory: the local workers use this environment.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    from video_embeddings_table import UserError

    try:
        if args.command == "index":
            _index(args)
        else:
            _search(args)
    except UserError as e:
        print(f"video-embeddings: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
