"""A blob store on the local filesystem, served over HTTP with HMAC-signed,
expiring URLs (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import mimetypes
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from imagegen.config import MAX_URL_TTL
from imagegen.domain.errors import NotFound, StorageFailed
from imagegen.private_files import read_or_create_private
from imagegen.storage.base import BlobEntry

#: Beside each blob: its Content-Type (never a key: image keys end in an image extension).
_TYPE_SUFFIX = ".type"

SIGNING_KEY_FILE = "blob-signing.key"
def load_or_create_signing_key(data_dir: Path) -> bytes:
    """32 random bytes kept in the data directory (mode 0600), made on first use."""
    text = read_or_create_private(
        data_dir / SIGNING_KEY_FILE, lambda: secrets.token_hex(32), what="the blob URL key"
    )
    return bytes.fromhex(text.strip())


def _scan(directory: Path) -> list[tuple[Path, bool, int, float]]:
    """(path, is a directory, size, modified) of each entry of `directory` that may hold
    or be a blob; nothing for a directory that does not exist."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name.endswith(_TYPE_SUFFIX):
            continue
        if entry.is_dir(follow_symlinks=False):
            found.append((Path(entry.path), True, 0, 0.0))
        elif entry.is_file(follow_symlinks=False):
            info = entry.stat(follow_symlinks=False)
            found.append((Path(entry.path), False, info.st_size, info.st_mtime))
    return found


class LocalBlobStore:
    """Blobs as files under `root`; Content-Type kept beside each file."""

    def __init__(
        self,
        root: Path,
        public_url: str,
        signing_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(signing_key) < 16:
            raise ValueError("the blob signing key must be at least 16 bytes")
        self.root = root
        self.public_url = public_url.rstrip("/")
        self._key = signing_key
        self._clock = clock

    @property
    def bucket(self) -> str:
        """`local` (for spans): files have no bucket, and the data directory's path would
        tell a trace reader nothing."""
        return "local"

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise NotFound(f"blob key {key!r} is not valid")
        if any("\\" in p or "\x00" in p for p in parts):
            raise NotFound(f"blob key {key!r} is not valid")
        return self.root.joinpath(*parts)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)

        def _write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                Path(tmp + ".type").write_text(content_type)
                os.replace(tmp + ".type", str(path) + ".type")
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                with contextlib.suppress(OSError):
                    os.unlink(tmp + ".type")
                raise

        try:
            await asyncio.to_thread(_write)
        except OSError as exc:
            raise StorageFailed(f"writing the image to local storage failed: {exc}") from exc

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"blob {key!r} not found") from None
        except OSError as exc:
            raise StorageFailed(f"reading the image from local storage failed: {exc}") from exc

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_remove, path)
        except OSError as exc:
            raise StorageFailed(f"deleting the image from local storage failed: {exc}") from exc

    async def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        def _remove_all() -> dict[str, str]:
            failures: dict[str, str] = {}
            for key in keys:
                try:
                    _remove(self._path(key))
                except (OSError, NotFound) as exc:
                    failures[key] = f"deleting the image from local storage failed: {exc}"
            return failures

        return await asyncio.to_thread(_remove_all)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def list_keys(self, prefix: str) -> AsyncIterator[BlobEntry]:
        """Every blob under `prefix`, one directory read (in a thread) at a time. Files
        that are not blobs are skipped: Content-Type files and the temporary files of
        writes (a key never has a component that starts with a dot)."""
        folder = prefix.rpartition("/")[0]
        pending = [self._path(folder) if folder else self.root]
        while pending:
            directory = pending.pop()
            try:
                found = await asyncio.to_thread(_scan, directory)
            except OSError as exc:
                raise StorageFailed(f"listing local storage failed: {exc}") from exc
            for path, is_dir, size, modified in found:
                if is_dir:
                    pending.append(path)
                    continue
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield BlobEntry(key, size, datetime.fromtimestamp(modified, UTC))

    def content_type(self, key: str) -> str:
        """The stored Content-Type, else one guessed from the extension."""
        path = self._path(key)
        try:
            return Path(str(path) + ".type").read_text().strip()
        except OSError:
            return mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def file_for_serving(self, key: str) -> Path:
        """The file behind a key (for the HTTP route); NotFound if absent."""
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"blob {key!r} not found")
        return path

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    async def signed_url(self, key: str, ttl: timedelta) -> str:
        if not timedelta(seconds=1) <= ttl <= MAX_URL_TTL:
            raise ValueError("signed URL lifetime must be between 1 second and 7 days")
        self._path(key)
        expires = int(self._clock() + ttl.total_seconds())
        signature = self._signature(key, expires)
        return f"{self.public_url}/blobs/{quote(key)}?expires={expires}&signature={signature}"

    def signature_matches(self, key: str, expires: int, signature: str) -> bool:
        """Whether we signed this key and expiry (constant-time), expired or not."""
        expected = self._signature(key, expires)
        # As bytes: compare_digest refuses str arguments holding non-ASCII characters.
        return hmac.compare_digest(expected.encode(), signature.encode())

    def verify(self, key: str, expires: int, signature: str) -> bool:
        """Whether a URL's signature is ours and it has not expired."""
        return self.signature_matches(key, expires, signature) and expires >= self._clock()

    def seconds_left(self, expires: int) -> int:
        return max(expires - int(self._clock()), 0)


def _remove(path: Path) -> None:
    """Unlink a blob and its content-type file; either may be missing already."""
    for victim in (path, Path(str(path) + _TYPE_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            victim.unlink()
