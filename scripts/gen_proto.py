"""Generate Python code, gRPC stubs and type stubs from proto/ into generated/.

`--check` regenerates into a temporary directory and fails if anything differs
from what is committed, so CI catches a contract edited without regenerating.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GENERATED_DIR = ROOT / "generated"
PACKAGE_DIR = Path("imagegen") / "v1"
# The mypy-protobuf plugins are installed beside this interpreter.
BIN_DIR = Path(sys.executable).parent
INIT_TEXT = '"""Generated from proto/imagegen/v1 by scripts/gen_proto.py. Do not edit."""\n'


def generate(out_dir: Path) -> None:
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / PACKAGE_DIR).glob("*.proto")
    )
    (out_dir / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={BIN_DIR / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN_DIR / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    (out_dir / PACKAGE_DIR / "__init__.py").write_text(INIT_TEXT)
    (out_dir / PACKAGE_DIR / "py.typed").write_text("")


def differences(left: Path, right: Path) -> list[str]:
    found: list[str] = []
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found += [f"only in committed: {n}" for n in cmp.left_only]
    found += [f"missing from committed: {n}" for n in cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(left, right, cmp.common_files, shallow=False)
    found += [f"differs: {n}" for n in mismatch + errors]
    for sub in cmp.common_dirs:
        found += differences(left / sub, right / sub)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            diff = differences(GENERATED_DIR / PACKAGE_DIR, Path(tmp) / PACKAGE_DIR)
        if diff:
            print("generated/ is stale; run ./dev gen", *diff, sep="\n  ")
            return 1
        print("generated/ is current")
        return 0
    shutil.rmtree(GENERATED_DIR / PACKAGE_DIR, ignore_errors=True)
    generate(GENERATED_DIR)
    print(f"wrote {GENERATED_DIR / PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
