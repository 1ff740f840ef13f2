"""The local store's signed-URL route (api/http.py): a malformed `expires` or
`signature` is 400, a signature that is not ours or an expired link is 403, never 500."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from imagegen.api.http import build_http_app, start_http_server
from imagegen.services.blob_files import MalformedSignedUrl, parse_signed_query
from imagegen.storage.local import LocalBlobStore

PNG = b"\x89PNG\r\n\x1a\n" + b"fake image body" * 10


@contextlib.asynccontextmanager
async def local_blob_server(
    tmp_path: Path, clock: Callable[[], float]
) -> AsyncIterator[LocalBlobStore]:
    store = LocalBlobStore(tmp_path / "b", "", b"k" * 32, clock=clock)
    runner, port = await start_http_server(
        build_http_app(local_store=store, metrics_text=lambda: (b"", "text/plain")),
        "127.0.0.1",
        0,
    )
    store.public_url = f"http://127.0.0.1:{port}"
    try:
        yield store
    finally:
        await runner.cleanup()


GOOD_SIGNATURE = "0" * 64
MALFORMED_QUERIES = {
    "expires-superscript-two": {"expires": "\u00b2", "signature": GOOD_SIGNATURE},
    "expires-arabic-digits": {"expires": "\u0661\u0662\u0663", "signature": GOOD_SIGNATURE},
    "expires-negative": {"expires": "-5", "signature": GOOD_SIGNATURE},
    "expires-plus": {"expires": "+5", "signature": GOOD_SIGNATURE},
    "expires-huge": {"expires": "9" * 400, "signature": GOOD_SIGNATURE},
    "expires-float": {"expires": "1.5", "signature": GOOD_SIGNATURE},
    "expires-spaces": {"expires": " 5 ", "signature": GOOD_SIGNATURE},
    "expires-empty": {"expires": "", "signature": GOOD_SIGNATURE},
    "expires-missing": {"signature": GOOD_SIGNATURE},
    "signature-missing": {"expires": "2000000"},
    "both-missing": {},
    "signature-short": {"expires": "2000000", "signature": "ab"},
    "signature-non-ascii": {"expires": "2000000", "signature": "\u00e9" * 64},
    "signature-uppercase": {"expires": "2000000", "signature": "A" * 64},
    "signature-long": {"expires": "2000000", "signature": "0" * 65},
}


@pytest.mark.parametrize("query", MALFORMED_QUERIES.values(), ids=MALFORMED_QUERIES.keys())
async def test_local_url_with_malformed_query_is_400(tmp_path: Path, query: dict[str, str]) -> None:
    async with local_blob_server(tmp_path, lambda: 1_000_000.0) as store:
        await store.put("generated/a/x.png", PNG, "image/png")
        async with httpx.AsyncClient(trust_env=False) as http:
            reply = await http.get(f"{store.public_url}/blobs/generated/a/x.png", params=query)
        assert reply.status_code == 400, reply.text
        assert reply.text.endswith("\n")


async def test_local_url_bad_signature_is_403_and_expired_is_403(tmp_path: Path) -> None:
    now = [1_000_000.0]
    async with local_blob_server(tmp_path, lambda: now[0]) as store:
        await store.put("generated/a/x.png", PNG, "image/png")
        url = await store.signed_url("generated/a/x.png", timedelta(seconds=10))
        base, query = url.split("?")
        params = dict(pair.split("=") for pair in query.split("&"))
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(url)).status_code == 200
            forged = {**params, "signature": "0" * 64}
            assert (await http.get(base, params=forged)).status_code == 403
            later = {**params, "expires": str(int(params["expires"]) + 1)}
            assert (await http.get(base, params=later)).status_code == 403
            other_key = f"{store.public_url}/blobs/generated/a/y.png"
            assert (await http.get(other_key, params=params)).status_code == 403
            odd_key = f"{store.public_url}/blobs/generated/%ED%A0%80%00/x.png"
            assert (await http.get(odd_key, params=params)).status_code == 403
            now[0] += 11
            expired = await http.get(url)
            assert expired.status_code == 403 and "expired" in expired.text


def test_signed_query_parsing() -> None:
    assert parse_signed_query("1700000000", "a" * 64) == (1_700_000_000, "a" * 64)
    assert parse_signed_query("0", "0" * 64) == (0, "0" * 64)
    for expires, signature in [
        ("\u00b2", "a" * 64),
        ("1\n", "a" * 64),
        (None, "a" * 64),
        ("1", None),
    ]:
        with pytest.raises(MalformedSignedUrl):
            parse_signed_query(expires, signature)
