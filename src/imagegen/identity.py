"""Who is calling: bearer-token verification, token minting and the development key.

A caller proves who it is with a JWT in the `authorization` metadata. The claims are
`sub` (user id), `sub_account` (optional) and `plan`. The algorithms are fixed by
configuration and never taken from the token, so `alg: none` and algorithm-confusion
tokens (an HS256 token signed with a server's RSA public key) are refused.

With no `IMAGEGEN_JWT_KEY` configured, the embedded default uses a development HMAC
key kept in the data directory, so `imagegen token` and `imagegen serve` agree on it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from imagegen.config import ConfigError, JwtSettings
from imagegen.domain.errors import Unauthenticated
from imagegen.domain.models import Identity
from imagegen.private_files import read_or_create_private

log = logging.getLogger(__name__)

#: Plans a token may name; anything else is refused rather than guessed at.
PLANS: frozenset[str] = frozenset({"free", "basic", "pro", "enterprise"})
DEFAULT_PLAN = "free"

#: Shortest HMAC secret accepted: RFC 7518 §3.2 asks for at least the hash size (256 bits).
MIN_HMAC_KEY_BYTES = 32
#: OpenID Connect Core 1.0 §2 caps `sub` at 255 ASCII characters; we take any unicode text
#: of up to 255 characters, so every subject an identity provider issues is accepted.
#: Storage keys encode it (imagegen.storage.keys), so no character is refused for them.
MAX_USER_ID_CHARS = 255
MAX_SUB_ACCOUNT_CHARS = 255
#: Far above any real token of ours; refusing larger ones before parsing bounds the work.
MAX_TOKEN_CHARS = 8192
#: Verified tokens remembered (most recently used kept): about 0.3 KiB each, so the
#: default bounds the cache near 3 MiB whatever callers send.
DEFAULT_VERIFIED_CACHE_ENTRIES = 10_000

DEV_KEY_FILE = "dev-jwt.key"
_DEV_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_MINT_HINT = "mint a new one with `imagegen token`"


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _check_algorithms(algorithms: Sequence[str], key: str | bytes) -> tuple[str, ...]:
    """Refuse configurations that would make verification weak or impossible."""
    chosen = tuple(algorithms)
    if not chosen:
        raise ValueError("at least one JWT algorithm must be configured")
    known = get_default_algorithms()
    for algorithm in chosen:
        if algorithm.lower() == "none":
            raise ValueError("the JWT algorithm `none` is never accepted")
        if algorithm not in known:
            raise ValueError(
                f"unknown JWT algorithm {algorithm!r}; use one of {', '.join(sorted(known))}"
            )
    hmac = [a for a in chosen if a in _HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(chosen):
        # One key cannot be both an HMAC secret and a public key; mixing the families is
        # how algorithm-confusion attacks start.
        raise ValueError("do not mix HMAC (HS*) and public-key JWT algorithms in one configuration")
    if hmac and len(_key_bytes(key)) < MIN_HMAC_KEY_BYTES:
        raise ValueError(
            f"the JWT HMAC key must be at least {MIN_HMAC_KEY_BYTES} bytes "
            "(for example 64 hex characters from `openssl rand -hex 32`)"
        )
    return chosen


class TokenVerifier:
    """Verifies bearer JWTs with a fixed key and algorithm list and yields an Identity.

    A caller sends the same token on every call, so a verified token's Identity is
    remembered until the token's `exp` (without the leeway: from then on PyJWT decides
    again), in a bounded LRU keyed by the token's SHA-256, so the tokens themselves are
    not kept. Only verified tokens are remembered; a refused one is checked again each
    time. The key and the checks are fixed for the verifier's life, so a remembered
    answer stays the answer until `exp`.
    """

    def __init__(
        self,
        key: str | bytes,
        algorithms: Sequence[str],
        issuer: str | None,
        audience: str | None,
        leeway: float = 5,
        *,
        cache_entries: int = DEFAULT_VERIFIED_CACHE_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_entries < 0:
            raise ValueError("cache_entries must be 0 (no cache) or more")
        self._algorithms = _check_algorithms(algorithms, key)
        if self._algorithms[0] not in _HMAC_ALGORITHMS:
            # Parse the public key now so a bad IMAGEGEN_JWT_KEY fails at start-up,
            # not on every request.
            try:
                get_default_algorithms()[self._algorithms[0]].prepare_key(key)
            except Exception as exc:
                raise ValueError(
                    f"the JWT key is not a usable {self._algorithms[0]} key: {exc}"
                ) from None
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        required = ["exp", "sub"]
        if issuer is not None:
            required.append("iss")
        if audience is not None:
            required.append("aud")
        self._options: dict[str, Any] = {
            "require": required,
            # The audience is checked only when one is configured; PyJWT would otherwise
            # refuse every token that carries an `aud` claim.
            "verify_aud": audience is not None,
        }
        self._cache_entries = cache_entries
        self._clock = clock
        #: sha256(token) -> (identity, the token's exp in epoch seconds).
        self._verified: OrderedDict[bytes, tuple[Identity, int]] = OrderedDict()

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms this verifier accepts, in configured order."""
        return self._algorithms

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens are remembered now."""
        return len(self._verified)

    def verify(self, token: str) -> Identity:
        """Check the token's signature and claims; raises Unauthenticated saying what to fix."""
        # Messages never quote the token or its header: both are the caller's secret or
        # attacker-controlled text that would end up in logs.
        if not token:
            raise Unauthenticated(f"empty bearer token: {_MINT_HINT}")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"bearer token is longer than {MAX_TOKEN_CHARS} characters")
        if not self._cache_entries:
            return self._verify(token)[0]
        # surrogatepass: any str hashes; PyJWT refuses a token that is not valid text.
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        remembered = self._verified.get(digest)
        if remembered is not None:
            identity, expires = remembered
            if self._clock() < expires:
                self._verified.move_to_end(digest)
                return identity
            del self._verified[digest]
        identity, expires = self._verify(token)
        if self._clock() < expires:
            self._verified[digest] = (identity, expires)
            if len(self._verified) > self._cache_entries:
                self._verified.popitem(last=False)
        return identity

    def _verify(self, token: str) -> tuple[Identity, int]:
        """The token's Identity and `exp` (epoch seconds), checked by PyJWT."""
        accepted = ", ".join(self._algorithms)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthenticated(
                "bearer token is not a JWT (expected `header.payload.signature`): " + _MINT_HINT
            ) from None
        if header.get("alg") not in self._algorithms:
            # PyJWT refuses these too; checking first makes `alg: none` impossible to
            # slip through whatever the library's defaults become.
            raise Unauthenticated(
                f"token is signed with an algorithm this server does not accept "
                f"(accepted: {accepted}): {_MINT_HINT}"
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                options=self._options,  # type: ignore[arg-type]
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(f"token expired: {_MINT_HINT}") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                "token signature does not verify: it was signed with another key; "
                "mint one with `imagegen token` against this server's key"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(
                f"token lacks the required `{exc.claim}` claim: {_MINT_HINT}"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                f"token issuer is not the one this server expects ({self._issuer!r}): " + _MINT_HINT
            ) from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"token audience is not the one this server expects ({self._audience!r}): "
                + _MINT_HINT
            ) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                "token is not valid yet (`nbf`/`iat` in the future): check the issuer's clock"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated(
                f"token is signed with an algorithm this server does not accept "
                f"(accepted: {accepted}): {_MINT_HINT}"
            ) from None
        except jwt.InvalidTokenError as exc:
            # The remaining cases (malformed payload, non-string `sub`, bad `iat`) carry
            # PyJWT's own short description, which names a claim, never the token.
            raise Unauthenticated(f"token is invalid ({exc}): {_MINT_HINT}") from None
        # PyJWT required `exp` and checked that it converts to an int.
        return _identity_from_claims(claims), int(claims["exp"])


