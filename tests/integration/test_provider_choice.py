"""Which provider serves a request: configured ones only, the caller's stored default,
the deployment's default, and capability checks before a job exists."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.fakes.forge_server import ForgeFake
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, metadata, reason_of

E = generation_pb2


async def test_listing_shows_configured_providers_only(tmp_path: Path, database_url: str) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            listed = await stub.ListProviders(E.ListProvidersRequest(), metadata=metadata())
    assert [p.id for p in listed.providers] == ["local"]
    local = listed.providers[0]
    assert local.default and local.capabilities.edit and local.capabilities.previews
    assert len(local.styles) == 13, "every preset of the contract, the seed's five included"
    assert list(local.models) == ["local-pillow-1"]
    assert {(s.width, s.height) for s in local.capabilities.sizes} >= {(1024, 1024), (512, 512)}


async def test_a_users_stored_default_provider_is_used(tmp_path: Path, database_url: str) -> None:
    async with ForgeFake.start() as fake:
        env = {"BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"}
        # The deployment's default stays `local`; alice picks forge for herself.
        env["IMAGEGEN_DEFAULT_PROVIDER"] = "local"
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                listed = await stub.ListProviders(E.ListProvidersRequest(), metadata=metadata())
                assert sorted(p.id for p in listed.providers) == ["forge", "local"]
                updated = await stub.UpdateUserSettings(
                    E.UpdateUserSettingsRequest(
                        settings=E.UserSettings(default_provider="forge"),
                        update_mask=field_mask_pb2.FieldMask(paths=["default_provider"]),
                    ),
                    metadata=metadata(),
                )
                assert updated.settings.default_provider == "forge"
                got = await stub.GetUserSettings(E.GetUserSettingsRequest(), metadata=metadata())
                assert got.settings.default_provider == "forge"
                listed = await stub.ListProviders(E.ListProvidersRequest(), metadata=metadata())
                assert [p.id for p in listed.providers if p.default] == ["forge"]

                spec = common_pb2.GenerationSpec(
                    prompt="a fox", size=common_pb2.ImageSize(width=512, height=512)
                )
                mine = await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=spec), metadata=metadata()
                )
                theirs = await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(spec=spec), metadata=metadata("bob")
                )
                assert mine.generation.provider == "forge"
                assert theirs.generation.provider == "local"

                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.UpdateUserSettings(
                        E.UpdateUserSettingsRequest(
                            settings=E.UserSettings(default_provider="openai")
                        ),
                        metadata=metadata(),
                    )
                assert reason_of(unknown.value) == "IMG_003"


async def test_a_needed_capability_is_checked_before_a_job(
    tmp_path: Path, database_url: str
) -> None:
    mask = common_pb2.ImageSource(data=b"\x89PNG\r\n\x1a\n")
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(
                        spec=common_pb2.GenerationSpec(
                            prompt="invert", sources=[mask], mask=mask, provider="local"
                        )
                    ),
                    metadata=metadata(),
                )
    assert reason_of(caught.value) == "IMG_003"
    assert "mask" in (caught.value.details() or "")


async def test_fallback_serves_when_the_provider_is_down_and_skips_incapable_ones(
    tmp_path: Path, database_url: str
) -> None:
    from tests.fakes.forge_server import Reply
    from tests.integration.test_pipeline import fetch, generate

    async with ForgeFake.start() as fake:
        fake.default = Reply(status=503, body=b"{}")
        env = {
            "BUILT_IN_FORGE_API_URL": fake.url,
            "BUILT_IN_FORGE_API_KEY": "k",
            "IMAGEGEN_FALLBACK_PROVIDERS": "forge,local",
        }
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="a fox",
                    provider="forge",
                    size=common_pb2.ImageSize(width=256, height=256),
                ),
            )
            assert err is None and events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
            served = await fetch(database_url, "SELECT provider FROM generations")
            assert [r["provider"] for r in served] == ["local"], "the job records who served it"
            images = await fetch(database_url, "SELECT provider FROM images")
            assert [r["provider"] for r in images] == ["local"]
            assert len(fake.requests) >= 2, "forge was tried (with retries) first"

            # A free-text edit: `local` cannot do it, so the chain does not fall to it.
            from tests.integration.test_edits import png

            events, err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="paint it like Monet",
                    provider="forge",
                    sources=[common_pb2.ImageSource(data=png(32, 32))],
                ),
            )
            assert events[-1].type == E.GENERATION_EVENT_TYPE_FAILED
            assert events[-1].error.code == "IMG_002"
