"""The ``video-embeddings`` command, run as a subprocess the way a person runs it: index
the shared clips into a LanceDB directory through a real Geneva backfill on local Ray,
search it by row and by URL in every aggregation mode, draw contact sheets, and fail with
one clear line where it should."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fsspec
import lance
import numpy as np
import pytest
from PIL import Image

import video_embeddings_table as vt
from video_embeddings_sheet import (
    HIT_BG,
    LABEL_W,
    PAD,
    QUERY_BG,
    SHEET_W,
    STRIP_H,
    THUMB_H,
    THUMB_W,
    THUMBNAILS,
)
from video_embeddings_udf import (
    aggregate_max,
    aggregate_mean,
    aggregate_segment,
    aggregate_weighted,
)

CLI = str(Path(sys.executable).with_name("video-embeddings"))
GOOD = ["av1_video.mkv", "bikes.mp4", "carphone_distorted.mp4", "h265_video.mp4"]
BAD = "audio_only.mp4"
"""The shared WAV under a video name: found by its extension, embedded as the zero tensor."""
OWN_LINE = re.compile(r"\d\d:\d\d:\d\d [A-Z]+ video_embeddings\w*(\.\w+)*: |video-embeddings: ")
"""A stderr line of the command's own: a log line of one of the package's loggers, or its
one-line error."""
NOISE = re.compile(r"DataReplacement|auth|Traceback|tqdm|it/s")
"""What the libraries print that a user cannot act on (lance, Ray, Geneva, progress bars)."""
AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": aggregate_mean,
    "max": aggregate_max,
    "weighted": aggregate_weighted,
    "segment": aggregate_segment,
}


def run_cli(
    *args: str, env: dict[str, str], check_rc: int | None = 0
) -> subprocess.CompletedProcess:
    result = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path) -> dict[str, str]:
    """The tiny checkpoint, 4 frames per video (a multiple of the tubelet size) for speed."""
    return {**os.environ, "VJEPA_MODEL": str(tiny_model_dir), "NUM_FRAMES": "4"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory, shared_videos: Path) -> Path:
    """Four shared clips, an audio file named like a video, and two files that are skipped
    (a WAV and a text file), linked into one folder."""
    d = tmp_path_factory.mktemp("clips")
    for name in GOOD:
        (d / name).symlink_to(shared_videos / name)
    (d / BAD).symlink_to(shared_videos / "sine_mono_s16.wav")
    (d / "sine_mono_s16.wav").symlink_to(shared_videos / "sine_mono_s16.wav")
    (d / "notes.txt").write_text("not a video")
    return d


@pytest.fixture(scope="module")
def indexed(
    tmp_path_factory: pytest.TempPathFactory, clip_dir: Path, env: dict[str, str]
) -> tuple[Path, dict[str, Any], str]:
    """One ``index`` run (a Geneva backfill on local Ray, stopped when the command exits):
    the LanceDB directory, the JSON summary, and stderr."""
    db = tmp_path_factory.mktemp("index") / "db"
    result = run_cli("index", str(clip_dir), "--db", str(db), "--json", env=env)
    return db, json.loads(result.stdout), result.stderr


@pytest.fixture(scope="module")
def reindexed(
    tmp_path_factory: pytest.TempPathFactory,
    indexed: tuple[Path, dict[str, Any], str],
    clip_dir: Path,
    env: dict[str, str],
) -> tuple[Path, dict[str, Any], str]:
    """A second ``index`` run over a copy of the first run's table, the same files named by
    globs this time, with --build-index and --verbose (Ray starts again, though nothing
    is left to embed): the LanceDB directory, the JSON summary, and stderr."""
    db = tmp_path_factory.mktemp("reindex") / "db"
    shutil.copytree(indexed[0], db)
    args = ["index", f"{clip_dir}/*.mp4", f"{clip_dir}/*.mkv", "--db", str(db)]
    result = run_cli(*args, "--build-index", "--json", "--verbose", env=env)
    return db, json.loads(result.stdout), result.stderr


def table(db: Path) -> dict[str, Any]:
    """The table's columns by URL: size, embedding rows, mean vector, row number."""
    ds = lance.dataset(str(db / "videos.lance"))
    rows = ds.to_table(
        columns=["video_uri", "size_bytes", "video_embedding", "video_embedding_mean", "_rowoffset"]
    ).to_pylist()
    return {
        r["video_uri"]: {
            "size": r["size_bytes"],
            "rows": np.array(r["video_embedding"], dtype=np.float32),
            "mean": np.array(r["video_embedding_mean"], dtype=np.float32),
            "row": r["_rowoffset"],
        }
        for r in rows
    }


