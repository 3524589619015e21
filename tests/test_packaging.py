"""The Triton code installs as contrastkit.kernels, never as a top-level ``kernels`` module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("contrastkit-*.whl")
    return path


def test_wheel_holds_kernels_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "contrastkit/kernels/__init__.py" in names
    assert "contrastkit/core.py" in names
    for package in sorted(p.parent for p in (ROOT / "contrastkit").rglob("__init__.py")):
        relative = package.relative_to(ROOT).as_posix()
        assert f"{relative}/__init__.py" in names, f"{relative} is missing from the wheel"
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ would shadow PyPI's 'kernels'"
    assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "examples")]


def test_installed_package_imports_kernels_from_any_directory(tmp_path):
    code = "import contrastkit.kernels as k, contrastkit; print(k.__name__); print(contrastkit.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    name, _ = result.stdout.split()
    assert name == "contrastkit.kernels"
