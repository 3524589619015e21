"""``kernels/`` is a layer below the library: it imports nothing of contrastkit, and contrastkit's
triton backend (``contrastkit/_triton.py``) adapts to its API of tensors and flags."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import contrastkit

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def library_imports(path: Path) -> list[str]:
    """Imports of ``path`` that reach above kernels/: ``from ..x`` (installed, kernels/ is
    contrastkit.kernels, so .. is contrastkit) or any absolute ``contrastkit`` import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level >= 2 or (node.level == 0 and module.split(".")[0] == "contrastkit"):
                found.append(f"{path.name}:{node.lineno}: from {'.' * node.level}{module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] == "contrastkit"]
    return found


def test_kernels_import_nothing_of_contrastkit():
    files = sorted(KERNELS.glob("*.py"))
    assert {"__init__.py", "info_nce.py", "_plan.py"} <= {f.name for f in files}
    assert [found for path in files for found in library_imports(path)] == []


def test_the_import_check_sees_each_kind_of_import(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("from .._options import SHARED\nfrom contrastkit.core import info_nce\nimport contrastkit\n"
                      "from . import _plan\nfrom ._layout import layout\nimport torch\n")
    assert [line.split(": ", 1)[1] for line in library_imports(source)] == [
        "from .._options import ...", "from contrastkit.core import ...", "import contrastkit"]


def test_shared_group_is_contrastkits_shared():
    from contrastkit import kernels

    assert kernels.SHARED_GROUP == contrastkit.SHARED


def test_the_adapter_passes_the_op_inputs_in_the_kernels_order():
    """contrastkit/_triton.py hands the kernels ``*OpInputs`` positionally and the options they read by name."""
    from contrastkit import kernels
    from contrastkit._options import OpInputs

    for launcher in (kernels.info_nce_rows, pytest.importorskip("contrastkit.kernels.info_nce").info_nce_rows):
        params = inspect.signature(launcher).parameters.values()
        assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == list(OpInputs._fields)
        assert [p.name for p in params if p.kind == p.KEYWORD_ONLY] == [
            "denominator", "normalize", "ignore_index", "self_key_offset"]


def test_op_schemas_name_the_inputs_then_the_settings():
    """The custom ops keep their names (compiled graphs refer to them) and take the inputs, then the settings."""
    ops = pytest.importorskip("contrastkit.kernels.info_nce")
    inputs, settings = list(ops.Inputs._fields), list(ops.Settings._fields)
    saved = ["lse", "pos_sigmoid", "q_plan", "k_plan", "need_query", "need_key", "need_temperature"]
    for name, before, after in [("info_nce_rows_triton", [], []), ("info_nce_rows_triton_symmetric", [], []),
                                ("info_nce_rows_triton_backward", ["grad_loss"], saved),
                                ("info_nce_rows_triton_symmetric_backward", ["grad_loss"], saved)]:
        schema = getattr(torch.ops.contrastkit, name).default._schema
        assert [a.name for a in schema.arguments] == before + inputs + after + settings, name
