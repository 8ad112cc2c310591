"""Geneva UDF that turns a video URL into V-JEPA2 embeddings.

The module is laid out in pipeline order: settings, open, sample, decode, preprocess,
embed, pool to rows, then the ``VideoEmbedding`` UDF that wires them together, and the
aggregation helpers used at search time. Torch, transformers and torchcodec are imported
lazily so that importing this module (on the driver, at ``add_columns``) stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import logging
import os
import queue
import random
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar, get_args
from urllib.parse import unquote, urlsplit

import fsspec
import numpy as np
import pyarrow as pa
from geneva import udf

if TYPE_CHECKING:
    import torch
    from geneva.transformer import UDF

__all__ = [
    "EMBEDDING_DIM",
    "EMBEDDING_TYPE",
    "Preprocessing",
    "Settings",
    "UnreadableVideo",
    "VideoEmbedding",
    "aggregate_max",
    "aggregate_mean",
    "aggregate_segment",
    "aggregate_weighted",
    "check_uri",
    "decode_frames",
    "embed",
    "embed_videos",
    "embedding_column",
    "open_video",
    "pool_to_frames",
    "preprocess",
    "redact",
    "resolve_uri",
    "sample_indices",
    "shrink",
    "to_arrow",
    "zero_embedding",
]

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 1024
"""Width of every output row: the hidden size of V-JEPA2 ViT-L."""

EMBEDDING_TYPE = pa.list_(pa.list_(pa.float32(), EMBEDDING_DIM))
"""A list of fixed-size float vectors, which LanceDB searches as a multivector."""

DEFAULT_MODEL = "facebook/vjepa2-vitl-fpc64-256"
MIB = 1024 * 1024
UDF_MEMORY = 8 * 1024**3
"""Bytes of host memory a worker asks Ray for: model, 64 decoded frames and headroom."""

CACHE_TYPE = "blockcache"
"""fsspec cache: each BLOCK_SIZE block of the object is fetched at most once per video,
whatever order the demuxer reads in (see README, "Reading from object storage")."""

RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0

FRAME_CHUNK_BYTES = 64 * MIB
"""Full-resolution frames one decode thread holds at once: each chunk is shrunk to the
model's crop before the next is decoded."""

NVDEC_STREAMS = 8
"""Clips decoded at once on NVDEC: torchcodec's direct backend peaked at 8 threads on an
H100 (27.5 clips/s, README "Performance")."""

DEFAULT_ALLOWED_URI_PREFIXES = (
    "gs://",
    "gcs://",
    "s3://",
    "s3a://",
    "file://",
    "http://",
    "https://",
)
"""Object stores, local files, and http(s) to public hosts (see ``check_uri``)."""
DEFAULT_MAX_PIXELS = 4096 * 2160
"""DCI 4K, the largest 4K frame: every 4K variant passes, 8K (7680x4320) is refused. A 4K
RGB frame is 26.5 MB, so 64 of them fit the UDF's memory beside the model; 64 8K frames
(6.4 GB) would not."""
DEFAULT_MAX_VIDEO_BYTES = 4 * 1024**3
"""About 10 minutes of 4K at 50 Mbit/s, far more than a 64-frame clip needs."""

T = TypeVar("T")
Dtype = Literal["float32", "bfloat16"]
Output = Literal["frames", "tokens"]
DecodeDevice = Literal["auto", "cpu", "cuda"]


