"""URL safety: the UDF opens only what ALLOWED_URI_PREFIXES allows and connects to nothing
else, caps the bytes it reads per video, and keeps credentials and signed-URL query strings
out of every log line and error message. Servers here listen on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import fsspec
import numpy as np
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from conftest import embed_fn

import video_embeddings.storage
import video_embeddings.urls
import video_embeddings_udf as vu
from video_embeddings.outcomes import ObjectFault
from video_embeddings.settings import DEFAULT_ALLOWED_URI_PREFIXES as DEFAULT
from video_embeddings_udf import BadVideo, Settings, check_uri, redact

# --- settings ---------------------------------------------------------------------------


def test_safety_settings_defaults_and_environment() -> None:
    """ALLOWED_URI_PREFIXES (comma-separated), MAX_PIXELS and MAX_VIDEO_BYTES have their
    documented defaults and are read from the environment; bad values fail at once."""
    s = Settings.from_env({})
    assert s.allowed_uri_prefixes == (
        "gs://", "gcs://", "s3://", "s3a://", "file://", "http://", "https://"
    )  # fmt: skip
    assert (s.max_pixels, s.max_video_bytes) == (4096 * 2160, 4 * 1024**3)
    env = {
        "ALLOWED_URI_PREFIXES": " gs://bucket/videos/, http://10.0.0.5:8080/ ,/data/,",
        "MAX_PIXELS": "33177600",
        "MAX_VIDEO_BYTES": "1048576",
    }
    s = Settings.from_env(env)
    assert s.allowed_uri_prefixes == ("gs://bucket/videos/", "http://10.0.0.5:8080/", "/data/")
    assert (s.max_pixels, s.max_video_bytes) == (7680 * 4320, 1024 * 1024)
    with pytest.raises(ValueError, match=r"Invalid ALLOWED_URI_PREFIXES entry \('videos/'\)"):
        Settings.from_env({"ALLOWED_URI_PREFIXES": "gs://,videos/"})
    with pytest.raises(ValueError, match=r"Invalid MAX_PIXELS \(0\)"):
        Settings.from_env({"MAX_PIXELS": "0"})
    with pytest.raises(ValueError, match=r"Invalid MAX_VIDEO_BYTES \('4G'\)\. It must be an"):
        Settings.from_env({"MAX_VIDEO_BYTES": "4G"})


# --- which URLs are allowed -------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "gs://bucket/clip #1?.mp4",
        "gcs://bucket/a.mp4",
        "s3://bucket/a.mp4",
        "/data/videos/a.mp4",
        "relative/a.mp4",
        "file:///data/a.mp4",
        "https://8.8.8.8/videos/a.mp4",
        "http://8.8.8.8:8080/a.mp4",
    ],
)
def test_default_allows_object_stores_local_paths_and_public_http(uri: str) -> None:
    check_uri(uri, DEFAULT)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://127.0.0.1:8080/a.mp4", "host 127.0.0.1 is loopback (127.0.0.1)"),
        ("http://localhost/a.mp4", "host localhost is a local or metadata name"),
        ("http://169.254.169.254/latest/meta-data/", "is link-local (169.254.169.254)"),
        ("http://metadata.google.internal/computeMetadata/v1/", "is a local or metadata name"),
        ("https://10.1.2.3/a.mp4", "is private (10.1.2.3)"),
        ("https://172.16.5.4/a.mp4", "is private (172.16.5.4)"),
        ("https://192.168.0.10/a.mp4", "is private (192.168.0.10)"),
        ("https://100.64.0.1/a.mp4", "is not public (100.64.0.1)"),
        ("http://0.0.0.0/a.mp4", "is private (0.0.0.0)"),
        ("http://[::1]/a.mp4", "is loopback (::1)"),
        ("http://[fe80::1]/a.mp4", "is link-local (fe80::1)"),
        ("http://[fd00::1]/a.mp4", "is private (fd00::1)"),
        ("http://[::ffff:169.254.169.254]/", "is link-local (169.254.169.254)"),
        ("http://2130706433/a.mp4", "host 2130706433 is loopback (127.0.0.1)"),
        ("http://0x7f.1/a.mp4", "host 0x7f.1 is loopback (127.0.0.1)"),
        ("http://8.8.8.8:99999/a.mp4", "its port is not a number from 0 to 65535"),
        ("http:///a.mp4", "it has no host"),
        ("https://8.8.8.8/videos/../admin", "its path has a '.' or '..' segment"),
        ("gs://bucket/videos/%2e%2e/secret.mp4", "its path has a '.' or '..' segment"),
        ("ftp://example.com/a.mp4", "it matches no ALLOWED_URI_PREFIXES entry"),
        ("GS://bucket/a.mp4", "it matches no ALLOWED_URI_PREFIXES entry"),
        ("simplecache::https://8.8.8.8/a.mp4", "it matches no ALLOWED_URI_PREFIXES entry"),
        ("memory://a.mp4", "it matches no ALLOWED_URI_PREFIXES entry"),
    ],
)
def test_default_refuses_non_public_hosts_and_other_schemes(uri: str, reason: str) -> None:
    """Loopback, link-local (the metadata server), private and other non-public hosts,
    however written, and schemes outside the list are refused, with the reason."""
    with pytest.raises(BadVideo) as refused:
        check_uri(uri, DEFAULT)
    assert str(refused.value).startswith("URL not allowed: ")
    assert reason in str(refused.value)


def test_explicit_prefixes_allow_exactly_what_they_name() -> None:
    """A prefix that names a host, port and folder allows that folder only; a local
    prefix is matched on the normalised path, so '..' cannot climb out of it."""
    prefixes = ("http://", "http://127.0.0.1:8080/videos/", "/data/videos/")
    for uri in [
        "http://127.0.0.1:8080/videos/a.mp4",
        "/data/videos/a.mp4",
        "/data/videos/sub/../b.mp4",
        "file:///data/videos/c.mp4",
    ]:
        check_uri(uri, prefixes)
    for uri, reason in [
        ("http://127.0.0.1:8080/other/a.mp4", "is loopback"),
        ("http://127.0.0.1:8081/videos/a.mp4", "is loopback"),
        ("/data/videos/../secret.mp4", "matches no"),
        ("file:///data/videos/../../etc/passwd", "matches no"),
        ("/data/videos2/a.mp4", "matches no"),
        ("gs://bucket/a.mp4", "matches no"),
    ]:
        with pytest.raises(BadVideo, match=reason):
            check_uri(uri, prefixes)


def test_prefixes_are_compared_by_scheme_host_port_and_path() -> None:
    """An entry covers a URL by its parts, not by its text: the same scheme; the same host
    (in any case) and port (the default one filled in); a path at or below the entry's, at
    a '/' boundary. A longer host, a host after credentials, another port or a sibling
    folder whose name starts the same are refused; local paths stop at a '/' too."""
    prefixes = (
        "https://cdn.example.com",
        "https://media.example.com:443/videos",
        "http://10.0.0.5:8080/clips/",
        "gs://bucket/videos",
        "/data/videos",
    )
    for uri in [
        "https://cdn.example.com/a.mp4",
        "https://cdn.example.com:443/a.mp4",
        "https://CDN.Example.com/a.mp4",
        "https://reader:password@cdn.example.com/a.mp4",
        "https://cdn.example.com",
        "https://media.example.com/videos",
        "https://media.example.com/videos/a.mp4?X-Goog-Signature=abc",
        "http://10.0.0.5:8080/clips/a.mp4",
        "gs://bucket/videos/clip #1?.mp4",
        "gs://bucket/videos",
        "/data/videos/a.mp4",
        "/data/videos",
        "file:///data/videos/sub/a.mp4",
    ]:
        check_uri(uri, prefixes)
    for uri in [
        "https://cdn.example.com.evil.net/a.mp4",
        "https://cdn.example.comm/a.mp4",
        "https://cdn.example.com@evil.net/a.mp4",
        "https://cdn.example.com:443@evil.net/a.mp4",
        "https://cdn.example.com:8443/a.mp4",
        "http://cdn.example.com/a.mp4",
        "https://media.example.com/videos2/a.mp4",
        "https://media.example.com/video",
        "https://media.example.com/a.mp4?next=/videos/a.mp4",
        "https://media.example.com:8443/videos/a.mp4",
        "http://10.0.0.5/clips/a.mp4",
        "http://10.0.0.5:8080/clipsX/a.mp4",
        "gs://bucket/videos2/a.mp4",
        "gs://bucket2/videos/a.mp4",
        "/data/videos2/a.mp4",
        "file:///data/videos.old/a.mp4",
    ]:
        with pytest.raises(BadVideo, match="matches no ALLOWED_URI_PREFIXES entry"):
            check_uri(uri, prefixes)


# --- no connection to a refused URL -----------------------------------------------------


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections and drops each at once."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.stop()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The UDF's retries, without the sleeps between them (4 attempts, as in production)."""
    monkeypatch.setattr(video_embeddings.storage, "RETRY_BASE_DELAY_S", 0.0)


