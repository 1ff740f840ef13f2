"""Prompt templates (SQL lives here only). A template is visible to its owner and,
when shared, to the members of the owner's sub-account."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from imagegen.domain.paging import Cursor
from imagegen.domain.templates import (
    PromptTemplate,
    TemplateVariable,
    VariableType,
    template_fingerprint,
)
from imagegen.repositories.images import parse_id

#: Who sees a template, with the caller's user id as $1 and sub-account as $2 (also the
#: rule of prompt suggestions, repositories/prompts.py).
VISIBLE = "(owner_id = $1 OR (shared AND sub_account <> '' AND sub_account = $2))"


def _variables_json(template: PromptTemplate) -> list[dict[str, Any]]:
    return [
        {
            "name": v.name,
            "type": v.type.value,
            "required": v.required,
            "default_value": v.default_value,
            "description": v.description,
        }
        for v in template.variables
    ]


def _from_row(row: asyncpg.Record) -> PromptTemplate:
    return PromptTemplate(
        id=str(row["id"]),
        owner_id=row["owner_id"],
        sub_account=row["sub_account"],
        display_name=row["name"],
        prompt=row["prompt"],
        description=row["description"],
        style=row["style"],
        category=row["category"],
        variables=tuple(
            TemplateVariable(
                name=v["name"],
                type=VariableType(v.get("type", "string")),
                required=bool(v.get("required", False)),
                default_value=str(v.get("default_value", "")),
                description=str(v.get("description", "")),
            )
            for v in row["variables"]
        ),
        shared=row["shared"],
        usage_count=row["usage_count"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class TemplateRepository:
    """Stores templates; reads are limited to what the caller may see."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self,
        template: PromptTemplate,
        *,
        request_id: str = "",
        remembered_for: timedelta | None = None,
    ) -> tuple[PromptTemplate, dict[str, Any] | None]:
        """Store a new template, or, when the owner already created one for `request_id`
        within `remembered_for`, return that one instead with the fingerprint it was
        created with (None for a new template). One transaction: a request_id older than
        `remembered_for` is forgotten first, and of two creates racing with one id, one
        inserts and the other gets its template."""
        async with self._pool.acquire() as conn, conn.transaction():
            if request_id and remembered_for is not None:
                await conn.execute(
                    "UPDATE prompt_templates SET request_id = NULL "
                    "WHERE owner_id = $1 AND request_id = $2 "
                    "AND created_at < now() - $3::interval",
                    template.owner_id,
                    request_id,
                    remembered_for,
                )
            return await self._insert_or_find(conn, template, request_id)

    async def _insert_or_find(
        self, conn: asyncpg.Connection, template: PromptTemplate, request_id: str
    ) -> tuple[PromptTemplate, dict[str, Any] | None]:
        # Twice at most: the template made for the id may be deleted between the insert
        # that met it and the read of it, and then this one is the first.
        for _ in range(2):
            row = await conn.fetchrow(
                """
                INSERT INTO prompt_templates (id, owner_id, sub_account, shared, name,
                                              description, prompt, style, category, variables,
                                              request_id, fingerprint)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                ON CONFLICT (owner_id, request_id) WHERE request_id IS NOT NULL DO NOTHING
                RETURNING *
                """,
                uuid.UUID(template.id),
                template.owner_id,
                template.sub_account,
                template.shared,
                template.display_name,
                template.description,
                template.prompt,
                template.style,
                template.category,
                _variables_json(template),
                request_id or None,
                template_fingerprint(template) if request_id else None,
            )
            if row is not None:
                return _from_row(row), None
            # The conflicting insert has committed (ON CONFLICT waits for it), so its row
            # is visible to this statement.
            past = await conn.fetchrow(
                "SELECT * FROM prompt_templates WHERE owner_id = $1 AND request_id = $2",
                template.owner_id,
                request_id,
            )
            if past is not None:
                return _from_row(past), dict(past["fingerprint"] or {})
        raise RuntimeError(f"request_id {request_id!r} kept conflicting with a deleted template")

    async def get_visible(
        self, user_id: str, sub_account: str, template_id: str
    ) -> PromptTemplate | None:
        tid = parse_id(template_id)
        if tid is None:
            return None
        row = await self._pool.fetchrow(
            f"SELECT * FROM prompt_templates WHERE id = $3 AND {VISIBLE}",  # noqa: S608
            user_id,
            sub_account,
            tid,
        )
        return None if row is None else _from_row(row)

    async def list_visible(
        self, user_id: str, sub_account: str, *, category: str, after: Cursor | None, limit: int
    ) -> list[PromptTemplate]:
        rows = await self._pool.fetch(
            f"""
            SELECT * FROM prompt_templates
             WHERE {VISIBLE}
               AND ($3 = '' OR category = $3)
               AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
             ORDER BY created_at DESC, id DESC
             LIMIT $6
            """,  # noqa: S608 - VISIBLE is a fixed clause
            user_id,
            sub_account,
            category,
            after.created_at if after else None,
            uuid.UUID(after.id) if after else None,
            limit,
        )
        return [_from_row(r) for r in rows]

    async def replace(self, template: PromptTemplate) -> PromptTemplate:
        """Write every editable field of a template its owner changed."""
        row = await self._pool.fetchrow(
            """
            UPDATE prompt_templates
               SET name = $3, description = $4, prompt = $5, style = $6, category = $7,
                   variables = $8, shared = $9, updated_at = now()
             WHERE id = $1 AND owner_id = $2
            RETURNING *
            """,
            uuid.UUID(template.id),
            template.owner_id,
            template.display_name,
            template.description,
            template.prompt,
            template.style,
            template.category,
            _variables_json(template),
            template.shared,
        )
        return _from_row(row)

    async def delete(self, owner_id: str, template_id: str) -> None:
        await self._pool.execute(
            "DELETE FROM prompt_templates WHERE id = $1 AND owner_id = $2",
            uuid.UUID(template_id),
            owner_id,
        )

    async def count_use(self, template_id: str) -> None:
        await self._pool.execute(
            "UPDATE prompt_templates SET usage_count = usage_count + 1 WHERE id = $1",
            uuid.UUID(template_id),
        )
