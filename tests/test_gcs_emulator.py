"""Checks that the GCS emulator helper really serves gcsfs and counts what gcsfs reads."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # must precede the gcsfs import

import gcsfs
import pytest
from gcs_emulator import CountingProxy, GcsEmulator

BUCKET = "videos"
ODD_NAME = "clips/my clip é #1.mp4"  # space, non-ASCII and '#' (no '?': gcsfs treats it as a glob)


@pytest.fixture
def gcs() -> Iterator[tuple[GcsEmulator, CountingProxy, gcsfs.GCSFileSystem]]:
    """An emulator with a counting proxy in front and a gcsfs filesystem pointed at the proxy."""
    with GcsEmulator() as emu, CountingProxy(emu.endpoint) as proxy:
        fs = gcsfs.GCSFileSystem(
            token="anon", endpoint_url=proxy.endpoint, skip_instance_cache=True
        )
        yield emu, proxy, fs


def test_upload_and_read_back_odd_names(
    gcs: tuple[GcsEmulator, CountingProxy, gcsfs.GCSFileSystem],
):
    """Objects uploaded with awkward names come back byte-identical via gs:// URLs in gcsfs."""
    emu, _, fs = gcs
    payloads = {ODD_NAME: os.urandom(4096), "plain.bin": b"x" * 10}
    for name, data in payloads.items():
        emu.upload(BUCKET, name, data)
    for name, data in payloads.items():
        assert fs.cat(f"gs://{BUCKET}/{name}") == data
        with fs.open(f"gs://{BUCKET}/{name}", "rb") as f:
            assert f.read() == data
    assert sorted(fs.find(f"gs://{BUCKET}")) == sorted(f"{BUCKET}/{n}" for n in payloads)


def test_proxy_counts_media_gets_and_bytes(
    gcs: tuple[GcsEmulator, CountingProxy, gcsfs.GCSFileSystem],
):
    """A plain fs.cat is exactly one media GET returning exactly the object's bytes; ranged reads
    are recorded with their Range header; reset() clears the counters."""
    emu, proxy, fs = gcs
    data = os.urandom(300_000)
    emu.upload(BUCKET, ODD_NAME, data)

    proxy.reset()
    assert fs.cat(f"gs://{BUCKET}/{ODD_NAME}") == data
    assert proxy.gets() == 1
    assert proxy.bytes_out == len(data)

    proxy.reset()
    assert fs.cat_file(f"gs://{BUCKET}/{ODD_NAME}", start=100, end=200) == data[100:200]
    (req,) = proxy.snapshot()
    assert (req.range, req.status, req.bytes_out) == ("bytes=100-199", 206, 100)

    proxy.reset()
    assert proxy.gets() == 0 and proxy.bytes_out == 0


def test_stop_leaves_no_proxy_threads() -> None:
    """stop() joins the proxy's serving and keep-alive handler threads, even with a live client."""
    before = set(threading.enumerate())
    with GcsEmulator() as emu, CountingProxy(emu.endpoint) as proxy:
        emu.upload(BUCKET, "a.bin", b"abc")
        fs = gcsfs.GCSFileSystem(
            token="anon", endpoint_url=proxy.endpoint, skip_instance_cache=True
        )
        assert fs.cat(f"{BUCKET}/a.bin") == b"abc"  # leaves a keep-alive connection open
    leftover = {t for t in set(threading.enumerate()) - before if t.is_alive()}
    # gcsfs/fsspec keep their own daemon IO threads alive for the process; ours must be gone.
    assert not [t for t in leftover if not t.daemon], leftover
