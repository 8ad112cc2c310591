"""Shared fixtures: a tiny random V-JEPA2 checkpoint, generated clips, the shared real clips."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

# gcsfs reads this at import; with it on, every open against the emulator stalls.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Geneva's local Ray would otherwise try to rebuild the uv environment on each worker.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from video_embeddings_udf import EMBEDDING_DIM, EMBEDDING_TYPE, Settings, VideoEmbedding  # noqa: E402

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
INDEX_STRIDE = 4
"""Generated clips paint frame i in gray level i * INDEX_STRIDE, so a decoded frame
tells which index it is."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class RowEmbedder:
    """The plain callable Geneva wraps (``udf``), called one row at a time as a batch of
    one, returning that row's ``(rows, 1024)`` float32 array, read from the Arrow output."""

    def __init__(self, settings: Settings) -> None:
        self.udf = VideoEmbedding(settings).func

    def __call__(self, video_uri: str) -> np.ndarray:
        out = self.udf(pa.array([video_uri], pa.string()))
        assert out.type == EMBEDDING_TYPE and len(out) == 1
        return out.flatten().flatten().to_numpy().reshape(-1, EMBEDDING_DIM)


def embed_fn(settings: Settings) -> RowEmbedder:
    return RowEmbedder(settings)


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1, stopped on exit; yields its endpoint.
    moto keeps its buckets per process, so each test names its own."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def local_ray() -> Iterator[None]:
    """Geneva starts local Ray on first backfill; stop it when the test is done."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random V-JEPA2 (hidden 1024, 1 layer, 16 heads, 64 px crop) saved like a hub
    checkpoint, so tests load it through the UDF's own ``from_pretrained`` path."""
    import torch
    from transformers import VJEPA2Config, VJEPA2Model
    from transformers.models.vjepa2 import VJEPA2VideoProcessor

    path = tmp_path_factory.mktemp("tiny-vjepa2")
    config = VJEPA2Config(
        hidden_size=1024,
        num_hidden_layers=1,
        num_attention_heads=16,
        crop_size=64,
        pred_hidden_size=64,
        pred_num_hidden_layers=1,
        pred_num_attention_heads=4,
    )
    torch.manual_seed(0)
    VJEPA2Model(config).save_pretrained(path)
    VJEPA2VideoProcessor(crop_size=64).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def settings(tiny_model_dir: Path) -> Settings:
    return Settings(model=str(tiny_model_dir))


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip("the shared sample clips are not beside the project")
    return SHARED_VIDEOS


def make_index_clip(path: Path, num_frames: int, *, vfr: bool = False) -> Path:
    """Encode ``num_frames`` gray 64x48 frames, frame i at level i * INDEX_STRIDE,
    losslessly (H.264, qp 0). ``.mkv`` is written through a pipe so its header has no
    duration; ``vfr`` gives the second half of the clip 5x longer frame durations."""
    assert num_frames * INDEX_STRIDE < 256
    frames = np.repeat(np.arange(num_frames, dtype=np.uint8) * INDEX_STRIDE, 64 * 48)
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray"]
    cmd += ["-s", "64x48", "-r", "25", "-i", "pipe:0", "-c:v", "libx264", "-qp", "0"]
    cmd += ["-pix_fmt", "yuv444p"]
    half = num_frames // 2
    if vfr:
        cmd += ["-vf", f"setpts='if(lt(N,{half}),N,{half}+(N-{half})*5)/25/TB'"]
        cmd += ["-fps_mode", "vfr"]
    if path.suffix == ".mkv":
        cmd += ["-f", "matroska", "pipe:1"]
        with path.open("wb") as out:
            subprocess.run(cmd, input=frames.tobytes(), stdout=out, check=True)
    else:
        subprocess.run([*cmd, str(path)], input=frames.tobytes(), check=True)
    return path


def frame_indices(frames: np.ndarray) -> list[int]:
    """Read back the index painted into each decoded ``(T, C, H, W)`` frame."""
    levels = frames.reshape(len(frames), -1).mean(axis=1)
    return np.round(levels / INDEX_STRIDE).astype(int).tolist()


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Index-coded clips: 60 frames in MP4, in MKV without a duration, and VFR MP4;
    10 frames (fewer than NUM_FRAMES); a single frame."""
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_index_clip(d / "sixty.mp4", 60),
        "mkv": make_index_clip(d / "sixty.mkv", 60),
        "vfr": make_index_clip(d / "sixty_vfr.mp4", 60, vfr=True),
        "short": make_index_clip(d / "ten.mp4", 10),
        "one": make_index_clip(d / "one.mp4", 1),
    }
