"""A batch of URLs through decode and model, one outcome per row: decode threads work
through the batch while the model embeds what is already decoded."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from video_embeddings.decode import NVDEC_STREAMS, DecodeEngines
from video_embeddings.model import Model, embed_clips, load_model
from video_embeddings.outcomes import BadVideo, ObjectFault, SystemFault
from video_embeddings.preprocess import shrink
from video_embeddings.settings import Settings, granted_cpus
from video_embeddings.storage import read_with_retries
from video_embeddings.urls import redact

if TYPE_CHECKING:
    import torch

__all__ = ["Runtime", "embed_videos", "load_runtime"]

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


def _decode_task(
    uri: str | None, rt: Runtime, settings: Settings, deadlines: dict[int, float], row: int
) -> torch.Tensor:
    """One row's clip, ``(T, C, crop, crop)`` uint8 on the model's device, with storage
    faults retried until the row's deadline, ``ROW_DEADLINE_S`` from now (noted in
    ``deadlines`` for the waiting thread)."""
    deadline = deadlines[row] = time.monotonic() + settings.row_deadline_s
    if uri is None or not uri.strip():
        raise BadVideo("no video URL")
    on_device = functools.partial(shrink, p=rt.model.preprocessing, device=rt.model.device)
    return read_with_retries(
        lambda: rt.engines.decode(uri, settings, on_device, deadline=deadline),
        what=uri,
        deadline=deadline,
    )


def _decoded(
    uris: list[str | None], rt: Runtime, settings: Settings
) -> Iterator[tuple[int, torch.Tensor | BadVideo | ObjectFault]]:
    """Yield ``(row, clip or fault)`` as decodes finish. At most one window of decodes is
    running or waiting for the model, which bounds memory. A row still running
    ``ROW_DEADLINE_S`` after its decode started, or not started twice that long after it
    was queued (the decode threads held by stalled reads), is given up as an
    ``ObjectFault``: its thread stops at its next read, and the call does not wait."""
    window = rt.engines.size + settings.embed_batch
    rows = iter(enumerate(uris))
    running: dict[Future[torch.Tensor], tuple[int, float]] = {}
    deadlines: dict[int, float] = {}  # set by each decode when it starts

    def deadline(row: int, queued: float) -> float:
        return deadlines.get(row, queued + 2 * settings.row_deadline_s)

    try:
        while True:
            while len(running) < window and (item := next(rows, None)) is not None:
                future = _submit(rt, item[1], settings, deadlines, item[0])
                running[future] = (item[0], time.monotonic())
            if not running:
                return
            first = min(deadline(*entry) for entry in running.values())
            timeout = min(first - time.monotonic(), _POLL_S)
            done, _ = wait(running, timeout=max(0.0, timeout), return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future)[0], _clip_or_fault(future)
            for future, (row, queued) in list(running.items()):
                if time.monotonic() >= deadline(row, queued):
                    del running[future]
                    future.cancel()  # a decode that has not started never will
                    seconds = f"{settings.row_deadline_s:g} s"
                    yield row, ObjectFault(f"no result within ROW_DEADLINE_S ({seconds})")
    finally:
        for future in running:
            future.cancel()


_POLL_S = 1.0
"""How often the waiting thread looks at the deadlines, at most: a decode that starts
sets its own."""


def _submit(
    rt: Runtime, uri: str | None, settings: Settings, deadlines: dict[int, float], row: int
) -> Future[torch.Tensor]:
    """Queue one row's decode; a decode thread that cannot start is a system fault."""
    try:
        return rt.pool.submit(_decode_task, uri, rt, settings, deadlines, row)
    except RuntimeError as e:  # "can't start new thread": the host is out of memory
        raise SystemFault(f"cannot start a decode thread: {e}") from e


def _clip_or_fault(future: Future[torch.Tensor]) -> torch.Tensor | BadVideo | ObjectFault:
    """The clip, or the row's fault; a ``SystemFault`` is raised."""
    try:
        return future.result()
    except (BadVideo, ObjectFault) as e:
        return e


def _log_fault(uri: str | None, fault: BadVideo | ObjectFault) -> None:
    if isinstance(fault, BadVideo):
        logger.warning("zero embedding for %s: %s", redact(str(uri)), redact(str(fault)))
    else:
        logger.warning("no embedding (NULL) for %s: %s", redact(str(uri)), redact(str(fault)))


def embed_videos(
    uris: list[str | None], rt: Runtime, settings: Settings
) -> list[np.ndarray | BadVideo | ObjectFault]:
    """Every row's outcome, in row order: its ``(rows, 1024)`` float32 embedding, or the
    ``BadVideo`` or ``ObjectFault`` that decides what it gets (each logged once, here).
    The model embeds ``EMBED_BATCH`` clips at a time, in the order they finish decoding,
    while the decode threads go on with the next ones. Raises ``SystemFault`` when the
    worker fails: then no row of the call has a result."""
    results: list[np.ndarray | BadVideo | ObjectFault] = [BadVideo("not decoded")] * len(uris)
    waiting: list[tuple[int, torch.Tensor]] = []

    def embed_waiting() -> None:
        try:
            outputs = embed_clips([clip for _, clip in waiting], rt.model, settings)
        except Exception as e:
            raise SystemFault(f"the model failed on a batch of {len(waiting)} clips: {e}") from e
        for (row, _), out in zip(waiting, outputs, strict=True):
            results[row] = out
        waiting.clear()

    for row, decoded in _decoded(uris, rt, settings):
        if isinstance(decoded, (BadVideo, ObjectFault)):
            _log_fault(uris[row], decoded)
            results[row] = decoded
        else:
            waiting.append((row, decoded))
        if len(waiting) == settings.embed_batch:
            embed_waiting()
    if waiting:
        embed_waiting()
    return results
