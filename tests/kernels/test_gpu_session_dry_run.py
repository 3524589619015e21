"""The kernel part of the GPU session script (``benchmarks/gpu_session.sh kernels``), dry run.

With DRY_RUN=1 the script runs the same Python entry points as on a lent GPU (correctness against
float64, per-kernel times, the side-by-side selection) on the CPU through Triton's interpreter at
tiny sizes, so CI sees a broken step before a GPU session does. Here rather than beside the
script: CI runs ``tests/`` only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
BASELINE = "18fed08"


def run(*cmd, env=None, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TRITON_INTERPRET": "1", **(env or {})})


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_kernel_part_dry_run(tmp_path):
    proc = run("bash", "benchmarks/gpu_session.sh", "kernels",
               env=dict(OUT=str(tmp_path), DRY_RUN="1", PYTHON=sys.executable))
    log = (tmp_path / "session.log").read_text()
    for step in ("kernels-correctness", "kernels-times", "kernels-side-by-side"):
        assert f"=== {step}: exit 0" in log, proc.stdout[-3000:]
    assert json.loads((tmp_path / "gpu_correctness.json").read_text())["passed"]
    rows = json.loads((tmp_path / "kernel_times.json").read_text())["rows"]
    assert {(r["case"], r["direction"]) for r in rows} >= {("supcon_all", "fwd+bwd"), ("cross_level", "bwd_dk")}
    assert all(r["ms"] > 0 for r in rows)
    assert "supcon8-N16384-D128-bfloat16-triton-fwd+bwd" in log


def test_old_kernels_are_timed_from_a_baseline_tree(tmp_path):
    """`gpu_session.sh baseline` rebuilds the baseline's package from git; kernel_times.py times it in a
    subprocess that imports it first."""
    if run("git", "cat-file", "-e", f"{BASELINE}^{{commit}}").returncode != 0:
        pytest.skip(f"the baseline commit {BASELINE} is not in this clone")
    tree = tmp_path / "baseline"
    proc = run("bash", "benchmarks/gpu_session.sh", "baseline", env=dict(OUT=str(tmp_path), OLD_TREE=str(tree)))
    assert (tree / "contrastkit" / "kernels" / "info_nce.py").is_file(), proc.stdout + proc.stderr
    proc = run(sys.executable, "benchmarks/kernel_times.py", "--dry-run", "--sizes", "96", "--cases", "supcon_all",
               "--old-tree", str(tree), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_times.json").read_text())["rows"]
    assert {r["tree"] for r in rows} == {"new", "old"} and all(r.get("ms", 0) > 0 for r in rows)
    assert "| supcon_all | 96 | fwd+bwd |" in (tmp_path / "kernel_times.md").read_text()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_dispatch_part_dry_run(tmp_path):
    """`gpu_session.sh dispatch`: the crossover sweep through the interpreter, the seed-size table and the
    examples' step shares, each step within its limit and each writing its results."""
    proc = run("bash", "benchmarks/gpu_session.sh", "dispatch",
               env=dict(OUT=str(tmp_path), DRY_RUN="1", PYTHON=sys.executable))
    log = (tmp_path / "session.log").read_text()
    for step in ("crossover", "seed-sizes", "step-share"):
        assert f"=== {step}: exit 0" in log, proc.stdout[-3000:]
    for stem in ("crossover-", "seed-sizes-", "step-share-"):
        assert list(tmp_path.glob(f"{stem}*.json")), stem
    (shares,) = tmp_path.glob("step-share-*.json")
    assert [r["case"] for r in json.loads(shares.read_text())["rows"]] == ["clcc-kvasir", "ssl4mis-acdc"]
