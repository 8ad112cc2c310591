"""Checks that the GCS emulator helper really serves gcsfs and counts what gcsfs reads."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # must precede the gcsfs import

import gcsfs
import pytest
from gcs_emulator import CountingProxy, FaultProxy, GcsEmulator

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


def _get(endpoint: str, name: str, *, timeout: float = 2.0) -> int | str:
    """One GET of object ``name`` on a fresh connection: its status, or what went wrong."""
    host = endpoint.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request("GET", f"/download/storage/v1/b/{BUCKET}/o/{name}?alt=media")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except TimeoutError:
        return "timeout"
    except (ConnectionError, http.client.IncompleteRead):
        return "reset"
    finally:
        conn.close()


def test_fault_proxy_injects_each_fault_in_turn() -> None:
    """With a fault every second request, the faults come in turn: 503, 429, a reset
    halfway through the body, a stall past the client's timeout; the other requests are
    forwarded, and each fault is recorded."""
    with GcsEmulator() as emu, FaultProxy(emu.endpoint, every=2, stall_s=3.0) as proxy:
        emu.upload(BUCKET, "a.bin", os.urandom(10_000))
        got = [_get(proxy.endpoint, "a.bin", timeout=2.0) for _ in range(8)]
        assert got == [200, 503, 200, 429, 200, "reset", 200, "timeout"]
        assert proxy.faults_injected() == {"503": 1, "429": 1, "reset": 1, "stall": 1}
        (reset,) = [r for r in proxy.snapshot() if r.fault == "reset"]
        assert reset.bytes_out == 5_000


def test_fault_proxy_outages_and_aimed_faults() -> None:
    """An outage armed with outage_from starts at the first request for that object and
    hits every request until it is lifted; fault_next hits one matching request once."""
    with GcsEmulator() as emu, FaultProxy(emu.endpoint) as proxy:
        emu.upload(BUCKET, "a.bin", b"a")
        emu.upload(BUCKET, "b.bin", b"b")
        proxy.outage_from("b.bin", "503")
        assert [_get(proxy.endpoint, n) for n in ("a.bin", "b.bin", "a.bin")] == [200, 503, 503]
        proxy.outage = None
        proxy.fault_next("b.bin", "429")
        assert [_get(proxy.endpoint, n) for n in ("a.bin", "b.bin", "b.bin")] == [200, 429, 200]


def test_fault_proxy_is_bounded_and_stops_by_itself() -> None:
    """A connection serves at most max_requests requests; stop() ends a stall at once;
    and a proxy nobody stops stops itself after lifetime_s, leaving no thread behind."""
    before = set(threading.enumerate())
    with GcsEmulator() as emu:
        emu.upload(BUCKET, "a.bin", b"abc")
        with FaultProxy(emu.endpoint, max_requests=2) as proxy:
            conn = http.client.HTTPConnection(proxy.endpoint.removeprefix("http://"), timeout=5)
            path = f"/download/storage/v1/b/{BUCKET}/o/a.bin?alt=media"
            statuses = []
            for _ in range(2):
                conn.request("GET", path)
                resp = conn.getresponse()
                statuses.append((resp.status, resp.read()))
            assert statuses == [(200, b"abc")] * 2
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                conn.request("GET", path)
                conn.getresponse()
            conn.close()
            proxy.outage, proxy.stall_s = "stall", 600.0
            stalled = threading.Thread(
                target=_get, args=(proxy.endpoint, "a.bin"), kwargs={"timeout": 600.0}
            )
            stalled.start()
            deadline = time.monotonic() + 10
            while not proxy.faults_injected() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proxy.faults_injected() == {"stall": 1}
        stalled.join(timeout=10)  # the proxy's stop() ended the stall
        assert not stalled.is_alive()

        proxy = FaultProxy(emu.endpoint, lifetime_s=0.2).start()
        address = proxy.endpoint.removeprefix("http://").split(":")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address[0], int(address[1])), timeout=1).close()
            except (ConnectionRefusedError, ConnectionResetError):  # reset: closing as we connect
                break
            time.sleep(0.05)
        else:
            pytest.fail("the proxy did not stop by itself")
    deadline = time.monotonic() + 10
    while _new_threads(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _new_threads(before)


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Live non-daemon threads started since ``before`` (gcsfs/fsspec keep daemon ones)."""
    return [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
