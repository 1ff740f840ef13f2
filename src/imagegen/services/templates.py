"""Prompt template use cases: create, read, list, change, delete, apply, generate."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

from imagegen.domain import paging
from imagegen.domain.errors import InvalidRequest, NotFound, PermissionDenied, RequestIdReused
from imagegen.domain.models import Generation, GenerationSpec, Identity, SourceRef, Style
from imagegen.domain.moderation import Purpose
from imagegen.domain.templates import (
    PromptTemplate,
    check_category,
    check_template,
    render,
    template_fingerprint,
)
from imagegen.domain.validation import check_request_id
from imagegen.repositories.templates import TemplateRepository
from imagegen.services.generations import SubmissionService

EDITABLE = ("display_name", "description", "prompt", "style", "category", "variables", "visibility")


class TemplateService:
    """Templates a caller owns, or sees through their sub-account."""

    def __init__(
        self,
        templates: TemplateRepository,
        submission: SubmissionService,
        *,
        request_id_ttl: timedelta,
    ) -> None:
        self._templates = templates
        self._submission = submission
        #: how long a create's request_id is remembered (as a submit's)
        self._request_id_ttl = request_id_ttl

    async def create(
        self, identity: Identity, template: PromptTemplate, request_id: str = ""
    ) -> PromptTemplate:
        """A new template owned by the caller. A retry with the same request_id and the
        same template gets the template made first; other parameters are IMG_009."""
        check_request_id(request_id)
        if template.shared and not identity.sub_account:
            raise InvalidRequest(
                "only a member of a sub-account can share a template", field="visibility"
            )
        owned = dataclasses.replace(
            template,
            id=str(uuid.uuid4()),
            owner_id=identity.user_id,
            sub_account=identity.sub_account,
            usage_count=0,
        )
        checked = check_template(owned)
        created, past_fingerprint = await self._templates.create(
            checked, request_id=request_id, remembered_for=self._request_id_ttl
        )
        if past_fingerprint is not None and past_fingerprint != template_fingerprint(checked):
            raise RequestIdReused(
                f"request_id {request_id!r} was used for a different template; use a new "
                "request_id for new parameters",
                metadata={"request_id": request_id},
            )
        return created

    async def get(self, identity: Identity, template_id: str) -> PromptTemplate:
        template = await self._templates.get_visible(
            identity.user_id, identity.sub_account, template_id
        )
        if template is None:
            raise NotFound(f"template {template_id!r} not found")
        return template

    async def _owned(self, identity: Identity, template_id: str) -> PromptTemplate:
        template = await self.get(identity, template_id)
        if template.owner_id != identity.user_id:
            raise PermissionDenied("only the template's owner can change it")
        return template

    async def list_templates(
        self, identity: Identity, *, category: str, page_size: int, page_token: str
    ) -> tuple[list[PromptTemplate], str]:
        size = paging.page_size(page_size)
        check_category(category)
        cursor = paging.decode_cursor(page_token, f"category={category}")
        page = await self._templates.list_visible(
            identity.user_id,
            identity.sub_account,
            category=category,
            after=cursor,
            limit=size + 1,
        )
        token = ""
        if len(page) > size:
            page = page[:size]
            last = page[-1]
            assert last.created_at is not None
            token = paging.encode_cursor(
                paging.Cursor(last.created_at, last.id), f"category={category}"
            )
        return page, token

    async def update(
        self, identity: Identity, template_id: str, changes: PromptTemplate, fields: tuple[str, ...]
    ) -> PromptTemplate:
        current = await self._owned(identity, template_id)
        fields = fields or EDITABLE
        unknown = [f for f in fields if f not in EDITABLE]
        if unknown:
            raise InvalidRequest(
                f"update_mask names fields that cannot change: {', '.join(unknown)}",
                field="update_mask",
            )
        values = {
            "display_name": changes.display_name,
            "description": changes.description,
            "prompt": changes.prompt,
            "style": changes.style,
            "category": changes.category,
            "variables": changes.variables,
            "shared": changes.shared,
        }
        picked = {
            ("shared" if f == "visibility" else f): values["shared" if f == "visibility" else f]
            for f in fields
        }
        if picked.get("shared") and not current.sub_account:
            raise InvalidRequest(
                "only a member of a sub-account can share a template", field="visibility"
            )
        updated = check_template(dataclasses.replace(current, **picked))  # type: ignore[arg-type]
        return await self._templates.replace(updated)

    async def delete(self, identity: Identity, template_id: str) -> None:
        template = await self._owned(identity, template_id)
        await self._templates.delete(identity.user_id, template.id)

    async def apply(
        self, identity: Identity, template_id: str, values: dict[str, str]
    ) -> tuple[str, str, dict[str, str]]:
        """The rendered prompt, the template's style and the values used."""
        template = await self.get(identity, template_id)
        prompt, used = render(template, values)
        return prompt, template.style, used

    async def generate(
        self,
        identity: Identity,
        template_id: str,
        values: dict[str, str],
        overrides: GenerationSpec,
        *,
        style_overridden: bool,
        request_id: str = "",
        source_refs: tuple[SourceRef, ...] = (),
        mask_ref: SourceRef | None = None,
        size_given: bool = True,
    ) -> Generation:
        """Submit a generation from the rendered template (its style unless overridden);
        the template's usage count goes up once for each job this creates (a retry with
        the same request_id gets its job back without counting again)."""
        template = await self.get(identity, template_id)
        prompt, _ = render(template, values)
        style = (
            overrides.style
            if style_overridden
            else (Style(template.style) if template.style else None)
        )
        spec = dataclasses.replace(overrides, prompt=prompt, style=style)
        # The rendered prompt is moderated inside submit, like any prompt, and recorded
        # as a template's.
        submitted = await self._submission.submit_job(
            identity,
            spec,
            request_id,
            source_refs=source_refs,
            mask_ref=mask_ref,
            size_given=size_given,
            moderation_purpose=Purpose.TEMPLATE,
        )
        if submitted.created:
            await self._templates.count_use(template.id)
        return submitted.generation
