"""Batches (BatchGenerate): how many specs one may hold, how a refusal names the spec it
is about, and what makes two batch requests "the same" for idempotency. Plain values
and functions; the use case is services/generations/batches.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from imagegen.domain.errors import ImageGenError, InvalidRequest
from imagegen.domain.models import GenerationSpec

#: The prefix of a batch's resource name, `batches/{batch}`.
BATCHES_PREFIX = "batches/"


def check_batch_size(specs: int, max_specs: int) -> None:
    """A batch holds 1 to `max_specs` specs (IMAGEGEN_MAX_BATCH); IMG_003 on `specs`."""
    if specs < 1:
        raise InvalidRequest(
            "specs is empty: a batch needs at least one spec", field="specs"
        )
    if specs > max_specs:
        raise InvalidRequest(
            f"a batch holds at most {max_specs} specs and this one has {specs}; split it",
            field="specs",
            metadata={"limit": str(max_specs), "specs": str(specs)},
        )


@contextlib.contextmanager
def about_spec(index: int) -> Iterator[None]:
    """Refusals raised inside name the spec at `index` of the batch: `index` in their
    metadata, and for an invalid field its path in the request (`specs[3].prompt`)."""
    try:
        yield
    except ImageGenError as exc:
        exc.metadata.setdefault("index", str(index))
        if isinstance(exc, InvalidRequest):
            path = f"specs[{index}]" + (f".{exc.field}" if exc.field else "")
            exc.field = path
            exc.metadata["field"] = path
        exc.message = f"specs[{index}]: {exc.message}"
        exc.args = (exc.message,)
        raise


def batch_fingerprint(specs: Sequence[GenerationSpec], callback_uri: str) -> dict[str, object]:
    """The parameters that make two batch requests "the same": every spec's fingerprint,
    in order, and the callback URL."""
    return {
        "specs": [spec.fingerprint() for spec in specs],
        "callback_uri": callback_uri,
    }
