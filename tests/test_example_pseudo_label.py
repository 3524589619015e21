"""examples/train_pseudo_label.py: the pseudo-label refresh, tiny end-to-end runs, resume, and real ACDC."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from contrastkit.data import find_acdc_root, predict_volume  # noqa: E402
from contrastkit.models import UNet  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_pseudo_label.py"


@pytest.fixture(scope="module")
def script():
    if str(SCRIPT.parent) not in sys.path:  # the scripts import examples/presets.py from beside them
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("train_pseudo_label", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--image-size", "48", "--width", "4", "--depth", "2", "--synthetic-volumes", "4",
        "--labeled-patients", "1", "--batch", "4", "--labeled-batch", "2", "--val-volumes", "1",
        "--test-volumes", "2", "--threads", "1"]


def _expected(model, images, threshold):
    """Independent float64 softmax / argmax / threshold of the model's logits."""
    with torch.no_grad():
        probabilities = model.eval()(images).double().softmax(1)
    confidence, labels = probabilities.max(1)
    return torch.where(confidence < threshold, -1, labels), confidence


def test_refresh_follows_the_model_and_ignores_unconfident_pixels(script):
    torch.manual_seed(0)
    model = UNet(1, 4, base_width=4, depth=1).train()
    images = torch.rand(3, 1, 16, 16)
    # Half the pixels fall below; the threshold lies halfway between two confidences so that
    # float32 and float64 rounding cannot put a pixel on different sides of it.
    ordered = _expected(model, images, 0.0)[1].flatten().sort().values
    middle = ordered.numel() // 2
    threshold = float(ordered[middle - 1] + ordered[middle]) / 2
    model.train()
    labels, confidence = script.refresh_pseudo_labels(model, images, threshold, batch=2)
    assert model.training  # the refresh restores the training mode
    want_labels, want_confidence = _expected(model, images, threshold)
    torch.testing.assert_close(confidence.double(), want_confidence, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, want_labels)
    low = confidence < threshold
    assert low.any() and (~low).any()  # both cases are exercised
    assert (labels[low] == script.IGNORE).all() and (labels[~low] >= 0).all()

    # The model changes (here: its head now prefers class 3 by a margin on confident pixels).
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))
    new_labels, new_confidence = script.refresh_pseudo_labels(model.train(), images, threshold)
    want_labels, _ = _expected(model, images, threshold)
    assert torch.equal(new_labels, want_labels)
    assert not torch.equal(new_labels, labels)
    assert (new_labels == 3).float().mean() > (labels == 3).float().mean()
    assert (new_labels[new_confidence < threshold] == script.IGNORE).all()

    # Everything below a threshold of 1 is ignored, and ignored pixels survive the training batch path.
    ignored, conf = script.refresh_pseudo_labels(model, images, 1.0)
    assert (ignored == script.IGNORE).all()
    masks = torch.stack([ignored.float(), conf], 1)
    sampler = script.TwoStreamBatchSampler.for_concat(1, 2, 1, 2, num_batches=1)
    augment = script.PairedAugment(p_flip=0.5, p_rot90=0.5)
    _, y, c = script.training_batch(images, masks, sampler, 0, augment, "cpu")
    assert (y == script.IGNORE).all() and ((c >= 0) & (c < 1)).all()


