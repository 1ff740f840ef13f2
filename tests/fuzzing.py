"""Seeded, descriptor-driven request fuzzing for the property test of bad input.

Every RPC of every imagegen service is found in the generated descriptors, so a new
RPC or field is fuzzed without touching this file. Requests travel as raw bytes over
a channel with identity serializers, so the server also sees bytes that no client
library would produce (truncated, wrong wire types, invalid UTF-8, bit flips).

Nothing here reaches beyond loopback: the fields a server fetches or calls (an image
source `uri`, a `callback_uri`) are drawn from a fixed list of URLs that the fetch
guard refuses without a DNS lookup, or `data:` URLs.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import pkgutil
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import imagegen.v1
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

FD = pb_descriptor.FieldDescriptor
STATUS_DETAILS_KEY = "grpc-status-details-bin"

#: Reasons other than IMG codes that an ErrorInfo may carry (proto/imagegen/v1/common.proto).
OTHER_REASONS = frozenset(
    {"UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "SHUTTING_DOWN", "STREAM_LIMIT"}
)


@dataclass(frozen=True)
class Rpc:
    """One method of one service, as the descriptors describe it."""

    service: str
    name: str
    input: pb_descriptor.Descriptor
    output: pb_descriptor.Descriptor
    server_streaming: bool
    client_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def input_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.input)

    def output_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.output)


def discover_rpcs() -> list[Rpc]:
    """Every RPC of every service in the generated `imagegen.v1` package."""
    rpcs: list[Rpc] = []
    for module_info in sorted(pkgutil.iter_modules(imagegen.v1.__path__), key=lambda m: m.name):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"imagegen.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(
                    Rpc(
                        service=service.full_name,
                        name=method.name,
                        input=method.input_type,
                        output=method.output_type,
                        server_streaming=method.server_streaming,
                        client_streaming=method.client_streaming,
                    )
                )
    return rpcs


# --- values ------------------------------------------------------------------------------


def png_bytes(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def huge_header_png() -> bytes:
    """A tiny file whose header claims 60000 x 60000 pixels (a decompression bomb)."""
    data = bytearray(png_bytes(8, 8))
    # IHDR width and height are the big-endian words at offsets 16 and 20.
    data[16:20] = (60000).to_bytes(4, "big")
    data[20:24] = (60000).to_bytes(4, "big")
    return bytes(data)


ODD_TEXT = (
    "",
    " ",
    "\t\n",
    "a\x00b",
    "\x00",
    "tag\x01\x02",
    "line\rbreak",
    "\x7f\x1b[31m",
    "ünïcödé ✓ 日本語 🦊",
    "\u202eevil",
    "\ufeffbom",
    "x" * 10_000,
    "y" * 4001,
    "'; DROP TABLE images; --",
    "%_\\",
    "{{subject}}",
    "{{ nope }}",
    "../../etc/passwd",
    "a" * 51,
    "a" * 201,
)
PLAIN_TEXT = (
    "a red fox in snow",
    "invert",
    "rotate",
    "lighthouse",
    "cats",
    "fox",
    "animal",
    "a",
    "Winter scene",
)
ODD_NAME_TAILS = (
    "",
    "..",
    "../x",
    "nope",
    "\x00",
    "ünï",
    "00000000-0000-0000-0000-000000000000",
    "x" * 10_000,
    "%2e%2e/x",
    "a/b/c",
)
#: URLs the fetch guard refuses before any DNS lookup or connection leaves loopback.
SAFE_URIS = (
    "",
    "http://127.0.0.1:9/x.png",
    "http://[::1]:9/x.png",
    "http://0x7f000001/x.png",
    "http://169.254.169.254/latest/meta-data",
    "https://10.0.0.1/x.png",
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.png",
    "gopher://127.0.0.1:70/",
    "javascript:alert(1)",
    "not a url",
    "http://",
    "http://[::1",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1/\x00",
    "data:",
    "data:image/png;base64,",
    "data:image/png,notbase64",
    "data:image/png;base64,!!!!",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:text/plain;base64," + base64.b64encode(b"hello").decode(),
)
TIME_ZONES = (
    "x" * 10_000,
    "",
    "UTC",
    "Europe/Paris",
    "Not/AZone",
    "../../etc/passwd",
    "\x00",
    "+05:00",
    "localtime",
    "posixrules",
    "posix/Europe/Paris",
)
#: (seconds, nanos) of Timestamps, in range and out of it.
TIMESTAMPS = (
    (1_700_000_000, 0),
    (0, 0),
    (-62_135_596_800, 0),  # 0001-01-01T00:00:00Z, the first valid instant
    (253_402_300_799, 999_999_999),  # 9999-12-31T23:59:59.999999999Z, the last
    (253_402_300_800, 0),  # year 10000
    (-62_135_596_801, 0),  # before year 1
    (1_700_000_000, 1_000_000_000),  # nanos past their range
    (1_700_000_000, -1),
    (2**62, 0),
    (-(2**62), 0),
    (2**63 - 1, 0),
)
#: (seconds, nanos) of Durations, in range and out of it.
DURATIONS = (
    (60, 0),
    (0, 0),
    (1, 0),
    (0, 500_000_000),
    (-1, 0),
    (-315_576_000_000, 0),  # the most negative valid Duration
    (315_576_000_000, 0),  # the largest valid Duration
    (315_576_000_001, 0),
    (-315_576_000_001, 0),
    (1, 1_000_000_000),
    (1, -1),  # signs disagree
    (-(2**62), 0),
    (2**63 - 1, 0),
)
INT32_EDGES = (0, 1, -1, 2, 4, 5, 2**31 - 1, -(2**31), 100, 101)
INT64_EDGES = (0, 1, -1, 3, 2**63 - 1, -(2**63), 2**31, 10**12)
UINT32_EDGES = (0, 1, 42, 2**32 - 1, 2**31)
UINT64_EDGES = (0, 1, 2**64 - 1, 2**63)
UNKNOWN_ENUMS = (99, -1, 2**31 - 1, -(2**31), 1000)
#: Field names that update masks of the contract accept.
UPDATABLE_HINTS = {
    "title",
    "description",
    "tags",
    "favorite",
    "display_name",
    "prompt",
    "style",
    "category",
    "variables",
    "visibility",
    "default_provider",
}
#: Values of the gathered templates' typed variables that parse.
TYPED_VALUES = {"n": ("3", "-1", "0"), "flag": ("true", "False")}
SIZES = (256, 512, 1024, 1536, 0, 1, 255, 257, -256, 100_000, 2**31 - 1)


@dataclass
class Pools:
    """Real values gathered before fuzzing, so mutated messages also reach deep code."""

    names: dict[str, list[str]] = field(default_factory=dict)  # prefix -> names
    page_tokens: dict[str, list[str]] = field(default_factory=dict)  # rpc name -> tokens
    variable_names: list[str] = field(default_factory=lambda: ["subject", "n", "flag"])
    #: The only names that purges ("Purge") and deletes ("Delete") may take, so the
    #: other resources stay for the whole run.
    victims: dict[str, set[str]] = field(default_factory=lambda: {"Purge": set(), "Delete": set()})

    def names_with(self, prefix: str) -> list[str]:
        return self.names.get(prefix, [])

    def all_names(self) -> list[str]:
        return [n for names in self.names.values() for n in names]


_NAME_FIELDS = {
    "name": ("images/", "generations/", "templates/"),
    "image": ("images/",),
    "generation": ("generations/",),
    "parents": ("images/",),
}


def _name_prefix_for(rpc_name: str) -> str:
    if "Template" in rpc_name:
        return "templates/"
    if "Generation" in rpc_name:
        return "generations/"
    return "images/"


class MessageFuzzer:
    """Builds seeded request messages and byte strings for one RPC at a time."""

    def __init__(self, rng: random.Random, pools: Pools, rpcs: Sequence[Rpc] = ()) -> None:
        self.rng = rng
        self.pools = pools
        self._all_rpcs = list(rpcs)
        self._png = png_bytes()
        self._bomb = huge_header_png()

    # -- structured messages --

    def message(self, rpc: Rpc, *, oddness: float) -> Message:
        """A request whose every field is plausible with probability 1 - oddness."""
        self._rpc = rpc
        instance = rpc.input_class()()
        self._fill(instance, oddness, depth=0, field_name="")
        return instance

    def _fill(self, message: Message, oddness: float, depth: int, field_name: str) -> None:
        descriptor = message.DESCRIPTOR
        if descriptor.full_name == "google.protobuf.Timestamp":
            plausible = [self._plausible_time(field_name)]
            seconds, nanos = self._pick_odd(plausible, TIMESTAMPS, oddness)
            message.seconds, message.nanos = seconds, nanos  # type: ignore[attr-defined]
            return
        if descriptor.full_name == "google.protobuf.Duration":
            seconds, nanos = self._pick_odd(DURATIONS[:4], DURATIONS, oddness)
            message.seconds, message.nanos = seconds, nanos  # type: ignore[attr-defined]
            return
        chosen_oneofs: dict[str, str] = {}
        for oneof in descriptor.oneofs:
            if oneof.fields and not oneof.name.startswith("_"):
                chosen_oneofs[oneof.name] = self.rng.choice(oneof.fields).name
        # Plausible messages leave fewer fields unset, so they pass validation more often.
        unset = 0.3 if oddness >= 0.1 else 0.05
        for fd in descriptor.fields:
            oneof = fd.containing_oneof
            if oneof is not None and chosen_oneofs.get(oneof.name, fd.name) != fd.name:
                continue
            if self.rng.random() < (0.85 if fd.name == "mask" and oddness < 0.1 else unset):
                continue  # left unset: defaults are input too
            if fd.message_type and fd.message_type.full_name == "google.protobuf.FieldMask":
                getattr(message, fd.name).paths.extend(self._mask_paths(descriptor, oddness))
                continue
            self._set_field(message, fd, oddness, depth)

    def _plausible_time(self, field_name: str) -> tuple[int, int]:
        now = 1_790_000_000  # late 2026, when these tests were written
        if field_name.endswith(("_start", "start_time")):
            return (now - 10 * 86_400, 0)
        if field_name.endswith(("_end", "end_time")):
            return (now + 86_400, 0)
        return (now, 0)

    def _set_field(self, message: Message, fd: FD, oddness: float, depth: int) -> None:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target = getattr(message, fd.name)
            keys = [self._map_key(oddness) for _ in range(self.rng.choice((0, 1, 1, 2, 3)))]
            if oddness < 0.1:
                keys.append("subject")  # the variable the gathered templates require
            value_fd = fd.message_type.fields_by_name["value"]
            for key in keys:
                if value_fd.message_type is not None:
                    self._fill(target[key], oddness, depth + 1, fd.name)
                elif key in TYPED_VALUES and self.rng.random() >= oddness:
                    target[key] = self.rng.choice(TYPED_VALUES[key])
                else:
                    target[key] = self._scalar(fd.message_type, value_fd, oddness)
            return
        if fd.is_repeated:
            if fd.message_type is not None and oddness < 0.1:
                count = self.rng.choice((0, 0, 0, 1))  # sources, variables: mostly none
            else:
                count = self.rng.choice((0, 1, 1, 2, 3))
            if self.rng.random() < oddness * 0.2:
                count = self.rng.choice((5, 21, 30))
            container = getattr(message, fd.name)
            for _ in range(count):
                if fd.message_type is not None:
                    if depth >= 4:
                        break
                    self._fill(container.add(), oddness, depth + 1, fd.name)
                else:
                    container.append(self._scalar(message.DESCRIPTOR, fd, oddness))
            return
        if fd.message_type is not None:
            if depth >= 4:
                return
            self._fill(getattr(message, fd.name), oddness, depth + 1, fd.name)
            return
        setattr(message, fd.name, self._scalar(message.DESCRIPTOR, fd, oddness))

    def _pick_odd(self, plausible: Sequence[Any], odd: Sequence[Any], oddness: float) -> Any:
        return self.rng.choice(odd if self.rng.random() < oddness else plausible)

    def _scalar(self, owner: pb_descriptor.Descriptor, fd: FD, oddness: float) -> Any:
        odd = self.rng.random() < oddness
        name = fd.name
        if fd.type == FD.TYPE_ENUM:
            values = [v.number for v in fd.enum_type.values]
            if fd.is_repeated:
                values = [v for v in values if v != 0] or values  # UNSPECIFIED filters nothing
            return self.rng.choice(UNKNOWN_ENUMS) if odd else self.rng.choice(values)
        if fd.type == FD.TYPE_BOOL:
            return self.rng.random() < 0.5
        if fd.type == FD.TYPE_BYTES:
            options: list[bytes] = (
                [self._png]
                if not odd
                else [
                    b"",
                    self.rng.randbytes(self.rng.randrange(1, 64)),
                    self._png[: self.rng.randrange(1, len(self._png))],
                    self._bomb,
                    b"GIF89a" + self.rng.randbytes(16),
                ]
            )
            return self.rng.choice(options)
        if fd.type == FD.TYPE_STRING:
            if owner.name == "TemplateVariable" and name == "name":
                return self._map_key(oddness)
            return self._string(name, odd)
        if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return self.rng.choice((0.0, 1.5, -1.0, 1e308, float("inf"), float("nan")))
        if name in ("width", "height"):
            return self.rng.choice(SIZES) if odd else self.rng.choice((256, 256, 256, 512))
        if name == "count":
            return self.rng.choice(INT32_EDGES) if odd else 1
        if name == "page_size":
            return self.rng.choice(INT32_EDGES) if odd else self.rng.choice((0, 1, 2, 100))
        if name == "max_depth":
            return self.rng.choice((*INT32_EDGES, 11)) if odd else self.rng.choice((0, 1, 10))
        if name == "after_sequence":
            return self.rng.choice(INT64_EDGES) if odd else self.rng.choice((0, 1, 2))
        if fd.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return self.rng.choice(UINT32_EDGES)
        if fd.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return self.rng.choice(UINT64_EDGES)
        if fd.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
            return self.rng.choice(INT64_EDGES) if odd else self.rng.choice((0, 1))
        return self.rng.choice(INT32_EDGES) if odd else self.rng.choice((0, 1))

    def _string(self, name: str, odd: bool) -> str:
        if name == "callback_uri":
            return self.rng.choice(SAFE_URIS) if odd else ""
        if name == "uri":
            if not odd and self.rng.random() < 0.7:
                return "data:image/png;base64," + base64.b64encode(self._png).decode()
            return self.rng.choice(SAFE_URIS)
        if name in _NAME_FIELDS or (name.endswith("_name") and name != "display_name"):
            return self._resource_name(name, odd)
        if name == "page_token":
            return self.page_token(odd)
        if name == "request_id":
            if odd:
                return self.rng.choice(("x" * 129, "a b", "\x00", "ünï", "../x", "ok-" + "1" * 20))
            return str(uuid.UUID(int=self.rng.getrandbits(128)))
        if name == "time_zone":
            plausible_zones = ("", "UTC", "Europe/Paris")
            return self.rng.choice(TIME_ZONES if odd else plausible_zones)
        if name in ("provider", "default_provider"):
            return self.rng.choice(
                ("nope", "LOCAL", "local\x00", "x" * 10_000, "forge", "openai", "sdwebui")
                if odd
                else ("", "local")
            )
        if name == "model":
            return self.rng.choice(ODD_TEXT) if odd else ""
        if odd:
            return self.rng.choice(ODD_TEXT)
        return self.rng.choice(PLAIN_TEXT)

    def _resource_name(self, field_name: str, odd: bool) -> str:
        prefixes = _NAME_FIELDS.get(field_name, ("images/",))
        if field_name == "name":
            prefixes = (_name_prefix_for(self._rpc.name),)
        prefix = self.rng.choice(prefixes)
        # Purges and deletes take only the names kept for them.
        verb = next((v for v in ("Purge", "Delete") if self._rpc.name.startswith(v)), "")
        real = [
            n for n in self.pools.names_with(prefix) if not verb or n in self.pools.victims[verb]
        ]
        if not odd and real:
            return self.rng.choice(real)
        choice = self.rng.random()
        if choice < 0.2 and self.pools.all_names():
            # A real name under the wrong collection, or bare, or upper case.
            real_name = self.rng.choice(self.pools.all_names())
            tail = real_name.split("/", 1)[-1]
            return self.rng.choice((tail, "images/" + tail, "templates/" + tail, tail.upper()))
        if choice < 0.3:
            return self.rng.choice(("", "/", "//", "images", "x" * 10_000, "🦊"))
        return prefix + self.rng.choice(ODD_NAME_TAILS)

    def _map_key(self, oddness: float) -> str:
        if self.rng.random() < oddness:
            return self.rng.choice(("", "x" * 10_000, "\x00", "Subject", "ünï" * 3000, "a b"))
        return self.rng.choice(self.pools.variable_names)

    def _mask_paths(self, owner: pb_descriptor.Descriptor, oddness: float) -> list[str]:
        """Paths of an update mask: plausible ones name fields of the message it updates."""
        known = [
            f.name
            for sibling in owner.fields
            if sibling.message_type is not None
            and sibling.message_type.full_name != "google.protobuf.FieldMask"
            for f in sibling.message_type.fields
            if f.name != "name"
        ]
        # Fields that some update mask accepts; the others are refused (also worth a call).
        updatable = [name for name in known if name in UPDATABLE_HINTS]
        known = (updatable if updatable and self.rng.random() < 0.8 else known) or ["title"]
        odd = ["*", "", "image.title", "name", "create_time", "unknown", "title,tags", "\x00"]
        count = self.rng.choice((0, 1, 1, 2, 3))
        return [self._pick_odd(known, odd, oddness) for _ in range(count)]

    # -- page tokens --

    def page_token(self, odd: bool) -> str:
        tokens = self.pools.page_tokens.get(self._rpc.name, [])
        others = [t for ts in self.pools.page_tokens.values() for t in ts]
        if not odd and tokens:
            return self.rng.choice(tokens)
        roll = self.rng.random()
        if roll < 0.6 and (tokens or others):
            return tamper_token(self.rng, self.rng.choice(tokens or others))
        if roll < 0.7 and others:
            return self.rng.choice(others)  # a real token of another list
        return self.rng.choice(
            (
                "",
                "nope",
                "====",
                "x" * 10_000,
                base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
                base64.urlsafe_b64encode(b"[" * 50_000 + b"]" * 50_000).decode(),
                base64.urlsafe_b64encode(b"null").decode(),
                "ünï",
            )
        )

    # -- bytes on the wire --

    def wire(self, rpc: Rpc) -> bytes:
        """Bytes that may or may not decode as the request: mutations of a real encoding."""
        base = self.message(rpc, oddness=0.3).SerializeToString()
        mutation = self.rng.randrange(11)
        if mutation == 0:
            return self.rng.randbytes(self.rng.randrange(0, 64))
        if mutation == 1 and base:
            return base[: self.rng.randrange(0, len(base))]
        if mutation == 2 and base:
            flipped = bytearray(base)
            for _ in range(self.rng.randrange(1, 4)):
                flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
            return bytes(flipped)
        if mutation == 3:
            return base + self._wrong_wire_type(rpc.input)
        if mutation == 4:
            return base + self._invalid_utf8(rpc.input)
        if mutation == 5:
            return base + _tag(self.rng.randrange(1, 30), 2) + _varint(10_000) + b"short"
        if mutation == 6:
            return base + b"\xff" * 11  # a varint that never ends
        if mutation == 7:
            return base + _tag(self.rng.randrange(1, 30), self.rng.choice((3, 4, 6, 7)))
        if mutation == 8:
            return base + _tag(536_870_911, 0) + _varint(1)  # unknown field: decodes fine
        if mutation == 9:
            return base + _nested_garbage(self.rng, rpc.input)
        # Another RPC's request: it may decode, with unknown or mistyped fields.
        other = self.rng.choice(self._all_rpcs) if self._all_rpcs else rpc
        return self.message(other, oddness=0.3).SerializeToString()

    def _wrong_wire_type(self, descriptor: pb_descriptor.Descriptor) -> bytes:
        if not descriptor.fields:
            return _tag(1, 0) + _varint(1)
        fd = self.rng.choice(descriptor.fields)
        right = _wire_type_of(fd)
        wrong = self.rng.choice([w for w in (0, 1, 2, 5) if w != right])
        return _tag(fd.number, wrong) + _payload(self.rng, wrong)

    def _invalid_utf8(self, descriptor: pb_descriptor.Descriptor) -> bytes:
        strings = [f for f in descriptor.fields if f.type == FD.TYPE_STRING]
        number = self.rng.choice(strings).number if strings else 1
        raw = self.rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b"))
        return _tag(number, 2) + _varint(len(raw)) + raw


def tamper_token(rng: random.Random, token: str) -> str:
    """A real page token with its JSON changed in one of many ways."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        data = {"t": "2026-01-01T00:00:00+00:00", "i": str(uuid.uuid4()), "s": ""}
    # Nested JSON arrays too deep for json.dumps; spliced into the text below.
    deep = "__deep__"
    depth = rng.choice((50, 5_000, 100_000))
    payload: Any
    choice = rng.randrange(14)
    if choice == 0:
        payload = {**data, "i": "nope"}
    elif choice == 1:
        payload = {**data, "i": None}
    elif choice == 2:
        payload = {**data, "i": rng.choice((5, -1, 2**70, 1.5, True))}
    elif choice == 3:
        payload = {**data, "i": deep}
    elif choice == 4:
        payload = {**data, "t": rng.choice(("nope", None, 5, [], "2026-13-45T99:99:99"))}
    elif choice == 5:
        payload = {
            **data,
            "t": rng.choice(("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00")),
        }
    elif choice == 6:
        payload = {**data, "t": "2026-01-01T00:00:00"}  # naive
    elif choice == 7:
        payload = {**data, "s": rng.choice((None, 5, "other", ["x"]))}
    elif choice == 8:
        payload = {k: v for k, v in data.items() if k != rng.choice(("t", "i", "s"))}
    elif choice == 9:
        payload = rng.choice(([data], "text", 5, None, True, deep))
    elif choice == 10:
        payload = {**data, "i": str(uuid.uuid4()).upper() + "\x00"}
    elif choice == 11:
        payload = {**data, "i": "' OR 1=1 --"}
    elif choice == 12:
        payload = {**data, "extra": "x" * 1000}
    else:
        raw = json.dumps(data).encode()
        return base64.urlsafe_b64encode(raw[: rng.randrange(len(raw))]).decode().rstrip("=")
    text = json.dumps(payload).replace(json.dumps(deep), "[" * depth + "]" * depth)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _wire_type_of(fd: FD) -> int:
    if fd.type in (FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE) or fd.is_repeated:
        return 2
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FIXED64, FD.TYPE_SFIXED64):
        return 1
    if fd.type in (FD.TYPE_FLOAT, FD.TYPE_FIXED32, FD.TYPE_SFIXED32):
        return 5
    return 0


