"""The step-share benchmark (``benchmarks/step_share.py``): each example's training step with and without
its contrastive loss, the loss called on one side only, and the table and files it writes."""

from __future__ import annotations

import json

import torch

from benchmarks import step_share
from contrastkit import CrossLevelContrast, PseudoLabelContrast

TINY = {"clcc-kvasir": step_share.Size(2, 1, 80), "ssl4mis-acdc": step_share.Size(2, 1, 32)}


def test_the_contrastive_loss_runs_on_the_with_side_only(monkeypatch):
    calls = []
    for module in (CrossLevelContrast, PseudoLabelContrast):
        original = module.forward
        def counted(self, *args, _original=original, **kwargs):
            calls.append(type(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(module, "forward", counted)
    for name, build in step_share.CASES.items():
        step = build(TINY[name], "cpu", torch.Generator().manual_seed(0))
        calls.clear()
        without = step(False)
        assert calls == [] and torch.isfinite(without)
        with_loss = step(True)
        assert len(calls) == 1 and torch.isfinite(with_loss)


def test_the_table_and_files(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(step_share.SIZES, "quick", TINY)
    assert step_share.main(["--device", "cpu", "--scale", "quick", "--budget-s", "0.01", "--out", str(tmp_path)]) == 0
    assert "| clcc-kvasir | 2×80² |" in capsys.readouterr().out
    (written,) = tmp_path.glob("step-share-*.json")
    rows = json.loads(written.read_text())["rows"]
    assert [r["case"] for r in rows] == list(step_share.CASES)
    for r in rows:
        assert r["with_ms"] > 0 and r["without_ms"] > 0 and 0 <= r["share"] < 1 and r["rounds"] >= 3
    assert written.with_suffix(".md").read_text().startswith("# The contrastive loss's share")
