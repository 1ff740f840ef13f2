"""The fetch guard. No test here sends a packet to anything but loopback, even if the
guard were broken: name lookup is stubbed and the connect step either records (and
refuses) or plays back a scripted reply."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpcore
import pytest

from imagegen.domain.errors import ImageTooLarge, InvalidRequest
from imagegen.providers.fetch_guard import (
    FetchLimits,
    GuardedFetcher,
    direct_connector,
    is_forbidden_address,
)

PUBLIC_IP = "93.184.216.34"


class ScriptedStream(httpcore.AsyncNetworkStream):
    """A connection that plays back canned reply bytes and records what was written.
    `stall` makes read() hang (for the deadline test)."""

    def __init__(self, chunks: list[bytes], *, stall: bool = False) -> None:
        self._chunks = list(chunks)
        self._stall = stall
        self.written = bytearray()
        self.tls_hostname: str | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._stall:
            await asyncio.sleep(3600)
        return self._chunks.pop(0) if self._chunks else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.written += buffer

    async def aclose(self) -> None:
        pass

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # Recorded so a test can see TLS is told the URL's host name, not the IP.
        self.tls_hostname = server_hostname
        return self

    def get_extra_info(self, info: str) -> Any:
        return None


class Recorder:
    """A connect step that records where it was asked to go and never connects,
    or hands out scripted streams (one per connection)."""

    def __init__(self, replies: list[list[bytes]] | None = None, *, stall: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.streams: list[ScriptedStream] = []
        self._replies = list(replies or [])
        self._stall = stall

    async def __call__(
        self, ip: str, port: int, timeout: float | None
    ) -> httpcore.AsyncNetworkStream:
        self.calls.append((ip, port))
        if not self._replies:
            raise httpcore.ConnectError("the recorder does not connect")
        stream = ScriptedStream(self._replies.pop(0), stall=self._stall)
        self.streams.append(stream)
        return stream


def resolver_for(table: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        return table.get(host, [PUBLIC_IP])

    return resolve


def fetcher(
    recorder: Recorder, table: dict[str, list[str]] | None = None, **limits: Any
) -> GuardedFetcher:
    return GuardedFetcher(
        FetchLimits(max_bytes=limits.pop("max_bytes", 1000), **limits),
        resolver=resolver_for(table or {}),
        connector=recorder,
    )


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "224.0.0.1",
        "2002:7f00:1::",
        "fd00:ec2::254",
        "::127.0.0.1",
        # NAT64: the well-known prefix and the local-use one carry an IPv4 address that a
        # translator connects to.
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::c0a8:101",
        "64:ff9b::",
        "64:ff9b:1::7f00:1",
        "64:ff9b:1::ac10:1",
        "64:ff9b:1::",
        # Local-use with the IPv4 address somewhere other than the last 32 bits: ambiguous.
        "64:ff9b:1:abcd::808:808",
        "64:ff9b:1:7f00:0:100::",
    ],
)
def test_forbidden_addresses(ip: str) -> None:
    assert is_forbidden_address(ip)


@pytest.mark.parametrize(
    "ip", [PUBLIC_IP, "2606:4700::1", "8.8.8.8", "64:ff9b::808:808", "64:ff9b:1::5db8:d822"]
)
def test_public_addresses(ip: str) -> None:
    assert not is_forbidden_address(ip)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.0.0.1/",
        "http://100.64.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://[64:ff9b:1::a9fe:a9fe]/latest/meta-data/",
    ],
)
async def test_literal_private_addresses_are_refused_before_connecting(url: str) -> None:
    recorder = Recorder()
    with pytest.raises(InvalidRequest):
        await fetcher(recorder).fetch(url)
    assert recorder.calls == []


@pytest.mark.parametrize(
    "addresses",
    [
        ["10.1.2.3"],
        ["169.254.169.254"],
        [PUBLIC_IP, "192.168.0.10"],
        ["fd00::5"],
        ["64:ff9b::a9fe:a9fe"],
        ["64:ff9b:1::7f00:1"],
    ],
)
async def test_names_resolving_to_private_addresses_are_refused(addresses: list[str]) -> None:
    recorder = Recorder()
    guard = fetcher(recorder, {"images.example.com": addresses})
    with pytest.raises(InvalidRequest) as caught:
        await guard.fetch("https://images.example.com/cat.png?token=secret")
    assert recorder.calls == []
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        "http://user:pw@example.com/x.png",
        "gopher://x/",
        "not a url",
    ],
)
async def test_other_schemes_and_credentials_are_refused(url: str) -> None:
    recorder = Recorder()
    with pytest.raises(InvalidRequest):
        await fetcher(recorder).fetch(url)
    assert recorder.calls == []


async def test_a_loopback_listener_sees_no_connection() -> None:
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        guard = GuardedFetcher(FetchLimits(max_bytes=1000))  # real resolver and connector
        for url in (
            f"http://127.0.0.1:{port}/",
            f"http://localhost:{port}/",
            f"http://[::ffff:127.0.0.1]:{port}/",
            f"http://2130706433:{port}/",
        ):
            with pytest.raises(InvalidRequest):
                await guard.fetch(url)
        await guard.aclose()
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 0


async def test_a_redirect_to_a_private_address_is_refused() -> None:
    redirect = (
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1/admin\r\nContent-Length: 0\r\n\r\n"
    )
    recorder = Recorder([[redirect]])
    with pytest.raises(InvalidRequest):
        await fetcher(recorder).fetch("http://images.example.com/x.png")
    assert recorder.calls == [(PUBLIC_IP, 80)], "only the first, public hop connected"


async def test_too_many_redirects() -> None:
    hop = b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n\r\n"
    recorder = Recorder([[hop] for _ in range(5)])
    with pytest.raises(InvalidRequest) as caught:
        await fetcher(recorder, max_redirects=2).fetch("http://images.example.com/x")
    assert "redirects" in caught.value.message


async def test_oversized_bodies_are_refused_whatever_the_headers_say() -> None:
    declared = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"200\r\n" + b"y" * 0x200 + b"\r\n" for _ in range(4))
        + b"0\r\n\r\n"
    )
    for reply in (declared, chunked):
        recorder = Recorder([[reply]])
        with pytest.raises(ImageTooLarge):
            await fetcher(recorder, max_bytes=1000).fetch("http://images.example.com/big.png")


async def test_a_content_length_that_understates_never_yields_more_than_declared() -> None:
    # The server claims 10 bytes and sends 5000: only the declared 10 are ever read.
    lying = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"z" * 5000
    recorder = Recorder([[lying]])
    body = await fetcher(recorder, max_bytes=1000).fetch("http://images.example.com/x.png")
    assert body.data == b"z" * 10


async def test_allowlisted_loopback_host_is_fetched() -> None:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 4\r\n\r\nPNG!")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        guard = GuardedFetcher(
            FetchLimits(max_bytes=100, allow_hosts=frozenset({"127.0.0.1"})),
            connector=direct_connector,
        )
        body = await guard.fetch(f"http://127.0.0.1:{port}/img.png")
        await guard.aclose()
    finally:
        server.close()
        await server.wait_closed()
    assert body.data == b"PNG!" and body.content_type == "image/png"


async def test_a_public_fetch_follows_a_redirect_and_reports_the_final_url() -> None:
    hop = b"HTTP/1.1 302 Found\r\nLocation: https://cdn.example.net/b.png?sig=1\r\n\r\n"
    done = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 3\r\n\r\nabc"
    recorder = Recorder([[hop], [done]])
    guard = fetcher(recorder, {"cdn.example.net": ["2606:4700::1"]})
    body = await guard.fetch("http://images.example.com/a.png?token=secret")
    assert body.data == b"abc" and body.content_type == "image/png"
    assert body.final_url == "https://cdn.example.net/b.png", "no query string is echoed"
    assert recorder.calls == [(PUBLIC_IP, 80), ("2606:4700::1", 443)]
    first, second = recorder.streams
    assert b"Host: images.example.com" in first.written
    assert b"Accept-Encoding: identity" in first.written
    # TLS verifies the URL's host name, not the vetted IP the socket went to.
    assert second.tls_hostname == "cdn.example.net"


async def test_an_error_status_is_refused_without_echoing_the_query() -> None:
    recorder = Recorder([[b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]])
    with pytest.raises(InvalidRequest) as caught:
        await fetcher(recorder).fetch("http://images.example.com/gone.png?token=secret")
    assert "HTTP 404" in caught.value.message
    assert "secret" not in caught.value.message
    assert caught.value.field == "sources"


async def test_a_stalled_server_times_out() -> None:
    recorder = Recorder([[b""]], stall=True)
    with pytest.raises(InvalidRequest) as caught:
        await fetcher(recorder, timeout=0.2).fetch("http://images.example.com/slow.png")
    assert "timed out" in caught.value.message


async def test_a_compressed_body_is_refused() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"
    with pytest.raises(InvalidRequest):
        await fetcher(Recorder([[reply]])).fetch("http://images.example.com/x.png")


async def test_an_allowlisted_name_may_resolve_to_a_private_address() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    recorder = Recorder([[ok]])
    guard = fetcher(
        recorder,
        {"forge.internal": ["10.0.0.7"]},
        allow_hosts=frozenset({"forge.internal"}),
    )
    assert (await guard.fetch("http://forge.internal:7860/out.png")).data == b"ok"
    assert recorder.calls == [("10.0.0.7", 7860)]


async def test_a_name_behind_dns64_with_a_public_ipv4_is_fetched() -> None:
    # DNS64 gives an IPv4-only public host a NAT64 address; the embedded IPv4 is public.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    recorder = Recorder([[ok]])
    guard = fetcher(recorder, {"v4only.example.com": ["64:ff9b::5db8:d822"]})
    assert (await guard.fetch("http://v4only.example.com/x.png")).data == b"ok"
    assert recorder.calls == [("64:ff9b::5db8:d822", 80)]


async def test_each_vetted_address_is_tried_in_turn() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    calls: list[str] = []

    async def connect(ip: str, port: int, timeout: float | None) -> httpcore.AsyncNetworkStream:
        calls.append(ip)
        if ip == PUBLIC_IP:
            raise OSError("unreachable")
        return ScriptedStream([ok])

    guard = GuardedFetcher(
        FetchLimits(max_bytes=100),
        resolver=resolver_for({"images.example.com": [PUBLIC_IP, "8.8.8.8"]}),
        connector=connect,
    )
    assert (await guard.fetch("http://images.example.com/x")).data == b"ok"
    assert calls == [PUBLIC_IP, "8.8.8.8"]
