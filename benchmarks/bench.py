"""Benchmark: does the UDF run at the speed of its slowest stage? One run, one machine.

Why: the GPU is the expensive part, so the UDF must keep it busy, and the only honest
comparison is one made in the same run on the same machine. This measures, as videos (or
clips) per second:

* seed: the original recipe (first 64 frames, float32, the HF processor on the CPU, one
  video at a time, decode then embed, raw tokens through Python lists into Arrow);
* decode only: the UDF's decode stage alone, on every engine it would use (all CPU cores,
  plus NVDEC where torchcodec can decode on CUDA);
* model only: preprocessing and the encoder on synthetic clips, ``EMBED_BATCH`` at a time;
* end to end: ``VideoEmbedding``'s batch call exactly as Geneva's applier makes it, one
  Arrow batch of URLs after another;
* I/O: GETs per video and bytes read over file size, streaming ``gs://`` through a GCS
  emulator on loopback (skipped where the emulator's binary is not installed).

On CUDA it also records peak GPU memory, the cosine between bf16 and float32 rows of the
same clips, and what ``VJEPA_COMPILE=1`` costs to start and gains.

Inputs: 10 s 720p H.264 clips generated with ffmpeg at the start (or read from
``--clips-dir``), plus the shared sample clips beside the project when present.

    uv run python benchmarks/bench.py [--quick] [--model tiny|vitl-random] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs loads

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import video_embeddings_udf as vu  # noqa: E402
from video_embeddings.frames import WHOLE_VIDEO  # noqa: E402
from video_embeddings.model import embed  # noqa: E402
from video_embeddings.pipeline import Runtime  # noqa: E402
from video_embeddings.preprocess import preprocess  # noqa: E402
from video_embeddings.rows import EMBEDDING_TYPE  # noqa: E402
from video_embeddings.settings import Settings  # noqa: E402

SHARED_VIDEOS = REPO.parent / "shared" / "videos"
SHARED_CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "scene_cuts.mp4", "nasa_13013.mp4"]
SEED_FRAMES = 64


def describe_machine() -> dict[str, Any]:
    import torchcodec
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchcodec": torchcodec.__version__,
        "transformers": transformers.__version__,
    }


def make_clips(out: Path, count: int) -> list[Path]:
    """``count`` 10 s 1280x720 30 fps H.264 clips, a keyframe every 2 s, like the anchors'."""
    paths = []
    for i in range(count):
        path = out / f"720p_{i}.mp4"
        source = f"testsrc2=size=1280x720:rate=30:duration=10,hue=h={i * 37}"
        cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source]
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-pix_fmt", "yuv420p"]
        subprocess.run([*cmd, str(path)], check=True)
        paths.append(path)
    return paths


def make_checkpoint(kind: str, out: Path) -> Path:
    """A random V-JEPA2 saved like a hub checkpoint: the tests' tiny one (hidden 1024, one
    layer, 64 px crop) or the full ViT-L configuration, so no download is needed."""
    from transformers import VJEPA2Config, VJEPA2Model
    from transformers.models.vjepa2 import VJEPA2VideoProcessor

    if kind == "tiny":
        config = VJEPA2Config(
            hidden_size=1024,
            num_hidden_layers=1,
            num_attention_heads=16,
            crop_size=64,
            pred_hidden_size=64,
            pred_num_hidden_layers=1,
            pred_num_attention_heads=4,
        )
    else:
        config = VJEPA2Config()
    torch.manual_seed(0)
    VJEPA2Model(config).save_pretrained(out)
    VJEPA2VideoProcessor(crop_size=config.crop_size).save_pretrained(out)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(count: int, action: Callable[[], Any]) -> float:
    """``count`` items over the seconds ``action`` takes, all work finished."""
    start = time.perf_counter()
    action()
    sync()
    return count / (time.perf_counter() - start)


