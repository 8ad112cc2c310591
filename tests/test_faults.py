"""Faults: transient storage faults are retried and then raised as object faults, never
turned into zeros; exhausted memory, device errors and storage outages are system faults;
a row past its deadline is given up. Servers here listen on 127.0.0.1 only."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import embed_fn
from fsspec.implementations.local import LocalFileSystem
from geneva.errors import FatalWorkerHardwareError

import video_embeddings.pipeline
import video_embeddings.storage
import video_embeddings_udf as vu
from video_embeddings.outcomes import OUTAGE_FAULTS, OUTAGE_WINDOW, ObjectFault, SystemFault
from video_embeddings.storage import RETRY_ATTEMPTS
from video_embeddings_udf import Settings


class FaultyFileSystem(LocalFileSystem):
    """Local files behind a ``faulty://`` URL whose first ``failing_opens`` opens raise
    ``fault`` on the third read, i.e. inside torchcodec's demuxer, mid-stream."""

    protocol = "faulty"
    failing_opens = 0
    fault: type[Exception] = ConnectionResetError
    opens = 0

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        cls = type(self)
        cls.opens += 1
        file = super()._open(path, mode, **kwargs)
        if cls.opens > cls.failing_opens:
            return file
        reads = 0
        real_read = file.read

        def read(size: int = -1) -> bytes:
            nonlocal reads
            reads += 1
            if reads >= 3:
                raise cls.fault("injected fault")
            return real_read(size)

        file.read = read
        return file


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings, with the ``faulty://`` test filesystem allowed."""
    prefixes = (*settings.allowed_uri_prefixes, "faulty://")
    return dataclasses.replace(settings, allowed_uri_prefixes=prefixes)


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> type[FaultyFileSystem]:
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    monkeypatch.setattr(video_embeddings.storage, "RETRY_BASE_DELAY_S", 0.0)
    FaultyFileSystem.opens = 0
    FaultyFileSystem.fault = ConnectionResetError
    return FaultyFileSystem


def test_transient_faults_are_retried_to_the_clean_result(
    settings: Settings,
    shared_videos: Path,
    faulty: type[FaultyFileSystem],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two connection resets mid-read, then success: the row equals the clean result,
    each retry is logged, and no zero tensor is written."""
    video = shared_videos / "bikes.mp4"
    fn = embed_fn(settings)
    clean = np.stack(fn(str(video)))
    faulty.failing_opens = 2
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        retried = np.stack(fn(f"faulty://{video}"))
    np.testing.assert_array_equal(retried, clean)
    assert faulty.opens == 3
    retries = [r for r in caplog.records if "transient fault" in r.getMessage()]
    assert [r.name for r in retries] == ["video_embeddings.storage"] * 2
    assert (
        retries[0]
        .getMessage()
        .startswith(
            f"transient fault reading faulty://{video} (attempt 1 of 4), retrying in 0.0s: "
            "ConnectionResetError: injected fault"
        )
    )
    assert "attempt 2 of 4" in retries[1].getMessage()
    assert not [r for r in caplog.records if "embedding" in r.getMessage()]


@pytest.mark.parametrize("fault", [ConnectionResetError, TimeoutError])
def test_persistent_fault_is_raised_after_bounded_retries(
    settings: Settings,
    shared_videos: Path,
    faulty: type[FaultyFileSystem],
    fault: type[Exception],
) -> None:
    """A fault that never clears is raised to Geneva after RETRY_ATTEMPTS tries, as an
    ObjectFault naming the URL, the attempts and the last error (the row is left NULL)."""
    faulty.failing_opens = 100
    faulty.fault = fault
    fn = embed_fn(settings)
    uri = f"faulty://{shared_videos / 'bikes.mp4'}"
    with pytest.raises(ObjectFault) as raised:
        fn(uri)
    assert str(raised.value) == (
        f"reading {uri} failed after 4 attempts: {fault.__name__}: injected fault"
    )
    assert raised.value.__cause__ is None
    assert faulty.opens == RETRY_ATTEMPTS == 4


def test_permission_error_is_raised_at_once(
    settings: Settings,
    shared_videos: Path,
    faulty: type[FaultyFileSystem],
) -> None:
    """A refused credential (403 becomes PermissionError) is not retried and not zeroed:
    an ObjectFault after one attempt, naming the PermissionError."""
    faulty.failing_opens = 100
    faulty.fault = PermissionError
    fn = embed_fn(settings)
    uri = f"faulty://{shared_videos / 'bikes.mp4'}"
    with pytest.raises(ObjectFault) as raised:
        fn(uri)
    assert (
        str(raised.value)
        == f"reading {uri} failed after 1 attempt: PermissionError: injected fault"
    )
    assert faulty.opens == 1


def test_object_deleted_mid_read_is_a_missing_object(
    settings: Settings, shared_videos: Path, faulty: type[FaultyFileSystem]
) -> None:
    """An object that disappears while torchcodec reads it gives the zero tensor, once,
    without retries: it is gone, not flaky."""
    faulty.failing_opens = 100
    faulty.fault = FileNotFoundError
    out = embed_fn(settings)(f"faulty://{shared_videos / 'bikes.mp4'}")
    assert np.array_equal(out, vu.zero_embedding())
    assert faulty.opens == 1


# --- system faults: the worker, not the row ---------------------------------------------

MEMORY_CHILD = """
import resource, sys
import numpy as np
import pyarrow as pa
from video_embeddings_udf import Settings, VideoEmbedding

model, small, large, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
udf = VideoEmbedding(Settings(model=model, decode_workers=1)).func
first = np.array(udf(pa.array([small])).to_pylist()[0], np.float32)
print("loaded", first.shape, bool(first.any()), flush=True)
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + headroom, resource.RLIM_INFINITY))
try:
    out = udf(pa.array([large]))
