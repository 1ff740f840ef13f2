"""Bad input over gRPC against a real server: each case is INVALID_ARGUMENT with IMG_003
naming the field in BadRequest, and changes nothing (the regression tests of the known
INTERNAL and UNKNOWN answers; tests/e2e/test_bad_input_fuzz.py is the property test)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Identity
from imagegen.domain.plans import PlanTable
from imagegen.identity import mint_token
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.usage import UnknownTimeZone, UsageQueries
from imagegen.services.usage import UsageService
from tests.inprocess import TEST_JWT_KEY, serve_in_process

G, L, T, U = generation_pb2, library_pb2, templates_pb2, usage_pb2
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


def md(user: str = "alice") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


@dataclass
class Stubs:
    """grpc.aio stubs of the four services (typed for the sync API, hence Any)."""

    generation: Any
    library: Any
    templates: Any
    usage: Any
    images: list[str]
    generations: list[str]
    templates_made: list[str]


async def _finish(stubs: Stubs, name: str) -> G.Generation:
    async for _ in stubs.generation.WatchGeneration(
        G.WatchGenerationRequest(name=name), metadata=md(), timeout=60
    ):
        pass
    reply = await stubs.generation.GetGeneration(G.GetGenerationRequest(name=name), metadata=md())
    return reply.generation  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
async def stubs(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str
) -> AsyncIterator[Stubs]:
    """One server for the module, with two images, two generations and two templates of
    alice (so every list has a second page)."""
    tmp_path: Path = tmp_path_factory.mktemp("bad-input")
    env = {"IMAGEGEN_LOCAL_STEP_DELAY": "0"}
    async with serve_in_process(tmp_path, module_database_url, env=env) as server:
        address = f"127.0.0.1:{server.grpc_port}"
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            made = Stubs(
                generation_pb2_grpc.ImageGenerationServiceStub(channel),
                library_pb2_grpc.ImageLibraryServiceStub(channel),
                templates_pb2_grpc.PromptTemplateServiceStub(channel),
                usage_pb2_grpc.UsageServiceStub(channel),
                [],
                [],
                [],
            )
            for prompt in ("a red fox", "two cats"):
                spec = common_pb2.GenerationSpec(
                    prompt=prompt, size=common_pb2.ImageSize(width=256, height=256)
                )
                submitted = await made.generation.SubmitGeneration(
                    G.SubmitGenerationRequest(spec=spec), metadata=md()
                )
                generation = await _finish(made, submitted.generation.name)
                assert generation.state == G.GENERATION_STATE_COMPLETED
                made.generations.append(generation.name)
                made.images.extend(image.name for image in generation.images)
                created = await made.templates.CreatePromptTemplate(
                    T.CreatePromptTemplateRequest(
                        template=T.PromptTemplate(
                            display_name=f"{prompt} template",
                            prompt="{{subject}} in snow",
                            category="animals",
                            variables=[T.TemplateVariable(name="subject", required=True)],
                        )
                    ),
                    metadata=md(),
                )
                made.templates_made.append(created.template.name)
            yield made


def invalid_field(err: grpc.aio.AioRpcError) -> str:
    """The field an INVALID_ARGUMENT IMG_003 error names (asserting it is one)."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status.from_call(err)
    assert status is not None
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert info.reason == "IMG_003", info
    assert any(d.Unpack(bad_request) for d in status.details if d.Is(bad_request.DESCRIPTOR))
    [violation] = bad_request.field_violations
    assert violation.field == info.metadata["field"]
    return violation.field