# --- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every setting of the package; built from the environment by ``from_env`` only."""

    num_frames: int = 64
    model: str = DEFAULT_MODEL
    block_size: int = 16 * MIB
    embedding_col: str = "video_embedding"
    video_uri_col: str = "video_uri"
    video_base_path: str | None = None
    dtype: Dtype | None = None
    """None picks bfloat16 on CUDA and float32 on the CPU."""
    output: Output = "frames"
    decode_device: DecodeDevice = "auto"
    """auto: NVDEC and the CPU cores together where torchcodec can decode on CUDA."""
    decode_workers: int | None = None
    """CPU decode threads; None means one per core of the worker."""
    embed_batch: int = 8
    """Clips per forward pass: 8 keeps ViT-L in bf16 near 2.5 GiB of GPU memory."""
    compile: bool = False

    allowed_uri_prefixes: tuple[str, ...] = DEFAULT_ALLOWED_URI_PREFIXES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES

    def __post_init__(self) -> None:
        for name, value in (
            ("NUM_FRAMES", self.num_frames),
            ("BLOCK_SIZE", self.block_size),
            ("EMBED_BATCH", self.embed_batch),
            ("DECODE_WORKERS", 1 if self.decode_workers is None else self.decode_workers),
            ("MAX_PIXELS", self.max_pixels),
            ("MAX_VIDEO_BYTES", self.max_video_bytes),
        ):
            if value < 1:
                raise ValueError(f"Invalid {name} ({value}). It must be at least 1.")
        for prefix in self.allowed_uri_prefixes:
            if "://" not in prefix and not prefix.startswith("/"):
                raise ValueError(
                    f"Invalid ALLOWED_URI_PREFIXES entry ({prefix!r}). Each entry is a scheme "
                    "such as gs://, a URL prefix such as http://10.0.0.5:8080/videos/, or an "
                    "absolute local path such as /data/videos/."
                )
        _check_choice("VJEPA_DTYPE", self.dtype, Dtype, optional=True)
        _check_choice("EMBEDDING_OUTPUT", self.output, Output)
        _check_choice("VIDEO_DECODE_DEVICE", self.decode_device, DecodeDevice)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from the environment (the one place that reads it)."""
        env = os.environ if environ is None else environ
        return cls(
            num_frames=_int_setting(env, "NUM_FRAMES", cls.num_frames),
            model=env.get("VJEPA_MODEL", cls.model),
            block_size=_int_setting(env, "BLOCK_SIZE", cls.block_size),
            embedding_col=env.get("VIDEO_EMBEDDING_COL", cls.embedding_col),
            video_uri_col=env.get("VIDEO_URI_COL", cls.video_uri_col),
            video_base_path=env.get("VIDEO_BASE_PATH") or None,
            dtype=env.get("VJEPA_DTYPE") or None,  # type: ignore[arg-type]
            output=env.get("EMBEDDING_OUTPUT", cls.output),  # type: ignore[arg-type]
            decode_device=env.get("VIDEO_DECODE_DEVICE", cls.decode_device),  # type: ignore[arg-type]
            decode_workers=_int_setting(env, "DECODE_WORKERS", None),
            embed_batch=_int_setting(env, "EMBED_BATCH", cls.embed_batch),
            compile=_bool_setting(env, "VJEPA_COMPILE", cls.compile),
            allowed_uri_prefixes=_list_setting(
                env, "ALLOWED_URI_PREFIXES", cls.allowed_uri_prefixes
            ),
            max_pixels=_int_setting(env, "MAX_PIXELS", cls.max_pixels),
            max_video_bytes=_int_setting(env, "MAX_VIDEO_BYTES", cls.max_video_bytes),
        )


def _int_setting(env: Mapping[str, str], name: str, default: int | None) -> Any:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"Invalid {name} ({raw!r}). It must be an integer.") from e


def _bool_setting(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "1", "false", "true"):
        return raw in ("1", "true") if raw else default
    raise ValueError(f"Invalid {name} ({env[name]!r}). Supported values are 0, 1, false, true.")


def _list_setting(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list; unset or empty keeps the default."""
    items = tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())
    return items or default


def _check_choice(name: str, value: object, mode: Any, *, optional: bool = False) -> None:
    allowed = get_args(mode)
    if value in allowed or (optional and value is None):
        return
    raise ValueError(f"Invalid {name} ({value!r}). Supported values are {', '.join(allowed)}.")


# --- open -------------------------------------------------------------------------------


class UnreadableVideo(Exception):
    """The video itself cannot be processed; its row gets the zero tensor."""


