"""Bearer-token verification, minting and the development key (no network, no server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from imagegen.config import ConfigError, JwtSettings
from imagegen.domain.errors import Unauthenticated
from imagegen.domain.models import Identity
from imagegen.identity import (
    DEV_KEY_FILE,
    TokenVerifier,
    load_or_create_dev_key,
    mint_token,
    resolve_jwt_key,
)
from tests.subjects import SUBJECTS

KEY = "k" * 40
OTHER_KEY = "o" * 40


def verifier(**overrides: object) -> TokenVerifier:
    options: dict[str, object] = {
        "key": KEY,
        "algorithms": ["HS256"],
        "issuer": None,
        "audience": None,
    }
    options.update(overrides)
    return TokenVerifier(**options)  # type: ignore[arg-type]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_valid_token_gives_identity() -> None:
    token = mint_token(KEY, user_id="alice", plan="pro", sub_account="team-1")
    assert verifier().verify(token) == Identity("alice", "team-1", "pro")


def test_defaults_for_optional_claims() -> None:
    # A token from another issuer may carry only the required claims.
    token = jwt.encode(
        {"sub": "bob", "exp": datetime.now(UTC) + timedelta(minutes=5)}, KEY, algorithm="HS256"
    )
    assert verifier().verify(token) == Identity("bob", "", "free")


def test_token_without_exp_is_refused() -> None:
    token = jwt.encode({"sub": "alice", "plan": "free"}, KEY, algorithm="HS256")
    with pytest.raises(Unauthenticated, match="exp"):
        verifier().verify(token)


def test_token_without_sub_is_refused() -> None:
    token = jwt.encode({"exp": datetime.now(UTC) + timedelta(minutes=5)}, KEY, algorithm="HS256")
    with pytest.raises(Unauthenticated, match="sub"):
        verifier().verify(token)


def test_expired_token_is_refused_with_advice() -> None:
    token = mint_token(
        KEY,
        user_id="alice",
        lifetime=timedelta(minutes=1),
        now=datetime.now(UTC) - timedelta(hours=1),
    )
    with pytest.raises(Unauthenticated, match="expired") as caught:
        verifier().verify(token)
    assert "imagegen token" in caught.value.message
    assert token not in caught.value.message


def test_leeway_tolerates_small_clock_skew() -> None:
    token = mint_token(
        KEY,
        user_id="alice",
        lifetime=timedelta(minutes=1),
        now=datetime.now(UTC) - timedelta(seconds=62),
    )
    assert verifier(leeway=5).verify(token).user_id == "alice"


def test_wrong_signature_is_refused() -> None:
    token = mint_token(OTHER_KEY, user_id="alice")
    with pytest.raises(Unauthenticated, match="signature") as caught:
        verifier().verify(token)
    assert token not in caught.value.message


def test_tampered_payload_is_refused() -> None:
    header, _payload, signature = mint_token(KEY, user_id="alice").split(".")
    forged = b64url(json.dumps({"sub": "admin", "exp": 4_000_000_000}).encode())
    with pytest.raises(Unauthenticated):
        verifier().verify(f"{header}.{forged}.{signature}")


def test_alg_none_token_is_refused() -> None:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(
        json.dumps({"sub": "alice", "plan": "enterprise", "exp": 4_000_000_000}).encode()
    )
    token = f"{header}.{payload}."
    with pytest.raises(Unauthenticated, match="algorithm"):
        verifier().verify(token)


def test_hs256_token_refused_where_rs256_is_expected() -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    rs_verifier = TokenVerifier(public_pem, ["RS256"], None, None)
    # The classic confusion attack: HMAC-sign with the server's public key as the secret.
    forged = jwt.api_jws.PyJWS().encode(
        json.dumps({"sub": "alice", "exp": 4_000_000_000}).encode(),
        b"x" * 32,
        algorithm="HS256",
    )
    with pytest.raises(Unauthenticated, match="algorithm"):
        rs_verifier.verify(forged)
    # ...while a real RS256 token verifies.
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    good = mint_token(private_pem, user_id="alice", algorithm="RS256")
    assert rs_verifier.verify(good).user_id == "alice"


def test_issuer_checked_when_configured() -> None:
    checked = verifier(issuer="https://auth.example")
    assert (
        checked.verify(mint_token(KEY, user_id="a", issuer="https://auth.example")).user_id == "a"
    )
    with pytest.raises(Unauthenticated, match="issuer"):
        checked.verify(mint_token(KEY, user_id="a", issuer="https://evil.example"))
    with pytest.raises(Unauthenticated, match="iss"):
        checked.verify(mint_token(KEY, user_id="a"))


def test_audience_checked_when_configured() -> None:
    checked = verifier(audience="imagegen")
    assert checked.verify(mint_token(KEY, user_id="a", audience="imagegen")).user_id == "a"
    with pytest.raises(Unauthenticated, match="audience"):
        checked.verify(mint_token(KEY, user_id="a", audience="billing"))
    with pytest.raises(Unauthenticated, match="aud"):
        checked.verify(mint_token(KEY, user_id="a"))


def test_issuer_and_audience_ignored_when_not_configured() -> None:
    token = mint_token(KEY, user_id="a", issuer="anyone", audience="anything")
    assert verifier().verify(token).user_id == "a"


def test_unknown_plan_is_refused() -> None:
    token = jwt.encode(
        {"sub": "alice", "plan": "platinum", "exp": datetime.now(UTC) + timedelta(minutes=5)},
        KEY,
        algorithm="HS256",
    )
    with pytest.raises(Unauthenticated, match="plan"):
        verifier().verify(token)


@pytest.mark.parametrize("sub", ["", "x" * 256, "山" * 256])
def test_user_id_length_is_checked(sub: str) -> None:
    token = jwt.encode(
        {"sub": sub, "exp": datetime.now(UTC) + timedelta(minutes=5)}, KEY, algorithm="HS256"
    )
    with pytest.raises(Unauthenticated, match="1 to 255 characters"):
        verifier().verify(token)


@pytest.mark.parametrize("sub", [*SUBJECTS, " ", "tab\there\r\n"])
def test_any_subject_an_identity_provider_issues_is_accepted(sub: str) -> None:
    token = jwt.encode(
        {"sub": sub, "exp": datetime.now(UTC) + timedelta(minutes=5)}, KEY, algorithm="HS256"
    )
    assert verifier().verify(token).user_id == sub
    assert verifier().verify(mint_token(KEY, user_id=sub, sub_account=sub)) == Identity(
        sub, sub, "free"
    )


def _token_with_raw_payload(payload: str) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(payload.encode())
    signing_input = f"{header}.{body}".encode()
    signature = b64url(hmac.new(KEY.encode(), signing_input, hashlib.sha256).digest())
    return f"{header}.{body}.{signature}"


@pytest.mark.parametrize(
    ("claim", "escaped"),
    [("sub", "a\\u0000b"), ("sub", "a\\ud800b"), ("sub_account", "t\\u0000")],
)
def test_text_postgresql_cannot_hold_is_refused(claim: str, escaped: str) -> None:
    # JSON escapes decode to a NUL or a lone surrogate: PostgreSQL's text refuses both, so
    # the token is refused here, saying why, instead of failing later as INTERNAL.
    exp = int((datetime.now(UTC) + timedelta(minutes=5)).timestamp())
    sub = "alice" if claim != "sub" else escaped
    extra = f', "{claim}": "{escaped}"' if claim != "sub" else ""
    token = _token_with_raw_payload(f'{{"sub": "{sub}", "exp": {exp}{extra}}}')
    with pytest.raises(Unauthenticated, match=f"`{claim}` holds a NUL"):
        verifier().verify(token)
    with pytest.raises(ValueError, match="NUL"):
        mint_token(KEY, user_id="a\x00b")


@pytest.mark.parametrize("garbage", ["", "not-a-jwt", "a.b.c", "x" * 10_000])
def test_garbage_is_refused(garbage: str) -> None:
    with pytest.raises(Unauthenticated):
        verifier().verify(garbage)


def test_short_hmac_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenVerifier("short-secret", ["HS256"], None, None)
    with pytest.raises(ValueError, match="32 bytes"):
        mint_token("short-secret", user_id="alice")


@pytest.mark.parametrize("algorithms", [[], ["none"], ["HS257"], ["HS256", "RS256"]])
def test_bad_algorithm_configuration_is_rejected(algorithms: list[str]) -> None:
    with pytest.raises(ValueError):
        TokenVerifier(KEY, algorithms, None, None)


def test_mint_refuses_unknown_plan() -> None:
    with pytest.raises(ValueError, match="plan"):
        mint_token(KEY, user_id="alice", plan="platinum")


def test_minted_token_lifetime_defaults_to_24_hours() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    token = mint_token(KEY, user_id="alice", now=now)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 24 * 3600
    assert claims["plan"] == "free"


def test_dev_key_created_once_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    key = load_or_create_dev_key(data_dir)
    path = data_dir / DEV_KEY_FILE
    assert len(key) == 64
    int(key, 16)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_dev_key(data_dir) == key
    # No temporary files are left behind.
    assert [p.name for p in data_dir.iterdir()] == [DEV_KEY_FILE]
    # The dev key is usable as an HMAC secret end to end.
    assert (
        TokenVerifier(key, ["HS256"], None, None).verify(mint_token(key, user_id="u")).user_id
        == "u"
    )


def test_dev_key_permissions_are_tightened(tmp_path: Path) -> None:
    key = load_or_create_dev_key(tmp_path)
    (tmp_path / DEV_KEY_FILE).chmod(0o644)
    assert load_or_create_dev_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / DEV_KEY_FILE).stat().st_mode) == 0o600


def test_corrupt_dev_key_is_reported(tmp_path: Path) -> None:
    (tmp_path / DEV_KEY_FILE).write_text("oops")
    with pytest.raises(ConfigError, match="delete it"):
        load_or_create_dev_key(tmp_path)


def test_resolve_jwt_key_prefers_configuration(tmp_path: Path) -> None:
    configured = JwtSettings(key=KEY, algorithms=("HS256",), issuer=None, audience=None)
    assert resolve_jwt_key(configured, tmp_path) == KEY
    assert not (tmp_path / DEV_KEY_FILE).exists()
    default = JwtSettings(key=None, algorithms=("HS256",), issuer=None, audience=None)
    assert resolve_jwt_key(default, tmp_path) == load_or_create_dev_key(tmp_path)


def test_resolve_jwt_key_needs_a_key_for_public_key_algorithms(tmp_path: Path) -> None:
    settings = JwtSettings(key=None, algorithms=("RS256",), issuer=None, audience=None)
    with pytest.raises(ConfigError, match="IMAGEGEN_JWT_KEY"):
        resolve_jwt_key(settings, tmp_path)


# --- the cache of verified tokens ------------------------------------------------------


class SharedClock:
    """One clock for the verifier's cache and for PyJWT's own expiry check, so a test
    can let time pass for both."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.now = now
        clock = self

        class _Datetime(datetime):
            @classmethod
            def now(cls, tz: tzinfo | None = None) -> _Datetime:  # type: ignore[override]
                return cls.fromtimestamp(clock.now, tz)

        monkeypatch.setattr(jwt.api_jwt, "datetime", _Datetime)

    def __call__(self) -> float:
        return self.now