async def refused(call: Awaitable[Any] | AsyncIterator[Any]) -> str:
    """Await a unary call or drain a stream; return the field its IMG_003 names."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return invalid_field(caught.value)


# --- page tokens ---------------------------------------------------------------------------


def _decoded(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))  # type: ignore[no-any-return]


def _encoded(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _deep(token: str) -> str:
    text = json.dumps({**_decoded(token), "i": "__deep__"})
    text = text.replace('"__deep__"', "[" * 50_000 + "]" * 50_000)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


TOKEN_TAMPERING: dict[str, Callable[[str], str]] = {
    "id-nope": lambda t: _encoded({**_decoded(t), "i": "nope"}),
    "id-null": lambda t: _encoded({**_decoded(t), "i": None}),
    "id-number": lambda t: _encoded({**_decoded(t), "i": 5}),
    "id-deeply-nested": _deep,
    "time-overflows": lambda t: _encoded({**_decoded(t), "t": "9999-12-31T23:59:59-14:00"}),
    "not-an-object": lambda t: _encoded([_decoded(t)]),
}
LISTS: dict[str, Callable[[Stubs, str], Awaitable[Any]]] = {
    "ListImages": lambda s, token: s.library.ListImages(
        L.ListImagesRequest(page_size=1, page_token=token), metadata=md()
    ),
    "ListGenerations": lambda s, token: s.generation.ListGenerations(
        G.ListGenerationsRequest(page_size=1, page_token=token), metadata=md()
    ),
    "ListUsage": lambda s, token: s.usage.ListUsage(
        U.ListUsageRequest(page_size=1, page_token=token), metadata=md()
    ),
    "ListPromptTemplates": lambda s, token: s.templates.ListPromptTemplates(
        T.ListPromptTemplatesRequest(page_size=1, page_token=token), metadata=md()
    ),
}


@pytest.mark.parametrize("tamper", TOKEN_TAMPERING.values(), ids=TOKEN_TAMPERING.keys())
@pytest.mark.parametrize("list_call", LISTS.values(), ids=LISTS.keys())
async def test_tampered_page_token_is_img_003(
    stubs: Stubs,
    list_call: Callable[[Stubs, str], Awaitable[Any]],
    tamper: Callable[[str], str],
) -> None:
    first = await list_call(stubs, "")
    assert first.next_page_token
    second = await list_call(stubs, first.next_page_token)
    assert await refused(list_call(stubs, tamper(first.next_page_token))) == "page_token"
    # The real token still works and gives the same page.
    assert names_in(await list_call(stubs, first.next_page_token)) == names_in(second)


def names_in(reply: Any) -> list[str]:
    """The names of the resources a list reply holds (its signed URLs change with time)."""
    return [
        item.name
        for field, values in reply.ListFields()
        if field.message_type is not None
        for item in values
    ]


# --- NUL and other control characters in text that reaches the database ---------------


def _update_image(field: str, **values: Any) -> Callable[[Stubs], Awaitable[Any]]:
    return lambda s: s.library.UpdateImage(
        L.UpdateImageRequest(
            image=common_pb2.Image(name=s.images[0], **values),
            update_mask={"paths": [field]},
        ),
        metadata=md(),
    )


def _create_template(**values: Any) -> Callable[[Stubs], Awaitable[Any]]:
    base: dict[str, Any] = {
        "display_name": "ok",
        "prompt": "{{subject}} at dusk",
        "variables": [T.TemplateVariable(name="subject")],
    }
    base.update(values)
    return lambda s: s.templates.CreatePromptTemplate(
        T.CreatePromptTemplateRequest(template=T.PromptTemplate(**base)), metadata=md()
    )


CONTROL_TEXT: dict[str, tuple[Callable[[Stubs], Awaitable[Any]], str]] = {
    "image-title-nul": (_update_image("title", title="a\x00b"), "title"),
    "image-title-escape": (_update_image("title", title="\x1b[31mred"), "title"),
    "image-description-nul": (_update_image("description", description="x\x00"), "description"),
    "image-tag-nul": (_update_image("tags", tags=["ok", "a\x00"]), "tags"),
    "image-tag-newline": (_update_image("tags", tags=["two\nlines"]), "tags"),
    "list-images-tag-nul": (
        lambda s: s.library.ListImages(L.ListImagesRequest(tags=["\x00"]), metadata=md()),
        "tags",
    ),
    "list-images-query-nul": (
        lambda s: s.library.ListImages(L.ListImagesRequest(query="fox\x00"), metadata=md()),
        "query",
    ),
    "template-name-nul": (_create_template(display_name="n\x00"), "display_name"),
    "template-category-nul": (_create_template(category="c\x00"), "category"),
    "template-description-nul": (_create_template(description="\x00"), "description"),
    "template-prompt-nul": (_create_template(prompt="{{subject}}\x00"), "prompt"),
    "template-variable-default-nul": (
        _create_template(variables=[T.TemplateVariable(name="subject", default_value="\x00")]),
        "variables",
    ),
    "template-variable-description-nul": (
        _create_template(variables=[T.TemplateVariable(name="subject", description="a\x00")]),
        "variables",
    ),
    "update-template-name-nul": (
        lambda s: s.templates.UpdatePromptTemplate(
            T.UpdatePromptTemplateRequest(
                template=T.PromptTemplate(name=s.templates_made[0], display_name="x\x00"),
                update_mask={"paths": ["display_name"]},
            ),
            metadata=md(),
        ),
        "display_name",
    ),
    "list-templates-category-nul": (
        lambda s: s.templates.ListPromptTemplates(
            T.ListPromptTemplatesRequest(category="animals\x00"), metadata=md()
        ),
        "category",
    ),
    "apply-template-value-nul": (
        lambda s: s.templates.ApplyPromptTemplate(
            T.ApplyPromptTemplateRequest(name=s.templates_made[0], variables={"subject": "\x00"}),
            metadata=md(),
        ),
        "variables",
    ),
    "generate-from-template-value-nul": (
        lambda s: s.templates.GenerateFromPromptTemplate(
            T.GenerateFromPromptTemplateRequest(
                name=s.templates_made[0], variables={"subject": "fox\x00"}
            ),
            metadata=md(),
        ),
        "variables",
    ),
    "prompt-nul": (
        lambda s: s.generation.SubmitGeneration(
            G.SubmitGenerationRequest(spec=common_pb2.GenerationSpec(prompt="fox\x00")),
            metadata=md(),
        ),
        "prompt",
    ),
}


async def snapshot(stubs: Stubs) -> tuple[Any, ...]:
    """What a refused request must leave as it was: alice's images, templates, jobs."""
    images = await stubs.library.ListImages(L.ListImagesRequest(page_size=100), metadata=md())
    templates = await stubs.templates.ListPromptTemplates(
        T.ListPromptTemplatesRequest(page_size=100), metadata=md()
    )
    jobs = await stubs.generation.ListGenerations(
        G.ListGenerationsRequest(page_size=100), metadata=md()
    )
    return (
        [(i.name, i.title, i.description, list(i.tags), i.update_time) for i in images.images],
        [(t.name, t.display_name, t.usage_count, t.update_time) for t in templates.templates],
        [g.name for g in jobs.generations],
    )