def zero_tensor_lines(settings: Settings, uri: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Embed ``uri`` (which must give the zero tensor) and return the package's log lines
    of that call alone: the model is loaded first, since its load logs a line of its own."""
    fn = embed_fn(settings)
    fn.udf._ready()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        out = fn(uri)
    assert np.array_equal(out, vu.zero_embedding())
    return [r.getMessage() for r in caplog.records if r.name.startswith("video_embeddings")]


def test_refused_url_gets_zero_tensor_one_log_line_and_no_connection(
    settings: Settings, listener: Listener, no_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A loopback URL gets the zero tensor and one log line saying why, and the listener
    at that address sees no connection. The same URL, explicitly allowed, does connect
    (4 times: the dropped connection is a transient fault, retried, then raised)."""
    uri = f"{listener.endpoint}/video.mp4"
    assert zero_tensor_lines(settings, uri, caplog) == [
        f"zero embedding for {uri}: URL not allowed: host 127.0.0.1 is loopback (127.0.0.1); "
        "list its prefix in ALLOWED_URI_PREFIXES to allow it"
    ]
    assert listener.connections == 0

    allowed = dataclasses.replace(settings, allowed_uri_prefixes=(f"{listener.endpoint}/",))
    with pytest.raises(ObjectFault, match=r"failed after 4 attempts: \w+") as raised:
        embed_fn(allowed)(uri)
    assert str(raised.value).startswith(f"reading {uri} failed after 4 attempts: ")
    last_error = str(raised.value).split(" attempts: ", 1)[1].split(":")[0]
    assert issubclass(getattr(aiohttp, last_error), aiohttp.ClientConnectionError), last_error
    assert listener.connections >= video_embeddings.storage.RETRY_ATTEMPTS


# --- names that do not resolve, and DNS rebinding ---------------------------------------

REBIND = "rebind.test"
"""The name the DNS stub answers for; ``.test`` names never resolve in real DNS."""


class DnsStub:
    """A loopback DNS stub, in process, in place of the system resolver
    (``socket.getaddrinfo``, which both the URL check and the HTTP client's resolver ask).
    It answers ``REBIND`` from ``answers``, one answer per lookup and the last one again
    after that: an IPv4 address, or None for "no such name". Other names go to the real
    resolver."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: list[str | None] = []
        self.lookups = 0
        self._real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != REBIND:
            return self._real(host, port, *args, **kwargs)
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answer, port))]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> DnsStub:
    return DnsStub(monkeypatch)


def rebind_url(listener: Listener) -> str:
    """A URL naming ``REBIND`` at the listener's port."""
    return f"http://{REBIND}:{listener.endpoint.rsplit(':', 1)[1]}/video.mp4"


def test_name_that_does_not_resolve_is_an_object_fault_and_never_connected(
    settings: Settings, listener: Listener, dns: DnsStub, no_backoff: None
) -> None:
    """A name that does not resolve when it is checked leaves the row NULL (an object
    fault, tried again by retry_failed), and is not looked up or connected to afterwards,
    although it would now resolve to the listener on loopback."""
    dns.answers = [None, "127.0.0.1"]
    with pytest.raises(ObjectFault) as raised:
        embed_fn(settings)(rebind_url(listener))
    assert str(raised.value) == (f"host {REBIND} does not resolve (Name or service not known)")
    assert (dns.lookups, listener.connections) == (1, 0)


def test_dns_rebinding_is_refused_at_connect_time(
    settings: Settings,
    listener: Listener,
    dns: DnsStub,
    no_backoff: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A name that is public when checked and loopback when the HTTP client connects gets
    the zero tensor and one log line saying so, and the listener at that loopback address
    sees no connection."""
    dns.answers = ["93.184.216.34", "127.0.0.1"]
    uri = rebind_url(listener)
    assert zero_tensor_lines(settings, uri, caplog) == [
        f"zero embedding for {uri}: URL not allowed: host {REBIND} resolved to 127.0.0.1 "
        "(loopback) at connect time"
    ]
    assert dns.lookups >= 2 and listener.connections == 0


def test_http_client_checks_the_address_it_connects_to(
    listener: Listener, dns: DnsStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the URL check out of the way, the HTTP client itself refuses a loopback
    answer (nothing connects); an entry that names the host and port lets it connect.
    Each policy reaches the open it is given: fsspec keeps one filesystem per policy."""
    monkeypatch.setattr(video_embeddings.storage, "check_uri", lambda uri, prefixes: None)
    dns.answers = ["127.0.0.1"]
    uri = rebind_url(listener)
    with pytest.raises(BadVideo, match=f"host {REBIND} resolved to 127.0.0.1 .loopback."):
        video_embeddings.storage.open_video(uri, block_size=1024, allowed_prefixes=DEFAULT)
    assert listener.connections == 0

    named = (*DEFAULT, uri.removesuffix("video.mp4"))
    with pytest.raises(FileNotFoundError):  # the listener drops the connection
        video_embeddings.storage.open_video(uri, block_size=1024, allowed_prefixes=named)
    assert listener.connections >= 1

    client = video_embeddings.storage.PolicyClient
    assert fsspec.filesystem("http", get_client=client(DEFAULT)) is fsspec.filesystem(
        "http", get_client=client(tuple(DEFAULT))
    )
    assert fsspec.filesystem("http", get_client=client(DEFAULT)) is not fsspec.filesystem(
        "http", get_client=client(named)
    )


class StubResolver(AbstractResolver):
    """A loopback DNS stub for aiohttp, in process: answers every name with
    ``addresses``."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("addresses", "refused"),
    [
        (["169.254.169.254"], "169.254.169.254 (link-local)"),
        (["93.184.216.34", "10.1.2.3"], "10.1.2.3 (private)"),
        (["::ffff:169.254.169.254"], "169.254.169.254 (link-local)"),
        (["fe80::1"], "fe80::1 (link-local)"),
        (["100.64.0.1"], "100.64.0.1 (not public)"),
        (["93.184.216.34", "2606:2800:220:1::"], None),
    ],
)
def test_resolver_refuses_non_public_answers(addresses: list[str], refused: str | None) -> None:
    """The HTTP client's resolver refuses a name when any address it resolved to is not
    public, unless an entry names that host and port (whatever its scheme or path)."""
    prefixes = (*DEFAULT, "http://metadata.test:8080/videos/")

    async def resolve(host: str, port: int) -> list[ResolveResult]:
        resolver = video_embeddings.urls.PolicyResolver(prefixes, base=StubResolver(*addresses))
        return await resolver.resolve(host, port)

    if refused is None:
        assert len(asyncio.run(resolve("metadata.test", 80))) == len(addresses)
    else:
        with pytest.raises(BadVideo) as raised:
            asyncio.run(resolve("metadata.test", 80))
        assert str(raised.value) == (
            f"URL not allowed: host metadata.test resolved to {refused} at connect time"
        )
    assert len(asyncio.run(resolve("Metadata.TEST", 8080))) == len(addresses)


# --- an HTTP server for redirects, errors and streams -----------------------------------


class Server(ThreadingHTTPServer):
    """Loopback HTTP server: /redirect answers 302 to ``redirect_to``, /missing 404,
    /unavailable 503, and /endless sends 256 MiB of zeros without a Content-Length,
    counting what it sent."""

    ENDLESS = 256 * 1024 * 1024

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.redirect_to = ""
        self.sent = 0


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/endless"):
            self.send_response(200)  # HTTP/1.0: the body ends when the connection does
            self.end_headers()
            chunk = bytes(64 * 1024)
            while body and self.server.sent < Server.ENDLESS:
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                self.server.sent += len(chunk)
        else:
            self.send_error(404 if path.startswith("/missing") else 503)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def allowing(settings: Settings, server: Server) -> Settings:
    """``settings`` with the test server's loopback address explicitly allowed."""
    prefixes = (*DEFAULT, f"{server.endpoint}/")
    return dataclasses.replace(settings, allowed_uri_prefixes=prefixes)


def test_redirect_is_not_followed(
    settings: Settings, server: Server, listener: Listener, no_backoff: None
) -> None:
    """An allowed server that redirects to a refused address gets the zero tensor (its
    redirect is no video), and nothing connects to where the redirect points."""
    server.redirect_to = f"{listener.endpoint}/video.mp4"
    out = embed_fn(allowing(settings, server))(f"{server.endpoint}/redirect.mp4")
    assert np.array_equal(out, vu.zero_embedding())
    assert listener.connections == 0


# --- byte cap ---------------------------------------------------------------------------


def test_object_over_max_video_bytes_is_refused_unread(
    settings: Settings, clips: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """An object whose size is known and over MAX_VIDEO_BYTES gets the zero tensor and a
    log line with its size (on gs:// no byte of it is fetched: see test_reliability)."""
    size = clips["mp4"].stat().st_size
    s = dataclasses.replace(settings, max_video_bytes=size - 1)
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        assert np.array_equal(embed_fn(s)(str(clips["mp4"])), vu.zero_embedding())
    assert caplog.records[-1].getMessage() == (
        f"zero embedding for {clips['mp4']}: object is {size} bytes, "
        f"over MAX_VIDEO_BYTES ({size - 1})"
    )
    assert embed_fn(dataclasses.replace(settings, max_video_bytes=size))(str(clips["mp4"])).any()


def test_object_of_unknown_size_is_refused(
    settings: Settings, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A 256 MiB object served without a Content-Length can be neither checked against
    MAX_VIDEO_BYTES nor seeked (which decoding needs): the zero tensor and a log line,
    and the server got to send only what socket buffers took before the UDF hung up."""
    with caplog.at_level(logging.WARNING, logger="video_embeddings"):
        out = embed_fn(allowing(settings, server))(f"{server.endpoint}/endless.mp4")
    assert np.array_equal(out, vu.zero_embedding())
    assert (
        caplog.records[-1]
        .getMessage()
        .endswith("/endless.mp4: object size is unknown (no Content-Length)")
    )
    assert server.sent < Server.ENDLESS / 4


# --- no secrets in logs or errors -------------------------------------------------------

SECRET = "s3cr3t-signature"
PASSWORD = "hunter2-password"


def signed(server: Server, path: str) -> str:
    """A URL shaped like a signed URL, with a password in it too."""
    host = server.endpoint.removeprefix("http://")
    return (
        f"http://reader:{PASSWORD}@{host}{path}?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        f"&X-Goog-Credential=reader%40project.iam&X-Goog-Signature={SECRET}"
    )


def test_redact_removes_credentials_and_query_strings() -> None:
    assert redact(f"https://user:{PASSWORD}@h/v.mp4?X-Amz-Signature={SECRET}&a=b") == (
        "https://<redacted>@h/v.mp4?<redacted>"
    )
    assert redact(f"url='https://h/v.mp4?sig={SECRET}'), then") == (
        "url='https://h/v.mp4?<redacted>'), then"
    )
    assert redact(f"https://h/my clip.mp4?sig={SECRET}") == "https://h/my clip.mp4?<redacted>"
    assert redact("gs://bucket/clip #1.mp4 and /data/a.mp4") == (
        "gs://bucket/clip #1.mp4 and /data/a.mp4"
    )


def test_signed_url_secrets_reach_no_log_line_or_error(
    settings: Settings, server: Server, no_backoff: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing object (404) gets the zero tensor; an object behind a persistent 503 is
    retried and raised as an object fault (the row is left NULL), never zeroed. Neither
    the signature nor the password (plain or as the Basic Authorization header) appears
    in a log record of any logger at INFO or above, in the error's message, or in a
    chained exception. (fsspec's own DEBUG log prints whole URLs.)"""
    fn = embed_fn(allowing(settings, server))
    with caplog.at_level(logging.INFO):
        assert np.array_equal(fn(signed(server, "/missing.mp4")), vu.zero_embedding())
        with pytest.raises(ObjectFault) as raised:
            fn(signed(server, "/unavailable.mp4"))
    error = raised.value
    host = server.endpoint.removeprefix("http://")
    assert str(error) == (
        f"reading http://<redacted>@{host}/unavailable.mp4?<redacted> failed after 4 attempts:"
        f" ClientResponseError: 503, message='Service Unavailable', "
        f"url='http://{host}/unavailable.mp4?<redacted>'"
    )
    assert error.__cause__ is None and error.__context__ is None
    zero_lines = [r.getMessage() for r in caplog.records if "zero embedding" in r.getMessage()]
    assert zero_lines == [
        f"zero embedding for http://<redacted>@{host}/missing.mp4?<redacted>: object does not exist"
    ]
    retries = [r for r in caplog.records if "transient fault" in r.getMessage()]
    assert len(retries) == video_embeddings.storage.RETRY_ATTEMPTS - 1
    basic = base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
    texts = [str(error), repr(error), *(caplog.text.splitlines())]
    assert not [t for t in texts if SECRET in t or PASSWORD in t or basic in t]
