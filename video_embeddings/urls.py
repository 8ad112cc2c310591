"""Which URLs may be read (``ALLOWED_URI_PREFIXES``, public hosts only by default), how a
table value becomes a URL, and redaction of URLs in every log line and error message.

The policy is enforced twice for an ``http(s)`` URL: ``check_uri`` before anything
connects, and ``PolicyResolver`` inside the HTTP client, on the addresses it is about to
connect to, so that a DNS answer that changes between the two (DNS rebinding) is refused
too. Both fail closed: a prefix allows only what it names, and a name that does not
resolve is never connected to."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from video_embeddings.outcomes import BadVideo, ObjectFault

__all__ = ["PolicyResolver", "check_uri", "redact", "resolve_uri"]


def resolve_uri(value: str, *, base_path: str | None) -> str:
    """Turn a table value into a URL: bare names are taken relative to ``base_path``,
    as the OpenVid tables store bare file names."""
    if base_path and "://" not in value and not value.startswith("/"):
        return f"{base_path.rstrip('/')}/{value}"
    return value


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")
# an http(s) URL's query string, or anything shaped like "?key=value" (a query after a
# space in an unquoted URL, say)
_URL_QUERY = re.compile(r"(?i)(\bhttps?://[^?#\s'\"]*)\?[^#\s'\"]*|\?[^?=&#\s'\"]+=[^#\s'\"]*")


_ONE_LINE = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
"""Control characters, written as escapes: a URL's newline cannot start a forged log line."""


def redact(text: str) -> str:
    """``text`` with the credentials (``user:password@``) and the query strings of the URLs
    in it replaced by ``<redacted>``: a signed URL's signature is in its query string. Used
    on every URL and storage error that goes into a log line or an exception message.
    Control characters are escaped (``\x0a``), so the result is one line."""
    text = _URL_USERINFO.sub(r"\1<redacted>@", text)
    text = _URL_QUERY.sub(lambda m: f"{m[1] or ''}?<redacted>", text)
    return text.translate(_ONE_LINE)


# --- prefixes, compared structurally ------------------------------------------------------

_HTTP_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


@dataclass(frozen=True)
class _Parts:
    """A URL or a prefix, taken apart: ``host`` is None for a bare ``scheme://`` prefix
    and for local paths; ``port`` is set for http(s) only, its default filled in."""

    scheme: str
    host: str | None
    port: int | None
    path: str


def _parts(value: str, *, prefix: bool) -> _Parts | None:
    """``value`` taken apart, or None when it is no URL this module can read (a prefix
    that is None matches nothing). A URL's faulty host or port raises ``BadVideo``.

    Local paths and ``file://`` URLs become scheme ``file`` and their normalised absolute
    path (a trailing ``/`` kept). Credentials (``user:password@``) are dropped: they do not
    change where a URL leads. The host of an http(s) URL is lower-cased, IDNA-encoded, an
    IP address written canonically, and a missing port is the scheme's default; its path
    stops at ``?`` or ``#``. Any other scheme's authority ends at the first ``/`` and the
    rest is its path, literally (``#`` and ``?`` are part of a ``gs://`` object name)."""
    if value.startswith("file://") or "://" not in value:
        return _Parts("file", None, None, _local_path(value.removeprefix("file://")))
    match = _SCHEME.fullmatch(value)
    if match is None:  # "simplecache::https://…" and the like
        return None
    scheme, rest = match.groups()
    http = scheme in _HTTP_PORTS
    stop = re.search(r"[/?#]" if http else "/", rest)
    cut = stop.start() if stop else len(rest)
    authority, path = rest[:cut], rest[cut:]
    if http and re.search(r"[\x00-\x20\x7f\\]", authority):  # parsers disagree on these
        if prefix:
            return None
        raise BadVideo("URL not allowed: its host is not valid")
    authority = authority.rpartition("@")[2]
    if prefix and not authority:
        return _Parts(scheme, None, None, path)  # a bare "scheme://": any host
    if not http:
        return _Parts(scheme, authority, None, path)
    if re.search(r"[?#]", path):
        if prefix:
            return None  # a prefix with a query or fragment: nothing to compare it with
        path = re.split(r"[?#]", path, maxsplit=1)[0]
    try:
        split = urlsplit(f"{scheme}://{authority}")
        host, port = split.hostname, split.port
    except ValueError as e:
        if prefix:
            return None
        if "port" in str(e).lower():
            raise BadVideo("URL not allowed: its port is not a number from 0 to 65535") from None
        raise BadVideo("URL not allowed: its host is not valid") from None
    if not host:
        if prefix:
            return None
        raise BadVideo("URL not allowed: it has no host")
    return _Parts(scheme, _host_key(host), _HTTP_PORTS[scheme] if port is None else port, path)


def _local_path(path: str) -> str:
    """A local path, normalised and absolute, keeping a trailing slash."""
    absolute = os.path.abspath(path) if path else ""
    if path.endswith("/") and not absolute.endswith("/"):
        absolute += "/"
    return absolute


def _host_key(host: str) -> str:
    """``host`` as both checks compare it: an IP address written canonically (``::1``,
    not ``0:0::1``), a name lower-cased and IDNA-encoded, as aiohttp passes it to its
    resolver."""
    host = host.lower().strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _under(path: str, prefix_path: str) -> bool:
    """Whether ``path`` is ``prefix_path`` or below it, at a ``/`` boundary: ``/videos``
    covers ``/videos`` and ``/videos/a.mp4``, not ``/videos2/a.mp4``."""
    if prefix_path in ("", "/") or prefix_path.endswith("/"):
        return path.startswith(prefix_path) or path + "/" == prefix_path
    return path == prefix_path or path.startswith(prefix_path + "/")


