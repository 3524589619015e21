"""examples/train_cross_level.py end to end at toy size: files, schedules, exact resume, real data path."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from contrastkit.data import shared_data_root  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cross_level.py"
TINY = ["--synthetic-size", "40", "--image-size", "32", "--grid", "2", "--width", "4", "--depth", "2",
        "--batch", "4", "--labeled-batch", "2", "--labeled-fraction", "0.25", "--eval-every", "2",
        "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_cross_level", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, out, *extra):
    return script.main([*TINY, "--out", str(out), *extra])


def records(out):
    return json.loads((out / "history.json").read_text())


def test_sequential_run_writes_everything_and_switches_losses(script, tmp_path):
    result = run(script, tmp_path, "--iterations", "4", "--warmup", "2")
    for name in ("best.pt", "last.pt", "metrics.json", "history.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["config"]["method"] == "cross_level" and metrics["iterations"] == 4
    assert set(metrics["test"]) == {"dice", "iou", "precision", "recall", "hd95"}
    for stats in metrics["test"].values():
        assert stats["n"] == 4 and 0 <= stats["std"] and stats["mean"] >= 0  # 40 images -> 4 test
    assert 0 <= metrics["test"]["dice"]["mean"] <= 1 and metrics["wall_time_s"] > 0
    history = records(tmp_path)
    assert [r["step"] for r in history] == [2, 4]
    # Warm-up of 2 iterations: contrast first, then consistency; supervised all along.
    assert "contrast/loss" in history[0] and "consistency/loss" not in history[0]
    assert "consistency/loss" in history[1] and "contrast/loss" not in history[1]
    assert all("sup/loss" in r and 0 <= r["val/dice"] <= 1 for r in history)
    assert metrics["best_val_dice"] == max(r["val/dice"] for r in history)


@pytest.mark.parametrize("method, schedule, expected", [
    ("cross_level", "joint", {"sup/loss", "contrast/loss", "consistency/loss"}),
    ("supervised", "sequential", {"sup/loss"}),
])
def test_joint_and_supervised_use_their_terms(script, tmp_path, method, schedule, expected):
    run(script, tmp_path, "--iterations", "2", "--method", method, "--schedule", schedule)
    (record,) = records(tmp_path)
    assert {k for k in record if k.endswith("/loss")} - {"total/loss"} == expected


def test_resume_continues_exactly(script, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(script, straight, "--iterations", "6", "--warmup", "3")
    run(script, split, "--iterations", "4", "--warmup", "3")
    before = records(split)
    resumed = run(script, split, "--iterations", "6", "--warmup", "3", "--resume", str(split / "last.pt"))
    history = records(split)
    assert [r["step"] for r in history] == [2, 4, 6]
    assert history[:2] == before  # extended, not restarted
    assert torch.load(split / "last.pt", weights_only=False)["state"]["step"] == 6
    # Step count, optimizer, sampler position and augmentation RNG all continue: the same weights
    # and history as one uninterrupted run.
    assert history == records(straight)
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(split / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == json.loads((straight / "metrics.json").read_text())["test"]


def test_real_kvasir_batches_through_the_script_data_path(script):
    root = shared_data_root()
    folder = root / "kvasir-seg" if root else None
    if folder is None or not (folder / "images").is_dir():
        pytest.skip("Kvasir-SEG not found: set $CONTRASTKIT_DATA or place it in ../shared/data/kvasir-seg")
    args = script.parse_args(["--data", str(folder), "--image-size", "64", "--eval-every", "2"])
    labeled, unlabeled, val, test = script.load_data(args)
    assert (len(labeled), len(unlabeled), len(val), len(test)) == (80, 718, 100, 100)  # 998 images, 80/10/10
    _, loader = script.make_loader(args, labeled, unlabeled)
    batches = list(loader)
    assert len(batches) == 2
    for images, masks in batches:
        assert images.shape == (8, 3, 64, 64) and masks.shape == (8, 1, 64, 64)
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
        assert set(masks.unique().tolist()) == {0.0, 1.0}
    labeled_masks = torch.cat([masks[:4] for _, masks in batches])
    assert (labeled_masks.flatten(1).sum(1) > 0).all()  # every Kvasir image shows a polyp