@pytest.mark.parametrize(("call", "field"), CONTROL_TEXT.values(), ids=CONTROL_TEXT.keys())
async def test_control_characters_are_img_003_and_change_nothing(
    stubs: Stubs, call: Callable[[Stubs], Awaitable[Any]], field: str
) -> None:
    before = await snapshot(stubs)
    assert await refused(call(stubs)) == field
    assert await snapshot(stubs) == before


# --- resource names ------------------------------------------------------------------------

ODD_NAME_TAILS = ["", "..", "../x", "nope", "\x00", "ünïcödé", "🦊", "x" * 10_000, "a/b"]
NAMED_CALLS: dict[str, tuple[str, Callable[[Stubs, str], Awaitable[Any] | AsyncIterator[Any]]]] = {
    "GetImage": (
        "images/",
        lambda s, n: s.library.GetImage(L.GetImageRequest(name=n), metadata=md()),
    ),
    "GetImageUrl": (
        "images/",
        lambda s, n: s.library.GetImageUrl(L.GetImageUrlRequest(name=n), metadata=md()),
    ),
    "DownloadImage": (
        "images/",
        lambda s, n: s.library.DownloadImage(L.DownloadImageRequest(name=n), metadata=md()),
    ),
    "PurgeImage": (
        "images/",
        lambda s, n: s.library.PurgeImage(L.PurgeImageRequest(name=n), metadata=md()),
    ),
    "GetGeneration": (
        "generations/",
        lambda s, n: s.generation.GetGeneration(G.GetGenerationRequest(name=n), metadata=md()),
    ),
    "WatchGeneration": (
        "generations/",
        lambda s, n: s.generation.WatchGeneration(G.WatchGenerationRequest(name=n), metadata=md()),
    ),
    "CancelGeneration": (
        "generations/",
        lambda s, n: s.generation.CancelGeneration(
            G.CancelGenerationRequest(name=n), metadata=md()
        ),
    ),
    "GetPromptTemplate": (
        "templates/",
        lambda s, n: s.templates.GetPromptTemplate(
            T.GetPromptTemplateRequest(name=n), metadata=md()
        ),
    ),
    "DeletePromptTemplate": (
        "templates/",
        lambda s, n: s.templates.DeletePromptTemplate(
            T.DeletePromptTemplateRequest(name=n), metadata=md()
        ),
    ),
}


