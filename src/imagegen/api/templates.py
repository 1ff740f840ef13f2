"""PromptTemplateService: thin proto <-> domain mapping around TemplateService."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeAlias

import grpc

from imagegen.api import convert
from imagegen.api.context import identity
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.templates import PromptTemplate, TemplateVariable, VariableType
from imagegen.domain.validation import check_resource_name
from imagegen.services.templates import TemplateService
from imagegen.v1 import common_pb2, templates_pb2, templates_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
PREFIX = "templates/"
T = templates_pb2

_TYPES = {
    T.TEMPLATE_VARIABLE_TYPE_UNSPECIFIED: VariableType.STRING,
    T.TEMPLATE_VARIABLE_TYPE_STRING: VariableType.STRING,
    T.TEMPLATE_VARIABLE_TYPE_INTEGER: VariableType.INTEGER,
    T.TEMPLATE_VARIABLE_TYPE_NUMBER: VariableType.NUMBER,
    T.TEMPLATE_VARIABLE_TYPE_BOOLEAN: VariableType.BOOLEAN,
}
_TYPES_PB = {v: k for k, v in _TYPES.items() if k != T.TEMPLATE_VARIABLE_TYPE_UNSPECIFIED}


def _id(name: str) -> str:
    return check_resource_name(name, "templates")


def template_from_proto(message: templates_pb2.PromptTemplate) -> PromptTemplate:
    if message.visibility not in (
        T.TEMPLATE_VISIBILITY_UNSPECIFIED,
        T.TEMPLATE_VISIBILITY_PRIVATE,
        T.TEMPLATE_VISIBILITY_SHARED,
    ):
        raise InvalidRequest(f"visibility {message.visibility} is not known", field="visibility")
    variables = []
    for v in message.variables:
        if v.type not in _TYPES:
            raise InvalidRequest(f"variable type {v.type} is not known", field="variables")
        variables.append(
            TemplateVariable(v.name, _TYPES[v.type], v.required, v.default_value, v.description)
        )
    style = convert.style_from_proto(message.style)
    return PromptTemplate(
        id="",
        owner_id="",
        sub_account="",
        display_name=message.display_name,
        prompt=message.prompt,
        description=message.description,
        style=style.value if style else "",
        category=message.category,
        variables=tuple(variables),
        shared=message.visibility == T.TEMPLATE_VISIBILITY_SHARED,
    )


def template_to_proto(template: PromptTemplate) -> templates_pb2.PromptTemplate:
    message = T.PromptTemplate(
        name=PREFIX + template.id,
        display_name=template.display_name,
        description=template.description,
        prompt=template.prompt,
        style=convert.style_to_proto(template.style),
        category=template.category,
        variables=[
            T.TemplateVariable(
                name=v.name,
                type=_TYPES_PB[v.type],
                required=v.required,
                default_value=v.default_value,
                description=v.description,
            )
            for v in template.variables
        ],
        visibility=T.TEMPLATE_VISIBILITY_SHARED
        if template.shared
        else T.TEMPLATE_VISIBILITY_PRIVATE,
        owner=template.owner_id,
        usage_count=template.usage_count,
    )
    for field, value in (
        ("create_time", template.created_at),
        ("update_time", template.updated_at),
    ):
        if value is not None:
            getattr(message, field).FromDatetime(value)
    return message


class PromptTemplateServicer(templates_pb2_grpc.PromptTemplateServiceServicer):
    """gRPC face of prompt templates."""

    def __init__(self, service: TemplateService, *, url_ttl: timedelta, usage_notice: str) -> None:
        self._service = service
        self._url_ttl = url_ttl
        self._usage_notice = usage_notice

    async def CreatePromptTemplate(
        self, request: T.CreatePromptTemplateRequest, context: Ctx
    ) -> T.CreatePromptTemplateResponse:
        created = await self._service.create(
            identity(), template_from_proto(request.template), request.request_id
        )
        return T.CreatePromptTemplateResponse(template=template_to_proto(created))

    async def GetPromptTemplate(
        self, request: T.GetPromptTemplateRequest, context: Ctx
    ) -> T.GetPromptTemplateResponse:
        template = await self._service.get(identity(), _id(request.name))
        return T.GetPromptTemplateResponse(template=template_to_proto(template))

    async def ListPromptTemplates(
        self, request: T.ListPromptTemplatesRequest, context: Ctx
    ) -> T.ListPromptTemplatesResponse:
        page, token = await self._service.list_templates(
            identity(),
            category=request.category,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return T.ListPromptTemplatesResponse(
            templates=[template_to_proto(t) for t in page], next_page_token=token
        )

    async def UpdatePromptTemplate(
        self, request: T.UpdatePromptTemplateRequest, context: Ctx
    ) -> T.UpdatePromptTemplateResponse:
        updated = await self._service.update(
            identity(),
            _id(request.template.name),
            template_from_proto(request.template),
            tuple(request.update_mask.paths),
        )
        return T.UpdatePromptTemplateResponse(template=template_to_proto(updated))

    async def DeletePromptTemplate(
        self, request: T.DeletePromptTemplateRequest, context: Ctx
    ) -> T.DeletePromptTemplateResponse:
        await self._service.delete(identity(), _id(request.name))
        return T.DeletePromptTemplateResponse()

    async def ApplyPromptTemplate(
        self, request: T.ApplyPromptTemplateRequest, context: Ctx
    ) -> T.ApplyPromptTemplateResponse:
        prompt, style, used = await self._service.apply(
            identity(), _id(request.name), dict(request.variables)
        )
        return T.ApplyPromptTemplateResponse(
            prompt=prompt, style=convert.style_to_proto(style), variables=used
        )

    async def GenerateFromPromptTemplate(
        self, request: T.GenerateFromPromptTemplateRequest, context: Ctx
    ) -> T.GenerateFromPromptTemplateResponse:
        o = request.overrides
        spec = common_pb2.GenerationSpec(
            prompt="template",
            negative_prompt=o.negative_prompt,
            style=o.style,
            count=o.count,
            format=o.format,
            provider=o.provider,
            model=o.model,
            source=o.source,
            sources=list(o.sources),
        )
        if o.HasField("size"):
            spec.size.CopyFrom(o.size)
        if o.HasField("seed"):
            spec.seed = o.seed
        if o.HasField("mask"):
            spec.mask.CopyFrom(o.mask)
        parsed = convert.parse_spec(spec)
        generation = await self._service.generate(
            identity(),
            _id(request.name),
            dict(request.variables),
            parsed.spec,
            style_overridden=o.style != common_pb2.STYLE_UNSPECIFIED,
            request_id=request.request_id,
            source_refs=parsed.source_refs,
            mask_ref=parsed.mask_ref,
            size_given=parsed.size_given,
        )
        return T.GenerateFromPromptTemplateResponse(
            generation=convert.generation_to_proto(
                generation, self._url_ttl, usage_notice=self._usage_notice
            )
        )
