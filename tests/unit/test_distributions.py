"""The two distributions built from this repository agree: the server (`imagegen`, the
root pyproject.toml) and its client (`imagegen-client`, clients/python) share a version,
the server pins exactly that client, and `imagegen` stays an implicit namespace package
that both fill (an imagegen/__init__.py in either would hide the other's modules)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import imagegen.client

ROOT = Path(__file__).resolve().parents[2]


def project(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())["project"]


def test_server_and_client_share_one_version_and_the_server_pins_it() -> None:
    server = project(ROOT / "pyproject.toml")
    client = project(ROOT / "clients" / "python" / "pyproject.toml")
    assert client["name"] == "imagegen-client"
    assert server["version"] == client["version"]
    assert f"imagegen-client=={client['version']}" in server["dependencies"]
    assert imagegen.client.__version__ == client["version"]


def test_imagegen_is_a_namespace_package_in_every_root() -> None:
    roots = [ROOT / "src", ROOT / "clients" / "python" / "src", ROOT / "generated"]
    for root in roots:
        assert (root / "imagegen").is_dir(), root
        assert not (root / "imagegen" / "__init__.py").exists(), root
    assert imagegen.client.__file__ is not None
    assert Path(imagegen.client.__file__).is_relative_to(roots[1])


def test_the_client_imports_nothing_of_the_server() -> None:
    allowed = ("imagegen.client", "imagegen.v1")
    for source in (ROOT / "clients" / "python" / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module == "imagegen" or module.startswith("imagegen."):
                    assert module.startswith(allowed), f"{source}: imports {module}"
