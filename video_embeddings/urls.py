"""Which URLs may be read (``ALLOWED_URI_PREFIXES``, public hosts only by default), how a
table value becomes a URL, and redaction of URLs in every log line and error message."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from video_embeddings.outcomes import BadVideo

__all__ = ["check_uri", "redact", "resolve_uri"]


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


def redact(text: str) -> str:
    """``text`` with the credentials (``user:password@``) and the query strings of the URLs
    in it replaced by ``<redacted>``: a signed URL's signature is in its query string. Used
    on every URL and storage error that goes into a log line or an exception message."""
    text = _URL_USERINFO.sub(r"\1<redacted>@", text)
    return _URL_QUERY.sub(lambda m: f"{m[1] or ''}?<redacted>", text)


def check_uri(uri: str, allowed_prefixes: Sequence[str]) -> None:
    """Refuse, before any connection, a URL that ALLOWED_URI_PREFIXES does not allow.

    A URL is allowed when it starts with one of the prefixes; local paths are compared as
    ``file://`` + their absolute path, and other URLs with a ``.`` or ``..`` path segment
    are refused. An ``http(s)`` URL allowed only by a bare ``http://`` or ``https://``
    entry must name a public host: loopback, link-local (the cloud metadata service at
    169.254.169.254 included), private and other non-public addresses, ``localhost`` and
    ``metadata.google.internal`` are refused unless a longer prefix names them. The host's
    name is resolved, but nothing connects to it."""
    url = _as_url(uri)
    matches = [p for p in map(_as_url, allowed_prefixes) if url.startswith(p)]
    if not matches:
        raise BadVideo("URL not allowed: it matches no ALLOWED_URI_PREFIXES entry")
    segments = unquote(urlsplit(url).path).split("/")
    if not url.startswith("file://") and ("." in segments or ".." in segments):
        raise BadVideo("URL not allowed: its path has a '.' or '..' segment")
    if max(matches, key=len) in ("http://", "https://"):
        _check_public_host(url)


def _as_url(value: str) -> str:
    """A local path or ``file://`` URL as ``file://`` + its normalised absolute path (keeping
    a trailing slash, which makes a prefix stop at a folder); other URLs without their
    credentials (``user:password@``), which do not change where they lead."""
    if "://" in value and not value.startswith("file://"):
        return re.sub(r"^([^:/?#]+://)[^/?#]*@", r"\1", value)
    path = value.removeprefix("file://")
    absolute = os.path.abspath(path) if path else ""
    if path.endswith("/") and not absolute.endswith("/"):
        absolute += "/"
    return f"file://{absolute}"


_LOCAL_NAMES = ("localhost", "metadata", "metadata.google.internal")


def _check_public_host(url: str) -> None:
    """Refuse an http(s) URL whose host is not public, by name or by any address it
    resolves to. An unresolvable name passes: nothing can connect to it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise BadVideo("URL not allowed: its port is not a number from 0 to 65535") from None
    if not host:
        raise BadVideo("URL not allowed: it has no host")
    if host in _LOCAL_NAMES or host.endswith((".localhost", ".internal")):
        raise BadVideo(f"URL not allowed: host {host} is a local or metadata name")
    try:
        infos = socket.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # no such name: the open fails as it would anyway
        return
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])  # drop an IPv6 scope
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise BadVideo(
                f"URL not allowed: host {host} is {_address_kind(address)} ({address}); "
                "list its prefix in ALLOWED_URI_PREFIXES to allow it"
            )


def _address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    return "private" if address.is_private else "not public"
