"""Build hook: put the generated contract (the repository's generated/imagegen/v1) into
the client's wheel as imagegen/v1.

Hatchling's static settings only select files under this directory; `force-include`
reaches outside it but also copies the files into an editable install, where they
would hide generated/ and go stale after `./dev gen`. So the mapping is made here,
for regular wheels only; editable installs see generated/ through dev-mode-dirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

GENERATED_CONTRACT = Path(__file__).resolve().parents[2] / "generated" / "imagegen" / "v1"


class GeneratedContractHook(BuildHookInterface):
    """Adds generated/imagegen/v1 to regular (non-editable) wheels."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        if not (GENERATED_CONTRACT / "__init__.py").is_file():
            raise FileNotFoundError(
                f"{GENERATED_CONTRACT} is missing: build the client from a checkout "
                "of the repository (generated/ is committed; ./dev gen remakes it)"
            )
        build_data["force_include"][str(GENERATED_CONTRACT)] = "imagegen/v1"
