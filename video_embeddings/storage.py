"""Opening a video's object on its fsspec filesystem for streaming reads, and the retries
around a read: transient faults are tried again with backoff; what is left at the end is
classified into the row's outcome (``BadVideo``, ``ObjectFault`` or ``SystemFault``)."""

from __future__ import annotations

import logging
import os
import random
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import aiohttp
import fsspec

from video_embeddings.outcomes import BadVideo, ObjectFault, SystemFault, is_system_fault
from video_embeddings.settings import DEFAULT_ALLOWED_URI_PREFIXES, DEFAULT_MAX_VIDEO_BYTES
from video_embeddings.urls import PolicyResolver, check_uri, redact

__all__ = [
    "CACHE_TYPE",
    "CACHE_BYTES",
    "PolicyClient",
    "RETRY_ATTEMPTS",
    "RETRY_BASE_DELAY_S",
    "StorageReader",
    "open_video",
    "read_with_retries",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_TYPE = "blockcache"
"""fsspec cache: each BLOCK_SIZE block of the object is fetched at most once per video,
whatever order the demuxer reads in (see docs/reading.md)."""
CACHE_BYTES = 64 * 1024 * 1024
"""Bytes the block cache of one open file may hold (``BLOCK_SIZE`` blocks, at least one):
64 MiB per decode thread. A clip up to that size is fetched once whatever order the
demuxer reads in; a larger one may fetch a block again when the decoder seeks back."""

RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
"""An http(s) request that connects in no 30 s or receives nothing for 60 s fails as a
transient fault (aiohttp's default lets a request wait 5 minutes)."""


def open_video(
    uri: str,
    *,
    block_size: int,
    allowed_prefixes: Sequence[str] = DEFAULT_ALLOWED_URI_PREFIXES,
    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
) -> IO[bytes]:
    """Open ``uri`` on its fsspec filesystem for streaming reads, never via local disk,
    after ``check_uri`` allowed it.

    The URL is taken literally: ``#`` and ``?`` in a ``gs://`` value are part of the
    object name (fsspec's URL parsing would read ``#123`` or ``?generation=123`` as a
    GCS generation). http(s) redirects are not followed, since one could lead to a host
    that ``check_uri`` refuses, and the HTTP client connects only to addresses that
    ``allowed_prefixes`` allows (``PolicyResolver``): an address it refuses when the
    connection is made (DNS rebinding) raises ``BadVideo`` too, with nothing connected.
    An object larger than ``max_bytes`` is refused unread, and so is one of unknown size
    (an http(s) answer without a Content-Length), which can be neither capped nor seeked:
    both raise ``BadVideo``."""
    check_uri(uri, allowed_prefixes)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme in ("http", "https"):
        fs = fsspec.filesystem(scheme, get_client=PolicyClient(tuple(allowed_prefixes)))
    else:
        fs = fsspec.filesystem(scheme)
    if scheme == "file":
        _check_regular_file(fs._strip_protocol(uri))
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    options: dict[str, Any] = {}
    if "gs" in protocols:
        # gcsfs splits a read of 10 MiB or more into parallel ranges, and blockcache asks
        # for whole blocks past the end of the object: those ranges get 416 from GCS.
        options["concurrency"] = 1
    if "http" in protocols:
        options["allow_redirects"] = False
    path = fs._strip_protocol(uri)
    try:
        file = fs.open(
            path,
            "rb",
            block_size=block_size,
            cache_type=CACHE_TYPE,
            cache_options={"maxblocks": max(1, CACHE_BYTES // block_size)},
            **options,
        )
    except FileNotFoundError as e:
        # fsspec's HTTP filesystem reports any failed request at open as a missing file,
        # the resolver's refusal included
        if isinstance(e.__cause__, BadVideo):
            raise e.__cause__ from None
        raise
    size = getattr(file, "size", None)
    if size is None or size > max_bytes:
        file.close()
        if size is None:
            raise BadVideo("object size is unknown (no Content-Length)")
        raise BadVideo(f"object is {size} bytes, over MAX_VIDEO_BYTES ({max_bytes})")
    return file


def _check_regular_file(path: str) -> None:
    """A local path must name a regular file: opening a FIFO blocks until a writer comes,
    and a device such as ``/dev/zero`` never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadVideo("object does not exist") from None
    except OSError:
        return  # the open raises it, as the object fault it is
    if not stat.S_ISREG(mode):
        raise BadVideo("not a regular file")


@dataclass(frozen=True)
class PolicyClient:
    """fsspec's ``get_client`` for http(s): an aiohttp session whose connector resolves
    names through ``PolicyResolver(allowed_prefixes)``, so the address connected to is
    the one the policy checked. fsspec keeps one filesystem, and so one session, per
    thread for each set of arguments, compared by their text: this class's ``repr`` names
    the prefixes, so each policy gets its own filesystem, reused row after row, and closed
    with it."""

    allowed_prefixes: tuple[str, ...]

    async def __call__(self, **kwargs: Any) -> aiohttp.ClientSession:
        resolver = PolicyResolver(self.allowed_prefixes)
        connector = aiohttp.TCPConnector(resolver=resolver)
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return aiohttp.ClientSession(connector=connector, **kwargs)


class StorageReader:
    """The file object torchcodec reads through. It remembers a storage error raised by
    ``read`` or ``seek``, so that a network fault is never mistaken for a bad video, and
    refuses to read past the row's ``deadline`` (``time.monotonic()`` seconds)."""

    def __init__(self, file: IO[bytes], *, deadline: float | None = None) -> None:
        self._file = file
        self._deadline = deadline
        self.error: BaseException | None = None

    @property
    def block_size(self) -> int:
        """Bytes per read from storage (``open_video``'s ``block_size``)."""
        return int(self._file.blocksize)  # type: ignore[attr-defined]

    @property
    def size(self) -> int:
        """The object's size in bytes (``open_video`` refuses one of unknown size)."""
        return int(self._file.size)  # type: ignore[attr-defined]

    def read(self, size: int = -1) -> bytes:
        return self._remembering(self._read, size)

    def _read(self, size: int) -> bytes:
        """``size`` bytes, or up to the end; fewer is a storage fault, not the end of the
        video: a server that answers a range with 416 gives fsspec no bytes at all."""
        start = self._file.tell()
        data = self._file.read(size)
        total = getattr(self._file, "size", None)
        if total is not None and size >= 0 and len(data) < min(size, total - start):
            raise OSError(f"short read: {len(data)} of {min(size, total - start)} bytes at {start}")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._remembering(self._file.seek, offset, whence)

    def _remembering(self, call: Callable[..., T], *args: int) -> T:
        try:
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise ObjectFault("no result within ROW_DEADLINE_S")
            return call(*args)
        except Exception as e:
            self.error = e
            raise


def read_with_retries(action: Callable[[], T], *, what: str, deadline: float) -> T:
    """Run ``action`` (one open-and-decode of ``what``), retrying transient storage
    faults with jittered exponential backoff (about 1, 2, 4 s) up to ``RETRY_ATTEMPTS``
    tries or the ``deadline``. What is left is raised as the row's outcome: a missing
    object as ``BadVideo``, an exhausted memory or device as ``SystemFault``, any other
    storage fault as ``ObjectFault`` naming the URL and the attempts. URLs and errors are
    logged redacted."""
    attempt = 1
    while True:
        try:
            return action()
        except (BadVideo, ObjectFault, SystemFault):
            raise
        except Exception as e:
            error = _http_cause(e)
        if is_system_fault(error):
            raise SystemFault(_describe(error))
        if isinstance(error, FileNotFoundError):  # 404 or 410: strongly consistent stores
            raise BadVideo("object does not exist")
        delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1) * (0.5 + random.random())
        if (
            attempt == RETRY_ATTEMPTS
            or not _is_transient(error)
            or time.monotonic() + delay > deadline
        ):
            # raised outside the except block, so that it chains no exception
            raise _object_fault(error, what=what, attempts=attempt)
        logger.warning(
            "transient fault reading %s (attempt %d of %d), retrying in %.1fs: %s",
            redact(what),
            attempt,
            RETRY_ATTEMPTS,
            delay,
            _describe(error),
        )
        time.sleep(delay)
        attempt += 1


def _http_cause(error: Exception) -> Exception:
    """fsspec's HTTP filesystem reports any failed request at open as a missing file: a
    403, a refused connection or a 503 is a storage fault, and only a 404 or 410 means
    missing. Returns the request's own error in the first cases, else ``error``."""
    cause = error.__cause__
    missing = getattr(cause, "status", None) in (404, 410)
    if (
        isinstance(error, FileNotFoundError)
        and isinstance(cause, aiohttp.ClientError)
        and not missing
    ):
        return cause
    return error


def _is_transient(error: BaseException) -> bool:
    """Timeouts, resets, 5xx/429 and expired credentials: worth another try. An HTTP
    error response is judged by its status only (a 403 or a 404 is not transient)."""
    from gcsfs.retry import is_retriable

    status = getattr(error, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    return isinstance(error, (TimeoutError, ConnectionError)) or is_retriable(error)


def _describe(error: BaseException) -> str:
    """``Type: message``, redacted. Not ``repr``: an HTTP error's repr shows the request
    headers, whose Authorization header carries the URL's credentials."""
    text = " ".join(str(error).split())  # one line
    return redact(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def _object_fault(error: Exception, *, what: str, attempts: int) -> ObjectFault:
    """The row's ``ObjectFault``, naming the URL, the attempts and the last error,
    redacted. It keeps the traceback but chains no exception, since a chained message
    (an HTTP error's URL, say) could carry a credential or a signature."""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    fault = ObjectFault(f"reading {redact(what)} failed after {tries}: {_describe(error)}")
    return fault.with_traceback(error.__traceback__)