@pytest.mark.parametrize(("prefix", "call"), NAMED_CALLS.values(), ids=NAMED_CALLS.keys())
async def test_malformed_names_are_img_003_on_name(
    stubs: Stubs,
    prefix: str,
    call: Callable[[Stubs, str], Awaitable[Any] | AsyncIterator[Any]],
) -> None:
    before = await snapshot(stubs)
    for tail in ODD_NAME_TAILS:
        assert await refused(call(stubs, prefix + tail)) == "name", repr(tail[:20])
    # A real id under another collection cannot name this one either.
    other = stubs.templates_made[0] if prefix != "templates/" else stubs.images[0]
    assert await refused(call(stubs, prefix + other.split("/", 1)[1] + "/x")) == "name"
    assert await refused(call(stubs, other)) == "name"
    # A well-formed name of nothing is NOT_FOUND, as before.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call(stubs, prefix + "0b7e4f0e-4b7a-4a51-9b55-4f1f5f7c2d10")
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await snapshot(stubs) == before


async def test_malformed_source_image_name_is_img_003_on_sources(stubs: Stubs) -> None:
    spec = common_pb2.GenerationSpec(
        prompt="invert", sources=[common_pb2.ImageSource(image="images/../x")]
    )
    before = await snapshot(stubs)
    assert (
        await refused(
            stubs.generation.SubmitGeneration(G.SubmitGenerationRequest(spec=spec), metadata=md())
        )
        == "sources"
    )
    assert await snapshot(stubs) == before


# --- Timestamps and Durations at and beyond their range ------------------------------------

FIRST_INSTANT = timestamp_pb2.Timestamp(seconds=-62_135_596_800)  # 0001-01-01T00:00:00Z
LAST_INSTANT = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
BAD_TIMESTAMPS = {
    "year-10000": timestamp_pb2.Timestamp(seconds=253_402_300_800),
    "before-year-1": timestamp_pb2.Timestamp(seconds=-62_135_596_801),
    "nanos-1e9": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=1_000_000_000),
    "negative-nanos": timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=-1),
    "huge": timestamp_pb2.Timestamp(seconds=2**62),
}
TIMESTAMP_CALLS: dict[str, tuple[str, Callable[[Stubs, dict[str, Any]], Any]]] = {
    "ListImages-start": (
        "create_time_start",
        lambda s, kw: s.library.ListImages(L.ListImagesRequest(**kw), metadata=md()),
    ),
    "ListImages-end": (
        "create_time_end",
        lambda s, kw: s.library.ListImages(L.ListImagesRequest(**kw), metadata=md()),
    ),
    "ListGenerations-end": (
        "create_time_end",
        lambda s, kw: s.generation.ListGenerations(G.ListGenerationsRequest(**kw), metadata=md()),
    ),
    "ListUsage-start": (
        "request_time_start",
        lambda s, kw: s.usage.ListUsage(U.ListUsageRequest(**kw), metadata=md()),
    ),
    "GetUsageStats-end": (
        "end_time",
        lambda s, kw: s.usage.GetUsageStats(U.GetUsageStatsRequest(**kw), metadata=md()),
    ),
    "ExportUsage-start": (
        "start_time",
        lambda s, kw: s.usage.ExportUsage(U.ExportUsageRequest(**kw), metadata=md()),
    ),
    "ExportGenerations-end": (
        "end_time",
        lambda s, kw: s.usage.ExportGenerations(U.ExportGenerationsRequest(**kw), metadata=md()),
    ),
}


