"""Packaging: the generated stubs import as rpcmesh.v1 from the tree and from a built wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_package_list_matches_the_tree() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "rpcmesh").rglob("__init__.py")
    }
    assert listed == on_disk | {"rpcmesh.v1"}
    assert config["package-dir"]["rpcmesh.v1"] == "generated/rpcmesh/v1"


def test_generated_stubs_import_as_rpcmesh_v1() -> None:
    from rpcmesh.v1 import bus_pb2, eventstore_pb2, registry_pb2, registry_pb2_grpc, saga_pb2

    assert registry_pb2.DESCRIPTOR.package == "rpcmesh.v1"
    assert registry_pb2_grpc.RegistryStub is not None
    names = {
        m.DESCRIPTOR.services_by_name[s].full_name
        for m, s in [
            (registry_pb2, "Registry"),
            (bus_pb2, "Bus"),
            (saga_pb2, "SagaCoordinator"),
            (eventstore_pb2, "EventStore"),
        ]
    }
    assert names == {
        "rpcmesh.v1.Registry",
        "rpcmesh.v1.Bus",
        "rpcmesh.v1.SagaCoordinator",
        "rpcmesh.v1.EventStore",
    }


@pytest.mark.slow
def test_built_wheel_installs_rpcmesh_v1_inside_the_package(tmp_path: Path) -> None:
    # Build from a copy so setuptools' build/ and egg-info never land in the source tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("rpcmesh", "generated"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheel_dir), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheel_dir.glob("rpcmesh-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    assert not (target / "generated").exists(), "a top-level 'generated' module must never be installed"
    assert (target / "rpcmesh" / "v1" / "registry_pb2.pyi").exists()
    assert (target / "rpcmesh" / "py.typed").exists()
    probe = (
        "import rpcmesh, rpcmesh.v1.registry_pb2 as r, rpcmesh.v1.saga_pb2_grpc as s, rpcmesh.controlplane;"
        "print(rpcmesh.__file__); print(r.__file__); print(s.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=60,
    ).stdout.split()
    assert all(path.startswith(str(target)) for path in out), out
