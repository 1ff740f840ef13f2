"""Template rendering and limits."""

from __future__ import annotations

import pytest

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.templates import (
    PromptTemplate,
    TemplateVariable,
    VariableType,
    check_template,
    render,
)


def template(prompt: str, *variables: TemplateVariable) -> PromptTemplate:
    return PromptTemplate("t", "alice", "", "Name", prompt, variables=variables)


ANIMAL = TemplateVariable("animal", required=True)
MOOD = TemplateVariable("mood", default_value="calm")


def test_defaults_and_values() -> None:
    t = template("a {{animal}} looking {{ mood }}", ANIMAL, MOOD)
    assert render(t, {"animal": "fox"}) == ("a fox looking calm", {"animal": "fox", "mood": "calm"})
    assert render(t, {"animal": "fox", "mood": "wild"})[0] == "a fox looking wild"


def test_missing_required_unknown_and_undeclared_are_named() -> None:
    t = template("a {{animal}}", ANIMAL)
    with pytest.raises(InvalidRequest) as missing:
        render(t, {})
    assert missing.value.metadata["variable"] == "animal"
    with pytest.raises(InvalidRequest) as unknown:
        render(t, {"animal": "fox", "colour": "red"})
    assert unknown.value.metadata["variable"] == "colour"
    with pytest.raises(InvalidRequest) as undeclared:
        render(template("a {{animal}} in {{place}}", ANIMAL), {"animal": "fox"})
    assert undeclared.value.metadata["variable"] == "place"
    with pytest.raises(InvalidRequest):
        check_template(template("a {{animal}} in {{place}}", ANIMAL))


def test_values_stay_literal() -> None:
    t = template("a {{animal}} and {{mood}}", ANIMAL, MOOD)
    prompt, _ = render(t, {"animal": "{{mood}}", "mood": "{{animal}}"})
    assert prompt == "a {{mood}} and {{animal}}"


def test_typed_variables() -> None:
    count = TemplateVariable("count", VariableType.INTEGER, required=True)
    flag = TemplateVariable("flag", VariableType.BOOLEAN)
    t = template("{{count}} birds {{flag}}", count, flag)
    assert render(t, {"count": "3", "flag": "true"})[0] == "3 birds true"
    for bad in ({"count": "three"}, {"count": "3", "flag": "maybe"}):
        with pytest.raises(InvalidRequest):
            render(t, bad)


def test_limits() -> None:
    ok = template("x")
    check_template(ok)
    for bad in (
        PromptTemplate("t", "a", "", "", "x"),
        PromptTemplate("t", "a", "", "n" * 101, "x"),
        PromptTemplate("t", "a", "", "n", "x", description="d" * 501),
        PromptTemplate("t", "a", "", "n", "x" * 4001),
        PromptTemplate("t", "a", "", "n", "x", category="c" * 51),
        PromptTemplate(
            "t", "a", "", "n", "x", variables=tuple(TemplateVariable(f"v{i}") for i in range(21))
        ),
        PromptTemplate("t", "a", "", "n", "x", variables=(TemplateVariable("Bad-Name"),)),
        PromptTemplate(
            "t", "a", "", "n", "x", variables=(TemplateVariable("a"), TemplateVariable("a"))
        ),
    ):
        with pytest.raises(InvalidRequest):
            check_template(bad)
    check_template(
        PromptTemplate(
            "t",
            "a",
            "",
            "n" * 100,
            "x" * 4000,
            category="c" * 50,
            variables=tuple(TemplateVariable(f"v{i}") for i in range(20)),
        )
    )
