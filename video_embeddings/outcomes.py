"""What a row can end as. Every stage raises one of these three faults, or returns data:

| outcome | the row gets | the job |
| --- | --- | --- |
| embedded | its ``(rows, 1024)`` float32 matrix | goes on |
| ``BadVideo`` | the spec's zero tensor, and one log line with the reason | goes on |
| ``ObjectFault`` | no value (NULL), the reason in Geneva's error records | goes on |
| ``SystemFault`` | nothing: the call raises | the task moves to another worker |

``video_embeddings_udf`` maps them to Geneva in one place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from geneva.errors import FatalWorkerHardwareError

__all__ = [
    "OUTAGE_FAULTS",
    "OUTAGE_WINDOW",
    "BadVideo",
    "ObjectFault",
    "OutageBudget",
    "RowOutcome",
    "SystemFault",
    "decode_fault",
    "is_system_fault",
    "memory_is_short",
]

OUTAGE_WINDOW = 16
"""Rows, among a worker's most recent, over which the skip budget counts object faults."""
OUTAGE_FAULTS = 9
"""Object faults among the last ``OUTAGE_WINDOW`` rows that make an outage: more than
half. A call of one row whose object answers 403 is one fault, not an outage."""


class BadVideo(Exception):
    """The video itself cannot be processed: undecodable bytes, no video stream, over a
    size limit, a URL that ALLOWED_URI_PREFIXES refuses, an object that does not exist.
    Retrying cannot help; the row gets the zero tensor."""


class ObjectFault(Exception):
    """This one object could not be read, for a reason that is not the video's: a 403, a
    host that does not resolve, an invalid URL, a server that ignores ``Range``, a
    transient error that outlasted its retries, the row's deadline. The row is left NULL
    and tried again by ``retry_failed``."""


class SystemFault(FatalWorkerHardwareError):
    """The worker cannot go on: memory (host or device) exhausted, a CUDA error, the model
    or FFmpeg cannot load, an outage of storage. The call raises and writes nothing.

    It is Geneva's ``FatalWorkerHardwareError`` because that is the one exception Geneva
    0.17's row isolation (``skip_on_error``) does not bisect and null-fill: Geneva retires
    the worker, runs the task on another (3 attempts), and fails the job if it persists."""


RowOutcome = "np.ndarray | BadVideo | ObjectFault"
"""One row's result: its embedding, or the fault that decides what the row gets."""

_SYSTEM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "bad_alloc",
    "can't start new thread",
    "cuda error",
    "cudnn",
    "cublas",
    "nvdec",
    "device-side assert",
)


def is_system_fault(error: BaseException) -> bool:
    """Whether ``error`` says the worker, not the input, is at fault: a ``MemoryError``,
    torch's ``OutOfMemoryError``, or a ``RuntimeError`` whose message names an allocation
    failure or a CUDA error (torch and torchcodec raise plain ``RuntimeError`` for both)."""
    if isinstance(error, (MemoryError, SystemFault)):
        return True
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, not imported here
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _SYSTEM_MESSAGES)


SPARE_BYTES = 64 * 1024 * 1024
"""What ``memory_is_short`` asks the host for: an allocation FFmpeg failed although this
much is free was asked for by the file."""


def memory_is_short() -> bool:
    """Whether the process cannot allocate ``SPARE_BYTES`` now (address space, cgroup or
    host memory exhausted)."""
    try:
        bytearray(SPARE_BYTES)
    except MemoryError:
        return True
    return False


def decode_fault(error: BaseException) -> SystemFault | BadVideo:
    """What a decoder's ``error`` means for the row, in one line: ``SystemFault`` for a
    worker fault (``is_system_fault``), else ``BadVideo``. FFmpeg's ENOMEM ("Cannot
    allocate memory") is a worker fault only when ``memory_is_short``: a damaged file
    whose header declares a huge packet or frame makes FFmpeg ask for gigabytes, and that
    refusal is the file's fault, not the worker's."""
    text = " ".join(str(error).split())
    if is_system_fault(error) and not (
        "cannot allocate memory" in text.lower() and not memory_is_short()
    ):
        return SystemFault(text)
    return BadVideo(text)


class OutageBudget:
    """The skip budget: counts object faults over a worker's last ``OUTAGE_WINDOW`` rows
    and raises ``SystemFault`` when more than half failed, so that a dead bucket or
    expired credentials fail the job instead of leaving the table NULL."""

    def __init__(self) -> None:
        self._recent: deque[ObjectFault | None] = deque(maxlen=OUTAGE_WINDOW)

    def record(self, outcomes: Sequence[object]) -> None:
        """Count freshly computed rows; raise ``SystemFault`` on an outage."""
        for outcome in outcomes:
            self._recent.append(outcome if isinstance(outcome, ObjectFault) else None)
            faults = [f for f in self._recent if f is not None]
            if len(faults) >= OUTAGE_FAULTS:
                self._recent.clear()
                raise SystemFault(
                    f"storage outage: {len(faults)} of the last {OUTAGE_WINDOW} objects "
                    f"could not be read (the last: {faults[-1]})"
                )