def _matches(url: _Parts, prefix: _Parts) -> bool:
    return (
        url.scheme == prefix.scheme
        and (prefix.host is None or (prefix.host == url.host and prefix.port == url.port))
        and _under(url.path, prefix.path)
    )


def _named_hosts(allowed_prefixes: Sequence[str]) -> frozenset[tuple[str, int]]:
    """The ``(host, port)`` pairs that an http(s) entry of ``allowed_prefixes`` names: the
    only ones allowed to be at a non-public address."""
    parts = (_parts(p, prefix=True) for p in allowed_prefixes)
    return frozenset(
        (p.host, p.port)
        for p in parts
        if p is not None and p.scheme in _HTTP_PORTS and p.host is not None and p.port is not None
    )


def check_uri(uri: str, allowed_prefixes: Sequence[str]) -> None:
    """Refuse, before any connection, a URL that ALLOWED_URI_PREFIXES does not allow.

    A URL is allowed when an entry covers it, compared part by part: the scheme; then the
    host and port, when the entry names them (the default port filled in on both sides,
    so ``https://cdn.example.com`` covers ``https://cdn.example.com:443/a.mp4`` but not
    ``https://cdn.example.com.evil.net/a.mp4``); then the path, at a ``/`` boundary
    (``https://cdn.example.com/videos`` covers ``/videos`` and ``/videos/a.mp4``, not
    ``/videos2/a.mp4``). Local paths and ``file://`` URLs are compared by their normalised
    absolute path, at a ``/`` boundary too. Other URLs with a ``.`` or ``..`` path segment
    are refused. All of these raise ``BadVideo``.

    An ``http(s)`` URL that no entry naming its host covers (only a bare ``http://`` or
    ``https://``) must name a public host: loopback, link-local (the cloud metadata
    service at 169.254.169.254 included), private and other non-public addresses,
    ``localhost`` and ``metadata.google.internal`` are refused (``BadVideo``). Its name is
    resolved, but nothing connects to it; a name that does not resolve raises
    ``ObjectFault`` (the row is left NULL and tried again later), and is never connected
    to. The HTTP client checks the addresses again when it connects (``PolicyResolver``)."""
    url = _parts(uri, prefix=False)
    prefixes = [p for p in (_parts(p, prefix=True) for p in allowed_prefixes) if p is not None]
    matches = [p for p in prefixes if url is not None and _matches(url, p)]
    if url is None or not matches:
        raise BadVideo("URL not allowed: it matches no ALLOWED_URI_PREFIXES entry")
    segments = re.split(r"[/\\]", unquote(url.path))
    if url.scheme != "file" and ("." in segments or ".." in segments):
        raise BadVideo("URL not allowed: its path has a '.' or '..' segment")
    if url.scheme in _HTTP_PORTS and all(p.host is None for p in matches):
        assert url.host is not None and url.port is not None
        _check_public_host(url.host, url.port)


# --- public hosts -----------------------------------------------------------------------

_LOCAL_NAMES = ("localhost", "metadata", "metadata.google.internal")

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _check_public_host(host: str, port: int) -> None:
    """Refuse a host that is not public, by name or by any address it resolves to; a
    name that does not resolve is an ``ObjectFault``."""
    if host in _LOCAL_NAMES or host.endswith((".localhost", ".internal")):
        raise BadVideo(f"URL not allowed: host {host} is a local or metadata name")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        raise ObjectFault(f"host {host} does not resolve ({reason})") from None
    for *_, sockaddr in infos:
        address = _address(str(sockaddr[0]))
        if _refused(address):
            raise BadVideo(
                f"URL not allowed: host {host} is {_address_kind(address)} ({address}); "
                "list its prefix in ALLOWED_URI_PREFIXES to allow it"
            )


def _address(text: str) -> _Address:
    address = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 scope
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _refused(address: _Address) -> bool:
    return not address.is_global or address.is_multicast


def _address_kind(address: _Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    return "private" if address.is_private else "not public"


# --- at connect time --------------------------------------------------------------------


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver for the HTTP client: it resolves a name with ``base`` (the
    system resolver, as ``check_uri`` does, by default) and raises ``BadVideo`` when any
    address it got is not public, unless an ALLOWED_URI_PREFIXES entry names that host and
    port. aiohttp connects only to the addresses a resolver returns, so a name that
    resolved to a public address for ``check_uri`` and to 169.254.169.254 a moment later
    (DNS rebinding) is refused before any connection. A name that does not resolve raises
    the base resolver's ``OSError``, which aiohttp reports as a failed connection.

    (aiohttp does not ask a resolver about a URL whose host is an IP address: there is
    nothing to rebind, and ``check_uri`` has checked it. It refuses legacy spellings such
    as ``2130706433`` itself.)"""

    def __init__(
        self, allowed_prefixes: Sequence[str], *, base: AbstractResolver | None = None
    ) -> None:
        self._named = _named_hosts(allowed_prefixes)
        self._base = base if base is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._base.resolve(host, port, family)
        if (_host_key(host), port) in self._named:
            return results
        for result in results:
            address = _address(result["host"])
            if _refused(address):
                raise BadVideo(
                    f"URL not allowed: host {host} resolved to {address} "
                    f"({_address_kind(address)}) at connect time"
                )
        return results

    async def close(self) -> None:
        await self._base.close()