def resolve_uri(value: str, *, base_path: str | None) -> str:
    """Turn a table value into a URL: bare names are taken relative to ``base_path``,
    as the OpenVid tables store bare file names."""
    if base_path and "://" not in value and not value.startswith("/"):
        return f"{base_path.rstrip('/')}/{value}"
    return value


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")
# an http(s) URL's query string, or anything shaped like "?key=value" (a query after a
# space in an unquoted URL, say)
_URL_QUERY = re.compile(r"(?i)(\bhttps?://[^?#\s'\"]*)\?[^#\s'\"]*|\?[^?=&#\s'\"]+=[^#\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the credentials (``user:password@``) and the query strings of the URLs
    in it replaced by ``<redacted>``: a signed URL's signature is in its query string. Used
    on every URL and storage error that goes into a log line or an exception message."""
    text = _URL_USERINFO.sub(r"\1<redacted>@", text)
    return _URL_QUERY.sub(lambda m: f"{m[1] or ''}?<redacted>", text)


def check_uri(uri: str, allowed_prefixes: Sequence[str]) -> None:
    """Refuse, before any connection, a URL that ALLOWED_URI_PREFIXES does not allow.

    A URL is allowed when it starts with one of the prefixes; local paths are compared as
    ``file://`` + their absolute path, and other URLs with a ``.`` or ``..`` path segment
    are refused. An ``http(s)`` URL allowed only by a bare ``http://`` or ``https://``
    entry must name a public host: loopback, link-local (the cloud metadata service at
    169.254.169.254 included), private and other non-public addresses, ``localhost`` and
    ``metadata.google.internal`` are refused unless a longer prefix names them. The host's
    name is resolved, but nothing connects to it."""
    url = _as_url(uri)
    matches = [p for p in map(_as_url, allowed_prefixes) if url.startswith(p)]
    if not matches:
        raise UnreadableVideo("URL not allowed: it matches no ALLOWED_URI_PREFIXES entry")
    segments = unquote(urlsplit(url).path).split("/")
    if not url.startswith("file://") and ("." in segments or ".." in segments):
        raise UnreadableVideo("URL not allowed: its path has a '.' or '..' segment")
    if max(matches, key=len) in ("http://", "https://"):
        _check_public_host(url)


def _as_url(value: str) -> str:
    """A local path or ``file://`` URL as ``file://`` + its normalised absolute path (keeping
    a trailing slash, which makes a prefix stop at a folder); other URLs without their
    credentials (``user:password@``), which do not change where they lead."""
    if "://" in value and not value.startswith("file://"):
        return re.sub(r"^([^:/?#]+://)[^/?#]*@", r"\1", value)
    path = value.removeprefix("file://")
    absolute = os.path.abspath(path) if path else ""
    if path.endswith("/") and not absolute.endswith("/"):
        absolute += "/"
    return f"file://{absolute}"


_LOCAL_NAMES = ("localhost", "metadata", "metadata.google.internal")


def _check_public_host(url: str) -> None:
    """Refuse an http(s) URL whose host is not public, by name or by any address it
    resolves to. An unresolvable name passes: nothing can connect to it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise UnreadableVideo("URL not allowed: its port is not a number from 0 to 65535") from None
    if not host:
        raise UnreadableVideo("URL not allowed: it has no host")
    if host in _LOCAL_NAMES or host.endswith((".localhost", ".internal")):
        raise UnreadableVideo(f"URL not allowed: host {host} is a local or metadata name")
    try:
        infos = socket.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # no such name: the open fails as it would anyway
        return
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])  # drop an IPv6 scope
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise UnreadableVideo(
                f"URL not allowed: host {host} is {_address_kind(address)} ({address}); "
                "list its prefix in ALLOWED_URI_PREFIXES to allow it"
            )


def _address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    return "private" if address.is_private else "not public"


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
    that ``check_uri`` refuses. An object larger than ``max_bytes`` is refused unread, and
    so is one of unknown size (an http(s) answer without a Content-Length), which can be
    neither capped nor seeked."""
    check_uri(uri, allowed_prefixes)
    fs = fsspec.filesystem(uri.split("://", 1)[0] if "://" in uri else "file")
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    options: dict[str, Any] = {}
    if "gs" in protocols:
        # gcsfs splits a read of 10 MiB or more into parallel ranges, and blockcache asks
        # for whole blocks past the end of the object: those ranges get 416 from GCS.
        options["concurrency"] = 1
    if "http" in protocols:
        options["allow_redirects"] = False
    path = fs._strip_protocol(uri)
    file = fs.open(path, "rb", block_size=block_size, cache_type=CACHE_TYPE, **options)
    size = getattr(file, "size", None)
    if size is None or size > max_bytes:
        file.close()
        if size is None:
            raise UnreadableVideo("object size is unknown (no Content-Length)")
        raise UnreadableVideo(f"object is {size} bytes, over MAX_VIDEO_BYTES ({max_bytes})")
    return file


class _StorageReader:
    """The file object torchcodec reads through. It remembers a storage error raised by
    ``read`` or ``seek``, so that a network fault is never mistaken for a bad video."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        return self._remembering(self._file.read, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._remembering(self._file.seek, offset, whence)

    def _remembering(self, call: Callable[..., T], *args: int) -> T:
        try:
            return call(*args)
        except Exception as e:
            self.error = e
            raise


# --- sample -----------------------------------------------------------------------------


def sample_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """``round(linspace(0, n - 1, num_frames))``: spread over the whole video, repeating
    frames when the video is shorter than ``num_frames``."""
    if num_video_frames < 1:
        raise UnreadableVideo("video stream has no frames")
    return np.round(np.linspace(0, num_video_frames - 1, num_frames)).astype(int).tolist()


# --- decode -----------------------------------------------------------------------------


