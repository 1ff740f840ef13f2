"""PromptTemplateService through a served process: sharing, permissions, apply, generate."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from imagegen.v1 import common_pb2, templates_pb2, templates_pb2_grpc

from imagegen.identity import mint_token
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, reason_of

T = templates_pb2


def md(user: str, team: str = "") -> tuple[tuple[str, str], ...]:
    token = mint_token(TEST_JWT_KEY, user_id=user, sub_account=team)
    return (("authorization", f"Bearer {token}"),)


async def test_shared_templates_permissions_and_generation(
    tmp_path: Path, database_url: str
) -> None:
    owner, member, outsider = md("alice", "team-a"), md("carol", "team-a"), md("bob", "team-b")
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = templates_pb2_grpc.PromptTemplateServiceStub(channel)
            created = (
                await stub.CreatePromptTemplate(
                    T.CreatePromptTemplateRequest(
                        template=T.PromptTemplate(
                            display_name="Animal portrait",
                            prompt="a portrait of a {{animal}} in {{place}}",
                            style=common_pb2.STYLE_WATERCOLOR,
                            category="portraits",
                            visibility=T.TEMPLATE_VISIBILITY_SHARED,
                            variables=[
                                T.TemplateVariable(name="animal", required=True),
                                T.TemplateVariable(name="place", default_value="a forest"),
                            ],
                        )
                    ),
                    metadata=owner,
                )
            ).template
            private = (
                await stub.CreatePromptTemplate(
                    T.CreatePromptTemplateRequest(
                        template=T.PromptTemplate(display_name="Mine", prompt="just mine")
                    ),
                    metadata=owner,
                )
            ).template
            assert created.owner == "alice" and created.usage_count == 0

            # The sub-account's member sees and applies the shared one, not the private one.
            seen = await stub.ListPromptTemplates(T.ListPromptTemplatesRequest(), metadata=member)
            assert [t.name for t in seen.templates] == [created.name]
            applied = await stub.ApplyPromptTemplate(
                T.ApplyPromptTemplateRequest(name=created.name, variables={"animal": "{{place}}"}),
                metadata=member,
            )
            assert applied.prompt == "a portrait of a {{place}} in a forest"
            assert applied.style == common_pb2.STYLE_WATERCOLOR
            by_category = await stub.ListPromptTemplates(
                T.ListPromptTemplatesRequest(category="portraits"), metadata=owner
            )
            assert [t.name for t in by_category.templates] == [created.name]

            # Members may not change it (PERMISSION_DENIED); outsiders cannot see it (NOT_FOUND).
            change = T.UpdatePromptTemplateRequest(
                template=T.PromptTemplate(name=created.name, display_name="Hijacked"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            )
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.UpdatePromptTemplate(change, metadata=member)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            for call in (
                stub.UpdatePromptTemplate(change, metadata=outsider),
                stub.GetPromptTemplate(
                    T.GetPromptTemplateRequest(name=created.name), metadata=outsider
                ),
                stub.GetPromptTemplate(
                    T.GetPromptTemplateRequest(name=private.name), metadata=member
                ),
                stub.DeletePromptTemplate(
                    T.DeletePromptTemplateRequest(name=created.name), metadata=outsider
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as hidden:
                    await call
                assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            renamed = await stub.UpdatePromptTemplate(
                T.UpdatePromptTemplateRequest(
                    template=T.PromptTemplate(name=created.name, display_name="Portraits"),
                    update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                ),
                metadata=owner,
            )
            assert renamed.template.display_name == "Portraits"
            assert renamed.template.prompt == created.prompt

            # Bad input names what is wrong and changes nothing.
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.ApplyPromptTemplate(
                    T.ApplyPromptTemplateRequest(name=created.name), metadata=member
                )
            assert reason_of(missing.value) == "IMG_003" and "animal" in (
                missing.value.details() or ""
            )

            # usage_count counts submitted generations only.
            generated = await stub.GenerateFromPromptTemplate(
                T.GenerateFromPromptTemplateRequest(
                    name=created.name,
                    variables={"animal": "fox"},
                    overrides=T.GenerationOverrides(
                        size=common_pb2.ImageSize(width=256, height=256)
                    ),
                ),
                metadata=member,
            )
            assert generated.generation.spec.prompt == "a portrait of a fox in a forest"
            assert generated.generation.spec.style == common_pb2.STYLE_WATERCOLOR
            overridden = await stub.GenerateFromPromptTemplate(
                T.GenerateFromPromptTemplateRequest(
                    name=created.name,
                    variables={"animal": "owl"},
                    overrides=T.GenerationOverrides(style=common_pb2.STYLE_SKETCH),
                ),
                metadata=owner,
            )
            assert overridden.generation.spec.style == common_pb2.STYLE_SKETCH
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GenerateFromPromptTemplate(
                    T.GenerateFromPromptTemplateRequest(name=created.name), metadata=owner
                )
            after = await stub.GetPromptTemplate(
                T.GetPromptTemplateRequest(name=created.name), metadata=owner
            )
            assert after.template.usage_count == 2
            await stub.DeletePromptTemplate(
                T.DeletePromptTemplateRequest(name=created.name), metadata=owner
            )
            with pytest.raises(grpc.aio.AioRpcError) as deleted:
                await stub.GetPromptTemplate(
                    T.GetPromptTemplateRequest(name=created.name), metadata=owner
                )
            assert deleted.value.code() == grpc.StatusCode.NOT_FOUND


def portrait(**changes: object) -> T.PromptTemplate:
    values: dict[str, object] = {
        "display_name": "Portrait",
        "prompt": "a portrait of a {{animal}}",
        "variables": [T.TemplateVariable(name="animal", required=True)],
    }
    values.update(changes)
    return T.PromptTemplate(**values)  # type: ignore[arg-type]


async def test_create_honours_its_request_id(
    tmp_path: Path, database_url: str
) -> None:
    import asyncio

    import asyncpg

    owner, other = md("alice"), md("bob")
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = templates_pb2_grpc.PromptTemplateServiceStub(channel)

            async def create(
                template: T.PromptTemplate, request_id: str, who: tuple[tuple[str, str], ...]
            ) -> T.PromptTemplate:
                reply = await stub.CreatePromptTemplate(
                    T.CreatePromptTemplateRequest(template=template, request_id=request_id),
                    metadata=who,
                )
                return reply.template

            # Retries, even racing ones, get the template created first.
            first, *retries = await asyncio.gather(
                *(create(portrait(), "create-1", owner) for _ in range(4))
            )
            assert {t.name for t in retries} == {first.name}
            # The same id with other parameters is IMG_009 and creates nothing.
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await create(portrait(display_name="Another"), "create-1", owner)
            assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(reused.value) == "IMG_009"
            # Request ids are per caller; no id always creates; a bad id is IMG_003.
            assert (await create(portrait(), "create-1", other)).name != first.name
            assert (await create(portrait(), "", owner)).name != first.name
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await create(portrait(), "not ok!", owner)
            assert reason_of(bad.value) == "IMG_003"

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT owner_id FROM prompt_templates ORDER BY owner_id")
    finally:
        await conn.close()
    assert [r["owner_id"] for r in rows] == ["alice", "alice", "bob"]


async def test_a_generate_retried_with_one_request_id_counts_one_use(
    tmp_path: Path, database_url: str
) -> None:
    owner = md("alice")
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = templates_pb2_grpc.PromptTemplateServiceStub(channel)
            template = (
                await stub.CreatePromptTemplate(
                    T.CreatePromptTemplateRequest(template=portrait()), metadata=owner
                )
            ).template
            request = T.GenerateFromPromptTemplateRequest(
                name=template.name,
                variables={"animal": "fox"},
                overrides=T.GenerationOverrides(size=common_pb2.ImageSize(width=256, height=256)),
                request_id="generate-1",
            )
            jobs = {
                (await stub.GenerateFromPromptTemplate(request, metadata=owner)).generation.name
                for _ in range(3)
            }
            assert len(jobs) == 1
            request.request_id = "generate-2"
            await stub.GenerateFromPromptTemplate(request, metadata=owner)
            after = await stub.GetPromptTemplate(
                T.GetPromptTemplateRequest(name=template.name), metadata=owner
            )
            assert after.template.usage_count == 2, "one use per job made"


async def test_a_create_request_id_is_forgotten_after_its_ttl(
    tmp_path: Path, database_url: str
) -> None:
    import asyncpg

    async with serve_in_process(
        tmp_path, database_url, env={"IMAGEGEN_REQUEST_ID_TTL": "60"}
    ) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = templates_pb2_grpc.PromptTemplateServiceStub(channel)
            request = T.CreatePromptTemplateRequest(template=portrait(), request_id="old-id")
            first = (await stub.CreatePromptTemplate(request, metadata=md("alice"))).template
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute(
                    "UPDATE prompt_templates SET created_at = now() - interval '61 seconds'"
                )
            finally:
                await conn.close()
            # Past the TTL the id is free again, even for other parameters.
            request.template.display_name = "Another"
            second = (await stub.CreatePromptTemplate(request, metadata=md("alice"))).template
            assert second.name != first.name and second.display_name == "Another"