except BaseException as e:
    print(f"raised {type(e).__module__}.{type(e).__qualname__}: {e}", flush=True)
else:
    rows = np.array(out.to_pylist()[0], np.float32)
    print("returned", rows.shape, "zero" if not rows.any() else "nonzero", flush=True)
finally:
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
"""


@pytest.mark.slow
def test_host_allocation_failure_is_a_system_fault(
    settings: Settings, clips: dict[str, Path], shared_videos: Path
) -> None:
    """Real host memory exhaustion, in a child process: the UDF loads its model with a
    first call on a small clip, then the address space is capped 16 MiB above what the
    process maps, and a 1280x720 clip (66 MB per chunk of decoded frames) cannot be
    decoded. The call raises SystemFault naming the failed allocation; it never returns
    the zero tensor, which would pass a worker's exhaustion off as a bad video. The child
    sees no GPU: this is about host memory."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_CHILD,
            settings.model,
            str(clips["short"]),
            str(shared_videos / "bigbuckbunny.mp4"),
            str(16 * 1024 * 1024),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr
    loaded, outcome = done.stdout.splitlines()[-2:]
    assert loaded == "loaded (64, 1024) True"
    assert outcome.startswith("raised video_embeddings.outcomes.SystemFault: "), outcome
    assert "allocate memory" in outcome.lower(), outcome


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ],
    ids=["cuda-oom", "cuda-error"],
)
def test_device_fault_is_a_system_fault(
    settings: Settings,
    clips: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    error: RuntimeError,
) -> None:
    """Mocked GPU step (CI has no GPU): the device-side resize the decode threads run,
    ``video_embeddings.pipeline.shrink``, is replaced by one that raises what torch raises
    when the device fails, a CUDA out-of-memory or a CUDA error. Decoding, the model and
    the UDF are real. The call raises SystemFault, which is Geneva's
    FatalWorkerHardwareError (the task moves to another worker, no row is written or
    NULL-filled), with torch's message; nothing is kept for row isolation."""
    calls: list[int] = []

    def failing_shrink(frames: torch.Tensor, p: Any, *, device: str) -> torch.Tensor:
        calls.append(len(frames))
        raise error

    udf = vu.VideoEmbedding(settings).func
    udf._ready()
    monkeypatch.setattr(video_embeddings.pipeline, "shrink", failing_shrink)
    with pytest.raises(SystemFault) as raised:
        udf(pa.array([str(clips["mp4"]), str(clips["short"])], pa.string()))
    assert isinstance(raised.value, FatalWorkerHardwareError)
    assert str(raised.value) == str(error)
    assert raised.value.__cause__ is error
    assert calls and all(n > 0 for n in calls)
    assert udf._isolating == {}


