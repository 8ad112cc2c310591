"""The UDF's pipeline stage by stage, on real FFmpeg decoding and the tiny real model."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RowEmbedder, embed_fn, frame_indices
from torchcodec.decoders import VideoDecoder
from transformers import AutoModel, AutoVideoProcessor

import video_embeddings_udf as vu
from video_embeddings.outcomes import SystemFault
from video_embeddings.preprocess import MAX_RESIZED_PIXELS
from video_embeddings_udf import BadVideo, Settings, sample_indices

# --- settings ---------------------------------------------------------------------------


def test_settings_defaults_and_environment() -> None:
    """Each setting has the documented default and is parsed from its variable."""
    assert Settings.from_env({}) == Settings(
        num_frames=64,
        model="facebook/vjepa2-vitl-fpc64-256",
        block_size=16 * 1024 * 1024,
        embedding_col="video_embedding",
        video_uri_col="video_uri",
        video_base_path=None,
        dtype=None,
        output="frames",
        decode_device="auto",
        decode_workers=None,
        embed_batch=8,
        compile=False,
    )
    env = {
        "NUM_FRAMES": "16",
        "VJEPA_MODEL": "/ckpt",
        "BLOCK_SIZE": "1048576",
        "VIDEO_EMBEDDING_COL": "emb",
        "VIDEO_URI_COL": "path",
        "VIDEO_BASE_PATH": "gs://b/videos",
        "VJEPA_DTYPE": "bfloat16",
        "EMBEDDING_OUTPUT": "tokens",
        "VIDEO_DECODE_DEVICE": "cpu",
        "DECODE_WORKERS": "3",
        "EMBED_BATCH": "2",
        "VJEPA_COMPILE": "1",
        "ROW_DEADLINE_S": "2.5",
    }
    assert Settings.from_env(env) == Settings(
        16,
        "/ckpt",
        1048576,
        "emb",
        "path",
        "gs://b/videos",
        "bfloat16",
        "tokens",
        "cpu",
        3,
        2,
        True,
        row_deadline_s=2.5,
    )
    assert Settings.from_env({}).row_deadline_s == 300.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NUM_FRAMES": "many"}, r"Invalid NUM_FRAMES \('many'\)\. It must be an integer"),
        ({"NUM_FRAMES": "0"}, r"Invalid NUM_FRAMES \(0\)"),
        (
            {"VJEPA_DTYPE": "fp16"},
            r"Invalid VJEPA_DTYPE \('fp16'\)\. Supported values are "
            r"float32, bfloat16",
        ),
        ({"EMBEDDING_OUTPUT": "mean"}, r"Invalid EMBEDDING_OUTPUT \('mean'\)"),
        ({"VIDEO_DECODE_DEVICE": "gpu"}, r"Invalid VIDEO_DECODE_DEVICE \('gpu'\)\. Supported"),
        ({"EMBED_BATCH": "0"}, r"Invalid EMBED_BATCH \(0\)"),
        ({"DECODE_WORKERS": "0"}, r"Invalid DECODE_WORKERS \(0\)"),
        ({"VJEPA_COMPILE": "yes please"}, r"Invalid VJEPA_COMPILE \('yes please'\)"),
        ({"ROW_DEADLINE_S": "0"}, r"Invalid ROW_DEADLINE_S \(0\.0\)\. It must be above 0"),
        ({"ROW_DEADLINE_S": "5m"}, r"Invalid ROW_DEADLINE_S \('5m'\)\. It must be a number"),
    ],
)
def test_settings_reject_bad_values(env: dict[str, str], message: str) -> None:
    """A bad setting fails at once with its name, its value and what is allowed."""
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_resolve_uri_uses_base_path_for_bare_names_only() -> None:
    """Bare names join VIDEO_BASE_PATH; full URLs and absolute paths are left alone."""
    base = "gs://bucket/videos/"
    assert vu.resolve_uri("a.mp4", base_path=base) == "gs://bucket/videos/a.mp4"
    assert vu.resolve_uri("sub/a.mp4", base_path=base) == "gs://bucket/videos/sub/a.mp4"
    assert vu.resolve_uri("s3://other/a.mp4", base_path=base) == "s3://other/a.mp4"
    assert vu.resolve_uri("/data/a.mp4", base_path=base) == "/data/a.mp4"
    assert vu.resolve_uri("a.mp4", base_path=None) == "a.mp4"


# --- sampling ---------------------------------------------------------------------------


def test_sample_indices_are_rounded_linspace() -> None:
    """Indices are round(linspace(0, n - 1, N)) over the whole video, repeating when short."""
    assert sample_indices(5, 3) == [0, 2, 4]
    assert sample_indices(4, 3) == [0, 2, 3]
    assert sample_indices(2, 4) == [0, 0, 1, 1]
    assert sample_indices(1, 3) == [0, 0, 0]
    long = sample_indices(250, 64)
    assert long[0] == 0 and long[-1] == 249 and len(long) == 64
    assert long == [round(i * 249 / 63) for i in range(64)]
    with pytest.raises(BadVideo, match="no frames"):
        sample_indices(0, 64)


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_decode_returns_the_sampled_frames(clips: dict[str, Path], kind: str) -> None:
    """At a constant frame rate the decoded frames are round(linspace(0, n - 1, T)), also
    on MKV without a duration in the header."""
    frames = vu.decode_frames(str(clips[kind]), num_frames=16, block_size=1 << 20)
    assert frames.shape == (16, 3, 48, 64) and frames.dtype == torch.uint8
    assert frame_indices(frames.numpy()) == sample_indices(60, 16)


def test_variable_frame_rate_is_sampled_uniformly_in_time(clips: dict[str, Path]) -> None:
    """The VFR clip starts frames 0-29 every 0.04 s, then frames 30-59 every 0.2 s from
    1.2 s; the muxer gives the last frame the nominal 0.04 s, so it ends at 7.04 s: 60
    slots of 7.04 / 60 s. The frames are those on screen at the middle of the sampled
    slots, worked out here from that timeline."""

    def on_screen(t: float) -> int:
        return int(t * 25) if t < 1.2 else min(59, 30 + int((t - 1.2) / 0.2))

    slot = 7.04 / 60
    want = [on_screen((i + 0.5) * slot) for i in sample_indices(60, 16)]
    assert want[:4] == [1, 13, 24, 31] and want[-1] == 58  # 59 is shown 0.04 s
    frames = vu.decode_frames(str(clips["vfr"]), num_frames=16, block_size=1 << 20)
    assert frame_indices(frames.numpy()) == want


@pytest.mark.parametrize(("kind", "n"), [("short", 10), ("one", 1)])
def test_short_videos_repeat_frames(clips: dict[str, Path], kind: str, n: int) -> None:
    """A video with fewer frames than NUM_FRAMES repeats frames by the same formula."""
    frames = vu.decode_frames(str(clips[kind]), num_frames=64, block_size=1 << 20)
    assert frame_indices(frames.numpy()) == sample_indices(n, 64)


# --- embedding --------------------------------------------------------------------------


def by_hand_tokens(model_dir: Path, video: Path, num_frames: int) -> torch.Tensor:
    """``get_vision_features`` on the HF processor's output, outside the UDF."""
    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    processor = AutoVideoProcessor.from_pretrained(model_dir)
    decoder = VideoDecoder(str(video), seek_mode="exact")
    n = decoder.metadata.num_frames
    indices = [round(i * (n - 1) / (num_frames - 1)) for i in range(num_frames)]
    pixels = processor(decoder.get_frames_at(indices).data, return_tensors="pt")
    with torch.inference_mode():
        return model.get_vision_features(pixels["pixel_values_videos"])[0]


