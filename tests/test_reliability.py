"""Bad inputs, storage faults and a resumed backfill, all read from gs:// through a real GCS
emulator with a fault-injecting proxy in front.

The corpus (tests/corpus.py) is stored under odd object names; each entry must give its
stated result, directly and through a real Geneva backfill. The backfill runs with a fault
every few requests and an outage that starts midway, which fails it; the rerun resumes from
Geneva's checkpoints. Recomputed rows are counted as requests per object at the proxy, so
the count does not depend on how the UDF batches its calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, unquote_plus

import fsspec
import gcsfs
import geneva
import numpy as np
import pyarrow as pa
import pytest
from conftest import embed_fn
from corpus import ENTRIES, HUGE_DURATION_MS, HUGE_FRAME_COUNT, SIXTY, Entry, build, eight_k
from gcs_emulator import FAULTS, FaultProxy, GcsEmulator
from torchcodec.decoders import VideoDecoder

import video_embeddings.storage
import video_embeddings_udf as vu
from video_embeddings.outcomes import OUTAGE_FAULTS, ObjectFault
from video_embeddings_udf import Settings, embedding_column, retry_failed

BUCKET = "corpus"
NUM_FRAMES = 16
CLIENT_TIMEOUT_S = 2
"""gcsfs's request timeout here (its default is aiohttp's 5 minutes): a stall past it
raises TimeoutError, which gcsfs leaves to the UDF to retry."""
REFUSED_URL = "http://169.254.169.254/computeMetadata/v1/video.mp4"
TAIL = [f"tail/{i:02d}.mp4" for i in range(3 * OUTAGE_FAULTS)]
"""One-frame clips after the corpus, so that an outage midway leaves enough rows for the
skip budget to trip on each of Geneva's 3 attempts at the task."""


def url(name: str) -> str:
    return f"gs://{BUCKET}/{name}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory, clips: dict[str, Path]) -> Iterator[FaultProxy]:
    """The corpus in the emulator, a fault proxy in front (injecting nothing until a test
    says so), and gcsfs pointed at the proxy, here and in Ray workers (through the
    environment), with a CLIENT_TIMEOUT_S request timeout."""
    objects = build(tmp_path_factory.mktemp("corpus"), clips)
    options = {"token": "anon", "requests_timeout": CLIENT_TIMEOUT_S}
    with (
        GcsEmulator() as emulator,
        FaultProxy(emulator.endpoint, stall_s=CLIENT_TIMEOUT_S + 2) as proxy,
        pytest.MonkeyPatch.context() as patch,
    ):
        for name, data in objects.items():
            emulator.upload(BUCKET, name, data)
        for name in TAIL:
            emulator.upload(BUCKET, name, clips["one"].read_bytes())
        patch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        patch.setenv("FSSPEC_GCS", json.dumps(options))  # read by fsspec in the Ray workers
        patch.setitem(fsspec.config.conf, "gcs", options)
        gcsfs.GCSFileSystem.clear_instance_cache()  # none may point at another test's proxy
        yield proxy
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def corpus_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, num_frames=NUM_FRAMES)


@dataclasses.dataclass
class Result:
    """What a direct call gave for an entry: its rows and the UDF's log lines."""

    rows: np.ndarray
    log_lines: list[str]


class _UdfLines(logging.Handler):
    """Collects the UDF's warnings, less the one about running without CUDA."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("video_embeddings") and "CUDA" not in record.getMessage():
            self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def clean(gcs: FaultProxy, corpus_settings: Settings) -> dict[str, Result]:
    """Each corpus entry embedded by a direct call, with no fault injected, and the
    UDF's log lines for it: the reference for every test here."""
    fn = embed_fn(corpus_settings)
    logger = logging.getLogger("video_embeddings")
    out = {}
    for entry in ENTRIES:
        handler = _UdfLines()
        logger.addHandler(handler)
        try:
            rows = np.stack(fn(url(entry.name)))
        finally:
            logger.removeHandler(handler)
        out[entry.name] = Result(rows, handler.lines)
    assert gcs.faults_injected() == {}
    return out


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_corpus_entry_gives_its_stated_result(entry: Entry, clean: dict[str, Result]) -> None:
    """A video that cannot be processed gives the zero tensor and exactly one log line
    with its reason; every other entry gives NUM_FRAMES finite, non-zero rows, equal to
    the entry it is stated to embed like."""
    result = clean[entry.name]
    if entry.reason is not None:
        np.testing.assert_array_equal(result.rows, np.zeros((1, 1024), np.float32))
        assert len(result.log_lines) == 1
        assert result.log_lines[0].startswith(f"zero embedding for {url(entry.name)}: ")
        assert entry.reason in result.log_lines[0]
        return
    assert result.log_lines == []
    assert result.rows.shape == (NUM_FRAMES, 1024)
    assert np.isfinite(result.rows).all() and np.abs(result.rows).sum() > 0
    if entry.same_as is not None:
        np.testing.assert_array_equal(result.rows, clean[entry.same_as].rows)


