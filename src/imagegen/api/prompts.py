"""PromptAssistantService: thin proto <-> domain mapping around the prompt use cases."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from imagegen.api import convert
from imagegen.api.context import identity
from imagegen.domain.suggestions import Suggestion, SuggestionSource
from imagegen.services.prompts import PromptEnhancement, PromptSuggestions
from imagegen.v1 import prompts_pb2, prompts_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
P = prompts_pb2

_SOURCE_PB = {
    SuggestionSource.HISTORY: P.SUGGESTION_SOURCE_HISTORY,
    SuggestionSource.TEMPLATE: P.SUGGESTION_SOURCE_TEMPLATE,
    SuggestionSource.PHRASE: P.SUGGESTION_SOURCE_PHRASE,
}


def _suggestion(found: Suggestion) -> prompts_pb2.PromptSuggestion:
    return P.PromptSuggestion(
        text=found.text,
        source=_SOURCE_PB[found.source],
        template=f"templates/{found.template_id}" if found.template_id else "",
        score=found.score,
    )


class PromptAssistantServicer(prompts_pb2_grpc.PromptAssistantServiceServicer):
    """gRPC face of prompt suggestions and enhancement."""

    def __init__(self, suggestions: PromptSuggestions, enhancement: PromptEnhancement) -> None:
        self._suggestions = suggestions
        self._enhancement = enhancement

    async def SuggestPrompts(
        self, request: P.SuggestPromptsRequest, context: Ctx
    ) -> P.SuggestPromptsResponse:
        found = await self._suggestions.suggest(
            identity(), request.text, convert.style_from_proto(request.style), request.limit
        )
        return P.SuggestPromptsResponse(suggestions=[_suggestion(s) for s in found])

    async def EnhancePrompt(
        self, request: P.EnhancePromptRequest, context: Ctx
    ) -> P.EnhancePromptResponse:
        enhanced = await self._enhancement.enhance(
            identity(),
            request.prompt,
            convert.style_from_proto(request.style),
            convert.source_from_proto(request.source),
        )
        return P.EnhancePromptResponse(
            prompt=enhanced.prompt,
            negative_prompt=enhanced.negative_prompt,
            enhancer=enhanced.enhancer,
            credits=enhanced.credits,
        )