@pytest.mark.parametrize("stamp", BAD_TIMESTAMPS.values(), ids=BAD_TIMESTAMPS.keys())
@pytest.mark.parametrize(("field", "call"), TIMESTAMP_CALLS.values(), ids=TIMESTAMP_CALLS.keys())
async def test_timestamp_out_of_range_is_img_003_on_its_field(
    stubs: Stubs,
    field: str,
    call: Callable[[Stubs, dict[str, Any]], Any],
    stamp: timestamp_pb2.Timestamp,
) -> None:
    assert await refused(call(stubs, {field: stamp})) == field


async def test_timestamps_at_the_ends_of_their_range_work(stubs: Stubs) -> None:
    everything = await stubs.library.ListImages(
        L.ListImagesRequest(create_time_start=FIRST_INSTANT, create_time_end=LAST_INSTANT),
        metadata=md(),
    )
    assert len(everything.images) == len(stubs.images)
    jobs = await stubs.generation.ListGenerations(
        G.ListGenerationsRequest(create_time_start=FIRST_INSTANT, create_time_end=LAST_INSTANT),
        metadata=md(),
    )
    assert len(jobs.generations) == len(stubs.generations)
    # An end in the first month of year 1: the range starts at the first instant there is.
    early = await stubs.usage.GetUsageStats(
        U.GetUsageStatsRequest(end_time=timestamp_pb2.Timestamp(seconds=-62_135_596_800 + 86_400)),
        metadata=md(),
    )
    assert early.start_time == FIRST_INSTANT and early.totals.requests == 0
    late = await stubs.usage.GetUsageStats(
        U.GetUsageStatsRequest(end_time=LAST_INSTANT), metadata=md()
    )
    assert late.totals.requests == 0
    # The very first instant as the end leaves an empty range: IMG_003 on end_time.
    assert (
        await refused(
            stubs.usage.GetUsageStats(U.GetUsageStatsRequest(end_time=FIRST_INSTANT), metadata=md())
        )
        == "end_time"
    )


BAD_TTLS = {
    "huge-negative": duration_pb2.Duration(seconds=-315_576_000_000),
    "past-negative-range": duration_pb2.Duration(seconds=-315_576_000_001),
    "past-positive-range": duration_pb2.Duration(seconds=315_576_000_001),
    "nanos-1e9": duration_pb2.Duration(seconds=60, nanos=1_000_000_000),
    "signs-disagree": duration_pb2.Duration(seconds=60, nanos=-1),
    "most-negative-int64": duration_pb2.Duration(seconds=-(2**63)),
}


@pytest.mark.parametrize("ttl", BAD_TTLS.values(), ids=BAD_TTLS.keys())
async def test_bad_url_ttl_is_img_003_on_ttl(stubs: Stubs, ttl: duration_pb2.Duration) -> None:
    call = stubs.library.GetImageUrl(
        L.GetImageUrlRequest(name=stubs.images[0], ttl=ttl), metadata=md()
    )
    assert await refused(call) == "ttl"


async def test_largest_url_ttl_is_capped_not_refused(stubs: Stubs) -> None:
    reply = await stubs.library.GetImageUrl(
        L.GetImageUrlRequest(
            name=stubs.images[0], ttl=duration_pb2.Duration(seconds=315_576_000_000)
        ),
        metadata=md(),
    )
    assert reply.uri


# --- errors that quote long input ----------------------------------------------------------

LONG_INPUT_CALLS: dict[str, tuple[Callable[[Stubs], Any], str]] = {
    "time-zone-10kb": (
        lambda s: s.usage.GetUsageStats(
            U.GetUsageStatsRequest(time_zone="Mars/" + "x" * 10_000), metadata=md()
        ),
        "time_zone",
    ),
    "variable-name-10kb": (
        lambda s: s.templates.ApplyPromptTemplate(
            T.ApplyPromptTemplateRequest(
                name=s.templates_made[0], variables={"subject": "fox", "ü" * 10_000: "x"}
            ),
            metadata=md(),
        ),
        "variables",
    ),
    "provider-10kb": (
        lambda s: s.generation.QuoteGeneration(
            G.QuoteGenerationRequest(
                spec=common_pb2.GenerationSpec(prompt="a fox", provider="x" * 10_000)
            ),
            metadata=md(),
        ),
        "provider",
    ),
}


