"""`spec.model`: listed by ListProviders, checked at submit (IMG_003 naming the
provider's models), sent to the provider in its wire form, kept on the job."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from tests.fakes.openai_server import OpenAIFake
from tests.fakes.sdwebui_server import SDFake
from tests.inprocess import serve_in_process
from tests.integration.test_pipeline import CHANNEL_OPTIONS, fetch, generate, metadata, reason_of

E = generation_pb2


def field_violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_sdwebui_models_are_the_servers_checkpoints_and_a_chosen_one_is_used(
    tmp_path: Path, database_url: str
) -> None:
    async with SDFake.start(step_delay=0.01) as fake:
        env = {"IMAGEGEN_SDWEBUI_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                listed = await stub.ListProviders(E.ListProvidersRequest(), metadata=metadata())
                chosen, chosen_err = await generate(
                    server.grpc_port,
                    common_pb2.GenerationSpec(
                        prompt="a lighthouse", provider="sdwebui", model="dreamshaper_8"
                    ),
                )
                _default, default_err = await generate(
                    server.grpc_port, common_pb2.GenerationSpec(prompt="a bay", provider="sdwebui")
                )
                stored = await stub.GetGeneration(
                    E.GetGenerationRequest(name=chosen[-1].generation), metadata=metadata()
                )
    sdwebui = next(p for p in listed.providers if p.id == "sdwebui")
    assert list(sdwebui.models) == ["v1-5-pruned-emaonly", "sd_xl_base_1.0", "dreamshaper_8"]
    assert chosen_err is None and default_err is None
    first, second = fake.body(0), fake.body(1)
    assert first["override_settings"] == {"sd_model_checkpoint": "dreamshaper_8"}
    assert "override_settings" not in second, "no model: the server keeps its loaded one"
    assert stored.generation.spec.model == "dreamshaper_8"
    assert stored.generation.model == "dreamshaper_8"
    rows = await fetch(database_url, "SELECT model FROM images ORDER BY created_at")
    assert [r["model"] for r in rows] == ["dreamshaper_8", "v1-5-pruned-emaonly"]


@pytest.mark.parametrize(
    ("provider", "model", "offered"),
    [
        ("local", "gpt-image-1", "local-pillow-1"),
        ("openai", "dall-e-3", "gpt-image-1, gpt-image-1-mini"),
        ("sdwebui", "no-such-checkpoint", "v1-5-pruned-emaonly"),
        ("local", "x" * 5000, "local-pillow-1"),
    ],
    ids=["local", "openai", "sdwebui", "huge"],
)
async def test_a_model_the_provider_does_not_offer_is_refused_at_submit(
    tmp_path: Path, database_url: str, provider: str, model: str, offered: str
) -> None:
    async with OpenAIFake.start() as openai, SDFake.start(step_delay=0.01) as sd:
        env = {
            "OPENAI_API_KEY": "sk",
            "OPENAI_BASE_URL": openai.url,
            "IMAGEGEN_SDWEBUI_URL": sd.url,
        }
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
            ) as channel:
                stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.SubmitGeneration(
                        E.SubmitGenerationRequest(
                            spec=common_pb2.GenerationSpec(
                                prompt="a fox", provider=provider, model=model
                            )
                        ),
                        metadata=metadata(),
                    )
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(err) == "IMG_003" and field_violations(err) == ["model"]
    assert offered in (err.details() or "")
    assert len(err.details() or "") < 600, "a huge name is not echoed whole"
    assert list(openai.calls) == [] and list(sd.calls) == []
    assert await fetch(database_url, "SELECT id FROM generations") == []


async def test_openai_gets_the_chosen_model_and_reports_it(
    tmp_path: Path, database_url: str
) -> None:
    async with OpenAIFake.start() as fake:
        env = {"OPENAI_API_KEY": "sk", "OPENAI_BASE_URL": fake.url}
        async with serve_in_process(tmp_path, database_url, env=env) as server:
            events, err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(
                    prompt="a fox", provider="openai", model="gpt-image-1-mini"
                ),
            )
            local, local_err = await generate(
                server.grpc_port,
                common_pb2.GenerationSpec(prompt="a fox", provider="local", model="local-pillow-1"),
            )
    assert err is None and local_err is None
    assert [c.model for c in fake.calls] == ["gpt-image-1-mini"]
    rows = await fetch(database_url, "SELECT model FROM images ORDER BY created_at")
    assert [r["model"] for r in rows] == ["gpt-image-1-mini", "local-pillow-1"]
    assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    assert local[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED


async def test_a_request_id_reused_with_another_model_is_img_009(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as server:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel:
            stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)

            async def submit(model: str) -> E.SubmitGenerationResponse:
                return await stub.SubmitGeneration(
                    E.SubmitGenerationRequest(
                        spec=common_pb2.GenerationSpec(
                            prompt="a fox", provider="local", model=model
                        ),
                        request_id="same-request",
                    ),
                    metadata=metadata(),
                )

            first = await submit("")
            again = await submit("")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit("local-pillow-1")
    assert first.generation.name == again.generation.name
    assert reason_of(caught.value) == "IMG_009"