def seed_recipe(videos: list[str], model_dir: Path) -> float:
    """The original recipe, videos per second: first 64 frames, the HF processor on the CPU,
    float32, batch 1, decode then embed, and the tokens through Python lists."""
    from torchcodec.decoders import VideoDecoder
    from transformers import AutoModel, AutoVideoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").to(device).eval()
    processor = AutoVideoProcessor.from_pretrained(model_dir)

    def one(path: str) -> pa.Array:
        decoder = VideoDecoder(path)
        frames = decoder.get_frames_in_range(0, SEED_FRAMES).data
        pixels = processor(frames, return_tensors="pt")["pixel_values_videos"].to(device)
        with torch.inference_mode():
            tokens = embed(model.get_vision_features, pixels)[0]
        return pa.array([tokens.cpu().tolist()], type=EMBEDDING_TYPE)

    one(videos[0])  # warm-up
    return rate(len(videos), lambda: [one(v) for v in videos])


def decode_only(videos: list[str], settings: Settings, rt: Runtime) -> float:
    """The UDF's decode stage alone, videos per second, on all its engines at once, with
    no row deadline."""

    def one(uri: str) -> None:
        rt.engines.decode(uri, [WHOLE_VIDEO], settings, lambda frames: frames, deadline=math.inf)

    with ThreadPoolExecutor(rt.engines.size) as pool:
        return rate(len(videos), lambda: list(pool.map(one, videos)))


def model_only(settings: Settings, rt: Runtime, batches: int) -> float:
    """Preprocessing and the encoder on synthetic uint8 clips, clips per second."""
    model = rt.model
    crop = model.preprocessing.crop
    shape = (settings.embed_batch, settings.num_frames, 3, *crop)
    clips = torch.randint(0, 256, shape, dtype=torch.uint8, device=model.device)

    def run() -> None:
        for _ in range(batches):
            embed(model.encode, preprocess(clips, model.preprocessing, dtype=model.dtype))

    run()  # warm-up
    return rate(batches * settings.embed_batch, run)


def end_to_end(videos: list[str], udf: Any, batch_rows: int) -> float:
    """``VideoEmbedding``'s batch call as Geneva's applier makes it, videos per second."""
    batches = [videos[i : i + batch_rows] for i in range(0, len(videos), batch_rows)]

    def run() -> None:
        for rows in batches:
            out = udf(pa.array(rows, pa.string()))
            assert len(out) == len(rows)

    return rate(len(videos), run)


@contextmanager
def gcs_bucket(files: list[Path]) -> Iterator[tuple[Any, dict[str, int]] | None]:
    """The files in a GCS emulator behind a counting proxy, with gcsfs pointed at it; None
    where the emulator is not installed (as on a machine with only torch)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import fsspec
        from gcs_emulator import CountingProxy, GcsEmulator
    except ImportError:
        yield None
        return
    try:
        emulator = GcsEmulator().start()
    except (FileNotFoundError, RuntimeError, OSError):
        yield None
        return
    with emulator, CountingProxy(emulator.endpoint) as proxy:
        sizes = {}
        for f in files:
            emulator.upload("bench", f.name, f.read_bytes())
            sizes[f"gs://bench/{f.name}"] = f.stat().st_size
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.endpoint
        fsspec.config.conf["gcs"] = {"token": "anon"}
        try:
            yield proxy, sizes
        finally:
            del os.environ["STORAGE_EMULATOR_HOST"]
            fsspec.config.conf.pop("gcs")


def storage_io(files: list[Path], udf: Any) -> dict[str, float | None]:
    """GETs per video and bytes read / file size, streaming ``gs://`` through the UDF."""
    with gcs_bucket(files) as bucket:
        if bucket is None:
            return {"gets_per_video": None, "bytes_read_ratio": None}
        proxy, sizes = bucket
        proxy.reset()
        udf(pa.array(list(sizes), pa.string()))
        gets = [r for r in proxy.snapshot() if r.is_media_get]
        return {
            "gets_per_video": len(gets) / len(sizes),
            "max_gets_per_video": max(
                sum(f"/o/{Path(uri).name}" in r.path for r in gets) for uri in sizes
            ),
            "bytes_read_ratio": sum(r.bytes_out for r in gets) / sum(sizes.values()),
        }


