"""Every setting of the package, built from the environment by ``Settings.from_env`` (the
one place that reads it), and the fixed sizes the other modules share."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "DEFAULT_ALLOWED_URI_PREFIXES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VIDEO_BYTES",
    "DEFAULT_MODEL",
    "DEFAULT_ROW_DEADLINE_S",
    "EMBEDDING_DIM",
    "DecodeDevice",
    "Dtype",
    "Output",
    "RUNTIME_KNOBS",
    "SEGMENT_SECONDS",
    "Settings",
    "granted_cpus",
]

EMBEDDING_DIM = 1024
"""Width of every output row: the hidden size of V-JEPA2 ViT-L."""

DEFAULT_MODEL = "facebook/vjepa2-vitl-fpc64-256"
KIB = 1024
MIB = 1024 * KIB

DEFAULT_ALLOWED_URI_PREFIXES = (
    "gs://",
    "gcs://",
    "s3://",
    "s3a://",
    "file://",
    "http://",
    "https://",
)
"""Object stores, local files, and http(s) to public hosts (see ``urls.check_uri``)."""
DEFAULT_MAX_PIXELS = 4096 * 2160
"""DCI 4K, the largest 4K frame: every 4K variant passes, 8K (7680x4320) is refused. A 4K
RGB frame is 26.5 MB, so 64 of them fit the UDF's memory beside the model; 64 8K frames
(6.4 GB) would not."""
DEFAULT_MAX_VIDEO_BYTES = 4 * 1024**3
"""About 10 minutes of 4K at 50 Mbit/s, far more than a 64-frame clip needs."""
DEFAULT_ROW_DEADLINE_S = 300.0
"""Seconds one row may take from the start of its read to its decoded frames, retries
included: reading a 4 GiB object at 50 MB/s takes about 90 s."""

SEGMENT_SECONDS = 10.0
"""Length of a segment (a moment) of a long video, in seconds, when ``index`` is asked for
segments without a length: within the 2-16 s of comparable interval embeddings, and 64
frames at 6.4 fps, about every fourth frame of 25 fps video."""

RUNTIME_KNOBS = (
    "block_size",
    "decode_device",
    "decode_workers",
    "embed_batch",
    "compile",
    "row_deadline_s",
)
"""Settings that change how fast a worker runs, never its rows: read on the worker from
its own environment when it loads (``with_runtime_knobs``), so they can be retuned for a
pod without adding the column again. Every other setting defines the output and is
frozen into the column at ``add_columns``."""

Dtype = Literal["float32", "bfloat16"]
Output = Literal["frames", "tokens"]
DecodeDevice = Literal["auto", "cpu", "cuda"]


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
    """CPU decode threads; None means one per CPU granted to the worker."""
    embed_batch: int = 8
    """Clips per forward pass: 8 keeps ViT-L in bf16 near 2.5 GiB of GPU memory."""
    compile: bool = False

    allowed_uri_prefixes: tuple[str, ...] = DEFAULT_ALLOWED_URI_PREFIXES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    row_deadline_s: float = DEFAULT_ROW_DEADLINE_S

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
        if not self.row_deadline_s > 0:
            raise ValueError(
                f"Invalid ROW_DEADLINE_S ({self.row_deadline_s}). It must be above 0 seconds."
            )
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

    def output_defining(self) -> dict[str, Any]:
        """The settings that define the rows (every field but ``RUNTIME_KNOBS``), as
        JSON-ready values: what the column freezes and the UDF's version hashes."""
        fields = dataclasses.asdict(self)
        return {k: v for k, v in fields.items() if k not in RUNTIME_KNOBS}

    def with_runtime_knobs(self, environ: Mapping[str, str] | None = None) -> Settings:
        """These output-defining settings with the ``RUNTIME_KNOBS`` of the environment
        (this process's by default)."""
        env = Settings.from_env(environ)
        return dataclasses.replace(self, **{k: getattr(env, k) for k in RUNTIME_KNOBS})

    @classmethod
    def from_output_defining(cls, values: Mapping[str, Any]) -> Settings:
        """Settings from ``output_defining()``'s values (unknown keys ignored), with the
        runtime knobs of this process's environment."""
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_KNOBS)
        known = {k: v for k, v in values.items() if k in names}
        if "allowed_uri_prefixes" in known:
            known["allowed_uri_prefixes"] = tuple(known["allowed_uri_prefixes"])
        return cls(**known).with_runtime_knobs()

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
            row_deadline_s=_float_setting(env, "ROW_DEADLINE_S", cls.row_deadline_s),
        )


def _int_setting(env: Mapping[str, str], name: str, default: int | None) -> Any:
    return _number_setting(env, name, default, int, "an integer")


def _float_setting(env: Mapping[str, str], name: str, default: float) -> float:
    return float(_number_setting(env, name, default, float, "a number"))


def _number_setting(env: Mapping[str, str], name: str, default: Any, kind: type, what: str) -> Any:
    """``kind(env[name])``; unset or empty keeps ``default``."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise ValueError(f"Invalid {name} ({raw!r}). It must be {what}.") from e


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


def granted_cpus() -> int:
    """The CPUs this process may use: Ray's assignment inside a Ray worker, rounded up (a
    worker granted 1.7 CPUs beside Geneva's small job actors uses 2), else the smaller of
    the CPU affinity mask and the cgroup v2 quota (``cpu.max``); never the host's
    ``os.cpu_count()``, which counts cores a container cannot use."""
    assigned = _ray_assigned_cpus()
    if assigned:
        return max(1, math.ceil(assigned))
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _ray_assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this worker; None outside a Ray worker (a driver, or no
    Ray at all)."""
    import ray
    from ray._private.worker import WORKER_MODE

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != WORKER_MODE:
        return None
    return context.get_assigned_resources().get("CPU")


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs allowed by a cgroup v2 quota ("200000 100000" is 2), None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)
