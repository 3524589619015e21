"""Checkpoints resume exactly; the history and the training figure are written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from contrastkit.training import History, load_checkpoint, save_checkpoint, seed_everything
from contrastkit.viz import training_figure


def test_checkpoint_round_trip_resumes_the_optimizer(tmp_path):
    seed_everything(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    model(x).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck" / "last.pt", model, opt, step=7, best=0.5)

    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path / "ck" / "last.pt", other, other_opt)
    assert state == {"step": 7, "best": 0.5}
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    # one more identical step from both gives identical weights: the Adam moments were restored
    for m, o in ((model, opt), (other, other_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model)


def test_history_and_figure(tmp_path):
    history = History()
    for step in (10, 20, 30):
        history.append(step=step, **{"train/loss": 1.0 / step, "val/dice": step / 40})
    history.append(step=40, **{"test/dice": torch.tensor(0.9)})
    assert history.series("val/dice") == ([10.0, 20.0, 30.0], [0.25, 0.5, 0.75])
    history.save(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())[-1]["test/dice"] == pytest.approx(0.9)

    images = np.full((3, 32, 32), 0.5)
    target = np.zeros((3, 32, 32), dtype=int)
    target[:, 8:20, 8:20] = 1
    path = training_figure(history, images, target, np.roll(target, 2, axis=2), tmp_path / "fig.png",
                           class_names=["lesion"])
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_state_round_trip_keeps_counters_rng_and_wall_time(tmp_path):
    import time

    from contrastkit.training import resume_run, save_run

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = History([{"step": 5, "val/dice": 0.4}])
    torch.manual_seed(3)
    save_run(tmp_path / "last.pt", model, opt, step=5, best=0.4, best_step=5, history=history,
             started=time.time() - 100.0, config={"lr": 0.1})
    expected_draw = torch.rand(3)
    torch.manual_seed(99)  # the resumed run must not depend on the RNG state it starts in
    step, best, best_step, restored, started = resume_run(tmp_path / "last.pt", model, opt)
    assert (step, best, best_step) == (5, 0.4, 5) and restored.records == history.records
    assert 99.0 <= time.time() - started < 110.0
    assert torch.equal(torch.rand(3), expected_draw)
