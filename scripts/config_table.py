"""Write (or `--check`) the README's configuration table from imagegen.config.SETTINGS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagegen.config import SETTINGS

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def render() -> str:
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    lines += [f"| `{s.name}` | {s.default} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        print(f"README.md lacks the {BEGIN} / {END} markers", file=sys.stderr)
        return 1
    updated = text[: start + len(BEGIN)] + "\n" + render() + "\n" + text[end:]
    if args.check:
        if updated != text:
            print("README.md's configuration table is stale; run scripts/config_table.py")
            return 1
        print("README configuration table is current")
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
