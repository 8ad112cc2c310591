"""A batch of URLs through decode and model, one outcome per row: decode threads work
through the batch while the model embeds what is already decoded."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from video_embeddings.decode import NVDEC_STREAMS, DecodeEngines
from video_embeddings.frames import WHOLE_VIDEO, Segment
from video_embeddings.model import Model, embed_clips, load_model
from video_embeddings.outcomes import BadVideo, ObjectFault, SystemFault
from video_embeddings.preprocess import shrink
from video_embeddings.settings import Settings, granted_cpus
from video_embeddings.storage import read_with_retries
from video_embeddings.urls import redact

if TYPE_CHECKING:
    import torch

__all__ = ["SEGMENTS_PER_DECODE", "Request", "Runtime", "embed_videos", "load_runtime"]

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker loads once: the model and the decode threads."""

    model: Model
    engines: DecodeEngines
    pool: ThreadPoolExecutor


def load_runtime(settings: Settings) -> Runtime:
    """Load V-JEPA2 once per worker, on CUDA when present, and start the decode threads:
    ``DECODE_WORKERS`` CPU threads (default: the CPUs granted to this process) and, on
    CUDA, ``NVDEC_STREAMS`` NVDEC streams. Raises ``SystemFault`` when the model cannot
    load or ``VIDEO_DECODE_DEVICE=cuda`` has no CUDA device."""
    import torch

    if torch.cuda.is_available():
        device = "cuda"
    else:
        device = "cpu"
        logger.warning("no CUDA device%s: V-JEPA2 runs on the CPU, which is slow", _ray_node())
    if settings.decode_device == "cuda" and device != "cuda":
        raise SystemFault("VIDEO_DECODE_DEVICE=cuda, but this worker has no CUDA device.")
    try:
        model = load_model(settings, device=device)
    except Exception as e:
        raise SystemFault(f"cannot load the model {settings.model!r}: {e}") from e
    nvdec = NVDEC_STREAMS if device == "cuda" and settings.decode_device != "cpu" else 0
    cpu = 0 if settings.decode_device == "cuda" else (settings.decode_workers or granted_cpus())
    engines = DecodeEngines(nvdec=nvdec, cpu=cpu)
    logger.info(
        "loaded %s on %s in %s; decoding with %d NVDEC streams and %d CPU threads",
        settings.model,
        device,
        model.dtype,
        nvdec,
        cpu,
    )
    pool = ThreadPoolExecutor(engines.size, thread_name_prefix="video-decode")
    return Runtime(model, engines, pool)


def _ray_node() -> str:
    """`` on Ray node ID`` inside a Ray worker: which node of a cluster a log line comes
    from."""
    import ray

    return f" on Ray node {ray.get_runtime_context().get_node_id()}" if ray.is_initialized() else ""


SEGMENTS_PER_DECODE = 8
"""Rows of one video next to each other in a batch (its segments) that one decode reads
together, in one pass over their stretch of the file: each decode reads the container's
header again, and a file read whole is read once per decode. A decode per engine is kept
running, so up to this many clips per engine are held at once (8 x 12.6 MB at 64 frames
of 256 px)."""

Request = tuple["str | None", Segment]
"""A row to embed: the video's URL (``None`` for a NULL) and its segment."""


def _decode_task(
    uri: str | None,
    segments: list[Segment],
    rt: Runtime,
    settings: Settings,
    deadlines: dict[int, float],
    task: int,
) -> list[torch.Tensor | BadVideo]:
    """One video's clips, one per segment, each ``(T, C, crop, crop)`` uint8 on the model's
    device, with storage faults retried until the task's deadline, ``ROW_DEADLINE_S`` per
    segment from now (noted in ``deadlines`` for the waiting thread). When the segments'
    decode gives a bad video, each segment is decoded again alone, so that one segment
    past the video's last frame does not take its neighbours' frames with it."""
    deadline = deadlines[task] = time.monotonic() + settings.row_deadline_s * len(segments)
    if uri is None or not uri.strip():
        raise BadVideo("no video URL")
    on_device = functools.partial(shrink, p=rt.model.preprocessing, device=rt.model.device)

    def decode(some: list[Segment]) -> list[torch.Tensor]:
        return read_with_retries(
            lambda: rt.engines.decode(uri, some, settings, on_device, deadline=deadline),
            what=uri,
            deadline=deadline,
        )

    try:
        return list(decode(segments))
    except BadVideo:
        if len(segments) == 1:
            raise
    return [_clip_or_bad_video(decode, segment) for segment in segments]


def _clip_or_bad_video(
    decode: Callable[[list[Segment]], list[torch.Tensor]], segment: Segment
) -> torch.Tensor | BadVideo:
    try:
        return decode([segment])[0]
    except BadVideo as e:
        return e


def _tasks(requests: list[Request]) -> Iterator[tuple[list[int], str | None, list[Segment]]]:
    """``(rows, URL, segments)`` per decode: consecutive rows of one video, at most
    ``SEGMENTS_PER_DECODE``, share one."""
    rows: list[int] = []
    for row, (uri, _) in enumerate(requests):
        if rows and (uri != requests[rows[0]][0] or len(rows) == SEGMENTS_PER_DECODE):
            yield rows, requests[rows[0]][0], [requests[r][1] for r in rows]
            rows = []
        rows.append(row)
    if rows:
        yield rows, requests[rows[0]][0], [requests[r][1] for r in rows]


