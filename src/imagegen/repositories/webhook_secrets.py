"""Users' webhook signing secrets, stored encrypted (SQL lives here only).

Each secret is sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the
deployment's IMAGEGEN_WEBHOOK_KEY, with its user and version as associated data, so a
ciphertext copied to another row does not open. A row names the key that sealed it
(`key_id`): a replica configured with another key says so instead of failing obscurely.
Without IMAGEGEN_WEBHOOK_KEY the key is a random one kept in the data directory, which
suits one process; replicas that share a database must share the key.

Secrets are never logged: they leave this module only as bytes for the signer and as the
`whsec_...` text the owner asks for.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from imagegen.private_files import read_or_create_private
from imagegen.repositories.db import Executor, transaction

#: The development key's file in the data directory.
DEV_KEY_FILE = "webhook-key"
#: The shortest IMAGEGEN_WEBHOOK_KEY accepted.
MIN_KEY_CHARS = 32
_NONCE_BYTES = 12


class SecretKeyMismatch(RuntimeError):
    """A stored secret was sealed with another deployment key than this process has."""


class SecretBox:
    """Seals and opens secrets with the deployment key."""

    def __init__(self, key_text: str) -> None:
        if len(key_text) < MIN_KEY_CHARS:
            raise ValueError(f"the webhook key must be at least {MIN_KEY_CHARS} characters")
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"imagegen webhook secrets v1"
        ).derive(key_text.encode())
        self._aead = AESGCM(key)
        #: names the key without revealing it
        self.key_id = hashlib.sha256(b"imagegen webhook key id:" + key).hexdigest()[:16]

    def seal(self, secret: bytes, *, user_id: str, version: int) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret, _associated(user_id, version))

    def open(self, sealed: bytes, *, user_id: str, version: int, key_id: str) -> bytes:
        if key_id != self.key_id:
            raise SecretKeyMismatch(
                f"the webhook secret (version {version}) of user {user_id!r} was sealed with "
                f"key {key_id}, but this process has key {self.key_id}: every replica needs "
                "the same IMAGEGEN_WEBHOOK_KEY"
            )
        try:
            return self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _associated(user_id, version)
            )
        except InvalidTag:
            raise SecretKeyMismatch(
                f"the webhook secret (version {version}) of user {user_id!r} does not open "
                "with this key; it was changed or moved"
            ) from None


def _associated(user_id: str, version: int) -> bytes:
    return f"imagegen-webhook-secret\x00{user_id}\x00{version}".encode()


def load_or_create_dev_key(data_dir: Path) -> str:
    """A random key kept in the data directory (mode 0600), made on first use."""
    text = read_or_create_private(
        data_dir / DEV_KEY_FILE, lambda: secrets.token_hex(32), what="the webhook sealing key"
    )
    return text.strip()


@dataclass(frozen=True)
class StoredSecret:
    """One version of a user's secret, opened."""

    version: int
    key: bytes
    created_at: datetime
    #: until when the version before it also signs; None for a first version
    previous_expires_at: datetime | None


class WebhookSecretStore:
    """Versions of each user's signing secret; the newest is the current one."""

    def __init__(self, db: Executor, box: SecretBox) -> None:
        self._db = db
        self._box = box

    def _opened(self, row: asyncpg.Record) -> StoredSecret:
        return StoredSecret(
            version=row["version"],
            key=self._box.open(
                bytes(row["secret_ciphertext"]),
                user_id=row["user_id"],
                version=row["version"],
                key_id=row["key_id"],
            ),
            created_at=row["created_at"],
            previous_expires_at=row["previous_expires_at"],
        )

    async def newest(self, user_id: str) -> list[StoredSecret]:
        """The current version and the one before it (when there is one), newest first."""
        rows = await self._db.fetch(
            "SELECT * FROM webhook_secrets WHERE user_id = $1 ORDER BY version DESC LIMIT 2",
            user_id,
        )
        return [self._opened(r) for r in rows]

    async def create_first(self, user_id: str, key: bytes) -> StoredSecret:
        """Store `key` as the user's first version, unless they have one already (made
        meanwhile by another request); returns the current version either way. Under the
        user's lock, as `rotate`, so a first rotation never races it for version 1."""
        async with transaction(self._db) as conn:
            await _lock_user(conn, user_id)
            await conn.execute(
                "INSERT INTO webhook_secrets (user_id, version, secret_ciphertext, key_id) "
                "VALUES ($1, 1, $2, $3) ON CONFLICT DO NOTHING",
                user_id,
                self._box.seal(key, user_id=user_id, version=1),
                self._box.key_id,
            )
            row = await conn.fetchrow(
                "SELECT * FROM webhook_secrets WHERE user_id = $1 ORDER BY version DESC LIMIT 1",
                user_id,
            )
            return self._opened(row)

    async def rotate(
        self,
        user_id: str,
        key: bytes,
        *,
        request_id: str,
        grace: timedelta,
        request_id_ttl: timedelta,
    ) -> StoredSecret:
        """Store `key` as the user's new current version; the previous one signs for
        `grace` more. With a request_id seen within `request_id_ttl`, nothing changes and
        the version that request made is returned. One transaction, under the user's lock
        (concurrent rotations number their versions one after the other). Versions older
        than the previous one are deleted once no remembered request_id can ask for them."""
        async with transaction(self._db) as conn:
            await _lock_user(conn, user_id)
            if request_id:
                await conn.execute(
                    "UPDATE webhook_secrets SET request_id = NULL WHERE user_id = $1 "
                    "AND request_id = $2 AND created_at < now() - $3::interval",
                    user_id,
                    request_id,
                    request_id_ttl,
                )
                earlier = await conn.fetchrow(
                    "SELECT * FROM webhook_secrets WHERE user_id = $1 AND request_id = $2",
                    user_id,
                    request_id,
                )
                if earlier is not None:
                    return self._opened(earlier)
            newest = await conn.fetchval(
                "SELECT max(version) FROM webhook_secrets WHERE user_id = $1", user_id
            )
            version = (newest or 0) + 1
            row = await conn.fetchrow(
                """
                INSERT INTO webhook_secrets (user_id, version, secret_ciphertext, key_id,
                                             previous_expires_at, request_id)
                VALUES ($1, $2, $3, $4, CASE WHEN $2 > 1 THEN now() + $5::interval END, $6)
                RETURNING *
                """,
                user_id,
                version,
                self._box.seal(key, user_id=user_id, version=version),
                self._box.key_id,
                grace,
                request_id or None,
            )
            await conn.execute(
                "DELETE FROM webhook_secrets WHERE user_id = $1 AND version < $2 - 1 "
                "AND created_at < now() - $3::interval",
                user_id,
                version,
                request_id_ttl,
            )
            return self._opened(row)


async def _lock_user(conn: asyncpg.Connection, user_id: str) -> None:
    """The user's secret lock, until the transaction ends."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('imagegen-webhook-secret:' || $1, 0))",
        user_id,
    )