def test_frame_rows_are_tubelet_means(settings: Settings, shared_videos: Path) -> None:
    """Each of the 64 rows is the mean of its tubelet's 16 patch tokens, computed by hand;
    frames 2k and 2k+1 share a row."""
    video = shared_videos / "bikes.mp4"
    rows = np.stack(embed_fn(settings)(str(video)))
    assert rows.shape == (64, 1024) and rows.dtype == np.float32
    assert not np.isnan(rows).any()
    tokens = by_hand_tokens(Path(settings.model), video, 64).numpy()
    assert tokens.shape == (32 * 16, 1024)
    for frame in range(64):
        tubelet = frame // 2
        expected = tokens[tubelet * 16 : (tubelet + 1) * 16].mean(axis=0)
        np.testing.assert_allclose(rows[frame], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(rows[0], rows[2])


def test_tokens_output_returns_raw_tokens(settings: Settings, shared_videos: Path) -> None:
    """EMBEDDING_OUTPUT=tokens returns every encoder token, time-major, unpooled."""
    video = shared_videos / "bikes.mp4"
    tokens_settings = Settings(model=settings.model, num_frames=16, output="tokens")
    rows = np.stack(embed_fn(tokens_settings)(str(video)))
    expected = by_hand_tokens(Path(settings.model), video, 16).numpy()
    assert rows.shape == (8 * 16, 1024)
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "video",
    [
        "av1_video.mkv",
        "h265_video.mp4",
        "bt709_full_range.mp4",
        "scene_cuts.mp4",
        "nasa_13013.mp4",
        "carphone_distorted.mp4",
        "bigbuckbunny.mp4",
    ],
)
def test_every_shared_clip_embeds(settings: Settings, shared_videos: Path, video: str) -> None:
    """Every real codec and container in the shared clips gives 64 finite, non-zero rows."""
    rows = np.stack(embed_fn(settings)(str(shared_videos / video)))
    assert rows.shape == (64, 1024)
    assert np.isfinite(rows).all() and np.abs(rows).sum() > 0


