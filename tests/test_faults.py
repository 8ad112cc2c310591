"""Storage faults: transient ones are retried and then raised, never turned into zeros."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from conftest import embed_fn
from fsspec.implementations.local import LocalFileSystem

import video_embeddings_udf as vu
from video_embeddings_udf import Settings


class FaultyFileSystem(LocalFileSystem):
    """Local files behind a ``faulty://`` URL whose first ``failing_opens`` opens raise
    ``fault`` on the third read, i.e. inside torchcodec's demuxer, mid-stream."""

    protocol = "faulty"
    failing_opens = 0
    fault: type[Exception] = ConnectionResetError
    opens = 0

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        cls = type(self)
        cls.opens += 1
        file = super()._open(path, mode, **kwargs)
        if cls.opens > cls.failing_opens:
            return file
        reads = 0
        real_read = file.read

        def read(size: int = -1) -> bytes:
            nonlocal reads
            reads += 1
            if reads >= 3:
                raise cls.fault("injected fault")
            return real_read(size)

        file.read = read
        return file


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings, with the ``faulty://`` test filesystem allowed."""
    prefixes = (*settings.allowed_uri_prefixes, "faulty://")
    return dataclasses.replace(settings, allowed_uri_prefixes=prefixes)


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> type[FaultyFileSystem]:
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    monkeypatch.setattr(vu, "RETRY_BASE_DELAY_S", 0.0)
    FaultyFileSystem.opens = 0
    FaultyFileSystem.fault = ConnectionResetError
    return FaultyFileSystem


def test_transient_faults_are_retried_to_the_clean_result(
    settings: Settings,
    shared_videos: Path,
    faulty: type[FaultyFileSystem],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two connection resets mid-read, then success: the row equals the clean result,
    each retry is logged, and no zero tensor is written."""
    video = shared_videos / "bikes.mp4"
    fn = embed_fn(settings)
    clean = np.stack(fn(str(video)))
    faulty.failing_opens = 2
    with caplog.at_level(logging.WARNING, logger="video_embeddings_udf"):
        retried = np.stack(fn(f"faulty://{video}"))
    np.testing.assert_array_equal(retried, clean)
    assert faulty.opens == 3
    retries = [r.getMessage() for r in caplog.records if "transient fault" in r.getMessage()]
    assert len(retries) == 2 and "attempt 1 of 4" in retries[0]


@pytest.mark.parametrize("fault", [ConnectionResetError, TimeoutError])
def test_persistent_fault_is_raised_after_bounded_retries(
    settings: Settings,
    shared_videos: Path,
    faulty: type[FaultyFileSystem],
    fault: type[Exception],
) -> None:
    """A fault that never clears is raised to Geneva after RETRY_ATTEMPTS tries."""
    faulty.failing_opens = 100
    faulty.fault = fault
    fn = embed_fn(settings)
    with pytest.raises(fault, match="injected fault"):
        fn(f"faulty://{shared_videos / 'bikes.mp4'}")
    assert faulty.opens == vu.RETRY_ATTEMPTS


def test_permission_error_is_raised_at_once(
    settings: Settings,
    shared_videos: Path,
    faulty: type[FaultyFileSystem],
) -> None:
    """A refused credential (403 becomes PermissionError) is not retried and not zeroed."""
    faulty.failing_opens = 100
    faulty.fault = PermissionError
    fn = embed_fn(settings)
    with pytest.raises(PermissionError):
        fn(f"faulty://{shared_videos / 'bikes.mp4'}")
    assert faulty.opens == 1


def test_object_deleted_mid_read_is_a_missing_object(
    settings: Settings, shared_videos: Path, faulty: type[FaultyFileSystem]
) -> None:
    """An object that disappears while torchcodec reads it gives the zero tensor, once,
    without retries: it is gone, not flaky."""
    faulty.failing_opens = 100
    faulty.fault = FileNotFoundError
    out = embed_fn(settings)(f"faulty://{shared_videos / 'bikes.mp4'}")
    assert np.array_equal(out, vu.zero_embedding())
    assert faulty.opens == 1
