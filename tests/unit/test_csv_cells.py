"""CSV cells that a spreadsheet would run as formulas are neutralised (OWASP)."""

from __future__ import annotations

import pytest

from imagegen.services.usage import neutralise_cell


@pytest.mark.parametrize(
    "text",
    ['=HYPERLINK("http://x.example","y")', "+1", "-1+2", "@SUM(A1)", "\tx", "\rx", "=", "-"],
)
def test_formula_starts_get_a_single_quote(text: str) -> None:
    assert neutralise_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["a fox", "", " =1", "'=already", "x=1", 3, -3, 0])
def test_other_cells_and_numbers_are_unchanged(value: object) -> None:
    assert neutralise_cell(value) == value