def test_hostile_headers_really_declare_huge_values(gcs: FaultProxy, tmp_path: Path) -> None:
    """The hostile entries (which embed exactly like the file they were patched from) do
    declare 2**31 - 1 frames and a 1e15 ms (31,700-year) duration: only the frames the
    exact scan finds are sampled, so neither makes the sampler allocate or seek past
    them."""
    fs = fsspec.filesystem("gs")
    frames = fs.cat_file(f"{BUCKET}/hostile/2147483647 frames declared.mp4")
    metadata = VideoDecoder(frames, seek_mode="exact").metadata
    assert metadata.num_frames_from_header == HUGE_FRAME_COUNT
    assert metadata.num_frames == 60
    mkv = tmp_path / "duration.mkv"
    mkv.write_bytes(fs.cat_file(f"{BUCKET}/hostile/1e15 ms duration declared.mkv"))
    probe = ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0"]
    declared = float(subprocess.run([*probe, str(mkv)], capture_output=True, text=True).stdout)
    assert declared == pytest.approx(HUGE_DURATION_MS / 1000)  # seconds
    assert VideoDecoder(str(mkv), seek_mode="exact").metadata.num_frames == 60


def test_8k_embeds_when_max_pixels_allows_it(settings: Settings, tmp_path: Path) -> None:
    """With MAX_PIXELS raised to 7680x4320, a very short 8K clip (2 frames, NUM_FRAMES=2)
    embeds to a non-zero [2, 1024]; with the default it is refused (see the corpus)."""
    clip = tmp_path / "8k.mp4"
    eight_k(clip)
    s = dataclasses.replace(settings, num_frames=2, max_pixels=7680 * 4320)
    rows = np.stack(embed_fn(s)(str(clip)))
    assert rows.shape == (2, 1024)
    assert np.isfinite(rows).all() and np.abs(rows).sum() > 0


def test_object_over_max_video_bytes_is_not_fetched(
    gcs: FaultProxy, corpus_settings: Settings
) -> None:
    """An object over MAX_VIDEO_BYTES gets the zero tensor from its size alone: its
    metadata is read, not one byte of its content."""
    gcs.reset()
    s = dataclasses.replace(corpus_settings, max_video_bytes=1000)
    assert np.array_equal(embed_fn(s)(url(SIXTY)), vu.zero_embedding())
    assert gcs.gets() == 0 and gcs.requests_for(SIXTY) > 0


# --- storage faults ---------------------------------------------------------------------


