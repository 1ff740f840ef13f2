"""Layering rules that import-linter cannot see: the SQL modules take no user-facing
limit decision (domain/limits.py and domain/credits.py do, over facts the repositories
read)."""

from __future__ import annotations

import ast
from pathlib import Path

import imagegen.repositories

LIMIT_ERRORS = frozenset(
    {"RateLimited", "InsufficientCredits", "StorageQuotaExceeded", "ImageTooLarge", "StreamLimit"}
)
REPOSITORIES = Path(imagegen.repositories.__file__).parent


def _name(node: ast.expr | None) -> str:
    """The class name an exception expression names: `X`, `errors.X`, `X(...)`."""
    if isinstance(node, ast.Call):
        return _name(node.func)
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def limit_errors_in(source: str, filename: str) -> list[str]:
    """Where a module raises or imports a user-facing limit error."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Raise) and _name(node.exc) in LIMIT_ERRORS:
            found.append(f"{filename}:{node.lineno} raises {_name(node.exc)}")
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in LIMIT_ERRORS:
                    found.append(f"{filename}:{node.lineno} imports {alias.name}")
    return found


def test_no_repository_raises_a_limit_error() -> None:
    modules = sorted(REPOSITORIES.rglob("*.py"))
    assert len(modules) > 5, f"found only {modules} under {REPOSITORIES}"
    found = [
        hit
        for path in modules
        for hit in limit_errors_in(path.read_text(), str(path.relative_to(REPOSITORIES)))
    ]
    assert found == []


def test_the_check_sees_every_form_of_raise() -> None:
    source = (
        "from imagegen.domain.errors import RateLimited\n"
        "from imagegen.domain import errors\n"
        "def f(x):\n"
        "    if x == 1:\n"
        "        raise RateLimited('m', retry_after=None)\n"
        "    if x == 2:\n"
        "        raise errors.InsufficientCredits('m')\n"
        "    if x == 3:\n"
        "        raise errors.StorageQuotaExceeded\n"
        "    raise LookupError('fine')\n"
    )
    assert limit_errors_in(source, "probe.py") == [
        "probe.py:1 imports RateLimited",
        "probe.py:5 raises RateLimited",
        "probe.py:7 raises InsufficientCredits",
        "probe.py:9 raises StorageQuotaExceeded",
    ]
