"""ImageGenerationService: thin proto <-> domain mapping around the generation use cases
(services/generations/).

Domain errors are raised as they are; the error interceptor turns them into rich
gRPC status in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc

from imagegen.api import convert
from imagegen.api.context import identity
from imagegen.api.errors import error_from_code
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import EventType, Generation, Identity
from imagegen.domain.providers import ProviderInfo
from imagegen.services.generations import (
    GenerationReads,
    GenerationWatch,
    SubmissionService,
    UserSettingsService,
)
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc


class ImageGenerationServicer(generation_pb2_grpc.ImageGenerationServiceServicer):
    """gRPC face of the generation use cases."""

    def __init__(
        self,
        *,
        submission: SubmissionService,
        reads: GenerationReads,
        watch: GenerationWatch,
        user_settings: UserSettingsService,
        url_ttl: timedelta,
        usage_notice: str,
    ) -> None:
        self._submission = submission
        self._reads = reads
        self._watch = watch
        self._user_settings = user_settings
        self._url_ttl = url_ttl
        self._usage_notice = usage_notice

    async def _submit(
        self, caller: Identity, spec: common_pb2.GenerationSpec, request_id: str
    ) -> Generation:
        parsed = convert.parse_spec(spec)
        return await self._submission.submit(
            caller,
            parsed.spec,
            request_id,
            source_refs=parsed.source_refs,
            mask_ref=parsed.mask_ref,
            size_given=parsed.size_given,
        )

    async def GenerateImage(
        self,
        request: generation_pb2.GenerateImageRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.GenerateImageRequest, generation_pb2.GenerateImageResponse
        ],
    ) -> AsyncIterator[generation_pb2.GenerateImageResponse]:
        caller = identity()
        generation = await self._submit(caller, request.spec, request.request_id)
        async for event in self._watch.watch(caller, generation.id):
            yield generation_pb2.GenerateImageResponse(
                event=convert.event_to_proto(event, self._url_ttl, usage_notice=self._usage_notice)
            )
            if event.type is EventType.FAILED:
                # The caller that waits learns of the failure as a status too.
                raise error_from_code(event.error_code, event.error_message, event.retryable)

    async def SubmitGeneration(
        self,
        request: generation_pb2.SubmitGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.SubmitGenerationRequest, generation_pb2.SubmitGenerationResponse
        ],
    ) -> generation_pb2.SubmitGenerationResponse:
        generation = await self._submit(identity(), request.spec, request.request_id)
        return generation_pb2.SubmitGenerationResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )

    async def WatchGeneration(
        self,
        request: generation_pb2.WatchGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.WatchGenerationRequest, generation_pb2.WatchGenerationResponse
        ],
    ) -> AsyncIterator[generation_pb2.WatchGenerationResponse]:
        caller = identity()
        generation_id = convert.generation_id_from_name(request.name)
        async for event in self._watch.watch(caller, generation_id, request.after_sequence):
            yield generation_pb2.WatchGenerationResponse(
                event=convert.event_to_proto(event, self._url_ttl, usage_notice=self._usage_notice)
            )

    async def GetGeneration(
        self,
        request: generation_pb2.GetGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.GetGenerationRequest, generation_pb2.GetGenerationResponse
        ],
    ) -> generation_pb2.GetGenerationResponse:
        generation = await self._reads.get(
            identity(), convert.generation_id_from_name(request.name)
        )
        return generation_pb2.GetGenerationResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )

    async def ListGenerations(
        self,
        request: generation_pb2.ListGenerationsRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.ListGenerationsRequest, generation_pb2.ListGenerationsResponse
        ],
    ) -> generation_pb2.ListGenerationsResponse:
        states = tuple(convert.state_from_proto(s) for s in request.states)
        page, next_token = await self._reads.list_generations(
            identity(),
            states=states,
            created_from=convert.optional_time(request, "create_time_start"),
            created_before=convert.optional_time(request, "create_time_end"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return generation_pb2.ListGenerationsResponse(
            generations=[
                convert.generation_to_proto(g, self._url_ttl, usage_notice=self._usage_notice)
                for g in page
            ],
            next_page_token=next_token,
        )

    async def CancelGeneration(
        self,
        request: generation_pb2.CancelGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.CancelGenerationRequest, generation_pb2.CancelGenerationResponse
        ],
    ) -> generation_pb2.CancelGenerationResponse:
        generation = await self._reads.cancel(
            identity(), convert.generation_id_from_name(request.name)
        )
        return generation_pb2.CancelGenerationResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )

    async def RerunGeneration(
        self,
        request: generation_pb2.RerunGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.RerunGenerationRequest, generation_pb2.RerunGenerationResponse
        ],
    ) -> generation_pb2.RerunGenerationResponse:
        generation = await self._submission.rerun(
            identity(), convert.generation_id_from_name(request.name), request.request_id
        )
        return generation_pb2.RerunGenerationResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )

    async def QuoteGeneration(
        self,
        request: generation_pb2.QuoteGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.QuoteGenerationRequest, generation_pb2.QuoteGenerationResponse
        ],
    ) -> generation_pb2.QuoteGenerationResponse:
        identity()
        parsed = convert.parse_spec(request.spec)
        quote = self._submission.quote(
            parsed.spec,
            edit=bool(parsed.source_refs),
            has_mask=parsed.mask_ref is not None,
            size_given=parsed.size_given,
        )
        return generation_pb2.QuoteGenerationResponse(
            credits=quote.credits, provider=quote.provider
        )

    async def GetUserSettings(
        self,
        request: generation_pb2.GetUserSettingsRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.GetUserSettingsRequest, generation_pb2.GetUserSettingsResponse
        ],
    ) -> generation_pb2.GetUserSettingsResponse:
        provider = await self._user_settings.default_provider(identity())
        return generation_pb2.GetUserSettingsResponse(
            settings=generation_pb2.UserSettings(default_provider=provider)
        )

    async def UpdateUserSettings(
        self,
        request: generation_pb2.UpdateUserSettingsRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.UpdateUserSettingsRequest, generation_pb2.UpdateUserSettingsResponse
        ],
    ) -> generation_pb2.UpdateUserSettingsResponse:
        caller = identity()
        paths = list(request.update_mask.paths) or ["default_provider"]
        unknown = [p for p in paths if p != "default_provider"]
        if unknown:
            raise InvalidRequest(
                f"update_mask names unknown fields: {', '.join(unknown)}", field="update_mask"
            )
        provider = await self._user_settings.set_default_provider(
            caller, request.settings.default_provider
        )
        return generation_pb2.UpdateUserSettingsResponse(
            settings=generation_pb2.UserSettings(default_provider=provider)
        )

    async def ListProviders(
        self,
        request: generation_pb2.ListProvidersRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.ListProvidersRequest, generation_pb2.ListProvidersResponse
        ],
    ) -> generation_pb2.ListProvidersResponse:
        providers = await self._user_settings.list_providers(identity())
        return generation_pb2.ListProvidersResponse(providers=[_provider(p) for p in providers])

    # Added to the contract ahead of their use cases (issues 13 and 14); until those
    # land they answer UNIMPLEMENTED, as the generated base class would.
    async def WaitGeneration(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def BatchGenerate(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def UpscaleImage(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def GetWebhookSecret(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def RotateWebhookSecret(self, request: Any, context: Any) -> Any:
        raise NotImplementedError


def _provider(info: ProviderInfo) -> generation_pb2.ProviderInfo:
    return generation_pb2.ProviderInfo(
        id=info.id,
        display_name=info.display_name,
        capabilities=generation_pb2.ProviderCapabilities(
            edit=info.edit,
            mask=info.mask,
            negative_prompt=info.negative_prompt,
            seed=info.seed,
            style=info.style,
            previews=info.previews,
            sizes=[common_pb2.ImageSize(width=s.width, height=s.height) for s in info.sizes],
            formats=[convert.format_to_proto(f) for f in info.formats],
            max_count=info.max_count,
            outpaint=info.outpaint,
            upscale=info.upscale,
        ),
        models=list(info.models),
        upscalers=list(info.upscalers),
        styles=convert.all_styles_proto(),
        default=info.default,
    )
