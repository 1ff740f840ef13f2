"""The client installs alone: a fresh virtualenv holding only imagegen-client (built from
clients/python, its dependencies from the wheel cache that `./dev test` fills) runs the
README's Python example against a served process, stays small, and the server's and
the client's wheels share no file.

Offline by construction: pip runs with --no-index, only our wheel directories, and no
pip configuration of the machine (which may name indexes or other wheel folders).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.served import start_server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "python"
WHEEL_CACHE = ROOT / ".cache" / "client-wheels"
SIZE_LIMIT_BYTES = 30 * 1000 * 1000  # 30 MB
# What `python -m venv` puts there itself; not part of what the client costs.
BOOTSTRAP = {"pip", "setuptools"}


def canonical(requirement: str) -> str:
    name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in cmd],
        env=env if env is not None else offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wheel_cache() -> Path:
    # A missing cache fails the run: skipping would let the test never run at all.
    if not any(WHEEL_CACHE.glob("grpcio-*.whl")) or not any(WHEEL_CACHE.glob("hatchling-*.whl")):
        pytest.fail(f"{WHEEL_CACHE} is missing or incomplete: `./dev test` fills it")
    return WHEEL_CACHE


@pytest.fixture(scope="module")
def built_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both distributions built from this checkout (build backend from the cache)."""
    out = tmp_path_factory.mktemp("built-wheels")
    cache = wheel_cache()
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links", cache,
        "--wheel-dir", out, ROOT, CLIENT_DIR)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory, built_wheels: Path) -> Path:
    """The python of a fresh virtualenv where only imagegen-client was installed."""
    venv = tmp_path_factory.mktemp("client-venv")
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-index", "--find-links", wheel_cache(),
        "--find-links", built_wheels, "imagegen-client")  # fmt: skip
    return python


def installed(python: Path) -> dict[str, list[str]]:
    """Each installed distribution's canonical name -> top-level entries of its files."""
    script = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps({d.metadata['Name']: sorted({f.parts[0] for f in d.files or []})"
        " for d in m.distributions()}))"
    )
    found = json.loads(run(python, "-I", "-c", script))
    return {canonical(name): tops for name, tops in found.items()}


def site_packages(python: Path) -> Path:
    script = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(run(python, "-I", "-c", script).strip())


def test_only_the_client_is_installed_and_its_site_packages_stay_under_30_mb(
    client_python: Path,
) -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    server_only = {canonical(r) for r in server["dependencies"]} - {
        canonical(r) for r in client["dependencies"]
    }
    server_only.discard("imagegen-client")
    distributions = installed(client_python)
    assert "imagegen-client" in distributions
    assert "imagegen" not in distributions
    assert not server_only & set(distributions), "a server dependency came with the client"
    probe = "import importlib.util as u; print(u.find_spec('imagegen.server') is None)"
    assert run(client_python, "-I", "-c", probe).strip() == "True"

    # Bytes of every file in site-packages except those of pip and setuptools (and the
    # entries their records name: pkg_resources, _distutils_hack, the .pth hook).
    root = site_packages(client_python)
    excluded = {top for name in BOOTSTRAP for top in distributions.get(name, [])}
    size = sum(
        path.lstat().st_size
        for entry in root.iterdir()
        if entry.name not in excluded
        for path in ([entry] if not entry.is_dir() else entry.rglob("*"))
        if path.is_file() or path.is_symlink()
    )
    print(f"client site-packages without {sorted(BOOTSTRAP)}: {size / 1e6:.1f} MB")
    assert size < SIZE_LIMIT_BYTES, f"{size / 1e6:.1f} MB"


def readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Calling it from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_example_generates_an_image_with_only_the_client(
    client_python: Path, tmp_path: Path, database_url: str
) -> None:
    server = await start_server(tmp_path, database_url, extra_env={"IMAGEGEN_URL_TTL": "600"})
    try:
        example = tmp_path / "example.py"
        example.write_text(readme_python_example())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "IMAGEGEN_"))}
        env.update(IMAGEGEN_ADDR=server.grpc_address, IMAGEGEN_TOKEN=server.token())
        # -I: nothing of this checkout (cwd, PYTHONPATH) is importable, only the venv.
        done = await asyncio.to_thread(
            subprocess.run,
            [str(client_python), "-I", str(example)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        percents = [int(line.split("%")[0]) for line in lines[:-1]]
        assert percents and percents == sorted(percents), done.stdout
        state, url = lines[-1].split()
        assert state == "completed"
        assert url.startswith(f"http://{server.http_address}/")
        async with httpx.AsyncClient(trust_env=False) as http:
            reply = await http.get(url)
        assert reply.status_code == 200
        assert reply.content.startswith(b"\x89PNG\r\n\x1a\n")
    finally:
        server.kill()


def wheel_files(directory: Path, prefix: str) -> tuple[set[str], str]:
    (wheel,) = directory.glob(f"{prefix}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return {n for n in names if ".dist-info/" not in n}, archive.read(metadata).decode()


def test_server_and_client_wheels_share_no_module(built_wheels: Path) -> None:
    server_files, server_metadata = wheel_files(built_wheels, "imagegen")
    client_files, client_metadata = wheel_files(built_wheels, "imagegen_client")
    assert not server_files & client_files
    assert "imagegen/__init__.py" not in server_files | client_files
    assert {"imagegen/client/__init__.py", "imagegen/v1/generation_pb2.py"} <= client_files
    assert all(n.startswith(("imagegen/client/", "imagegen/v1/")) for n in client_files)
    assert "imagegen/server.py" in server_files
    assert not any(n.startswith(("imagegen/client/", "imagegen/v1/")) for n in server_files)
    version = re.search(r"^Version: (.+)$", client_metadata, re.M)
    assert version is not None
    assert f"Requires-Dist: imagegen-client=={version[1]}" in server_metadata.splitlines()
