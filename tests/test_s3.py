"""Streaming from s3:// through s3fs, against moto's S3 server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import embed_fn, moto_s3

import video_embeddings_udf as vu
from video_embeddings_udf import Settings

BUCKET = "videos"


@pytest.fixture(scope="module")
def s3(shared_videos: Path) -> Iterator[object]:
    """moto's S3 server on 127.0.0.1 holding two shared clips, with fsspec's s3 options
    pointed at it; the server is stopped and the options removed afterwards."""
    import boto3

    with moto_s3() as endpoint:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        for name in ["bikes.mp4", "av1_video.mkv"]:
            client.put_object(Bucket=BUCKET, Key=name, Body=(shared_videos / name).read_bytes())
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(fsspec.config.conf, "s3", options)
            yield endpoint


@pytest.mark.parametrize("name", ["bikes.mp4", "av1_video.mkv"])
def test_stream_from_s3_matches_local(
    s3: object, settings: Settings, shared_videos: Path, name: str
) -> None:
    """An s3:// URL embeds to exactly the rows of the same local file."""
    fn = embed_fn(settings)
    remote = np.stack(fn(f"s3://{BUCKET}/{name}"))
    np.testing.assert_array_equal(remote, np.stack(fn(str(shared_videos / name))))


def test_missing_s3_object_gives_zero_tensor(s3: object, settings: Settings) -> None:
    """A key that does not exist is a bad video: the zero tensor, not a failed job."""
    assert np.array_equal(embed_fn(settings)(f"s3://{BUCKET}/nope.mp4"), vu.zero_embedding())