def _storable(text: str) -> bool:
    """Whether PostgreSQL can keep the text: it holds no NUL and no lone surrogate (a JSON
    `\\ud800` escape decodes to one, and it has no UTF-8 form)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    user_id = claims.get("sub")
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= MAX_USER_ID_CHARS:
        raise Unauthenticated(
            f"token `sub` must be a user id of 1 to {MAX_USER_ID_CHARS} characters: {_MINT_HINT}"
        )
    if not _storable(user_id):
        raise Unauthenticated(
            "token `sub` holds a NUL character or a lone UTF-16 surrogate, "
            "which no user id may hold"
        )
    sub_account = claims.get("sub_account", "")
    if sub_account is None:
        sub_account = ""
    if not isinstance(sub_account, str) or len(sub_account) > MAX_SUB_ACCOUNT_CHARS:
        raise Unauthenticated(
            f"token `sub_account` must be text of at most {MAX_SUB_ACCOUNT_CHARS} characters"
        )
    if not _storable(sub_account):
        raise Unauthenticated(
            "token `sub_account` holds a NUL character or a lone UTF-16 surrogate, "
            "which no sub-account may hold"
        )
    plan = claims.get("plan", DEFAULT_PLAN)
    if plan is None:
        plan = DEFAULT_PLAN
    if not isinstance(plan, str) or plan not in PLANS:
        raise Unauthenticated(
            f"token `plan` must be one of {', '.join(sorted(PLANS))}: {_MINT_HINT}"
        )
    return Identity(user_id=user_id, sub_account=sub_account, plan=plan)


def mint_token(
    key: str | bytes,
    *,
    user_id: str,
    plan: str = DEFAULT_PLAN,
    sub_account: str = "",
    lifetime: timedelta = timedelta(hours=24),
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | None = None,
    now: datetime | None = None,
) -> str:
    """Sign a token for `user_id` that TokenVerifier accepts (for the CLI and tests).

    For RS*/ES*/PS* algorithms `key` is the private key in PEM form.
    """
    _check_algorithms([algorithm], key)
    if not 1 <= len(user_id) <= MAX_USER_ID_CHARS:
        raise ValueError(f"user id must be 1 to {MAX_USER_ID_CHARS} characters")
    if not _storable(user_id) or not _storable(sub_account):
        raise ValueError("user id and sub-account may not hold NUL or a lone surrogate")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(sorted(PLANS))}, not {plan!r}")
    if len(sub_account) > MAX_SUB_ACCOUNT_CHARS:
        raise ValueError(f"sub-account must be at most {MAX_SUB_ACCOUNT_CHARS} characters")
    if lifetime <= timedelta(0):
        raise ValueError("token lifetime must be positive")
    issued_at = now if now is not None else datetime.now(UTC)
    payload: dict[str, Any] = {
        "sub": user_id,
        "plan": plan,
        "iat": issued_at,
        "exp": issued_at + lifetime,
    }
    if sub_account:
        payload["sub_account"] = sub_account
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    return jwt.encode(payload, key, algorithm=algorithm)


def load_or_create_dev_key(data_dir: Path) -> str:
    """The development HMAC key at `data_dir/dev-jwt.key`: made once (mode 0600), then reused."""
    key = read_or_create_private(
        data_dir / DEV_KEY_FILE,
        lambda: secrets.token_hex(32) + "\n",
        what="a development JWT key",
    ).strip()
    if not _DEV_KEY_PATTERN.fullmatch(key):
        raise ConfigError(
            f"{data_dir / DEV_KEY_FILE} does not hold a development JWT key (64 hex "
            "characters); delete it to make a new one (tokens minted with the old key stop "
            "working)"
        )
    return key


class NoSigningKey(ConfigError):
    """No IMAGEGEN_JWT_KEY and no development key where one was looked for."""


def resolve_jwt_key(settings: JwtSettings, data_dir: Path, *, create: bool = True) -> str:
    """The configured IMAGEGEN_JWT_KEY, or the development key in `data_dir`. With
    `create=False` (a tool minting tokens for a server) a missing key raises NoSigningKey
    saying where it looked, instead of making a key no server uses."""
    if settings.key:
        return settings.key
    if not all(a in _HMAC_ALGORITHMS for a in settings.algorithms):
        raise ConfigError(
            "IMAGEGEN_JWT_KEY must be set (a PEM public key) when IMAGEGEN_JWT_ALGORITHMS "
            "names a public-key algorithm; the development key is HMAC only"
        )
    path = data_dir / DEV_KEY_FILE
    if not create and not path.exists():
        raise NoSigningKey(
            f"no signing key: IMAGEGEN_JWT_KEY is not set and there is no {path} "
            f"(looked in IMAGEGEN_DATA_DIR={data_dir}); run this with the server's "
            "IMAGEGEN_DATA_DIR (the server makes the key on its first start) or its "
            "IMAGEGEN_JWT_KEY, or pass --create-key to make a new key there"
        )
    return load_or_create_dev_key(data_dir)