def gpu_extras(videos: list[str], settings: Settings, udf: Any) -> dict[str, Any]:
    """Peak GPU memory of the default batch, bf16 against float32 rows, and compile."""
    from dataclasses import replace

    sample = pa.array(videos[: settings.embed_batch], pa.string())
    torch.cuda.reset_peak_memory_stats()
    bf16 = np.array(udf(sample).to_pylist(), dtype=np.float32)
    peak = torch.cuda.max_memory_allocated() / 2**30
    fp32_udf = vu.VideoEmbedding(replace(settings, dtype="float32")).func  # type: ignore[attr-defined]
    fp32 = np.array(fp32_udf(sample).to_pylist(), dtype=np.float32)
    cos = (bf16 * fp32).sum(-1) / (np.linalg.norm(bf16, axis=-1) * np.linalg.norm(fp32, axis=-1))
    del fp32_udf
    start = time.perf_counter()
    compiled = vu.VideoEmbedding(replace(settings, compile=True)).func  # type: ignore[attr-defined]
    rt: Runtime = compiled._ready()
    compile_s = time.perf_counter() - start
    return {
        "peak_gpu_gib": round(peak, 2),
        "cosine_bf16_fp32_min": float(cos.min()),
        "compile_s": round(compile_s, 1),
        "model_compiled_clips_per_s": model_only(settings, rt, batches=8),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clips: under 2 min on 2 cores")
    parser.add_argument("--model", choices=["tiny", "vitl-random"], default="tiny")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--clips-dir", type=Path, help="use these .mp4 clips, not generated ones")
    parser.add_argument("--batch-rows", type=int, default=32, help="rows per Geneva batch")
    parser.add_argument("--videos", type=int, help="videos in the end-to-end run")
    args = parser.parse_args(argv)

    logging_quiet()
    n_generated, seed_n, e2e_n, model_batches = (4, 2, 12, 2) if args.quick else (8, 4, 48, 8)
    e2e_n = args.videos or e2e_n
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.clips_dir:
            generated = sorted(args.clips_dir.glob("*.mp4"))
        else:
            generated = make_clips(tmp, n_generated)
        shared = [SHARED_VIDEOS / n for n in SHARED_CLIPS if (SHARED_VIDEOS / n).exists()]
        files = generated + shared
        videos = [str(files[i % len(files)]) for i in range(e2e_n)]
        model_dir = make_checkpoint(args.model, tmp / "model")
        settings = Settings(model=str(model_dir))
        udf = vu.VideoEmbedding(settings).func  # type: ignore[attr-defined]
        rt: Runtime = udf._ready()

        result: dict[str, Any] = {**describe_machine(), "model": args.model}
        result["decode_threads"] = {"cpu": rt.engines.cpu, "nvdec": rt.engines.nvdec}
        result["seed_videos_per_s"] = seed_recipe([str(f) for f in files[:seed_n]], model_dir)
        result["decode_videos_per_s"] = decode_only(videos, settings, rt)
        result["model_clips_per_s"] = model_only(settings, rt, model_batches)
        udf(pa.array(videos[:2], pa.string()))  # warm-up
        result["e2e_videos_per_s"] = end_to_end(videos, udf, args.batch_rows)
        result.update(storage_io(files, udf))
        if torch.cuda.is_available():
            result.update(gpu_extras(videos, settings, udf))
    slowest = min(result["decode_videos_per_s"], result["model_clips_per_s"])
    result["e2e_over_slowest_stage"] = result["e2e_videos_per_s"] / slowest
    result["e2e_over_decode"] = result["e2e_videos_per_s"] / result["decode_videos_per_s"]
    result["e2e_over_seed"] = result["e2e_videos_per_s"] / result["seed_videos_per_s"]
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def logging_quiet() -> None:
    """Keep the per-worker model-load lines out of the table: the UDF module's and its
    stages' (the ``video_embeddings`` package)."""
    import logging

    for name in ("video_embeddings_udf", "video_embeddings"):
        logging.getLogger(name).setLevel(logging.ERROR)


def print_table(result: dict[str, Any]) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    raise SystemExit(main())
