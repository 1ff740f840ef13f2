"""The docs agree with the code, cite only files in this repository, and the outputs of
the README's own commands are ignored by git."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imagegen.domain.plans import MB, PlanTable
from imagegen.domain.pricing import PriceTable

ROOT = Path(__file__).resolve().parents[2]
PLANS_AND_PRICES = ROOT / "docs" / "plans-and-prices.md"


def table_rows(heading: str) -> list[list[str]]:
    section = PLANS_AND_PRICES.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def number(cell: str) -> int | None:
    digits = cell.removesuffix(" MB").replace(",", "")
    return int(digits) if digits else None


def test_the_plan_table_is_the_default_one() -> None:
    documented = {
        name: (
            number(hour),
            number(day),
            number(concurrent),
            number(stored),
            number(credits),
            number(streams),
        )
        for name, hour, day, concurrent, stored, credits, streams in table_rows("Plans")
    }
    expected = {
        name: (
            limits.requests_per_hour,
            limits.requests_per_day,
            limits.concurrent,
            None if limits.storage_bytes is None else limits.storage_bytes // MB,
            limits.monthly_credits,
            limits.max_streams,
        )
        for name, limits in PlanTable.default().plans.items()
    }
    assert documented == expected


def test_the_retention_table_is_the_default_one() -> None:
    documented = {
        name: (number(deleted), number(events), number(uploads))
        for name, deleted, events, uploads in table_rows("Retention")
    }
    expected = {
        name: (limits.deleted_image_days, limits.event_log_days, limits.upload_days)
        for name, limits in PlanTable.default().plans.items()
    }
    assert documented == expected


def test_the_price_table_is_the_default_one() -> None:
    prices = PriceTable.default()
    rows = table_rows("Prices")
    tiers = [(int(re.sub(r"\D", "", size.split("(")[0])), int(c)) for size, c in rows[:-1]]
    assert tiers == [(tier.max_pixels, tier.credits) for tier in prices.tiers]
    top = prices.tiers[-1]
    assert rows[-1][0] == f"larger: {top.credits} per started block of {top.max_pixels:,}"
    assert f"at least {prices.edit_credits} credits" in PLANS_AND_PRICES.read_text()
    enhancement = f"A prompt enhancement (`EnhancePrompt`) costs {prices.enhance_credits} credits"
    assert enhancement in " ".join(PLANS_AND_PRICES.read_text().split())
    upscale = (
        f"An upscale (`UpscaleImage`) costs {prices.upscale_credits[2]} credit at 2x and "
        f"{prices.upscale_credits[4]} credits at 4x"
    )
    assert upscale in " ".join(PLANS_AND_PRICES.read_text().split())
    assert "An outpaint is priced as an edit" in PLANS_AND_PRICES.read_text()


#: Where the design reasons live is this repository; nothing may point outside it.
OUTSIDE_DOC = re.compile(r"\b" + "DES" + r"IGN(\.md|'s)\b")
TEXT_SUFFIXES = {".py", ".md", ".proto", ".toml", ".yaml", ".yml", ".json", ".sql", ".txt", ""}


def repository_files() -> list[Path]:
    """Every file git would commit here (tracked, or new and not ignored)."""
    if shutil.which("git") is not None and (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        return [ROOT / name for name in listed]
    skipped = {".git", ".venv", "node_modules", ".data", "__pycache__", ".mypy_cache"}
    return [p for p in ROOT.rglob("*") if not skipped & set(p.relative_to(ROOT).parts)]


def test_code_and_docs_cite_only_files_in_this_repository() -> None:
    offenders = []
    for path in repository_files():
        if not path.is_file() or "generated" in path.relative_to(ROOT).parts[:1]:
            continue
        if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="replace")
        offenders += [
            f"{path.relative_to(ROOT)}:{n}"
            for n, line in enumerate(text.splitlines(), 1)
            if OUTSIDE_DOC.search(line)
        ]
    assert offenders == []


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="not a git checkout (the check reads the repository's .gitignore through git)",
)
@pytest.mark.parametrize(
    "output",
    [
        "images/3f2a9c4e-0d1b-4c5e-9a7f-1b2c3d4e5f60.png",
        "3f2a9c4e-0d1b-4c5e-9a7f-1b2c3d4e5f60.png",
        "3f2a9c4e-0d1b-4c5e-9a7f-1b2c3d4e5f60.webp",
        "3f2a9c4e-0d1b-4c5e-9a7f-1b2c3d4e5f60.jpeg",
        "usage.csv",
        "history.csv",
    ],
)
def test_the_outputs_of_the_readme_commands_are_ignored(output: str) -> None:
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q", output], check=False
    )
    assert ignored.returncode == 0, f"{output} is not in .gitignore"