class DecodeCounter:
    """Counts PyJWT decodes, i.e. verifications the cache did not answer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting)


def test_a_verified_token_is_remembered_by_its_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = DecodeCounter(monkeypatch)
    checked = verifier()
    token = mint_token(KEY, user_id="alice", plan="pro")
    for _ in range(5):
        assert checked.verify(token) == Identity("alice", "", "pro")
    assert decodes.calls == 1
    assert checked.cached_tokens == 1
    # Memory holds the token's digest, never the token.
    assert list(checked._verified) == [hashlib.sha256(token.encode()).digest()]


def test_an_expired_token_is_refused_even_if_it_was_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issued = datetime.now(UTC).replace(microsecond=0)
    token = mint_token(KEY, user_id="alice", lifetime=timedelta(seconds=60), now=issued)
    # Patched only now: PyJWT's encoder also looks at its `datetime`.
    clock = SharedClock(monkeypatch, issued.timestamp())
    decodes = DecodeCounter(monkeypatch)
    checked = verifier(leeway=5, clock=clock)
    assert checked.verify(token).user_id == "alice"
    clock.now += 59
    assert checked.verify(token).user_id == "alice"
    assert decodes.calls == 1
    # Past `exp` the entry is dropped and PyJWT decides again (the leeway still lets it
    # pass, and nothing is remembered for a token already past its exp)...
    clock.now += 2
    assert checked.verify(token).user_id == "alice"
    assert decodes.calls == 2 and checked.cached_tokens == 0
    # ...until the leeway too has passed.
    clock.now += 5
    with pytest.raises(Unauthenticated, match="expired"):
        checked.verify(token)


def test_a_token_never_answers_for_another(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = verifier()
    alice = mint_token(KEY, user_id="alice", plan="pro")
    bob = mint_token(KEY, user_id="bob", plan="free", sub_account="team")
    assert checked.verify(alice) == Identity("alice", "", "pro")
    assert checked.verify(bob) == Identity("bob", "team", "free")
    assert checked.verify(alice) == Identity("alice", "", "pro")
    # The remembered token's payload with another signature, or another payload under
    # its signature, is a different token and is checked in full.
    header, payload, signature = alice.split(".")
    with pytest.raises(Unauthenticated, match="signature"):
        checked.verify(f"{header}.{payload}.{signature[:-2]}AA")
    forged = b64url(json.dumps({"sub": "bob", "exp": 4_000_000_000}).encode())
    with pytest.raises(Unauthenticated):
        checked.verify(f"{header}.{forged}.{signature}")
    # Refusals are not remembered.
    assert checked.cached_tokens == 2


def test_the_cache_is_bounded_and_keeps_the_recently_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decodes = DecodeCounter(monkeypatch)
    checked = verifier(cache_entries=3)
    tokens = [mint_token(KEY, user_id=f"user-{n}") for n in range(10)]
    for token in tokens[:3]:
        checked.verify(token)
    checked.verify(tokens[0])  # now the most recently used
    for token in tokens[3:]:
        checked.verify(token)
        assert checked.cached_tokens <= 3
    assert checked.cached_tokens == 3
    calls = decodes.calls
    for token in tokens[-3:]:
        checked.verify(token)
    assert decodes.calls == calls
    assert checked.verify(tokens[0]).user_id == "user-0"
    assert decodes.calls == calls + 1


def test_a_cache_of_zero_entries_verifies_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = DecodeCounter(monkeypatch)
    checked = verifier(cache_entries=0)
    token = mint_token(KEY, user_id="alice")
    for _ in range(3):
        assert checked.verify(token).user_id == "alice"
    assert decodes.calls == 3 and checked.cached_tokens == 0
    with pytest.raises(ValueError):
        verifier(cache_entries=-1)