def _payload(rng: random.Random, wire_type: int) -> bytes:
    if wire_type == 0:
        return _varint(rng.choice((0, 1, 2**63, 2**64 - 1)))
    if wire_type == 1:
        return rng.randbytes(8)
    if wire_type == 5:
        return rng.randbytes(4)
    body = rng.randbytes(rng.randrange(0, 12))
    return _varint(len(body)) + body


def _nested_garbage(rng: random.Random, descriptor: pb_descriptor.Descriptor) -> bytes:
    messages = [f for f in descriptor.fields if f.type == FD.TYPE_MESSAGE]
    if not messages:
        return _tag(1, 2) + _varint(3) + b"\xff\xff\xff"
    fd = rng.choice(messages)
    inner = _tag(rng.randrange(1, 20), rng.choice((0, 1, 2, 5))) + rng.randbytes(6)
    return _tag(fd.number, 2) + _varint(len(inner)) + inner


# --- calling ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one call ended with."""

    rpc: Rpc
    label: str
    code: grpc.StatusCode
    details: str
    status: status_pb2.Status | None
    responses: list[bytes]

    def error_infos(self) -> list[error_details_pb2.ErrorInfo]:
        infos = []
        for detail in self.status.details if self.status else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                infos.append(info)
        return infos


def _status_of(metadata: Any) -> status_pb2.Status | None:
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


