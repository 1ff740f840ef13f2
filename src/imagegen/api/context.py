"""Per-RPC values that servicers, logs and spans read without passing them around.

The auth interceptor sets both variables inside the handler it wraps, so they live
in the RPC's own task and never leak into another RPC.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar

from imagegen.domain.errors import Unauthenticated
from imagegen.domain.models import Identity

#: The verified caller of the current RPC; unset outside an authenticated RPC.
current_identity: ContextVar[Identity] = ContextVar("imagegen_identity")
#: An id for the current RPC's log lines: the caller's `x-request-id` or a fresh one.
current_request_id: ContextVar[str] = ContextVar("imagegen_request_id", default="")

REQUEST_ID_METADATA_KEY = "x-request-id"
# A caller's id is copied into logs and error messages, so only short, plain ones are
# kept; anything else (newlines, control characters, huge values) is replaced.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def identity() -> Identity:
    """The caller of the current RPC; raises Unauthenticated if no token was verified."""
    caller = current_identity.get(None)
    if caller is None:
        raise Unauthenticated("this call needs a bearer token: send `authorization: Bearer <jwt>`")
    return caller


def request_id() -> str:
    """The current RPC's request id, or "" outside an RPC."""
    return current_request_id.get()


def new_request_id() -> str:
    """A fresh request id (uuid4, hex)."""
    return uuid.uuid4().hex


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's `x-request-id` if it is sane (1-128 of [A-Za-z0-9._:-]), else a new id."""
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_METADATA_KEY and isinstance(value, str):
            if _SANE_REQUEST_ID.fullmatch(value):
                return value
            break
    return new_request_id()
