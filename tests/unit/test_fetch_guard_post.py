"""The fetch guard's webhook side: `check_destination` at submit and `post` at delivery.
As in test_fetch_guard.py, name lookup is stubbed and the connect step records (and
refuses) or plays back a scripted reply: nothing is sent anywhere."""

from __future__ import annotations

import pytest

from imagegen.domain.errors import InvalidRequest
from tests.unit.test_fetch_guard import PUBLIC_IP, Recorder, fetcher

HOOK = "https://hooks.example.com/in?token=s3cr3t"


def reply(status: str, body: bytes = b"", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://0x7f000001/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/",
        "https://[fd00::1]/",
    ],
)
async def test_literal_private_destinations_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await fetcher(Recorder()).check_destination(url, field="callback_uri")
    assert caught.value.field == "callback_uri"


@pytest.mark.parametrize("addresses", [["10.1.2.3"], [PUBLIC_IP, "127.0.0.1"], []])
async def test_names_resolving_to_private_addresses_or_nothing_are_refused(
    addresses: list[str],
) -> None:
    guard = fetcher(Recorder(), {"hooks.example.com": addresses})
    with pytest.raises(InvalidRequest) as caught:
        await guard.check_destination(HOOK, field="callback_uri")
    assert "s3cr3t" not in caught.value.message


async def test_a_public_destination_and_an_allowlisted_one_pass() -> None:
    recorder = Recorder()
    await fetcher(recorder).check_destination(HOOK, field="callback_uri")
    allowed = fetcher(recorder, allow_hosts=frozenset({"127.0.0.1"}))
    await allowed.check_destination("http://127.0.0.1:8080/hook", field="callback_uri")
    assert recorder.calls == []  # checking never connects


async def test_a_post_sends_the_body_and_headers_and_reads_the_status() -> None:
    recorder = Recorder([[reply("204 No Content")]])
    result = await fetcher(recorder).post(HOOK, b'{"a":1}', {"webhook-id": "msg_1"})
    assert (result.status, result.error) == (204, "")
    (stream,) = recorder.streams
    sent = bytes(stream.written)
    assert sent.startswith(b"POST /in?token=s3cr3t HTTP/1.1\r\n")
    assert b"webhook-id: msg_1\r\n" in sent and sent.endswith(b'{"a":1}')
    assert stream.tls_hostname == "hooks.example.com"


async def test_a_redirect_is_a_failure_and_is_not_followed() -> None:
    recorder = Recorder([[reply("307 Temporary Redirect", headers="Location: /else\r\n")]])
    result = await fetcher(recorder).post(HOOK, b"{}", {})
    assert result.status == 307 and "redirect" in result.error
    assert len(recorder.calls) == 1


async def test_an_error_status_is_a_failure_without_the_query_string() -> None:
    recorder = Recorder([[reply("500 Internal Server Error", b"boom")]])
    result = await fetcher(recorder).post(HOOK, b"{}", {})
    assert result.status == 500 and "500" in result.error
    assert "s3cr3t" not in result.error


async def test_only_the_first_bytes_of_a_huge_answer_are_read() -> None:
    body = b"x" * 10_000
    recorder = Recorder([[reply("200 OK", body)[:200], body[150:], body]])
    result = await fetcher(recorder, max_bytes=100).post(HOOK, b"{}", {})
    assert result.status == 200 and result.error == ""


async def test_a_destination_that_now_resolves_privately_is_refused_at_connect() -> None:
    recorder = Recorder([[reply("200 OK")]])
    guard = fetcher(recorder, {"hooks.example.com": ["10.0.0.7"]})
    result = await guard.post(HOOK, b"{}", {})
    assert result.status == 0 and "refused" in result.error
    assert recorder.calls == []


async def test_no_answer_in_time_is_a_failure() -> None:
    recorder = Recorder([[reply("200 OK")]], stall=True)
    result = await fetcher(recorder, timeout=0.2).post(HOOK, b"{}", {})
    assert result.status == 0 and "0.2" in result.error


async def test_a_dead_receiver_is_a_failure() -> None:
    result = await fetcher(Recorder()).post(HOOK, b"{}", {})
    assert result.status == 0 and "failed" in result.error


@pytest.mark.parametrize(
    ("addresses", "allowed"),
    [
        ([PUBLIC_IP], True),
        (["10.1.2.3"], False),
        ([PUBLIC_IP, "127.0.0.1"], False),
        (["::ffff:169.254.169.254"], False),
        (["2002:7f00:1::"], False),  # 6to4 around 127.0.0.1
        (["64:ff9b::5db8:d822"], True),  # NAT64 around the public address
        ([], False),
    ],
)
async def test_the_check_at_submit_and_the_connect_step_agree(
    addresses: list[str], allowed: bool
) -> None:
    # One vetting serves both steps: a destination the up-front check lets through is one
    # the connect step would reach, and one it refuses is never connected to.
    recorder = Recorder([[reply("204 No Content")]])
    guard = fetcher(recorder, {"hooks.example.com": addresses})
    refused_up_front = False
    try:
        await guard.check_destination(HOOK, field="callback_uri")
    except InvalidRequest:
        refused_up_front = True
    result = await guard.post(HOOK, b"{}", {})
    assert refused_up_front is not allowed
    assert (result.status == 204) is allowed, result.error
    assert bool(recorder.calls) is allowed