def test_model_input_matches_checkpoint_crop(settings: Settings, shared_videos: Path) -> None:
    """The processor's output is exactly the checkpoint's crop size (64 px here), so the
    position embeddings are the ones the model was built for."""
    p = vu.Preprocessing.from_processor(AutoVideoProcessor.from_pretrained(settings.model))
    frames = vu.decode_frames(
        str(shared_videos / "scene_cuts.mp4"), num_frames=4, block_size=1 << 20
    )
    clips = vu.shrink(frames, p, device="cpu")[None]
    assert vu.preprocess(clips, p, dtype=torch.float32).shape == (1, 4, 3, 64, 64)


def test_odd_num_frames_is_refused_with_reason(tiny_model_dir: Path, shared_videos: Path) -> None:
    """NUM_FRAMES must fill whole tubelets; an odd value fails loudly at model load, as a
    model that cannot load: a system fault naming the checkpoint and the setting."""
    fn = embed_fn(Settings(model=str(tiny_model_dir), num_frames=15))
    with pytest.raises(SystemFault, match=r"Invalid NUM_FRAMES \(15\).*tubelet size \(2\)") as e:
        fn(str(shared_videos / "bikes.mp4"))
    assert str(e.value).startswith(f"cannot load the model {str(tiny_model_dir)!r}: ")
    assert isinstance(e.value.__cause__, ValueError)
    assert fn.udf._runtime is None


# --- bad input --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(settings: Settings) -> RowEmbedder:
    """A UDF whose model is already loaded, so a test sees only its own log lines."""
    fn = embed_fn(settings)
    fn.udf._ready()
    return fn


