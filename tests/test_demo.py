"""The README's main job: find videos, backfill them on local Ray, search the table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import demo


def test_find_videos_in_folder_glob_and_file(tmp_path: Path, shared_videos: Path) -> None:
    """Folders are walked recursively and globs expanded; only video extensions count."""
    (tmp_path / "sub").mkdir()
    for name in ["bikes.mp4", "av1_video.mkv", "sine_mono_s16.wav"]:
        shutil.copy(shared_videos / name, tmp_path / "sub" / name)
    (tmp_path / "notes.txt").write_text("not a video")
    sub = tmp_path / "sub"
    assert demo.find_videos([str(tmp_path)]) == [str(sub / "av1_video.mkv"), str(sub / "bikes.mp4")]
    assert demo.find_videos([f"{tmp_path}/sub/*.mp4"]) == [str(sub / "bikes.mp4")]
    assert demo.find_videos([f"file://{sub}/bikes.mp4"]) == [str(sub / "bikes.mp4")]


def test_main_job_embeds_generated_clips_and_finds_each_first(
    tmp_path: Path,
    tiny_model_dir: Path,
    local_ray: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With no source, the job generates clips, backfills them through Geneva on local
    Ray into a LanceDB directory, and each clip's own embedding finds that clip first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VJEPA_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("NUM_FRAMES", "16")
    assert demo.main(["--db", str(tmp_path / "db")]) == 0
    clips = sorted((tmp_path / "demo-clips").glob("*.mp4"))
    assert len(clips) == len(demo.GENERATED)
    out = capsys.readouterr().out
    assert f"embedded {len(clips)} videos" in out
    for clip in clips:
        assert f"  {clip}\n    -> {clip}\n" in out