def by_hand(query: np.ndarray, rows: np.ndarray, aggregate: str) -> float:
    """The score as the issue defines it, computed here independently of the CLI: cosine of
    the aggregated vectors, or for ``none`` the mean over query rows of the best cosine."""
    if aggregate == "none":
        q = query / np.linalg.norm(query, axis=1, keepdims=True)
        d = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return float(np.mean(np.max(q @ d.T, axis=1)))
    a, b = AGGREGATES[aggregate](query), AGGREGATES[aggregate](rows)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_ranking(
    hits: list[dict], query_uri: str, query: np.ndarray, stored: dict, aggregate: str
) -> None:
    """The query's own video first with score 1, every good video once, scores equal to
    the by-hand computation and descending, the zero-tensor video never a hit."""
    assert [h["rank"] for h in hits] == list(range(1, len(GOOD) + 1))
    assert hits[0]["uri"] == query_uri
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert sorted(Path(h["uri"]).name for h in hits) == sorted(GOOD)
    for hit in hits:
        assert math.isfinite(hit["score"])
        assert hit["row"] == stored[hit["uri"]]["row"]
        expected = by_hand(query, stored[hit["uri"]]["rows"], aggregate)
        assert hit["score"] == pytest.approx(expected, abs=1e-5)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_find_videos_in_folder_glob_and_file(clip_dir: Path) -> None:
    """Folders are walked, globs expanded, file:// accepted; sizes come from the listing;
    files without a video extension are counted as skipped."""
    videos = sorted([*GOOD, BAD])
    found = vt.find_videos([str(clip_dir)])
    assert list(found.videos) == [str(clip_dir / n) for n in videos]
    assert found.videos[str(clip_dir / "bikes.mp4")] == (clip_dir / "bikes.mp4").stat().st_size
    assert found.skipped == 2
    assert list(vt.find_videos([f"{clip_dir}/*.mkv"]).videos) == [str(clip_dir / "av1_video.mkv")]
    found = vt.find_videos([f"file://{clip_dir}/bikes.mp4", str(clip_dir / "missing")])
    assert list(found.videos) == [str(clip_dir / "bikes.mp4")]
    assert found.skipped == 0