@pytest.fixture(scope="module")
def bad_inputs(
    tmp_path_factory: pytest.TempPathFactory, clips: dict[str, Path], shared_videos: Path
) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    good = clips["mp4"].read_bytes()
    files = {
        "empty.mp4": b"",
        "random.mp4": np.random.default_rng(0).bytes(50_000),
        "text.mp4": b"this is not a video\n" * 100,
        "truncated.mp4": (shared_videos / "bikes.mp4").read_bytes()[:250_000],
        "audio.wav": (shared_videos / "sine_mono_s16.wav").read_bytes(),
        "header_only.mp4": good[:64],
    }
    paths = {name: d / name for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    out = {name: str(p) for name, p in paths.items()}
    out["missing.mp4"] = str(d / "missing.mp4")
    return out


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.mp4", "Invalid data"),
        ("random.mp4", "Invalid data"),
        ("text.mp4", "Invalid data"),
        ("truncated.mp4", "Invalid data"),
        ("audio.wav", "No valid stream"),
        ("header_only.mp4", "Invalid data"),
        ("missing.mp4", "object does not exist"),
    ],
)
def test_bad_input_gives_zero_tensor_and_one_log_line(
    loaded: RowEmbedder,
    bad_inputs: dict[str, str],
    name: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A video that cannot be processed returns [[0.0] * 1024] and logs its URL and why."""
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        out = loaded(bad_inputs[name])
    assert np.array_equal(out, np.zeros((1, 1024), np.float32))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("video_embeddings")]
    assert len(lines) == 1
    assert lines[0].startswith(f"zero embedding for {bad_inputs[name]}: ") and reason in lines[0]
    assert "\n" not in lines[0]


def test_ffmpeg_missing_is_one_clear_line(tmp_path: Path) -> None:
    """Without FFmpeg's libraries the error is one line naming the fix, not torchcodec's
    long traceback, raised as a system fault (the worker cannot decode anything). FFmpeg
    is hidden for real: in a private mount namespace, /dev/null is bound over each
    libavcodec, so the loader cannot use it (needs root and unshare)."""
    import glob
    import shutil
    import subprocess
    import sys

    libs = [p for p in glob.glob("/usr/lib/*/libavcodec.so.*") if not os.path.islink(p)]
    if not libs or shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("hiding FFmpeg needs root, unshare and a system libavcodec")
    hide = "; ".join(f"mount --bind /dev/null {lib}" for lib in libs)
    code = "import video_embeddings_udf as v; v.decode_frames('x.mp4', num_frames=4, block_size=1)"
    script = f'{hide}; exec "{sys.executable}" -c "{code}"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    if "mount" in result.stderr and "denied" in result.stderr:
        pytest.skip("this machine does not allow private mount namespaces")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "video_embeddings.outcomes.SystemFault: torchcodec could not load FFmpeg's shared "
        "libraries (versions 4 to 7); "
        "install them, e.g. `apt-get install ffmpeg` on Debian/Ubuntu."
    )
    assert "libtorchcodec" not in result.stderr


# --- aggregation ------------------------------------------------------------------------


ROWS = np.array([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)


def test_aggregations_match_by_hand() -> None:
    """Mean, max, Gaussian-weighted and segment pooling, each L2-normalised."""
    np.testing.assert_allclose(vu.aggregate_mean(ROWS), np.array([4, 5]) / np.sqrt(41), rtol=1e-6)
    np.testing.assert_allclose(vu.aggregate_max(ROWS), np.array([3, 4]) / 5, rtol=1e-6)
    w = np.exp(-0.5 * ((np.arange(4) - 2) / 1.0) ** 2)
    weighted = (ROWS * w[:, None]).sum(axis=0) / w.sum()
    np.testing.assert_allclose(
        vu.aggregate_weighted(ROWS), weighted / np.linalg.norm(weighted), rtol=1e-6
    )
    np.testing.assert_allclose(vu.aggregate_segment(ROWS), [1.0, 0.0])
    np.testing.assert_allclose(
        vu.aggregate_segment(ROWS, start=0.5, end=1.0), np.array([1, 1]) / np.sqrt(2), rtol=1e-6
    )


@pytest.mark.parametrize(
    "aggregate",
    [vu.aggregate_mean, vu.aggregate_max, vu.aggregate_weighted, vu.aggregate_segment],
)
def test_aggregations_of_zero_tensor_are_zero(aggregate) -> None:
    """The zero tensor of a bad video aggregates to zeros, never NaN."""
    out = aggregate(np.array(vu.zero_embedding(), dtype=np.float32))
    assert out.shape == (1024,) and not np.isnan(out).any() and not out.any()


def test_import_is_cheap() -> None:
    """Importing the module (as the driver does at add_columns) loads no torch model
    stack: torchcodec and transformers stay unimported."""
    import subprocess
    import sys

    code = (
        "import sys, video_embeddings_udf; "
        "print(sorted(m for m in ('torchcodec', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ}
    )
    assert out.stdout.strip() == "[]"


# --- model loading ----------------------------------------------------------------------


def test_model_loads_once_on_cpu_with_sdpa_and_no_predictor(
    settings: Settings, shared_videos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing loads at construction; the first call loads the model once, in float32
    on the CPU with one warning, with SDPA attention, and the predictor never runs."""
    fn = embed_fn(settings)
    assert fn.udf._runtime is None
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        fn(str(shared_videos / "carphone_distorted.mp4"))
        loaded = fn.udf._runtime.model
        model = loaded.encode.__self__  # the Hugging Face model behind get_vision_features
        predictor_calls = []
        model.predictor.register_forward_hook(lambda *args: predictor_calls.append(1))
        fn(str(shared_videos / "h265_video.mp4"))
    assert fn.udf._runtime.model is loaded
    assert [r.getMessage() for r in caplog.records] == [
        "no CUDA device: V-JEPA2 runs on the CPU, which is slow"
    ]
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert (loaded.device, loaded.dtype) == ("cpu", torch.float32)
    assert predictor_calls == []


def test_bfloat16_stays_close_to_float32(settings: Settings, shared_videos: Path) -> None:
    """VJEPA_DTYPE=bfloat16 runs the model in bf16 and still returns float32 rows within
    bf16's precision of the float32 result."""
    video = str(shared_videos / "bikes.mp4")
    full = np.stack(embed_fn(settings)(video))
    bf16_fn = embed_fn(Settings(model=settings.model, dtype="bfloat16"))
    half = np.stack(bf16_fn(video))
    loaded = bf16_fn.udf._runtime.model
    assert next(loaded.encode.__self__.parameters()).dtype == torch.bfloat16
    assert loaded.dtype == torch.bfloat16
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05)
    assert np.abs(half - full).max() > 0