@pytest.fixture
def faults(gcs: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The fault proxy, counting from zero; the UDF's backoff is cut to zero in this
    process (its schedule is unchanged: 4 attempts). Faults are switched off afterwards."""
    monkeypatch.setattr(video_embeddings.storage, "RETRY_BASE_DELAY_S", 0.0)
    gcs.reset()
    yield gcs
    gcs.every, gcs.faults, gcs.outage = 0, FAULTS, None


@pytest.mark.parametrize("fault", FAULTS)
def test_transient_fault_is_retried_to_the_clean_result(
    faults: FaultProxy,
    fault: str,
    corpus_settings: Settings,
    clean: dict[str, Result],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the video's read answered 503 or 429, reset halfway through its body, or
    stalled past the client's timeout, the video still embeds to exactly its clean rows:
    gcsfs retries the first three itself, the UDF retries the stall. No zero tensor."""
    faults.fault_next("alt=media", fault)
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        rows = np.stack(embed_fn(corpus_settings)(url(SIXTY)))
    np.testing.assert_array_equal(rows, clean[SIXTY].rows)
    assert faults.faults_injected() == {fault: 1}
    retries = [r.getMessage() for r in caplog.records if "transient fault" in r.getMessage()]
    assert len(retries) == (fault == "stall")
    assert not [r for r in caplog.records if "zero embedding" in r.getMessage()]


GCSFS_TRIES = 6
"""gcsfs tries each request 6 times (5 retries, sleeping about 1, 2, 4, 8, 16 s)."""


@pytest.mark.parametrize(
    ("fault", "error", "message", "reads"),
    [
        (
            "503",
            ObjectFault,
            "HttpError: injected fault, 503",
            video_embeddings.storage.RETRY_ATTEMPTS * GCSFS_TRIES,
        ),
    ],
)
def test_persistent_outage_fails_after_bounded_attempts(
    faults: FaultProxy,
    fault: str,
    error: type[Exception],
    message: str,
    reads: int,
    corpus_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 503 that persists is an object fault (the row is left NULL), with a clear
    message and no zero tensor, after 4 UDF attempts of 6
    gcsfs tries each of the object's metadata GET. The sleeps between tries are cut to
    zero in this process; in production they bound such an outage to about 2.3 minutes
    per row (4 x 33 s of gcsfs backoff plus the UDF's 1, 2 and 4 s). A stalled storage
    fails in 4 request timeouts plus that backoff: see the backfill test below."""
    real_sleep = asyncio.sleep

    async def no_sleep(delay: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", SimpleNamespace(sleep=no_sleep))
    faults.outage = fault
    with pytest.raises(error) as raised:
        embed_fn(corpus_settings)(url(SIXTY))
    assert str(raised.value) == (
        f"reading {url(SIXTY)} failed after {video_embeddings.storage.RETRY_ATTEMPTS} "
        f"attempts: {message}"
    )
    metadata_gets = [r for r in faults.snapshot() if r.path.endswith("/o/odd%2Fsixty%20frames.mp4")]
    assert len(metadata_gets) == reads
    assert {r.fault for r in faults.snapshot()} == {fault}


OUTAGE_AT = "odd/10-bit.mp4"
"""The object whose first read starts the outage, midway through the table."""
FAULT_EVERY = 8
"""A fault every 8 requests: 503, 429, reset and stall in turn, so each comes once in
the 32 or more requests that the rows before OUTAGE_AT make."""
ROW_DEADLINE_S = 5.0
"""Each row of the outage gives up after this long: two stalled requests of the client's
2 s timeout and the backoff between them; a row before the outage has time for one
stall and a clean read."""


@pytest.mark.slow
def test_backfill_survives_faults_fails_on_an_outage_and_resumes(
    gcs: FaultProxy,
    clean: dict[str, Result],
    corpus_settings: Settings,
    tmp_path: Path,
    local_ray: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One Geneva backfill over the corpus, a refused metadata-server URL and the tail, on
    local Ray, with a fault every FAULT_EVERY requests. When it reaches OUTAGE_AT the
    storage stalls for good: each row then fails at its ROW_DEADLINE_S, the skip budget
    calls it an outage after OUTAGE_FAULTS of them, and after Geneva's 3 attempts on fresh
    workers the job fails, naming the outage, and commits nothing (so no zeros and no
    NULLs in the table). The rerun resumes: no row that Geneva checkpointed before the
    outage is read again; ``retry_failed`` reads the rows the outage left NULL; every row
    ends with exactly its clean result."""
    values = [REFUSED_URL, *(url(e.name) for e in ENTRIES), *(url(t) for t in TAIL)]
    names = [v.removeprefix(f"gs://{BUCKET}/") for v in values]
    outage_row = names.index(OUTAGE_AT)
    # a runtime knob: Ray's workers read it from the environment they start with
    monkeypatch.setenv("ROW_DEADLINE_S", str(ROW_DEADLINE_S))
    db = geneva.connect(str(tmp_path / "db"))
    tbl = db.create_table("videos", pa.table({"video_uri": values}))
    tbl.add_columns(embedding_column(corpus_settings))
    # one applier and a checkpoint per row, so that the rows before the outage are done
    options = {
        "num_gpus": 0, "concurrency": 1, "checkpoint_size": 1, "task_size": len(values),
        "batch_checkpoint_flush_interval_seconds": 0,
    }  # fmt: skip

    gcs.reset()
    gcs.every = FAULT_EVERY
    gcs.outage_from(quote(OUTAGE_AT, safe=""), "stall")
    started = time.monotonic()
    with pytest.raises(Exception, match="storage outage") as failed:
        tbl.backfill("video_embedding", **options)
    first_s = time.monotonic() - started
    assert "of the last 16 objects could not be read" in str(failed.value)
    assert tbl.to_arrow()["video_embedding"].null_count == len(values)
    assert all(gcs.requests_for(name) for name in names[1:outage_row])
    first_run = gcs.snapshot()
    outage = next(i for i, r in enumerate(first_run) if OUTAGE_AT in unquote_plus(r.path))
    scheduled = {r.fault for r in first_run[:outage] if r.fault}

    gcs.outage = None
    gcs.reset()
    started = time.monotonic()
    tbl.backfill("video_embedding", **options)
    rerun_s = time.monotonic() - started
    left_null = tbl.to_arrow()["video_embedding"].null_count
    rerun_requests = len(gcs.snapshot())
    started = time.monotonic()
    retried = retry_failed(tbl, "video_embedding", **options)
    retry_s = time.monotonic() - started
    print(
        f"outage backfill: first run {len(first_run)} requests, failed after {first_s:.0f} s "
        f"({len(first_run) - outage} of them in the outage); rerun {rerun_requests} requests in "
        f"{rerun_s:.0f} s, {left_null} rows NULL; retry_failed {retried} rows, "
        f"{len(gcs.snapshot()) - rerun_requests} requests in {retry_s:.0f} s"
    )
    assert scheduled | set(gcs.faults_injected()) == set(FAULTS)
    assert [name for name in names[:outage_row] if gcs.requests_for(name)] == []
    assert gcs.requests_for(OUTAGE_AT) > 0
    stored = tbl.to_arrow().to_pylist()
    assert sorted(row["video_uri"] for row in stored) == sorted(values)
    one = np.stack(embed_fn(corpus_settings)(url(TAIL[0])))
    for row in stored:
        name = row["video_uri"].removeprefix(f"gs://{BUCKET}/")
        expected = clean[name].rows if name in clean else one
        if row["video_uri"] == REFUSED_URL:
            expected = np.zeros((1, 1024), np.float32)
        np.testing.assert_array_equal(np.array(row["video_embedding"]), expected)