# --- loopback servers: a stalled body, a refused credential -----------------------------


class Loopback(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every path ``/*.mp4`` with the bytes of
    ``clip`` in ``mode`` "stall" (HEAD answers normally; a GET gets its 206 headers, then
    its body stalls for ``STALL_S`` or until ``stop``), 403 to everything in mode
    "forbid", or 416 to every GET in mode "416". It counts the requests for each path."""

    STALL_S = 30.0

    def __init__(self, mode: str, clip: Path) -> None:
        super().__init__(("127.0.0.1", 0), _LoopbackHandler)
        self.mode = mode
        self.clip = clip.read_bytes()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: Counter[tuple[str, str]] = Counter()
        self.released = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,))

    def start(self) -> Loopback:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()  # ends every stall at once
        self.shutdown()
        self.server_close()  # joins the handler threads
        self._thread.join()

    def count(self, method: str) -> Counter[str]:
        return Counter({path: n for (m, path), n in self.requests.items() if m == method})


class _LoopbackHandler(BaseHTTPRequestHandler):
    server: Loopback

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_GET(self) -> None:
        self._answer("GET")

    def _answer(self, method: str) -> None:
        self.server.requests[method, self.path] += 1
        if self.server.mode == "forbid":
            self.send_error(403)
            return
        if self.server.mode == "416" and method == "GET":
            self.send_response(416)  # every range, though HEAD gave the size
            self.send_header("Content-Range", f"bytes */{len(self.server.clip)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = len(self.server.clip)
        if method == "HEAD":
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return
        start, _, end = self.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        last = min(int(end or size - 1), size - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{last}/{size}")
        self.send_header("Content-Length", str(last - int(start) + 1))
        self.end_headers()
        self.wfile.flush()
        self.server.released.wait(Loopback.STALL_S)  # the body never comes in time

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def loopback(clips: dict[str, Path]) -> Iterator[Any]:
    """Starts a ``Loopback`` server in a mode with the short clip; stops them all after."""
    servers: list[Loopback] = []

    def start(mode: str) -> Loopback:
        servers.append(Loopback(mode, clips["short"]).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def allowing(settings: Settings, server: Loopback, **changes: Any) -> Settings:
    """``settings`` with the loopback server's address explicitly allowed."""
    prefixes = (*settings.allowed_uri_prefixes, f"{server.endpoint}/")
    return dataclasses.replace(settings, allowed_uri_prefixes=prefixes, **changes)


def test_row_past_its_deadline_is_given_up_without_stalling_the_batch(
    settings: Settings, clips: dict[str, Path], loopback: Any
) -> None:
    """A server that answers HEAD but stalls each GET body for 30 s: with ROW_DEADLINE_S
    at 2 s, a batch of a good local clip and the stalled URL raises an ObjectFault naming
    ROW_DEADLINE_S within 10 s (the call does not wait for the stalled read), and the good
    row was embedded all the same: its outcome is kept for Geneva's row isolation."""
    server = loopback("stall")
    good, stalled = str(clips["mp4"]), f"{server.endpoint}/stalled.mp4"
    s = allowing(settings, server, row_deadline_s=2, decode_workers=2)
    udf = vu.VideoEmbedding(s).func
    udf._ready()
    started = time.monotonic()
    with pytest.raises(ObjectFault, match=r"ROW_DEADLINE_S") as raised:
        udf(pa.array([good, stalled], pa.string()))
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert str(raised.value) == "no result within ROW_DEADLINE_S (2 s)"
    assert server.count("GET")["/stalled.mp4"] >= 1  # the read really was stalled
    kept = udf._isolating[good]
    assert isinstance(kept, np.ndarray) and kept.shape == (64, 1024) and kept.any()
    assert udf._isolating[stalled] is raised.value
    np.testing.assert_allclose(kept, embed_fn(settings)(good), rtol=1e-4, atol=1e-5)


def test_skip_budget_turns_a_storage_outage_into_a_system_fault(
    settings: Settings, clips: dict[str, Path], tmp_path: Path, loopback: Any
) -> None:
    """A server that answers 403 to everything. Sixteen of its URLs in one call are an
    outage (9 object faults among a worker's last 16 rows): SystemFault, after one request
    of each URL's size and no retries. One such URL in a call of one is an ObjectFault, and
    so is one among 15 good clips, whose outcomes are kept so that Geneva's halving reads
    nothing again; a failed row of one, called again alone as Geneva does, is not read
    again; nine such rows, one call each, trip the budget."""
    server = loopback("forbid")
    s = allowing(settings, server, num_frames=16)
    forbidden = [f"{server.endpoint}/v{i}.mp4" for i in range(OUTAGE_WINDOW)]
    assert (OUTAGE_WINDOW, OUTAGE_FAULTS) == (16, 9)

    udf = vu.VideoEmbedding(s).func
    with pytest.raises(SystemFault, match=r"^storage outage: 9 of the last 16 objects") as out:
        udf(pa.array(forbidden, pa.string()))
    assert isinstance(out.value, FatalWorkerHardwareError)
    assert "failed after 1 attempt: ClientResponseError: 403" in str(out.value)
    assert server.count("HEAD") == Counter({f"/v{i}.mp4": 1 for i in range(16)})
    assert server.count("GET") == Counter({f"/v{i}.mp4": 1 for i in range(16)})  # fsspec's

    one = vu.VideoEmbedding(s).func
    with pytest.raises(ObjectFault) as single:
        one(pa.array([forbidden[0]], pa.string()))
    assert str(single.value).startswith(
        f"reading {forbidden[0]} failed after 1 attempt: ClientResponseError: 403, "
        "message='Forbidden'"
    )
    assert list(one._isolating) == [forbidden[0]]
    asked = sum(server.requests.values())
    with pytest.raises(ObjectFault) as again:  # Geneva calls a failed row alone again
        one(pa.array([forbidden[0]], pa.string()))
    assert again.value is single.value and sum(server.requests.values()) == asked

    good = [str(shutil.copy(clips["short"], tmp_path / f"good{i}.mp4")) for i in range(15)]
    mixed = vu.VideoEmbedding(s).func
    batch = [*good[:8], forbidden[1], *good[8:]]
    before = sum(server.requests.values())
    with pytest.raises(ObjectFault, match=r"failed after 1 attempt: ClientResponseError: 403"):
        mixed(pa.array(batch, pa.string()))
    expected = [np.ndarray] * 8 + [ObjectFault] + [np.ndarray] * 7
    assert [type(mixed._isolating[u]) for u in batch] == expected
    asked = sum(server.requests.values()) - before
    kept = {u: mixed._isolating[u] for u in good}
    halves = mixed(pa.array(good[:8], pa.string())).to_pylist()
    for uri, rows in zip(good[:8], halves, strict=True):
        np.testing.assert_array_equal(np.array(rows, np.float32), kept[uri])
    with pytest.raises(ObjectFault, match="403"):
        mixed(pa.array([forbidden[1], *good[8:]], pa.string()))
    with pytest.raises(ObjectFault, match="403"):
        mixed(pa.array([forbidden[1]], pa.string()))
    assert sum(server.requests.values()) - before == asked  # nothing was read again

    for uri in forbidden[2:OUTAGE_FAULTS]:  # one fault is already counted
        with pytest.raises(ObjectFault):
            one(pa.array([uri], pa.string()))
    with pytest.raises(SystemFault, match=r"^storage outage: 9 of the last 16 objects"):
        one(pa.array([forbidden[OUTAGE_FAULTS]], pa.string()))


def test_rows_queued_behind_a_stalled_read_are_given_up_too(
    settings: Settings, clips: dict[str, Path], loopback: Any
) -> None:
    """One decode thread, held by a stalled read: the row queued behind it cannot start,
    and is given up twice ROW_DEADLINE_S after it was queued. The call returns in bounded
    time, every row with an outcome (both NULL here, retried later)."""
    server = loopback("stall")
    s = allowing(settings, server, decode_workers=1, row_deadline_s=2.0, num_frames=16)
    batch = [f"{server.endpoint}/stalled.mp4", str(clips["mp4"])]
    udf = vu.VideoEmbedding(s).func
    started = time.monotonic()
    with pytest.raises(ObjectFault, match=r"no result within ROW_DEADLINE_S \(2 s\)"):
        udf(pa.array(batch, pa.string()))
    assert time.monotonic() - started < 10
    assert [type(udf._isolating[u]) for u in batch] == [ObjectFault, ObjectFault]


def test_a_range_answered_416_is_an_object_fault_not_a_bad_video(
    settings: Settings, loopback: Any
) -> None:
    """HEAD gives the size, then every range gets 416 (an object replaced mid-read, a
    glitch): fsspec returns no bytes, which must not read as the end of a bad video."""
    server = loopback("416")
    with pytest.raises(ObjectFault, match=r"failed after 1 attempt: OSError: short read: 0 of"):
        embed_fn(allowing(settings, server, num_frames=16))(f"{server.endpoint}/v.mp4")


@pytest.mark.parametrize(("value", "reason"), [("", "no video URL"), ("  ", "no video URL")])
def test_blank_urls_are_bad_videos(
    settings: Settings, value: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        np.testing.assert_array_equal(embed_fn(settings)(value), vu.zero_embedding())
    lines = [r.getMessage() for r in caplog.records if "zero embedding" in r.getMessage()]
    assert lines == [f"zero embedding for {value}: {reason}"]


def test_a_fifo_is_refused_without_blocking(settings: Settings, tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: a local path must be a regular file."""
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    started = time.monotonic()
    np.testing.assert_array_equal(embed_fn(settings)(str(fifo)), vu.zero_embedding())
    assert time.monotonic() - started < 30


def test_log_lines_stay_one_line_and_binary_columns_read(
    settings: Settings, clips: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A newline in a URL is escaped in the log (no forged second line); a binary URL
    column is read as UTF-8."""
    forged = "/nope.mp4\nzero embedding for gs://b/forged.mp4: forged"
    udf = vu.VideoEmbedding(dataclasses.replace(settings, num_frames=16)).func
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        out = udf(pa.array([forged.encode(), str(clips["mp4"]).encode()], pa.binary()))
    [line] = [r.getMessage() for r in caplog.records if "zero embedding" in r.getMessage()]
    assert "\n" not in line and line.startswith("zero embedding for /nope.mp4\\x0azero")
    assert len(out[1].as_py()) == 16


def test_ffmpeg_out_of_memory_is_the_files_fault_while_memory_is_free() -> None:
    """FFmpeg's ENOMEM is a bad video while the process can still allocate
    ``SPARE_BYTES`` (a damaged header asked for gigabytes); a torch allocation failure, or
    a CUDA error, stays a system fault."""
    from video_embeddings.outcomes import SystemFault, decode_fault, memory_is_short

    assert not memory_is_short()
    enomem = RuntimeError("Failed to read frame from input file: Cannot allocate memory")
    assert isinstance(decode_fault(enomem), vu.BadVideo)
    torch_oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")
    assert isinstance(decode_fault(torch_oom), SystemFault)
    assert isinstance(decode_fault(RuntimeError("CUDA error: misaligned address")), SystemFault)
