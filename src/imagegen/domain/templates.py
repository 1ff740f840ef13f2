"""Prompt templates: `{{name}}` placeholders with typed variables (no I/O).

Rendering is one pass: each placeholder is replaced by its value as plain text, so a
value that itself contains `{{x}}` stays literal and is never expanded again.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.validation import MAX_PROMPT_CHARS, check_text

MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 500
MAX_CATEGORY_CHARS = 50
MAX_VARIABLES = 20
MAX_VALUE_CHARS = 1000
VARIABLE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")


class VariableType(enum.StrEnum):
    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"


@dataclass(frozen=True)
class TemplateVariable:
    """A declared placeholder."""

    name: str
    type: VariableType = VariableType.STRING
    required: bool = False
    default_value: str = ""
    description: str = ""


@dataclass(frozen=True)
class PromptTemplate:
    """A reusable prompt; `shared` makes it visible to the owner's sub-account."""

    id: str
    owner_id: str
    sub_account: str
    display_name: str
    prompt: str
    description: str = ""
    style: str = ""
    category: str = ""
    variables: tuple[TemplateVariable, ...] = ()
    shared: bool = False
    usage_count: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    extra: dict[str, str] = field(default_factory=dict)


def template_fingerprint(template: PromptTemplate) -> dict[str, object]:
    """The parameters that make two creates "the same" for a request_id (JSON-ready)."""
    return {
        "display_name": template.display_name,
        "description": template.description,
        "prompt": template.prompt,
        "style": template.style,
        "category": template.category,
        "variables": [
            {
                "name": v.name,
                "type": v.type.value,
                "required": v.required,
                "default_value": v.default_value,
                "description": v.description,
            }
            for v in template.variables
        ],
        "shared": template.shared,
    }


def placeholders(prompt: str) -> list[str]:
    return [m.group(1) for m in PLACEHOLDER.finditer(prompt)]


def check_template(template: PromptTemplate) -> PromptTemplate:
    """Every limit of a template; IMG_003 naming the field otherwise."""
    if not 1 <= len(template.display_name.strip()) <= MAX_NAME_CHARS:
        raise InvalidRequest(
            f"display_name must be 1 to {MAX_NAME_CHARS} characters", field="display_name"
        )
    check_text(template.display_name, "display_name")
    if len(template.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidRequest(
            f"description must be at most {MAX_DESCRIPTION_CHARS} characters", field="description"
        )
    check_text(template.description, "description", multiline=True)
    if not template.prompt.strip() or len(template.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt must be 1 to {MAX_PROMPT_CHARS} characters", field="prompt")
    check_text(template.prompt, "prompt", multiline=True)
    check_category(template.category)
    if len(template.variables) > MAX_VARIABLES:
        raise InvalidRequest(f"at most {MAX_VARIABLES} variables", field="variables")
    seen: set[str] = set()
    for variable in template.variables:
        if not VARIABLE_NAME.fullmatch(variable.name):
            raise InvalidRequest(
                f"variable name {variable.name!r} must match [a-z_][a-z0-9_]*", field="variables"
            )
        if variable.name in seen:
            raise InvalidRequest(f"variable {variable.name!r} is declared twice", field="variables")
        seen.add(variable.name)
        check_text(variable.description, "variables", multiline=True)
        if variable.default_value:
            _typed(variable, variable.default_value)
    for name in placeholders(template.prompt):
        if name not in seen:
            raise InvalidRequest(
                f"the prompt uses {{{{{name}}}}} but no variable {name!r} is declared",
                field="prompt",
                metadata={"variable": name},
            )
    return template


def check_category(category: str) -> str:
    """A category (of a template, or a list filter): at most 50 characters of text."""
    if len(category) > MAX_CATEGORY_CHARS:
        raise InvalidRequest(
            f"category must be at most {MAX_CATEGORY_CHARS} characters", field="category"
        )
    return check_text(category, "category")


def render(template: PromptTemplate, values: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The prompt with every placeholder filled, and the values used (defaults included).
    IMG_003 names a missing required variable, an unknown one, or an undeclared placeholder."""
    declared = {v.name: v for v in template.variables}
    for name in values:
        if name not in declared:
            raise InvalidRequest(
                f"variable {name!r} is not declared by this template",
                field="variables",
                metadata={"variable": name},
            )
    used: dict[str, str] = {}
    for variable in template.variables:
        if variable.name in values:
            used[variable.name] = _typed(variable, values[variable.name])
        elif variable.default_value:
            used[variable.name] = variable.default_value
        elif variable.required:
            raise InvalidRequest(
                f"variable {variable.name!r} is required",
                field="variables",
                metadata={"variable": variable.name},
            )
        else:
            used[variable.name] = ""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in used:
            raise InvalidRequest(
                f"the prompt uses {{{{{name}}}}} but no variable {name!r} is declared",
                field="prompt",
                metadata={"variable": name},
            )
        return used[name]

    rendered = PLACEHOLDER.sub(fill, template.prompt)
    if len(rendered) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"the rendered prompt is over {MAX_PROMPT_CHARS} characters", field="variables"
        )
    return rendered, used


def _typed(variable: TemplateVariable, value: str) -> str:
    if len(value) > MAX_VALUE_CHARS:
        raise InvalidRequest(
            f"variable {variable.name!r} is over {MAX_VALUE_CHARS} characters", field="variables"
        )
    check_text(value, "variables", multiline=True)
    if not _parses(variable.type, value):
        raise InvalidRequest(
            f"variable {variable.name!r} must be a {variable.type.value}, not {value!r}",
            field="variables",
            metadata={"variable": variable.name},
        )
    return value


def _parses(kind: VariableType, value: str) -> bool:
    try:
        if kind is VariableType.INTEGER:
            int(value)
        elif kind is VariableType.NUMBER:
            float(value)
    except ValueError:
        return False
    return kind is not VariableType.BOOLEAN or value.lower() in ("true", "false")
