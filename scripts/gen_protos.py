"""Regenerate the Python stubs for every contract into its generated/ folder.

Two trees are generated, each with messages (`_pb2.py`), gRPC stubs
(`_pb2_grpc.py`) and mypy stubs for both (`.pyi`, from mypy-protobuf):

* ``protos/`` (the rpcmesh contracts) into ``generated/``, installed as
  ``rpcmesh.v1``, plus a descriptor set with imports for tools
  (``generated/rpcmesh.binpb``);
* ``examples/protos/`` (the example services) into ``examples/``, beside the
  example code that uses them (``examples/echo/v1`` is the ``echo.v1`` package).

Run through `make protos`; the output is committed and CI fails when a fresh
run changes it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TREES = [
    (ROOT / "protos", ROOT / "generated", "rpcmesh.binpb"),
    (ROOT / "examples" / "protos", ROOT / "examples", None),
]

PACKAGE_INIT = '"""Generated protobuf and gRPC stubs for the `{package}` contracts (do not edit)."""\n'


def generate(proto_root: Path, out: Path, descriptor_set: str | None) -> list[str]:
    """Run protoc over every .proto under proto_root into out."""
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    packages = sorted({str(Path(p).parent) for p in protos})
    for package in packages:
        shutil.rmtree(out / package, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
    ]
    if descriptor_set:
        args += ["--include_imports", f"--descriptor_set_out={out / descriptor_set}"]
    subprocess.run([*args, *protos], check=True, cwd=ROOT)
    for package in packages:
        package_dir = out / package
        (package_dir / "__init__.py").write_text(PACKAGE_INIT.format(package=package.replace("/", ".")))
        (package_dir / "py.typed").write_text("")
    return protos


def main() -> None:
    for proto_root, out, descriptor_set in TREES:
        protos = generate(proto_root, out, descriptor_set)
        print(f"generated {len(protos)} protos into {out.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