def _decoded(
    requests: list[Request], rt: Runtime, settings: Settings
) -> Iterator[tuple[int, torch.Tensor | BadVideo | ObjectFault]]:
    """Yield ``(row, clip or fault)`` as decodes finish. Each engine is kept decoding, and
    beyond that at most one window of rows (engines + ``EMBED_BATCH``) is being decoded
    or waiting for the model, which bounds memory. A decode still running
    ``ROW_DEADLINE_S`` per row after it started, or not started twice that long after it
    was queued (the decode threads held by stalled reads), is given up as an
    ``ObjectFault`` for each of its rows: its thread stops at its next read, and the call
    does not wait."""
    window = rt.engines.size + settings.embed_batch
    tasks = iter(enumerate(_tasks(requests)))
    running: dict[Future[list[torch.Tensor | BadVideo]], tuple[int, list[int], float]] = {}
    deadlines: dict[int, float] = {}  # set by each decode when it starts

    def deadline(task: int, rows: list[int], queued: float) -> float:
        return deadlines.get(task, queued + 2 * settings.row_deadline_s * len(rows))

    def in_flight() -> int:
        return sum(len(rows) for _, rows, _ in running.values())

    try:
        while True:
            while len(running) < rt.engines.size or in_flight() < window:
                if (item := next(tasks, None)) is None:
                    break
                task, (rows, uri, segments) = item
                future = _submit(rt, uri, segments, settings, deadlines, task)
                running[future] = (task, rows, time.monotonic())
            if not running:
                return
            first = min(deadline(*entry) for entry in running.values())
            timeout = min(first - time.monotonic(), _POLL_S)
            done, _ = wait(running, timeout=max(0.0, timeout), return_when=FIRST_COMPLETED)
            for future in done:
                rows = running.pop(future)[1]
                yield from zip(rows, _clips_or_fault(future, len(rows)), strict=True)
            for future, (task, rows, queued) in list(running.items()):
                if time.monotonic() >= deadline(task, rows, queued):
                    del running[future]
                    future.cancel()  # a decode that has not started never will
                    seconds = f"{settings.row_deadline_s:g} s"
                    fault = ObjectFault(f"no result within ROW_DEADLINE_S ({seconds})")
                    yield from ((row, fault) for row in rows)
    finally:
        for future in running:
            future.cancel()


_POLL_S = 1.0
"""How often the waiting thread looks at the deadlines, at most: a decode that starts
sets its own."""


def _submit(
    rt: Runtime,
    uri: str | None,
    segments: list[Segment],
    settings: Settings,
    deadlines: dict[int, float],
    task: int,
) -> Future[list[torch.Tensor | BadVideo]]:
    """Queue one decode; a decode thread that cannot start is a system fault."""
    try:
        return rt.pool.submit(_decode_task, uri, segments, rt, settings, deadlines, task)
    except RuntimeError as e:  # "can't start new thread": the host is out of memory
        raise SystemFault(f"cannot start a decode thread: {e}") from e


def _clips_or_fault(
    future: Future[list[torch.Tensor | BadVideo]], rows: int
) -> list[torch.Tensor | BadVideo | ObjectFault]:
    """The clips (or a segment's own bad video), or the decode's fault for each of its
    ``rows``; a ``SystemFault`` is raised."""
    try:
        return list(future.result())
    except (BadVideo, ObjectFault) as e:
        return [e] * rows


def _log_fault(request: Request, fault: BadVideo | ObjectFault) -> None:
    uri, segment = request
    what = redact(str(uri)) + (
        "" if segment == WHOLE_VIDEO else f" [{segment[0]:g} s, {segment[1]:g} s)"
    )
    if isinstance(fault, BadVideo):
        logger.warning("zero embedding for %s: %s", what, redact(str(fault)))
    else:
        logger.warning("no embedding (NULL) for %s: %s", what, redact(str(fault)))


def embed_videos(
    requests: list[Request], rt: Runtime, settings: Settings
) -> list[np.ndarray | BadVideo | ObjectFault]:
    """Every row's outcome, in row order: the ``(rows, 1024)`` float32 embedding of its
    video's segment (``WHOLE_VIDEO`` for a video), or the ``BadVideo`` or ``ObjectFault``
    that decides what it gets (each logged once, here). Segments of one video next to
    each other are decoded together (``SEGMENTS_PER_DECODE``).
    The model embeds ``EMBED_BATCH`` clips at a time, in the order they finish decoding,
    while the decode threads go on with the next ones. Raises ``SystemFault`` when the
    worker fails: then no row of the call has a result."""
    results: list[np.ndarray | BadVideo | ObjectFault] = [BadVideo("not decoded")] * len(requests)
    waiting: list[tuple[int, torch.Tensor]] = []

    def embed_waiting() -> None:
        try:
            outputs = embed_clips([clip for _, clip in waiting], rt.model, settings)
        except Exception as e:
            raise SystemFault(f"the model failed on a batch of {len(waiting)} clips: {e}") from e
        for (row, _), out in zip(waiting, outputs, strict=True):
            results[row] = out
        waiting.clear()

    for row, decoded in _decoded(requests, rt, settings):
        if isinstance(decoded, (BadVideo, ObjectFault)):
            _log_fault(requests[row], decoded)
            results[row] = decoded
        else:
            waiting.append((row, decoded))
        if len(waiting) == settings.embed_batch:
            embed_waiting()
    if waiting:
        embed_waiting()
    return results
