"""JWT subjects of the forms identity providers issue, and pairs that a careless encoding
would fold together; shared by the key, identity and end-to-end tests."""

from __future__ import annotations

import unicodedata

#: Every form of `sub` a tenant may meet (OpenID Connect allows any text up to 255).
SUBJECTS: tuple[str, ...] = (
    "auth0|5f7c1e2a9b3d4c0012345678",
    "google-oauth2|1234567890",
    "a+b@x.com",
    "Jane Doe",
    "Zoë 山田",
    "../x",
    "..",
    "/",
    "x" * 255,
    "山" * 255,
)

#: Pairs of distinct subjects that differ only where an encoding might fold them: URL
#: decoding (`+` and space, `%2F` and `/`), unicode normalisation (NFC and NFD), the escape
#: character and its sequences, and letter case (S3 and Linux file names keep case).
LOOKALIKE_PAIRS: tuple[tuple[str, str], ...] = (
    ("a b", "a+b"),
    ("a%2Fb", "a/b"),
    (unicodedata.normalize("NFC", "Zoë"), unicodedata.normalize("NFD", "Zoë")),
    ("a|b", "a_7Cb"),
    ("a_20b", "a b"),
    ("Alice Doe", "alice Doe"),
)