async def call_raw(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    request: bytes,
    *,
    metadata: Sequence[tuple[str, str]],
    timeout: float,
    label: str = "",
) -> Outcome:
    """Send `request` as it is; read every response (streams to their end or deadline)."""
    responses: list[bytes] = []
    try:
        if rpc.server_streaming:
            stream = channel.unary_stream(rpc.path)(request, metadata=metadata, timeout=timeout)
            async for response in stream:
                responses.append(response)
            code = await stream.code()
            details = await stream.details() or ""
            status = _status_of(await stream.trailing_metadata())
        else:
            unary = channel.unary_unary(rpc.path)(request, metadata=metadata, timeout=timeout)
            responses.append(await unary)
            code, details, status = grpc.StatusCode.OK, "", None
    except grpc.aio.AioRpcError as err:
        code, details = err.code(), err.details() or ""
        status = _status_of(err.trailing_metadata())
    return Outcome(rpc, label, code, details, status, responses)


def iter_names(message: Message) -> Iterator[str]:
    """Every resource name inside a response message (name, image, generation fields)."""
    for fd, value in message.ListFields():
        if fd.type == FD.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                continue
            for item in value if fd.is_repeated else [value]:
                yield from iter_names(item)
        elif fd.type == FD.TYPE_STRING and fd.name in _NAME_FIELDS:
            for item in value if fd.is_repeated else [value]:
                if "/" in item:
                    yield item
