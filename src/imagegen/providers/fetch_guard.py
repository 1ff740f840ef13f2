"""The one guard for every server-side URL fetch (caller-given sources and URLs that
providers return) and every webhook POST.

Only http(s); the address is checked at connect time, on the address actually
connected, so DNS rebinding and redirects cannot reach loopback, private, link-local,
CGNAT, unique-local or metadata addresses; every redirect is followed by hand and
checked again; the body is capped while it streams, whatever Content-Length says; the
whole fetch has a deadline. A configured allowlist of hosts (empty by default) lets
trusted internal hosts through.

A webhook POST (`post`) goes through the same connect-time check, follows no redirect
(one is a failed attempt), reads at most `max_bytes` of the answer and never raises for
the receiver's failures: it says what happened. `check_destination` refuses a URL up
front (at submit) the way the connect step would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from imagegen.domain.errors import ImageTooLarge, InvalidRequest
from imagegen.domain.models import FetchedBody

Resolver = Callable[[str, int], Awaitable[list[str]]]
Connector = Callable[[str, int, float | None], Awaitable[httpcore.AsyncNetworkStream]]

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
#: NAT64 prefixes (RFC 6052, RFC 8215): a translator turns these into IPv4 connections.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
_REDIRECTS = {301, 302, 303, 307, 308}
#: What a field's URL is called in messages.
_WHAT = {"sources": "source URL", "callback_uri": "callback URL"}


@dataclass(frozen=True)
class FetchLimits:
    """Caps of one fetch."""

    max_bytes: int
    timeout: float = 15.0
    max_redirects: int = 3
    allow_hosts: frozenset[str] = field(default_factory=frozenset)


def _nat64_embedded(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64 translator would connect to; 0.0.0.0 (always forbidden)
    where its place cannot be known."""
    if address in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64_LOCAL_USE:
        # Inside the local-use /48 the operator picks the layout (RFC 6052 allows prefixes
        # of 48 to 96 bits, each putting the IPv4 address elsewhere). With bits 48-95 zero
        # only the /96 layout names a routable IPv4 address (every other layout reads as
        # 0.0.0.0/8), so the last 32 bits are judged; any other address is ambiguous and
        # refused (a trusted host behind such a translator goes in the allowlist).
        if (int(address) >> 32) & ((1 << 48) - 1):
            return ipaddress.IPv4Address(0)
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_forbidden_address(ip: str) -> bool:
    """True for every address that is not plainly public: loopback, private, link-local,
    CGNAT, unique-local, multicast, reserved, unspecified, metadata, and IPv6 forms
    that embed such an IPv4 address (mapped, compatible, 6to4, Teredo, NAT64)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return True
    if address in _METADATA:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or _nat64_embedded(address)
        if address.teredo:
            embedded = address.teredo[1]
        if embedded is None and int(address) >> 32 == 0 and int(address) > 1:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # IPv4-compatible
        if embedded is not None:
            return is_forbidden_address(str(embedded))
    return not address.is_global or address.is_multicast


def is_allowlisted(host: str, allow_hosts: frozenset[str]) -> bool:
    """Whether the allowlist names this host (by name, or by its literal address)."""
    literal = literal_address(host)
    return host.lower().strip("[]") in allow_hosts or (
        literal is not None and literal in allow_hosts
    )


def literal_address(host: str) -> str | None:
    """The IP a host names literally, in any spelling inet_aton accepts (0x7f000001,
    2130706433, 0177.0.0.1, 127.1) or as IPv6; None for a name to resolve."""
    bare = host.strip("[]")
    try:
        return str(ipaddress.ip_address(bare.split("%", 1)[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(bare))
    except OSError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolves `host` to."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def direct_connector(
    ip: str,
    port: int,
    timeout: float | None,  # noqa: ASYNC109 - httpcore's connect signature
) -> httpcore.AsyncNetworkStream:
    """Open a TCP connection to an already vetted address."""
    return await httpcore.AnyIOBackend().connect_tcp(ip, port, timeout=timeout)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, vets every address, then connects to a vetted one. TLS still checks the
    certificate against the URL's host name (httpcore passes it to start_tls)."""

    def __init__(self, limits: FetchLimits, resolver: Resolver, connector: Connector) -> None:
        self._limits = limits
        self._resolver = resolver
        self._connector = connector

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _vetted_addresses(
            host,
            port,
            allowlisted=is_allowlisted(host, self._limits.allow_hosts),
            resolver=self._resolver,
        )
        # Every address is vetted already; try them in order so one dead address of a
        # multi-homed name does not fail the fetch (the last error is the one reported).
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._connector(address, port, timeout)
            except (OSError, httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _Refused("unix sockets are never fetched")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Refused(httpcore.ConnectError):
    """The guard refused to connect (raised inside httpcore, caught by the fetcher)."""


class _Unresolved(_Refused):
    """The host name resolves to no address."""


class _Forbidden(_Refused):
    """The host is, or resolves to, an address that is not plainly public."""


async def _vetted_addresses(
    host: str, port: int, *, allowlisted: bool, resolver: Resolver
) -> list[str]:
    """The addresses `host` may be reached at, in order and without repeats: its literal
    address, or every address it resolves to. Unless `allowlisted`, all of them must be
    plainly public (`is_forbidden_address`), or none is used. The one vetting both the
    connect step and the up-front check use, so they cannot drift apart. Raises
    _Unresolved or _Forbidden (the resolver's own errors pass through)."""
    literal = literal_address(host)
    addresses = [literal] if literal else await resolver(host, port)
    if not addresses:
        raise _Unresolved(f"{host} does not resolve")
    if not allowlisted and any(is_forbidden_address(a) for a in addresses):
        raise _Forbidden(f"{host} is a private, loopback, link-local or metadata address")
    return list(dict.fromkeys(addresses))


def _shown(url: httpx.URL) -> str:
    # Query strings and fragments may carry tokens: never echo them. netloc holds
    # host[:port] only (userinfo is refused before any fetch anyway).
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (its response and error mapping) over a pool whose network
    backend is the guard. httpx has no public hook for the connect step, so the pool the
    base class built is swapped for one that takes `network_backend`."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        super().__init__(retries=0)
        self._pool = httpcore.AsyncConnectionPool(
            # The same CA bundle (certifi) a plain httpx client trusts.
            ssl_context=httpx.create_ssl_context(),
            max_connections=20,
            max_keepalive_connections=10,
            retries=0,
            network_backend=backend,
        )


@dataclass(frozen=True)
class PostReply:
    """What a guarded POST came to: the receiver's HTTP status (0 when no answer came)
    and, when it was not a 2xx answer, why, for people (never the URL's query string)."""

    status: int
    error: str = ""


class GuardedFetcher:
    """Fetches URLs (and POSTs webhooks) under the guard; see the module docstring."""

    def __init__(
        self,
        limits: FetchLimits,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
    ) -> None:
        self._limits = limits
        self._resolver = resolver or system_resolver
        backend = _GuardedBackend(limits, self._resolver, connector or direct_connector)
        # trust_env=False: no proxy from the environment could route around the guard.
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(backend),
            trust_env=False,
            follow_redirects=False,
            timeout=limits.timeout,
            # The body is read raw (never inflated, so no decompression bomb); asking for
            # identity keeps servers from sending a compressed image we could not use.
            headers={"Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def fetch(self, url: str) -> FetchedBody:
        """The body at `url`; IMG_003 when refused or failing, IMG_007 past the byte cap."""
        try:
            async with asyncio.timeout(self._limits.timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise InvalidRequest(
                f"fetching the source URL timed out after {self._limits.timeout:g}s",
                field="sources",
            ) from None

    async def _fetch(self, url: str) -> FetchedBody:
        current = self._checked(url)
        for _ in range(self._limits.max_redirects + 1):
            try:
                async with self._client.stream("GET", current) as reply:
                    if reply.status_code in _REDIRECTS:
                        location = reply.headers.get("location")
                        if not location:
                            raise InvalidRequest("a redirect without a Location", field="sources")
                        current = self._checked(str(current.join(location)))
                        continue
                    if not 200 <= reply.status_code < 300:
                        raise InvalidRequest(
                            f"the source URL {_shown(current)} answered HTTP {reply.status_code}",
                            field="sources",
                        )
                    encoding = reply.headers.get("content-encoding", "identity").lower()
                    if encoding not in ("", "identity"):
                        raise InvalidRequest(
                            f"{_shown(current)} sent a {encoding}-encoded body", field="sources"
                        )
                    data = await self._read_capped(reply)
                    return FetchedBody(data, _shown(current), reply.headers.get("content-type", ""))
            except _Refused as exc:
                raise InvalidRequest(
                    f"refused to fetch {_shown(current)}: {exc}", field="sources"
                ) from None
            except httpx.TimeoutException:
                raise InvalidRequest(
                    f"fetching {_shown(current)} timed out", field="sources"
                ) from None
            except httpx.TransportError as exc:
                if isinstance(exc.__cause__, _Refused) or isinstance(exc.__context__, _Refused):
                    raise InvalidRequest(
                        f"refused to fetch {_shown(current)}: {exc.__cause__ or exc.__context__}",
                        field="sources",
                    ) from None
                raise InvalidRequest(
                    f"fetching {_shown(current)} failed ({type(exc).__name__})", field="sources"
                ) from None
        raise InvalidRequest(f"more than {self._limits.max_redirects} redirects", field="sources")

    async def check_destination(self, url: str, *, field: str) -> None:
        """Refuse up front (IMG_003 naming `field`) a URL that the connect step would
        refuse now: not http(s), with credentials, or whose host is (or resolves to) a
        private, loopback, link-local or metadata address and is not allowlisted. Every
        later request is checked again when it connects (a name may resolve elsewhere)."""
        parsed = self._checked(url, field=field)
        host = parsed.host
        if is_allowlisted(host, self._limits.allow_hosts):
            # Judged when it connects; an allowlisted name need not resolve yet.
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self._limits.timeout):
                await _vetted_addresses(host, port, allowlisted=False, resolver=self._resolver)
        except (OSError, TimeoutError, _Unresolved):
            raise InvalidRequest(f"{field}: {host} does not resolve", field=field) from None
        except _Forbidden as exc:
            raise InvalidRequest(
                f"{field}: {exc} (a deployment may allow a host with IMAGEGEN_FETCH_ALLOW_HOSTS)",
                field=field,
            ) from None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PostReply:
        """POST `body` once, within the deadline; redirects are not followed, at most
        `max_bytes` of the answer are read. Never raises for the receiver's failures."""
        try:
            current = self._checked(url, field="callback_uri")
        except InvalidRequest as exc:
            return PostReply(0, exc.message)
        try:
            async with asyncio.timeout(self._limits.timeout):
                return await self._post(current, body, headers)
        except TimeoutError:
            return PostReply(0, f"no answer within {self._limits.timeout:g}s")

    async def _post(self, url: httpx.URL, body: bytes, headers: Mapping[str, str]) -> PostReply:
        try:
            async with self._client.stream("POST", url, content=body, headers=headers) as reply:
                await self._read_some(reply)
                status = reply.status_code
        except httpx.TimeoutException:
            return PostReply(0, f"{_shown(url)} timed out")
        except httpx.TransportError as exc:
            refused = next(
                (e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, _Refused)),
                None,
            )
            if refused is not None:
                return PostReply(0, f"refused to connect to {_shown(url)}: {refused}")
            return PostReply(0, f"sending to {_shown(url)} failed ({type(exc).__name__})")
        if 300 <= status < 400:
            return PostReply(
                status, f"answered HTTP {status} (a redirect): redirects are not followed"
            )
        if not 200 <= status < 300:
            return PostReply(status, f"answered HTTP {status}")
        return PostReply(status)

    async def _read_some(self, reply: httpx.Response) -> None:
        """Read the answer's body up to the cap, and no further: only its status counts,
        and leaving the stream early closes the connection."""
        read = 0
        async for chunk in reply.aiter_raw():
            read += len(chunk)
            if read >= self._limits.max_bytes:
                return

    def _checked(self, url: str, *, field: str = "sources") -> httpx.URL:
        what = _WHAT.get(field, "URL")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise InvalidRequest(f"the {what} is not a valid URL", field=field) from None
        if parsed.scheme not in ("http", "https"):
            raise InvalidRequest("only http and https URLs can be fetched", field=field)
        if parsed.userinfo:
            raise InvalidRequest("URLs with credentials are not fetched", field=field)
        if not parsed.host:
            raise InvalidRequest(f"the {what} has no host", field=field)
        return parsed

    async def _read_capped(self, reply: httpx.Response) -> bytes:
        declared = reply.headers.get("content-length", "")
        cap = self._limits.max_bytes
        if declared.isdigit() and int(declared) > cap:
            raise ImageTooLarge(
                f"the source is {declared} bytes; the limit is {cap}", metadata={"limit": str(cap)}
            )
        body = bytearray()
        # Raw bytes: a Content-Encoding is never inflated, so it cannot hide a bomb.
        async for chunk in reply.aiter_raw():
            body += chunk
            if len(body) > cap:
                raise ImageTooLarge(
                    f"the source is over the limit of {cap} bytes", metadata={"limit": str(cap)}
                )
        return bytes(body)