@pytest.mark.parametrize(("call", "field"), LONG_INPUT_CALLS.values(), ids=LONG_INPUT_CALLS.keys())
async def test_refusal_quoting_long_input_reaches_the_caller(
    stubs: Stubs, call: Callable[[Stubs], Any], field: str
) -> None:
    # Before: the status was larger than a client accepts (bare RESOURCE_EXHAUSTED).
    assert await refused(call(stubs)) == field


@pytest.mark.parametrize("zone", ["localtime", "posixrules", "posix/Europe/Paris", "right/UTC"])
async def test_time_zone_files_that_are_not_iana_names_are_img_003(stubs: Stubs, zone: str) -> None:
    # Python's ZoneInfo opens these files; PostgreSQL refuses them (it was INTERNAL).
    call = stubs.usage.GetUsageStats(U.GetUsageStatsRequest(time_zone=zone), metadata=md())
    assert await refused(call) == "time_zone"


async def test_iana_time_zones_still_work(stubs: Stubs) -> None:
    for zone in ("", "UTC", "Europe/Paris", "America/New_York", "Etc/GMT+5"):
        reply = await stubs.usage.GetUsageStats(
            U.GetUsageStatsRequest(time_zone=zone), metadata=md()
        )
        assert reply.totals.requests >= 2


async def test_a_zone_the_database_does_not_know_is_img_003(
    stubs: Stubs, module_database_url: str
) -> None:
    # The service checks names against Python's list; PostgreSQL's may differ. Alice's
    # usage records (made by the stubs fixture) make PostgreSQL read the zone.
    pool = await asyncpg.create_pool(module_database_url, min_size=1, max_size=1)
    now = datetime.now(UTC)
    try:
        # The repository only reports it; the service makes it the caller's error.
        with pytest.raises(UnknownTimeZone):
            await UsageQueries(pool).totals(
                "alice", now - timedelta(days=1), now + timedelta(days=1), "posixrules"
            )
        service = UsageService(UsageQueries(pool), CreditLedger(pool), PlanTable.default())
        with pytest.raises(InvalidRequest) as caught:
            await service.stats(
                Identity("alice"), now - timedelta(days=1), now + timedelta(days=1), "posixrules"
            )
        assert caught.value.field == "time_zone"
        assert "posixrules" in str(caught.value)
    finally:
        await pool.close()


# --- enum numbers outside the known set (already refused; pinned here) ----------------------

UNKNOWN_ENUMS: dict[str, tuple[Callable[[Stubs], Any], str]] = {
    "list-images-kind": (
        lambda s: s.library.ListImages(L.ListImagesRequest(kind=99), metadata=md()),
        "kind",
    ),
    "list-generations-state": (
        lambda s: s.generation.ListGenerations(
            G.ListGenerationsRequest(states=[G.GENERATION_STATE_COMPLETED, 99]), metadata=md()
        ),
        "states",
    ),
    "list-usage-status": (
        lambda s: s.usage.ListUsage(U.ListUsageRequest(statuses=[-1]), metadata=md()),
        "statuses",
    ),
    "download-format": (
        lambda s: s.library.DownloadImage(
            L.DownloadImageRequest(name=s.images[0], format=99), metadata=md()
        ),
        "format",
    ),
    "spec-style": (
        lambda s: s.generation.QuoteGeneration(
            G.QuoteGenerationRequest(
                spec=common_pb2.GenerationSpec(prompt="a fox", style=2**31 - 1)
            ),
            metadata=md(),
        ),
        "style",
    ),
    "template-visibility": (_create_template(visibility=99), "visibility"),
    "template-variable-type": (
        _create_template(variables=[T.TemplateVariable(name="subject", type=99)]),
        "variables",
    ),
}


@pytest.mark.parametrize(("call", "field"), UNKNOWN_ENUMS.values(), ids=UNKNOWN_ENUMS.keys())
async def test_unknown_enum_numbers_are_img_003_on_their_field(
    stubs: Stubs, call: Callable[[Stubs], Any], field: str
) -> None:
    before = await snapshot(stubs)
    assert await refused(call(stubs)) == field
    assert await snapshot(stubs) == before
