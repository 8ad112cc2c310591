"""Streaming from https?:// through fsspec's HTTP filesystem, from a server on loopback."""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import embed_fn

import video_embeddings_udf as vu
from video_embeddings.outcomes import ObjectFault
from video_embeddings_udf import Settings


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class QuietServer(ThreadingHTTPServer):
    """Says nothing when a client hangs up mid-body, as a reader that stops at what it
    needs does (this server ignores ``Range`` and sends whole files)."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def http_base(shared_videos: Path) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving the shared clips; stopped afterwards."""
    handler = functools.partial(QuietHandler, directory=str(shared_videos))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def settings(settings: Settings, http_base: str) -> Settings:
    """The session's settings, with the loopback server explicitly allowed."""
    prefixes = (*settings.allowed_uri_prefixes, f"{http_base}/")
    return dataclasses.replace(settings, allowed_uri_prefixes=prefixes)


def test_http_video_matches_local(http_base: str, settings: Settings, shared_videos: Path) -> None:
    """An http:// URL embeds to exactly the rows of the same local file."""
    fn = embed_fn(settings)
    remote = np.stack(fn(f"{http_base}/bikes.mp4"))
    np.testing.assert_array_equal(remote, np.stack(fn(str(shared_videos / "bikes.mp4"))))


def test_http_404_gives_zero_tensor(http_base: str, settings: Settings) -> None:
    """An HTTP 404 is a missing object: the zero tensor, not a failed job."""
    assert np.array_equal(embed_fn(settings)(f"{http_base}/nope.mp4"), vu.zero_embedding())


def test_server_ignoring_range_is_an_object_fault(
    http_base: str, settings: Settings, shared_videos: Path
) -> None:
    """This server ignores ``Range`` and answers every read with the whole file. With
    64 KiB blocks, the second block cannot be read: an ObjectFault after one attempt (the
    row is left NULL to be retried), neither the zero tensor nor a retried read."""
    small_blocks = dataclasses.replace(settings, block_size=64 * 1024)
    uri = f"{http_base}/bikes.mp4"
    assert (shared_videos / "bikes.mp4").stat().st_size > 2 * small_blocks.block_size
    with pytest.raises(ObjectFault) as raised:
        embed_fn(small_blocks)(uri)
    assert str(raised.value).startswith(
        f"reading {uri} failed after 1 attempt: ValueError: The HTTP server doesn't appear "
        "to support range requests."
    )