def test_pickled_udf_carries_settings_not_the_model(
    settings: Settings, shared_videos: Path
) -> None:
    """What Geneva stores at add_columns is the settings only: a UDF that has already
    loaded its model pickles without it and loads again after unpickling."""
    import cloudpickle

    fn = embed_fn(settings)
    fn(str(shared_videos / "carphone_distorted.mp4"))
    copy = cloudpickle.loads(cloudpickle.dumps(fn.udf))
    assert copy.settings == settings and copy._runtime is None


@pytest.mark.gpu
def test_cuda_defaults_to_bfloat16(settings: Settings, shared_videos: Path) -> None:
    """On a CUDA machine the model runs on the GPU in bfloat16 by default."""
    fn = embed_fn(settings)
    rows = np.stack(fn(str(shared_videos / "bikes.mp4")))
    param = next(fn.udf._runtime.model.encode.__self__.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
    assert rows.shape == (64, 1024) and np.isfinite(rows).all()


def test_udf_version_is_stable_and_follows_settings() -> None:
    """Geneva's UDF version is the same in every process for the same settings (so a new
    driver does not look like a new UDF) and changes when a setting changes."""
    import subprocess
    import sys

    code = (
        "import video_embeddings_udf as v; "
        "print(v.VideoEmbedding(v.Settings()).version, "
        "v.VideoEmbedding(v.Settings(num_frames=32)).version)"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]
    assert vu.VideoEmbedding(Settings()).version == runs[0][0]


@pytest.mark.parametrize(
    ("size", "embeds"), [("2x8192", False), ("8192x2", False), ("8x256", True)]
)
def test_extreme_aspect_ratios_are_bounded(
    settings: Settings, tmp_path: Path, size: str, embeds: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A 2x8192 or 8192x2 frame would resize to 256x1048576 before the crop with ViT-L's
    processor (768 MiB a frame; 73x299008 with the tiny model's): it gets the zero tensor
    with the reason, before any resize. A 32:1 frame (8x256) still embeds."""
    clip = tmp_path / f"{size}.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25", "-t",
         "0.2", "-c:v", "libx264", "-pix_fmt", "yuv444p", str(clip)],
        check=True,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        rows = embed_fn(dataclasses.replace(settings, num_frames=4))(str(clip))
    zero = [r.getMessage() for r in caplog.records if "zero embedding" in r.getMessage()]
    if embeds:
        assert rows.shape == (4, 1024) and np.abs(rows).sum() > 0 and zero == []
    else:
        np.testing.assert_array_equal(rows, vu.zero_embedding())
        w, h = size.split("x")
        [line] = zero
        resized = line.split("would resize to ")[1].split(" ")[0]  # the tiny model's 73 px
        assert resized == ("299008x73" if w == "8192" else "73x299008")
        assert line == (
            f"zero embedding for {clip}: frame size {w}x{h} would resize to {resized} "
            f"before the crop, over {MAX_RESIZED_PIXELS} pixels: its aspect ratio is too extreme"
        )