def _video_decoder_class() -> type:
    """Import torchcodec's decoder, turning a missing FFmpeg into one line that says what
    to install instead of torchcodec's long traceback."""
    try:
        return importlib.import_module("torchcodec.decoders").VideoDecoder
    except (OSError, RuntimeError):
        raise RuntimeError(
            "torchcodec could not load FFmpeg's shared libraries (versions 4 to 7); "
            "install them, e.g. `apt-get install ffmpeg` on Debian/Ubuntu."
        ) from None


def _new_decoder(video_decoder: type, source: _StorageReader, device: str) -> Any:
    """``seek_mode="exact"`` scans the container once, so the frame count and the frames
    are right on MKV/WebM without a duration and on variable-frame-rate files. On CUDA,
    torchcodec's direct NVDEC backend ("beta") keeps pace with the model; its default
    FFmpeg CUDA path does not (README, "Performance")."""
    if device == "cpu":
        return video_decoder(source, seek_mode="exact")
    from torchcodec.decoders import set_cuda_backend

    with set_cuda_backend("beta"):
        return video_decoder(source, seek_mode="exact", device=device)


def _frames_in_chunks(
    decoder: Any, indices: list[int], shrink: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Decode ``indices`` a chunk at a time, shrinking each chunk before the next, so a
    thread never holds more than ``FRAME_CHUNK_BYTES`` of full-resolution frames (or one
    frame, if a frame is larger)."""
    import torch

    meta = decoder.metadata
    frame_bytes = 3 * (meta.width or 1) * (meta.height or 1)
    step = max(1, FRAME_CHUNK_BYTES // frame_bytes)
    parts = []
    for start in range(0, len(indices), step):
        frames = decoder.get_frames_at(indices[start : start + step]).data
        parts.append(shrink(frames) if shrink else frames)
    return torch.cat(parts)


def decode_frames(
    uri: str,
    *,
    num_frames: int,
    block_size: int,
    allowed_prefixes: Sequence[str] = DEFAULT_ALLOWED_URI_PREFIXES,
    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
    shrink: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stream ``uri`` into torchcodec on ``device`` and return its sampled frames,
    ``(T, C, H, W)`` uint8, passed chunk by chunk through ``shrink`` when given.

    A header that declares a huge frame count or duration changes nothing: the exact scan
    counts the frames that exist, and only those are sampled. A frame larger than
    ``max_pixels`` is refused before any is decoded."""
    video_decoder = _video_decoder_class()
    try:
        with open_video(
            uri, block_size=block_size, allowed_prefixes=allowed_prefixes, max_bytes=max_bytes
        ) as file:
            reader = _StorageReader(file)
            try:
                decoder = _new_decoder(video_decoder, reader, device)
                _check_frame_size(decoder.metadata, max_pixels)
                indices = sample_indices(decoder.metadata.num_frames or 0, num_frames)
                return _frames_in_chunks(decoder, indices, shrink)
            except (ValueError, RuntimeError) as e:
                if reader.error is not None:
                    raise reader.error from None
                raise UnreadableVideo(" ".join(str(e).split())) from e  # one log line
    except FileNotFoundError as e:  # missing at open, or deleted while being read
        cause = e.__cause__
        if cause is not None and _is_http_failure(cause):
            raise cause from None
        raise UnreadableVideo("object does not exist") from e


def _is_http_failure(error: BaseException) -> bool:
    """fsspec's HTTP filesystem reports any failed request at open as a missing file: a
    refused connection or a 503 is a storage fault, and only a 404 or 410 means missing."""
    from aiohttp import ClientError

    status = getattr(error, "status", None)
    return isinstance(error, ClientError) and status not in (404, 410)


def _check_frame_size(metadata: Any, max_pixels: int) -> None:
    """Refuse, from the stream's header, frames larger than MAX_PIXELS."""
    width, height = metadata.width or 0, metadata.height or 0
    if width * height > max_pixels:
        raise UnreadableVideo(
            f"frame size {width}x{height} ({width * height} pixels) is over "
            f"MAX_PIXELS ({max_pixels})"
        )


def _is_transient(error: BaseException) -> bool:
    """Timeouts, resets, 5xx/429 and expired credentials: worth another try. An HTTP
    error response is judged by its status only (a 403 or a 404 is not transient)."""
    from gcsfs.retry import is_retriable

    status = getattr(error, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    return isinstance(error, (TimeoutError, ConnectionError)) or is_retriable(error)


def _with_retries(action: Callable[[], T], *, what: str) -> T:
    """Run ``action``, retrying transient storage faults with jittered exponential
    backoff. The last fault is raised for Geneva to handle, never turned into data, as
    ``_storage_error`` rewrites it; URLs and errors are logged redacted."""
    attempt = 1
    while True:
        try:
            return action()
        except UnreadableVideo:
            raise
        except Exception as e:
            error = e
        if attempt == RETRY_ATTEMPTS or not _is_transient(error):
            # raised outside the except block, so that it chains no exception
            raise _storage_error(error, what=what, attempts=attempt)
        delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1) * (0.5 + random.random())
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


def _describe(error: BaseException) -> str:
    """``Type: message``, redacted. Not ``repr``: an HTTP error's repr shows the request
    headers, whose Authorization header carries the URL's credentials."""
    text = str(error)
    return redact(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def _storage_error(error: Exception, *, what: str, attempts: int) -> Exception:
    """``error``, of the same type where it can be built from a message (else an
    ``OSError``), with a message that names the URL and the attempts, redacted. It keeps
    the traceback but chains no exception, since a chained message (an HTTP error's URL,
    say) could carry a credential or a signature."""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    message = f"reading {redact(what)} failed after {tries}: {_describe(error)}"
    try:
        clear = type(error)(message)
    except Exception:
        clear = OSError(message)
    return clear.with_traceback(error.__traceback__)


class _DecodeEngines:
    """Lends each decode whichever engine is free, so NVDEC streams and CPU threads feed
    the same batches; the faster engine comes back sooner and so takes more clips."""

    def __init__(self, *, nvdec: int, cpu: int) -> None:
        self.nvdec, self.cpu, self.size = nvdec, cpu, nvdec + cpu
        self._free: queue.SimpleQueue[str] = queue.SimpleQueue()
        for device in ["cuda"] * nvdec + ["cpu"] * cpu:
            self._free.put(device)
        self._nvdec_missing = False

    def decode(self, uri: str, settings: Settings, shrink: Callable[..., Any]) -> torch.Tensor:
        """Decode on the engine lent; a clip NVDEC cannot take (AV1 on an H100, say) is
        decoded again on the CPU before it counts as unreadable."""
        device = self._free.get()
        try:
            if device == "cuda":
                try:
                    return self._decode(uri, settings, shrink, "cuda")
                except UnreadableVideo as e:
                    self._note_nvdec_failure(uri, e, settings)
            return self._decode(uri, settings, shrink, "cpu")
        finally:
            if not (device == "cuda" and self._nvdec_missing):
                self._free.put(device)

    @staticmethod
    def _decode(uri: str, settings: Settings, shrink: Callable[..., Any], device: str) -> Any:
        return decode_frames(
            uri,
            num_frames=settings.num_frames,
            block_size=settings.block_size,
            allowed_prefixes=settings.allowed_uri_prefixes,
            max_bytes=settings.max_video_bytes,
            max_pixels=settings.max_pixels,
            device=device,
            shrink=shrink,
        )

    def _note_nvdec_failure(self, uri: str, error: UnreadableVideo, settings: Settings) -> None:
        if "Unsupported device" not in str(error):
            logger.info("NVDEC cannot decode %s (%s); decoding it on the CPU", redact(uri), error)
            return
        if settings.decode_device == "cuda":
            raise RuntimeError(
                "VIDEO_DECODE_DEVICE=cuda, but this torchcodec build cannot decode on CUDA; "
                "install torchcodec's CUDA build or set VIDEO_DECODE_DEVICE=auto."
            ) from None
        if not self._nvdec_missing:
            self._nvdec_missing = True
            logger.warning("this torchcodec build has no CUDA decoder: decoding on the CPU")


# --- preprocess -------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """The checkpoint's video processor, read from its config, as tensor operations:
    resize the shortest edge, centre-crop, rescale and normalise, exactly as it does."""

    shortest_edge: int
    crop: tuple[int, int]
    scale: float
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: int

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocessing:
        """Read a V-JEPA2-style processor; refuse one this module would not match."""
        size, crop = processor.size, processor.crop_size
        if not (processor.do_resize and processor.do_center_crop and size.get("shortest_edge")):
            raise ValueError(
                f"Invalid video processor (resize {dict(size)!r}, crop {dict(crop)!r}): "
                "supported is a shortest-edge resize followed by a centre crop."
            )
        if size["shortest_edge"] < max(crop["height"], crop["width"]):
            raise ValueError(
                f"Invalid video processor: it resizes to {size['shortest_edge']} px, below "
                f"its {crop['height']}x{crop['width']} crop, which would need padding."
            )
        normalize = bool(processor.do_normalize)
        return cls(
            shortest_edge=size["shortest_edge"],
            crop=(crop["height"], crop["width"]),
            scale=float(processor.rescale_factor) if processor.do_rescale else 1.0,
            mean=tuple(processor.image_mean) if normalize else None,
            std=tuple(processor.image_std) if normalize else None,
            interpolation=int(processor.resample),
        )


def _resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The processor's output size: shortest edge to ``shortest_edge``, the long edge
    scaled and truncated to an integer."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def shrink(frames: torch.Tensor, p: Preprocessing, *, device: str) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 → ``(N, C, crop, crop)`` uint8 on ``device``: the processor's
    resize and centre crop, done per chunk of frames as they are decoded."""
    from torchvision.transforms.v2 import functional as F

    frames = frames.to(device, non_blocking=True)
    size = _resized_shape(frames.shape[-2], frames.shape[-1], p.shortest_edge)
    frames = F.resize(frames, list(size), interpolation=p.interpolation, antialias=True)
    top = int((size[0] - p.crop[0]) / 2.0)
    left = int((size[1] - p.crop[1]) / 2.0)
    return frames[..., top : top + p.crop[0], left : left + p.crop[1]].contiguous()


def preprocess(clips: torch.Tensor, p: Preprocessing, *, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T, C, crop, crop)`` uint8 → the model's input in ``dtype``: rescaled and
    normalised with mean and std folded into one step, as the processor folds them."""
    import torch

    x = clips.to(torch.float32)
    if p.mean is not None and p.std is not None:
        shape = (1, 1, -1, 1, 1)
        mean = torch.tensor(p.mean, device=x.device).view(shape) / p.scale
        std = torch.tensor(p.std, device=x.device).view(shape) / p.scale
        x = (x - mean) / std
    elif p.scale != 1.0:
        x = x * p.scale
    return x.to(dtype)


# --- embed, pool, output ----------------------------------------------------------------


def embed(
    encode: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor
) -> torch.Tensor:
    """Encoder only (never the predictor): ``(B, T, C, crop, crop)`` →
    ``(B, tokens, hidden)`` float32, tokens time-major, ``T / tubelet`` tubelets of
    ``(crop / patch)²`` patches. ``encode`` is ``model.get_vision_features``, compiled or
    not."""
    import torch

    with torch.inference_mode():
        return encode(pixel_values).float()


def pool_to_frames(tokens: torch.Tensor, *, num_frames: int, tubelet_size: int) -> torch.Tensor:
    """``(..., tokens, hidden)`` → ``(..., num_frames, hidden)``: each frame's row is the
    mean of its tubelet's spatial patch tokens, so frames ``2k`` and ``2k + 1`` share a row."""
    tubelets = num_frames // tubelet_size
    shape = (*tokens.shape[:-2], tubelets, -1, tokens.shape[-1])
    per_tubelet = tokens.reshape(shape).mean(dim=-2)
    return per_tubelet.repeat_interleave(tubelet_size, dim=-2)


def zero_embedding() -> np.ndarray:
    """The spec's result for a video that cannot be processed: one all-zero row."""
    return np.zeros((1, EMBEDDING_DIM), dtype=np.float32)


def to_arrow(rows: list[np.ndarray]) -> pa.Array:
    """One ``(n_i, 1024)`` float32 array per video → the column's Arrow array, built from
    the arrays' buffers without a round trip through Python floats."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32)), EMBEDDING_DIM)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=EMBEDDING_TYPE)


# --- the UDF ----------------------------------------------------------------------------


@dataclass
class _Runtime:
    """What a worker loads once: the model, how to feed it, and the decode threads."""

    model: Any
    encode: Callable[[torch.Tensor], Any]
    preprocessing: Preprocessing
    tubelet_size: int
    device: str
    dtype: torch.dtype
    engines: _DecodeEngines
    pool: ThreadPoolExecutor


def _load_runtime(settings: Settings) -> _Runtime:
    """Load V-JEPA2 once per worker, on CUDA when present, and start the decode threads."""
    import torch
    from transformers import AutoModel, AutoVideoProcessor

    if torch.cuda.is_available():
        device = "cuda"
    else:
        device = "cpu"
        logger.warning("no CUDA device%s: V-JEPA2 runs on the CPU, which is slow", _ray_node())
    if settings.decode_device == "cuda" and device != "cuda":
        raise ValueError("Invalid VIDEO_DECODE_DEVICE (cuda): this worker has no CUDA device.")
    dtype = getattr(torch, settings.dtype or ("bfloat16" if device == "cuda" else "float32"))
    model = AutoModel.from_pretrained(settings.model, dtype=dtype, attn_implementation="sdpa")
    processor = AutoVideoProcessor.from_pretrained(settings.model)
    _check_checkpoint(settings, model.config, processor)
    preprocessing = Preprocessing.from_processor(processor)  # refuse before compiling
    model = model.to(device).eval()
    encode = model.get_vision_features
    if settings.compile:
        encode = _compiled(
            encode, settings, crop=model.config.crop_size, device=device, dtype=dtype
        )
    nvdec = NVDEC_STREAMS if device == "cuda" and settings.decode_device != "cpu" else 0
    cpu = (
        0 if settings.decode_device == "cuda" else (settings.decode_workers or os.cpu_count() or 1)
    )
    engines = _DecodeEngines(nvdec=nvdec, cpu=cpu)
    logger.info(
        "loaded %s on %s in %s; decoding with %d NVDEC streams and %d CPU threads",
        settings.model,
        device,
        dtype,
        nvdec,
        cpu,
    )
    return _Runtime(
        model=model,
        encode=encode,
        preprocessing=preprocessing,
        tubelet_size=model.config.tubelet_size,
        device=device,
        dtype=dtype,
        engines=engines,
        pool=ThreadPoolExecutor(engines.size, thread_name_prefix="video-decode"),
    )


def _ray_node() -> str:
    """`` on Ray node ID`` inside a Ray worker: which node of a cluster a log line comes
    from."""
    import ray

    return f" on Ray node {ray.get_runtime_context().get_node_id()}" if ray.is_initialized() else ""


def _compiled(
    encode: Callable[[torch.Tensor], torch.Tensor],
    settings: Settings,
    *,
    crop: int,
    device: str,
    dtype: torch.dtype,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` under ``torch.compile``, compiled now at the one batch shape it will see
    (``_embed_clips`` pads short batches), not in the middle of a job."""
    import torch

    started = time.perf_counter()
    compiled = torch.compile(encode)
    shape = (settings.embed_batch, settings.num_frames, 3, crop, crop)
    with torch.inference_mode():
        compiled(torch.zeros(shape, device=device, dtype=dtype))
    logger.info("compiled the encoder in %.0fs", time.perf_counter() - started)
    return compiled


def _check_checkpoint(settings: Settings, config: Any, processor: Any) -> None:
    """Refuse a checkpoint whose rows would not fit the column or whose positions would
    be silently wrong."""
    if config.hidden_size != EMBEDDING_DIM:
        raise ValueError(
            f"Invalid VJEPA_MODEL ({settings.model!r}): hidden size {config.hidden_size}; "
            f"the column stores {EMBEDDING_DIM}-wide rows."
        )
    if processor.crop_size["height"] != config.crop_size:
        raise ValueError(
            f"Invalid VJEPA_MODEL ({settings.model!r}): its processor crops to "
            f"{processor.crop_size['height']} px but the model expects {config.crop_size}."
        )
    if settings.num_frames % config.tubelet_size:
        raise ValueError(
            f"Invalid NUM_FRAMES ({settings.num_frames}). It must be a multiple of the "
            f"model's tubelet size ({config.tubelet_size})."
        )


def _decode_task(uri: str | None, rt: _Runtime, settings: Settings) -> torch.Tensor:
    """One row's clip, ``(T, C, crop, crop)`` uint8 on the model's device, with storage
    faults retried."""
    if uri is None:
        raise UnreadableVideo("no video URL")
    shrink_on_device = functools.partial(shrink, p=rt.preprocessing, device=rt.device)
    return _with_retries(lambda: rt.engines.decode(uri, settings, shrink_on_device), what=uri)


def _decoded(
    uris: list[str | None], rt: _Runtime, settings: Settings
) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Yield ``(row, clip)`` as decodes finish, ``None`` for an unreadable video. At most
    one window of decodes is running or waiting for the model, which bounds memory."""
    window = rt.engines.size + settings.embed_batch
    rows = iter(enumerate(uris))
    running: dict[Future[torch.Tensor], int] = {}
    try:
        while True:
            while len(running) < window and (item := next(rows, None)) is not None:
                running[rt.pool.submit(_decode_task, item[1], rt, settings)] = item[0]
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                row = running.pop(future)
                yield row, _clip_or_none(future, uris[row])
    finally:
        for future in running:
            future.cancel()


def _clip_or_none(future: Future[torch.Tensor], uri: str | None) -> torch.Tensor | None:
    """A bad video becomes ``None`` and one log line; any other error is raised."""
    try:
        return future.result()
    except UnreadableVideo as e:
        logger.warning("zero embedding for %s: %s", redact(str(uri)), redact(str(e)))
        return None


def _embed_clips(clips: list[torch.Tensor], rt: _Runtime, settings: Settings) -> np.ndarray:
    """Embed a batch of clips together: ``(B, rows, 1024)`` float32 on the host."""
    import torch

    x = torch.stack(clips)
    if settings.compile and len(clips) < settings.embed_batch:  # one compiled shape only
        x = torch.cat([x, x.new_zeros((settings.embed_batch - len(clips), *x.shape[1:]))])
    tokens = embed(rt.encode, preprocess(x, rt.preprocessing, dtype=rt.dtype))[: len(clips)]
    if settings.output == "frames":
        tokens = pool_to_frames(
            tokens, num_frames=settings.num_frames, tubelet_size=rt.tubelet_size
        )
    return tokens.cpu().numpy()


def embed_videos(uris: list[str | None], rt: _Runtime, settings: Settings) -> list[np.ndarray]:
    """Every row's ``(rows, 1024)`` float32 embedding, in row order. The model embeds
    ``EMBED_BATCH`` clips at a time, in the order they finish decoding, while the decode
    threads go on with the next ones; a bad video gets the zero tensor and never takes
    its batch-mates down."""
    results = [zero_embedding()] * len(uris)
    waiting: list[tuple[int, torch.Tensor]] = []

    def embed_waiting() -> None:
        outputs = _embed_clips([clip for _, clip in waiting], rt, settings)
        for (row, _), out in zip(waiting, outputs, strict=True):
            results[row] = out
        waiting.clear()

    for row, clip in _decoded(uris, rt, settings):
        if clip is not None:
            waiting.append((row, clip))
        if len(waiting) == settings.embed_batch:
            embed_waiting()
    if waiting:
        embed_waiting()
    return results


@udf(data_type=EMBEDDING_TYPE, num_gpus=1, memory=UDF_MEMORY)
class VideoEmbedding:
    """Embed the video at each URL as ``[NUM_FRAMES, 1024]`` per-frame rows (or the raw
    ``[tokens, 1024]`` with ``EMBEDDING_OUTPUT=tokens``), a Geneva batch at a time.

    Settings are read here, on the driver at ``add_columns``; Geneva pickles the instance
    into the table, so they are frozen then. The model loads on the first call."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self._runtime: _Runtime | None = None

    def __call__(self, video_uri: pa.Array) -> pa.Array:
        return to_arrow(embed_videos(self._uris(video_uri), self._ready(), self.settings))

    def _ready(self) -> _Runtime:
        if self._runtime is None:
            self._runtime = _load_runtime(self.settings)
        return self._runtime

    def _uris(self, column: pa.Array | pa.ChunkedArray) -> list[str | None]:
        base = self.settings.video_base_path
        return [None if v is None else resolve_uri(v, base_path=base) for v in column.to_pylist()]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only: a loaded model never travels with the UDF."""
        return {"settings": self.settings, "_runtime": None}


# ``@udf`` leaves a wrapper function at the class's name. Pointing the class's qualified name
# at ``VideoEmbedding.__wrapped__`` lets pickle find the class by reference instead of
# copying it by value with a per-process id, so Geneva's UDF version (a hash of the pickled
# instance, i.e. of the settings, and of ``__call__``'s code) is the same in every process.
VideoEmbedding.__wrapped__.__qualname__ = "VideoEmbedding.__wrapped__"  # type: ignore[attr-defined]


def embedding_column(settings: Settings | None = None) -> dict[str, tuple[UDF, list[str]]]:
    """The ``add_columns`` spec for the embedding column, reading ``VIDEO_URI_COL``."""
    settings = settings or Settings.from_env()
    return {settings.embedding_col: (VideoEmbedding(settings), [settings.video_uri_col])}


# --- aggregation at search time ---------------------------------------------------------


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else np.zeros_like(vector)


def aggregate_mean(rows: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the rows: the standard whole-video vector."""
    return _normalise(np.asarray(rows, dtype=np.float32).mean(axis=0))


def aggregate_max(rows: np.ndarray) -> np.ndarray:
    """L2-normalised element-wise max: keeps the strongest feature of any moment."""
    return _normalise(np.asarray(rows, dtype=np.float32).max(axis=0))


def aggregate_weighted(rows: np.ndarray) -> np.ndarray:
    """L2-normalised Gaussian-weighted mean, centred on the middle (sigma = n / 4),
    for clips whose subject sits mid-video."""
    rows = np.asarray(rows, dtype=np.float32)
    n = len(rows)
    weights = np.exp(-0.5 * ((np.arange(n) - n / 2) / (n / 4)) ** 2)
    return _normalise(np.average(rows, axis=0, weights=weights).astype(np.float32))


def aggregate_segment(rows: np.ndarray, *, start: float = 0.0, end: float = 1 / 3) -> np.ndarray:
    """L2-normalised mean of a temporal segment, given as fractions of the clip
    (default: the first third)."""
    rows = np.asarray(rows, dtype=np.float32)
    n = len(rows)
    lo = min(int(start * n), n - 1)
    hi = max(int(end * n), lo + 1)
    return _normalise(rows[lo:hi].mean(axis=0))
