"""ImageGenerationService: thin proto <-> domain mapping around the generation use cases
(services/generations/).

Domain errors are raised as they are; the error interceptor turns them into rich
gRPC status in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc

from imagegen.api import convert
from imagegen.api.context import identity
from imagegen.api.errors import error_from_code
from imagegen.domain.batches import BATCHES_PREFIX, about_spec
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import EventType, Generation, Identity
from imagegen.domain.providers import ProviderInfo
from imagegen.domain.validation import check_resource_name
from imagegen.services.generations import (
    GenerationReads,
    GenerationWaiter,
    GenerationWatch,
    SubmissionService,
    UserSettingsService,
)
from imagegen.services.generations.batches import BatchItem, BatchService
from imagegen.services.webhooks.secrets import WebhookSecrets, WebhookSecretView
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
        waiter: GenerationWaiter,
        webhook_secrets: WebhookSecrets,
        batches: BatchService,
        usage_notice: str,
    ) -> None:
        self._submission = submission
        self._batches = batches
        self._reads = reads
        self._watch = watch
        self._waiter = waiter
        self._webhook_secrets = webhook_secrets
        self._user_settings = user_settings
        self._url_ttl = url_ttl
        self._usage_notice = usage_notice

    async def _submit(
        self,
        caller: Identity,
        spec: common_pb2.GenerationSpec,
        request_id: str,
        callback_uri: str = "",
    ) -> Generation:
        parsed = convert.parse_spec(spec)
        return await self._submission.submit(
            caller,
            dataclasses.replace(parsed.spec, callback_uri=callback_uri),
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
        # The stream's slot is taken before the submit: a refused stream leaves no job.
        with self._watch.stream_slot(caller):
            generation = await self._submit(caller, request.spec, request.request_id)
            async for event in self._watch.follow(generation):
                yield generation_pb2.GenerateImageResponse(
                    event=convert.event_to_proto(
                        event, self._url_ttl, usage_notice=self._usage_notice
                    )
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
        generation = await self._submit(
            identity(), request.spec, request.request_id, request.callback_uri
        )
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
        with self._watch.stream_slot(caller):
            async for event in self._watch.watch(caller, generation_id, request.after_sequence):
                yield generation_pb2.WatchGenerationResponse(
                    event=convert.event_to_proto(
                        event, self._url_ttl, usage_notice=self._usage_notice
                    )
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
            batch_id=convert.batch_id_from_name(request.batch) if request.batch else "",
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
        parsed = convert.parse_spec(request.spec)
        quote = await self._submission.quote(
            identity(),
            parsed.spec,
            source_refs=parsed.source_refs,
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

    async def WaitGeneration(
        self,
        request: generation_pb2.WaitGenerationRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.WaitGenerationRequest, generation_pb2.WaitGenerationResponse
        ],
    ) -> generation_pb2.WaitGenerationResponse:
        caller = identity()
        generation_id = convert.generation_id_from_name(request.name)
        timeout = convert.optional_duration(request, "timeout")
        generation = await self._waiter.wait(
            caller, generation_id, timeout, deadline_left=context.time_remaining()
        )
        return generation_pb2.WaitGenerationResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )

    async def GetWebhookSecret(
        self,
        request: generation_pb2.GetWebhookSecretRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.GetWebhookSecretRequest, generation_pb2.GetWebhookSecretResponse
        ],
    ) -> generation_pb2.GetWebhookSecretResponse:
        caller = identity()
        secret = await self._webhook_secrets.get(caller)
        return generation_pb2.GetWebhookSecretResponse(secret=_webhook_secret(secret))

    async def RotateWebhookSecret(
        self,
        request: generation_pb2.RotateWebhookSecretRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.RotateWebhookSecretRequest, generation_pb2.RotateWebhookSecretResponse
        ],
    ) -> generation_pb2.RotateWebhookSecretResponse:
        caller = identity()
        secret = await self._webhook_secrets.rotate(caller, request.request_id)
        return generation_pb2.RotateWebhookSecretResponse(secret=_webhook_secret(secret))

    async def BatchGenerate(
        self,
        request: generation_pb2.BatchGenerateRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.BatchGenerateRequest, generation_pb2.BatchGenerateResponse
        ],
    ) -> generation_pb2.BatchGenerateResponse:
        caller = identity()
        self._batches.check_size(len(request.specs))
        items = []
        for index, message in enumerate(request.specs):
            with about_spec(index):
                parsed = convert.parse_spec(message)
            items.append(
                BatchItem(
                    parsed.spec,
                    names_sources=bool(parsed.source_refs) or parsed.mask_ref is not None,
                )
            )
        submitted = await self._batches.submit(
            caller, items, request.request_id, request.callback_uri
        )
        return generation_pb2.BatchGenerateResponse(
            batch=BATCHES_PREFIX + submitted.batch_id,
            generations=[
                convert.generation_to_proto(g, self._url_ttl, usage_notice=self._usage_notice)
                for g in submitted.generations
            ],
        )

    async def UpscaleImage(
        self,
        request: generation_pb2.UpscaleImageRequest,
        context: grpc.aio.ServicerContext[
            generation_pb2.UpscaleImageRequest, generation_pb2.UpscaleImageResponse
        ],
    ) -> generation_pb2.UpscaleImageResponse:
        caller = identity()
        generation = await self._submission.upscale(
            caller,
            check_resource_name(request.image, "images", field="image"),
            factor=request.factor,
            provider=request.provider,
            upscaler=request.upscaler,
            request_id=request.request_id,
            source=convert.source_from_proto(request.source),
            output_format=convert.format_from_proto(request.format),
        )
        return generation_pb2.UpscaleImageResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )


def _webhook_secret(view: WebhookSecretView) -> generation_pb2.WebhookSecret:
    message = generation_pb2.WebhookSecret(secret=view.secret)
    message.create_time.FromDatetime(view.created_at)
    if view.previous_expire_time is not None:
        message.previous_expire_time.FromDatetime(view.previous_expire_time)
    return message


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