def _leaves(tree):
    """The numbers of a nested JSON result, in order."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree] if isinstance(tree, (int, float)) else []


def _check_outputs(out: Path):
    result = json.loads((out / "metrics.json").read_text())
    for key in ("RV", "Myo", "LV", "mean"):
        for metric in ("dice", "hd95"):
            value = result["test"][key][metric]
            assert value["n"] == 2 and np.isfinite(value["mean"])
        assert 0 <= result["test"][key]["dice"]["mean"] <= 1
    assert [v["name"] for v in result["per_volume"]] == ["case000", "case001"]
    volume = result["per_volume"][0]
    assert volume["mean"]["dice"] == pytest.approx(np.mean([volume[c]["dice"] for c in ("RV", "Myo", "LV")]))
    assert result["wall_time_s"] > 0 and result["config"]["image_size"] == 48
    assert result["hd95_unit"] == "voxel"  # synthetic volumes carry no spacing
    assert (out / "results.png").stat().st_size > 1000
    assert {"best.pt", "last.pt", "history.json"} <= {p.name for p in out.iterdir()}
    return result


@pytest.mark.parametrize("method, mode", [("supervised", "prototype"), ("pseudo_label", "pixel")])
def test_smoke_run_writes_metrics_figure_and_checkpoints(script, tmp_path, method, mode):
    result = script.main(TINY + ["--iterations", "3", "--rounds", "1", "--eval-every", "3",
                                 "--method", method, "--mode", mode, "--out", str(tmp_path)])
    assert _check_outputs(tmp_path) == json.loads(json.dumps(result))
    assert result["iterations"] == {"stage1": 3, "stage2": 3, "total": 6}
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in history] == [3, 6]
    assert ("contrast/loss" in history[-1]) == (method == "pseudo_label")
    assert ("teacher_3.pt" in {p.name for p in tmp_path.iterdir()}) == (method == "pseudo_label")


def test_resume_mid_round_matches_an_uninterrupted_run(script, tmp_path, monkeypatch):
    # Stage 1: 2 steps; stage 2: 2 rounds of 3 (refreshes at 2 and 5); evaluations at 2, 4, 6, 8.
    args = TINY + ["--iterations", "2", "--rounds", "2", "--refresh-every", "3", "--eval-every", "2"]
    full = script.main(args + ["--out", str(tmp_path / "full")])

    validate, calls = script.validate, []

    def crash_at_step_6(model, volumes, a):
        calls.append(1)
        if len(calls) == 3:  # the third evaluation: after the round-2 teacher was written
            raise KeyboardInterrupt
        return validate(model, volumes, a)

    monkeypatch.setattr(script, "validate", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        script.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(script, "validate", validate)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["state"]
    assert state["step"] == 4  # mid-round 1 (steps 2-4), with the round-2 teacher already on disk
    # The round's teacher travels in last.pt. Checked here because, when no step after the round's start
    # beats it, it equals the best model, and the runs below could not tell it from one remade from best.pt.
    carried = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["carry"]
    teacher = torch.load(tmp_path / "cut" / "teacher_2.pt", weights_only=False)["model"]
    assert carried.keys() == {"best.pt", "teacher_2.pt"}
    assert all(torch.equal(carried["teacher_2.pt"][k], v) for k, v in teacher.items())
    # last.pt alone, away from the folder holding best.pt and the round's teacher_2.pt, into another --out.
    (tmp_path / "moved").mkdir()
    shutil.copyfile(tmp_path / "cut" / "last.pt", tmp_path / "moved" / "last.pt")
    elsewhere = script.main(args + ["--out", str(tmp_path / "other"), "--resume", str(tmp_path / "moved" / "last.pt")])
    resumed = script.main(args + ["--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "last.pt")])
    for out, result in ((tmp_path / "cut", resumed), (tmp_path / "other", elsewhere)):
        _check_outputs(out)
        assert result["best_step"] == full["best_step"]
        assert _leaves(result["test"]) == pytest.approx(_leaves(full["test"]), rel=1e-5, abs=1e-6)
        assert _leaves(result["per_volume"]) == pytest.approx(_leaves(full["per_volume"]), rel=1e-5, abs=1e-6)
        history = json.loads((out / "history.json").read_text())
        assert [r["step"] for r in history] == [2, 4, 6, 8]
        expected = json.loads((tmp_path / "full" / "history.json").read_text())
        assert [r.keys() for r in history] == [r.keys() for r in expected]
        assert _leaves(history) == pytest.approx(_leaves(expected), rel=1e-5, abs=1e-6)
    # A longer stage 1 (--resume-anyway) moves the round under way to steps 3-5, whose teacher no earlier
    # leg made: it is the best model so far, as at the start of any round.
    longer = script.main(args + ["--iterations", "3", "--out", str(tmp_path / "longer"), "--resume-anyway",
                                 "--resume", str(tmp_path / "moved" / "last.pt")])
    assert longer["config_changes"][0]["differences"] == {"iterations": [2, 3]}
    assert longer["iterations_done"] == 9 and (tmp_path / "longer" / "teacher_3.pt").is_file()


def test_stage2_from_the_baselines_stage1_matches_a_run_of_its_own(script, tmp_path, capsys):
    args = TINY + ["--iterations", "2", "--rounds", "2", "--refresh-every", "2", "--eval-every", "2"]
    own = script.main(args + ["--mode", "pixel", "--out", str(tmp_path / "own")])
    baseline = script.main(args + ["--method", "supervised", "--out", str(tmp_path / "base")])
    assert baseline["stage1_from"] is None and (tmp_path / "base" / "stage1_best.pt").is_file()
    assert torch.load(tmp_path / "base" / "stage1.pt", weights_only=False)["state"]["step"] == 2
    forked = script.main(args + ["--mode", "pixel", "--out", str(tmp_path / "fork"),
                                 "--stage1-from", str(tmp_path / "base")])
    _check_outputs(tmp_path / "fork")
    assert forked["stage1_from"] == str(tmp_path / "base") and forked["best_step"] == own["best_step"]
    assert _leaves(forked["test"]) == pytest.approx(_leaves(own["test"]), rel=1e-5, abs=1e-6)
    history = json.loads((tmp_path / "fork" / "history.json").read_text())
    assert history == json.loads((tmp_path / "own" / "history.json").read_text())
    # examples/study.py resumes a cut fork without its --stage1-from: the same run, so accepted;
    # another setting stops it, naming the flag and both values.
    resume = args + ["--mode", "pixel", "--out", str(tmp_path / "fork"), "--resume", str(tmp_path / "fork" / "last.pt")]
    assert script.parse_args(resume).stage1_from is None
    with pytest.raises(SystemExit):
        script.parse_args([*resume, "--lam", "0.5"])
    assert "--lam 0.5 (checkpoint: 0.1)" in capsys.readouterr().err


def test_stage1_from_refuses_what_it_cannot_continue(script, tmp_path, capsys):
    args = TINY + ["--iterations", "2", "--rounds", "1", "--eval-every", "2"]
    with pytest.raises(FileNotFoundError, match="stage1.pt"):
        script.main(args + ["--out", str(tmp_path / "a"), "--stage1-from", str(tmp_path / "nothing")])
    script.main(args + ["--method", "supervised", "--out", str(tmp_path / "base")])
    with pytest.raises(ValueError, match=r"other settings: image_size=48 \(here 32\)"):
        script.main([*args, "--image-size", "32", "--out", str(tmp_path / "b"),
                     "--stage1-from", str(tmp_path / "base")])
    wrong = tmp_path / "wrong"  # a checkpoint of the right run but from the wrong step
    wrong.mkdir()
    for name in ("stage1.pt", "stage1_best.pt"):
        shutil.copyfile(tmp_path / "base" / "last.pt", wrong / name)
    with pytest.raises(ValueError, match="stage1.pt is at step 4, stage 1 ends at 2"):
        script.main(args + ["--out", str(tmp_path / "c"), "--stage1-from", str(wrong)])
    for extra in (["--method", "supervised"], ["--resume", "x.pt"]):
        with pytest.raises(SystemExit):
            script.main([*args, *extra, "--stage1-from", str(tmp_path / "base")])
        assert "--stage1-from starts a pseudo-label run" in capsys.readouterr().err


@pytest.mark.skipif(find_acdc_root() is None, reason="ACDC not found (set CONTRASTKIT_DATA or ../shared/data/acdc)")
def test_real_acdc_batch_and_volume(script, monkeypatch):
    root = find_acdc_root()
    split = script.acdc_patient_split

    def few_unlabeled(*a, **k):  # all labeled slices of 1 patient, only 6 unlabeled ones: fast
        labeled, unlabeled = split(*a, **k)
        return labeled, unlabeled[:6]

    monkeypatch.setattr(script, "acdc_patient_split", few_unlabeled)
    args = script.parse_args(["--data", str(root), "--labeled-patients", "1", "--image-size", "64",
                              "--val-volumes", "1", "--test-volumes", "1"])
    (images, labels), unlabeled, val, test = script.load_data(args)
    assert images.shape[1:] == (1, 64, 64) and labels.shape[1:] == (64, 64) and len(images) == 32
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert set(labels.unique().tolist()) == {0, 1, 2, 3} and unlabeled.shape == (6, 1, 64, 64)
    masks = torch.cat([torch.stack([labels.float(), torch.ones(labels.shape)], 1),
                       torch.stack([torch.full((6, 64, 64), float(script.IGNORE)), torch.zeros(6, 64, 64)], 1)])
    sampler = script.TwoStreamBatchSampler.for_concat(len(images), 6, 2, 2, num_batches=1)
    x, y, c = script.training_batch(torch.cat([images, unlabeled]), masks, sampler, 0,
                                    script.PairedAugment(), "cpu")
    assert x.shape == (4, 1, 64, 64) and (y[:2] >= 0).all() and (y[2:] == script.IGNORE).all()

    name, volume, label = test[0]
    model = UNet(1, 4, base_width=4, depth=2).eval()
    pred = predict_volume(model, volume, 64)
    assert name in (root / "test.list").read_text() and pred.shape == label.shape and pred.dtype == np.int64
    assert set(np.unique(pred)) <= {0, 1, 2, 3}
    summary, per_volume = script.test_metrics(model, [test[0]], args)
    assert per_volume[0]["name"] == name and summary["mean"]["dice"]["n"] == 1


def _error(script, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "-1"], "argument --iterations: expected an int >= 1; got -1"),
    (["--iterations", "0"], "argument --iterations: expected an int >= 1; got 0"),
    (["--rounds", "0"], "argument --rounds: expected an int >= 1; got 0"),
    (["--refresh-every", "0"], "argument --refresh-every: expected an int >= 1; got 0"),
    (["--eval-every", "0"], "argument --eval-every: expected an int >= 1; got 0"),
    (["--val-volumes", "0"], "argument --val-volumes: expected an int >= 1; got 0"),
    (["--confidence-threshold", "1.5"], "argument --confidence-threshold: expected a number in [0, 1]; got 1.5"),
    (["--labeled-patients", "4", "--synthetic-volumes", "4"],
     "--labeled-patients 4 leaves no unlabeled volume of --synthetic-volumes 4"),
])
def test_flags_out_of_range_are_refused_naming_the_flag(script, capsys, argv, message):
    assert message in _error(script, capsys, argv)


def test_ssl4mis_preset_builds_the_protocol_and_trains(script, tmp_path, capsys, monkeypatch):
    from presets import PRESETS

    args = script.parse_args(["--preset", "ssl4mis-acdc", "--labeled-patients", "7"])
    expected = {**PRESETS["ssl4mis-acdc"]["values"], "labeled_patients": 7}
    assert {k: getattr(args, k) for k in expected} == expected
    assert (args.image_size, args.batch, args.labeled_batch, args.optimizer, args.lr) == (256, 24, 12, "sgd", 0.01)
    assert args.iterations + args.rounds * args.refresh_every == 30000
    # Bad combinations name the flag and the preset, before anything is loaded.
    message = _error(script, capsys, ["--preset", "ssl4mis-acdc", "--depth", "9"])
    assert "--image-size 256 (from --preset ssl4mis-acdc) is not a multiple of 2^9 = 512, which --depth 9 requires" \
        in message
    monkeypatch.setenv("WORLD_SIZE", "5")
    message = _error(script, capsys, ["--preset", "ssl4mis-acdc"])
    assert "--labeled-batch 12 (from --preset ssl4mis-acdc) cannot be split evenly over 5 processes" in message
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert "16 processes but --labeled-batch 12" in _error(script, capsys, ["--preset", "ssl4mis-acdc"])
    monkeypatch.delenv("WORLD_SIZE")
    # Two iterations (one per stage) at a reduced size, with the preset's optimizer and schedule,
    # in bf16 autocast and channels-last memory.
    result = script.main(TINY + ["--preset", "ssl4mis-acdc", "--iterations", "1", "--rounds", "1", "--refresh-every",
                                 "1", "--eval-every", "1", "--amp", "bf16", "--channels-last", "--out", str(tmp_path)])
    config = result["config"]
    assert (config["optimizer"], config["momentum"], config["weight_decay"], config["lr_schedule"]) == (
        "sgd", 0.9, 1e-4, "poly")
    assert (config["amp"], config["channels_last"], config["image_size"], result["world_size"]) == ("bf16", True, 48, 1)
    history = json.loads((tmp_path / "history.json").read_text())
    # Poly over both stages (T = 2): step 0 at 0.01, step 1 at 0.01 · (1 − 1/2)^0.9.
    assert [r["lr"] for r in history] == pytest.approx([0.01, 0.01 * 0.5**0.9])
    assert "contrast/loss" in history[1] and np.isfinite(history[1]["contrast/loss"])


def test_time_budget_stops_the_cardiac_run_cleanly(script, tmp_path, monkeypatch):
    import contrastkit.training as training

    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr(training.time, "monotonic", lambda: float(next(ticks)))
    result = script.main(TINY + ["--iterations", "20", "--rounds", "1", "--eval-every", "10", "--time-budget", "25",
                                 "--out", str(tmp_path)])
    assert result["stopped_at_time_budget"] and result["iterations_done"] < 40
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == result["iterations_done"]
    assert (tmp_path / "metrics.json").is_file()