def test_find_videos_under_an_object_store_prefix(
    shared_videos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gs:// prefix is listed recursively on a real GCS emulator: videos come back as
    gs:// URLs with their sizes, the other object is counted as skipped."""
    import gcsfs
    from gcs_emulator import GcsEmulator

    bikes, av1 = (
        (shared_videos / "bikes.mp4").read_bytes(),
        (shared_videos / "av1_video.mkv").read_bytes(),
    )
    with GcsEmulator() as emulator:
        emulator.upload("videos", "clips/bikes.mp4", bikes)
        emulator.upload("videos", "clips/more/av1_video.mkv", av1)
        emulator.upload("videos", "clips/notes.txt", b"not a video")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
        monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
        gcsfs.GCSFileSystem.clear_instance_cache()  # no instance bound to another endpoint
        try:
            found = vt.find_videos(["gs://videos/clips/"])
        finally:
            gcsfs.GCSFileSystem.clear_instance_cache()
    assert found.videos == {
        "gs://videos/clips/bikes.mp4": len(bikes),
        "gs://videos/clips/more/av1_video.mkv": len(av1),
    }
    assert found.skipped == 1


def test_progress_counts_this_runs_videos_from_genevas_job_tracker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Geneva's tracker counts rows an earlier run embedded in its total and done count
    (its snapshot shape, as a real backfill reported it); progress shows this run's."""
    progress = vt._Progress(total=5)
    snapshot = {
        "rows_checkpointed": {"n": 9, "total": 12, "done": False, "desc": "Rows checkpointed"},
        "rows_skipped_on_error": {"n": 1, "total": 0, "done": False},
    }
    with caplog.at_level("INFO", logger="video_embeddings_table"):
        progress.update(snapshot)
        progress.report()
        progress.report()  # nothing moved: no second line
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("embedding: 2/5 videos, ") and "1 failures so far" in lines[0]
    assert lines[1].startswith("embedding: 5/5 videos, ")


@pytest.mark.slow
def test_index_embeds_every_video_then_nothing_on_a_second_run(
    indexed: tuple[Path, dict[str, Any], str],
    reindexed: tuple[Path, dict[str, Any], str],
    clip_dir: Path,
    env: dict[str, str],
) -> None:
    """The first run adds and embeds every video (the audio-only one as the zero tensor,
    with its reason), counts the skipped files, and reports progress on stderr. A second
    run over the same files, named by globs this time, adds and embeds nothing and leaves
    every embedding as it was; with --build-index it builds the ANN index, and search
    through it ranks exactly as the full scan does."""
    db, summary, stderr = indexed
    assert summary["found"] == summary["added"] == 5
    assert summary["embedded"] == 4
    assert list(summary["bad_videos"]) == [str(clip_dir / BAD)]
    assert "no valid stream" in summary["bad_videos"][str(clip_dir / BAD)].lower()
    assert summary["object_faults"] == {}
    assert (summary["skipped"], summary["already_indexed"], summary["rows"]) == (2, 0, 5)
    assert summary["ann_index"] is False
    assert "embedding: 5/5 videos" in stderr and "failures so far" in stderr

    stored = table(db)
    for name in GOOD:
        entry = stored[str(clip_dir / name)]
        assert entry["size"] == (clip_dir / name).stat().st_size
        assert entry["rows"].shape == (4, 1024) and entry["rows"].any()
        np.testing.assert_allclose(entry["mean"], aggregate_mean(entry["rows"]), atol=1e-6)
    np.testing.assert_array_equal(stored[str(clip_dir / BAD)]["rows"], np.zeros((1, 1024)))
    np.testing.assert_array_equal(stored[str(clip_dir / BAD)]["mean"], np.zeros(1024))

    again, summary, second_stderr = reindexed
    assert (summary["found"], summary["added"], summary["already_indexed"]) == (5, 0, 5)
    assert (summary["embedded"], summary["bad_videos"], summary["object_faults"]) == (0, {}, {})
    assert summary["ann_index"] is True
    assert "video_embeddings_table: embedding:" not in second_stderr
    for uri, entry in table(again).items():
        np.testing.assert_array_equal(entry["rows"], stored[uri]["rows"])

    row = str(stored[str(clip_dir / "bikes.mp4")]["row"])
    exact = json.loads(run_cli("search", "--row", row, "--db", str(db), "--json", env=env).stdout)
    ann = json.loads(run_cli("search", "--row", row, "--db", str(again), "--json", env=env).stdout)
    assert (exact["ann"], ann["ann"]) == (False, True)
    assert [(h["uri"], h["row"]) for h in ann["hits"]] == [
        (h["uri"], h["row"]) for h in exact["hits"]
    ]
    for a, e in zip(ann["hits"], exact["hits"], strict=True):
        assert a["score"] == pytest.approx(e["score"], abs=1e-6)


@pytest.mark.slow
def test_stderr_has_only_the_commands_own_lines_unless_verbose(
    indexed: tuple[Path, dict[str, Any], str], reindexed: tuple[Path, dict[str, Any], str]
) -> None:
    """Without --verbose, index's stderr is its own progress and outcome: no notice from
    Ray (token auth, its workers' forwarded output), lance (DataReplacement), Geneva
    (tracebacks, progress bars). With --verbose the libraries' lines are there too."""
    quiet = indexed[2].splitlines()
    assert any("video_embeddings_table: embedding: 5/5 videos" in line for line in quiet)
    assert [line for line in quiet if NOISE.search(line) or not OWN_LINE.match(line)] == []

    verbose = reindexed[2].splitlines()
    others = [line for line in verbose if not OWN_LINE.match(line)]
    assert any(" geneva." in line for line in others), reindexed[2][-3000:]
    assert any("Started a local Ray instance" in line for line in others), reindexed[2][-3000:]


@pytest.mark.parametrize("aggregate", ["mean", "max", "weighted", "segment", "none"])
@pytest.mark.slow
def test_search_by_row_ranks_by_cosine_of_the_aggregate(
    indexed: tuple[Path, dict[str, Any], str], clip_dir: Path, env: dict[str, str], aggregate: str
) -> None:
    db = indexed[0]
    stored = table(db)
    query_uri = str(clip_dir / "bikes.mp4")
    args = ["--row", str(stored[query_uri]["row"]), "--aggregate", aggregate]
    result = json.loads(run_cli("search", *args, "--db", str(db), "--json", env=env).stdout)
    assert (result["query_uri"], result["aggregate"]) == (query_uri, aggregate)
    assert_ranking(result["hits"], query_uri, stored[query_uri]["rows"], stored, aggregate)


@pytest.mark.parametrize("aggregate", ["mean", "none"])
@pytest.mark.slow
def test_search_by_url_embeds_the_query_like_the_table(
    indexed: tuple[Path, dict[str, Any], str], clip_dir: Path, env: dict[str, str], aggregate: str
) -> None:
    """A URL is embedded with the table's settings, so the video's own row comes first
    with score 1 and the scores are those of its stored embedding. (The URL path differs
    from the row path only in where the query comes from; the row test covers every mode's
    scoring, so this runs one aggregation and late interaction.)"""
    db = indexed[0]
    stored = table(db)
    query_uri = str(clip_dir / "h265_video.mp4")
    args = [query_uri, "--aggregate", aggregate, "--db", str(db), "--json"]
    result = json.loads(run_cli("search", *args, env=env).stdout)
    assert (result["query_uri"], result["query_row"]) == (query_uri, None)
    assert_ranking(result["hits"], query_uri, stored[query_uri]["rows"], stored, aggregate)


def thumbnails(pixels: np.ndarray, strip: int) -> list[np.ndarray]:
    """The thumbnail cells of one strip of a PNG sheet."""
    top = strip * STRIP_H + PAD
    lefts = [LABEL_W + PAD + j * (THUMB_W + PAD) for j in range(THUMBNAILS)]
    return [pixels[top : top + THUMB_H, left : left + THUMB_W] for left in lefts]


@pytest.mark.slow
def test_png_sheet_has_the_query_strip_then_one_per_hit(
    indexed: tuple[Path, dict[str, Any], str], clip_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """-k 3 gives a PNG of exactly 4 strips: the query's (its own colour) on top, then the
    hits in rank order. The query is a row, so hit 1 is the same video and its strip shows
    the same frames; every strip has thumbnails. The text output lists rank, score, URL."""
    db = indexed[0]
    stored = table(db)
    query_uri = str(clip_dir / "bikes.mp4")
    sheet_path = tmp_path / "sheet.png"
    args = ["--row", str(stored[query_uri]["row"]), "-k", "3", "--sheet", str(sheet_path)]
    result = run_cli("search", *args, "--db", str(db), env=env)
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["rank", "score", "url"]
    assert lines[2].split() == ["1", "1.0000", query_uri]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3"]

    image = Image.open(sheet_path)
    assert image.format == "PNG"
    assert image.size == (SHEET_W, 4 * STRIP_H)
    pixels = np.asarray(image.convert("RGB"))
    backgrounds = [tuple(pixels[i * STRIP_H + 2, 2]) for i in range(4)]
    assert backgrounds == [QUERY_BG] + [HIT_BG] * 3
    for strip in range(4):
        assert all(cell.std() > 10 for cell in thumbnails(pixels, strip))  # frames, not blanks
    np.testing.assert_array_equal(thumbnails(pixels, 0), thumbnails(pixels, 1))
    assert not np.array_equal(thumbnails(pixels, 1), thumbnails(pixels, 2))
    first, last = thumbnails(pixels, 1)[0], thumbnails(pixels, 1)[-1]
    assert not np.array_equal(first, last)  # sampled across the video, not one frame


class _SheetParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.strips: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if "strip" in (values.get("class") or "").split():
            self.strips.append(values["class"] or "")
        if tag == "img":
            self.images.append(values["src"] or "")
        self.links += [
            v for k, v in attrs if k in ("href", "src") and v and not v.startswith("data:")
        ]


@pytest.mark.slow
def test_html_sheet_is_self_contained_and_loads_in_chromium(
    indexed: tuple[Path, dict[str, Any], str], clip_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """The HTML sheet has the query strip and one per hit, every thumbnail inlined as a
    decodable image and nothing fetched from elsewhere; headless Chromium renders it with
    no console error and takes a screenshot of it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    db = indexed[0]
    sheet_path = tmp_path / "sheet.html"
    row = str(table(db)[str(clip_dir / "av1_video.mkv")]["row"])
    run_cli("search", "--row", row, "-k", "2", "--sheet", str(sheet_path), "--db", str(db), env=env)

    parser = _SheetParser()
    parser.feed(sheet_path.read_text())
    assert parser.strips == ["strip query", "strip", "strip"]
    assert parser.links == []
    assert len(parser.images) == 3 * THUMBNAILS
    for src in parser.images:
        header, data = src.split(",", 1)
        assert header == "data:image/jpeg;base64"
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "JPEG" and max(image.size) <= THUMB_W

    shot = tmp_path / "screenshot.png"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # tests may run as root
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            f"--window-size={SHEET_W},{3 * STRIP_H}",
            sheet_path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert ":CONSOLE" not in result.stderr  # page errors are logged as console messages
    screenshot = Image.open(shot)
    assert screenshot.format == "PNG"
    assert screenshot.size == (SHEET_W, 3 * STRIP_H)
    assert np.asarray(screenshot.convert("RGB")).std() > 10


@pytest.mark.parametrize(
    ("case", "rc", "message"),
    [
        ("no videos", 1, "no videos found under"),
        ("not a LanceDB directory", 1, "is not a LanceDB directory"),
        ("undecodable query", 1, "cannot decode the query video"),
        ("model for index", 1, "point VJEPA_MODEL at a local checkpoint directory"),
        ("model for search", 1, "point VJEPA_MODEL at a local checkpoint directory"),
        ("bad sheet name", 2, "must end in .png or .html"),
        ("unwritable sheet", 1, "cannot write the contact sheet"),
        ("segments of 0 s", 2, "'0' must be above 0 seconds"),
        ("a stride alone", 2, "--segment-stride needs --segment-seconds"),
        ("--from alone", 2, "--from and --to go together"),
        ("--to before --from", 2, "--to must be after --from"),
        ("moments without a view", 1, "no segments view 'videos_segments'"),
    ],
)
@pytest.mark.slow
def test_errors_are_one_line_with_an_exit_code(
    indexed: tuple[Path, dict[str, Any], str],
    clip_dir: Path,
    env: dict[str, str],
    tmp_path: Path,
    case: str,
    rc: int,
    message: str,
) -> None:
    """Each failure a user can cause ends the command with one line on stderr that says
    what is wrong, and a non-zero exit code; nothing is written."""
    db = str(indexed[0])
    (tmp_path / "empty").mkdir()
    no_model = {**env, "VJEPA_MODEL": str(tmp_path / "no-such-checkpoint")}
    new_db = tmp_path / "new-db"
    args, run_env = {
        "no videos": (["index", str(tmp_path / "empty"), "--db", str(new_db)], env),
        "not a LanceDB directory": (["search", "--row", "0", "--db", str(clip_dir)], env),
        "undecodable query": (["search", str(clip_dir / BAD), "--db", db], env),
        "model for index": (["index", str(clip_dir), "--db", str(new_db)], no_model),
        "model for search": (["search", str(clip_dir / "bikes.mp4"), "--db", db], no_model),
        "bad sheet name": (["search", "--row", "0", "--db", db, "--sheet", "out.jpg"], env),
        "unwritable sheet": (
            ["search", "--row", "1", "--db", db, "--sheet", str(tmp_path / "no" / "x.png")],
            env,
        ),
        "segments of 0 s": (["index", str(clip_dir), "--db", db, "--segment-seconds", "0"], env),
        "a stride alone": (["index", str(clip_dir), "--db", db, "--segment-stride", "5"], env),
        "--from alone": (["search", str(clip_dir / "bikes.mp4"), "--db", db, "--from", "1"], env),
        "--to before --from": (
            ["search", str(clip_dir / "bikes.mp4"), "--db", db, "--from", "2", "--to", "1"],
            env,
        ),
        "moments without a view": (["search", "--row", "0", "--db", db, "--moments"], env),
    }[case]
    result = run_cli(*args, env=run_env, check_rc=rc)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    if rc == 1:  # nothing but the error (a usage error also prints the usage)
        assert result.stderr.splitlines() == errors, result.stderr
        assert errors[0].startswith("video-embeddings: error: ")
    assert not new_db.exists()


@pytest.mark.slow
def test_a_model_that_cannot_be_fetched_fails_in_seconds(
    clip_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """A hub id that is neither cached nor fetchable (offline here; on a machine with hub
    access, no such repository) fails with one line, as fast as a missing local
    directory that never touches the network: the hub downloads' own retries would add
    about 25 s. The two runs are compared rather than timed alone, since importing the
    libraries alone takes seconds on a loaded machine."""
    new_db = tmp_path / "db"
    seconds = {}
    for model in (str(tmp_path / "no-such-checkpoint"), "facebook/not-a-model"):
        start = time.monotonic()
        args = ["index", str(clip_dir), "--db", str(new_db)]
        result = run_cli(*args, env={**env, "VJEPA_MODEL": model}, check_rc=1)
        seconds[model] = time.monotonic() - start
        assert result.stderr.startswith(f"video-embeddings: error: cannot load the model {model!r}")
        assert result.stderr.count("\n") == 1, result.stderr
        assert "point VJEPA_MODEL at a local checkpoint directory" in result.stderr
    assert seconds["facebook/not-a-model"] - seconds[str(tmp_path / "no-such-checkpoint")] < 15
    assert not new_db.exists()


@pytest.mark.parametrize("command", [[], ["index"], ["search"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = subprocess.run([CLI, *command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: video-embeddings {' '.join(command)}".rstrip())
