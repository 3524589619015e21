"""examples/train_cross_level.py end to end at toy size: files, schedules, exact resume, real data path."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from contrastkit.data import shared_data_root  # noqa: E402
from contrastkit.training import DistributedContext  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cross_level.py"
TINY = ["--synthetic-size", "40", "--image-size", "32", "--grid", "2", "--width", "4", "--depth", "2",
        "--batch", "4", "--labeled-batch", "2", "--labeled-fraction", "0.25", "--eval-every", "2",
        "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def script():
    if str(SCRIPT.parent) not in sys.path:  # the scripts import examples/presets.py from beside them
        sys.path.insert(0, str(SCRIPT.parent))
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
    # The default poly schedule (SSL4MIS): the step with index s trains at lr·(1 − s/T)^0.9;
    # each record holds the rate of its period's last step (indices 1 and 3 of T = 4).
    assert [r["lr"] for r in history] == pytest.approx([3e-3 * (1 - 1 / 4) ** 0.9, 3e-3 * (1 - 3 / 4) ** 0.9])
    # The new configuration is recorded with the results.
    config = metrics["config"]
    assert (config["lr_schedule"], config["amp"], config["optimizer"], config["preset"]) == ("poly", "none", "adamw",
                                                                                           None)
    assert metrics["world_size"] == 1 and metrics["test_data"] == {} and config["test_data"] is None


@pytest.mark.parametrize("method, schedule, expected", [
    ("cross_level", "joint", {"sup/loss", "contrast/loss", "consistency/loss"}),
    ("supervised", "sequential", {"sup/loss"}),
])
def test_joint_and_supervised_use_their_terms(script, tmp_path, method, schedule, expected):
    run(script, tmp_path, "--iterations", "2", "--method", method, "--schedule", schedule)
    (record,) = records(tmp_path)
    assert {k for k in record if k.endswith("/loss")} - {"total/loss"} == expected


def interrupt_at_validation(script, monkeypatch, call):
    """Make the script's ``call``-th validation raise KeyboardInterrupt, as a killed job would."""
    predict, calls = script.predict, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return predict(*args, **kwargs)

    monkeypatch.setattr(script, "predict", interrupted)


@pytest.mark.parametrize("options", [
    ["--lr-schedule", "poly"],
    ["--lr-schedule", "cosine", "--lr-warmup", "2", "--amp", "fp16"],  # + the fp16 gradient scaler's state
])
def test_resume_continues_exactly(script, tmp_path, monkeypatch, options):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = ["--iterations", "6", "--warmup", "3", *options]
    expected = run(script, straight, *args)
    interrupt_at_validation(script, monkeypatch, 3)  # killed during the step-6 validation
    with pytest.raises(KeyboardInterrupt):
        run(script, cut, *args)
    monkeypatch.undo()
    saved = torch.load(cut / "last.pt", weights_only=False)
    assert saved["state"]["step"] == 4 and saved["scheduler"]["step"] == 4
    resumed = run(script, cut, *args, "--resume", str(cut / "last.pt"))
    history = records(cut)
    assert [r["step"] for r in history] == [2, 4, 6]
    # Step count, optimizer, schedule, sampler position and augmentation all continue: the same
    # weights, learning rates and history as one uninterrupted run, to the bit.
    assert history == records(straight)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(cut / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"] and a["scaler"] == b["scaler"]
    assert resumed["test"] == expected["test"]


def test_resume_with_more_iterations_extends_a_constant_schedule(script, tmp_path):
    # Resuming with a larger --iterations continues the run (--resume-anyway: it is another
    # configuration); with a constant learning rate this is exactly one longer run (a decaying
    # schedule is recomputed over the new total).
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(script, straight, "--iterations", "6", "--warmup", "3", "--lr-schedule", "constant")
    run(script, split, "--iterations", "4", "--warmup", "3", "--lr-schedule", "constant")
    before = records(split)
    result = run(script, split, "--iterations", "6", "--warmup", "3", "--lr-schedule", "constant",
                 "--resume", str(split / "last.pt"), "--resume-anyway")
    assert [c["differences"] for c in result["config_changes"]] == [{"iterations": [4, 6]}]
    history = records(split)
    assert history[:2] == before and history == records(straight)
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(split / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_into_another_out_finishes_like_an_uninterrupted_run(script, tmp_path, monkeypatch):
    # The best model (step 2) is older than the checkpoint (step 4) and no later step beats it, so the
    # new folder's best.pt can come only from what last.pt carries: it is moved alone, away from cut/.
    straight, cut, moved, other = (tmp_path / name for name in ("straight", "cut", "moved", "other"))
    args = ["--iterations", "6", "--warmup", "3"]
    expected = run(script, straight, *args)
    assert expected["best_step"] == 2  # what makes this test the case above; a change of the tiny run may move it
    interrupt_at_validation(script, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(script, cut, *args)
    monkeypatch.undo()
    moved.mkdir()
    shutil.copyfile(cut / "last.pt", moved / "last.pt")
    resumed = run(script, other, *args, "--resume", str(moved / "last.pt"))
    metrics = json.loads((other / "metrics.json").read_text())
    assert metrics["best_step"] == expected["best_step"] and metrics["test"] == expected["test"]
    assert records(other) == records(straight)  # the history travelled too
    a = torch.load(straight / "best.pt", weights_only=False)["model"]
    b = torch.load(other / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["config_changes"] == [] and resumed["resumed_from_config"] is None  # --out may differ


def test_resume_with_other_settings_stops_naming_them(script, tmp_path, capsys):
    run(script, tmp_path / "a", "--iterations", "2")
    resume = [*TINY, "--iterations", "2", "--resume", str(tmp_path / "a" / "last.pt")]
    message = _error(script, capsys, [*resume, "--lr", "0.001", "--synthetic-size", "60"])
    assert "--lr 0.001 (checkpoint: 0.003)" in message and "--synthetic-size 60 (checkpoint: 40)" in message
    assert "--resume-anyway" in message
    # Where it writes and how it executes may change: these resume.
    args = script.parse_args([*resume, "--out", str(tmp_path / "b"), "--threads", "2", "--time-budget", "60"])
    assert args.out == str(tmp_path / "b")
    # Another optimizer cannot take over the saved state, whatever the user says.
    for anyway in ([], ["--resume-anyway"]):
        message = _error(script, capsys, [*resume, "--optimizer", "sgd", *anyway])
        assert "--optimizer sgd" in message and "trained with --optimizer adamw" in message


def test_resume_anyway_records_both_configurations_in_another_out(script, tmp_path, monkeypatch):
    cut = tmp_path / "cut"
    args = ["--iterations", "6", "--warmup", "3"]
    interrupt_at_validation(script, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(script, cut, *args)
    monkeypatch.undo()
    resume = ["--resume", str(cut / "last.pt"), "--resume-anyway"]
    result = run(script, tmp_path / "every3", *args, "--eval-every", "3", *resume)
    metrics = json.loads((tmp_path / "every3" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["config"]["eval_every"] == 3 and metrics["resumed_from_config"]["eval_every"] == 2
    assert metrics["config_changes"] == [{"step": 4, "differences": {"eval_every": [2, 3]},
                                          "resumed_from_config": metrics["resumed_from_config"]}]
    assert [r["step"] for r in records(tmp_path / "every3")] == [2, 4, 6]
    # Fewer iterations than the checkpoint's step, in bf16: nothing left to train, the best model is tested.
    result = run(script, tmp_path / "short", *args, "--iterations", "2", "--amp", "bf16", *resume)
    assert (result["iterations_done"], result["best_step"]) == (4, 2)
    assert result["config_changes"][0]["differences"] == {"amp": ["none", "bf16"], "iterations": [6, 2]}
    assert (tmp_path / "short" / "metrics.json").is_file()


def test_real_kvasir_batches_through_the_script_data_path(script):
    root = shared_data_root()
    folder = root / "kvasir-seg" if root else None
    if folder is None or not (folder / "images").is_dir():
        pytest.skip("Kvasir-SEG not found: set $CONTRASTKIT_DATA or place it in ../shared/data/kvasir-seg")
    args = script.parse_args(["--data", str(folder), "--image-size", "64", "--eval-every", "2"])
    labeled, unlabeled, val, test = script.load_data(args)
    assert (len(labeled), len(unlabeled), len(val), len(test)) == (80, 718, 100, 100)  # 998 images, 80/10/10
    _, loader = script.make_loader(args, labeled, unlabeled, DistributedContext())
    batches = list(loader)
    assert len(batches) == 2
    for images, masks in batches:
        assert images.shape == (8, 3, 64, 64) and masks.shape == (8, 1, 64, 64)
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
        assert set(masks.unique().tolist()) == {0.0, 1.0}
    labeled_masks = torch.cat([masks[:4] for _, masks in batches])
    assert (labeled_masks.flatten(1).sum(1) > 0).all()  # every Kvasir image shows a polyp


@pytest.fixture(scope="module")
def float32_run(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("float32")
    run(script, out, "--iterations", "2", *PLAIN_STEPS)
    return records(out)[0], torch.load(out / "last.pt", weights_only=False)["model"]


# Plain SGD steps: Adam's first steps move a weight by about lr whatever the size of its gradient,
# so it would turn the rounding of another memory layout on near-zero gradients into ~lr.
PLAIN_STEPS = ("--optimizer", "sgd", "--momentum", "0")


@pytest.mark.parametrize("options, exact", [
    (["--amp", "bf16"], False),
    (["--amp", "fp16"], False),
    (["--channels-last"], True),
    (["--compile", "aot_eager"], True),  # inductor's C++ build takes minutes on 2 cores; same tracing
])
def test_precision_memory_format_and_compile_train_the_same_model(script, tmp_path, float32_run, options, exact):
    reference, reference_weights = float32_run
    result = run(script, tmp_path, "--iterations", "2", *PLAIN_STEPS, *options)
    (record,) = records(tmp_path)
    weights = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    assert weights.keys() == reference_weights.keys()  # plain module keys, also when compiled
    losses = [k for k in reference if k.endswith("/loss")]
    if exact:  # the same arithmetic in another layout or traced: equal up to float rounding
        assert [record[k] for k in losses] == pytest.approx([reference[k] for k in losses], rel=1e-5)
        for k, w in weights.items():
            if "--compile" in options and k.startswith("projector."):
                # The projection head is unused after the 1-step warm-up. Eager autograd leaves it
                # no gradient (AdamW skips it); the compiled backward gives it zeros, so AdamW
                # moves it on its momentum. It affects nothing once the contrast is off.
                assert not torch.equal(w, reference_weights[k])
                continue
            torch.testing.assert_close(w, reference_weights[k], rtol=1e-4, atol=1e-5)
    else:  # autocast really ran in 16 bits: close to float32, not equal
        assert [record[k] for k in losses] == pytest.approx([reference[k] for k in losses], rel=2e-2, abs=2e-3)
        assert any(record[k] != reference[k] for k in losses)
    assert result["config"][options[0].lstrip("-").replace("-", "_")] == (options[1] if len(options) > 1 else True)


def _write_folder(root, n, mask_suffix="", seed=0):
    """``n`` synthetic polyps as PNG files in root/images and root/masks (mask names with the suffix)."""
    from PIL import Image

    from contrastkit.data import SyntheticPolyps

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    source = SyntheticPolyps(n, size=32, seed=seed)
    for i in range(n):
        image, mask = source[i]
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(
            root / "images" / f"case{i:03d}.png")
        Image.fromarray((mask[0].numpy() * 255).astype("uint8")).save(root / "masks" / f"case{i:03d}{mask_suffix}.png")
    return root


def test_extra_test_folders_are_evaluated_with_the_best_checkpoint(script, tmp_path, capsys):
    # ISIC 2018 names its masks <id>_segmentation.png: train on one such folder, test on another.
    train = _write_folder(tmp_path / "isic", 20, "_segmentation")
    other = _write_folder(tmp_path / "other", 6, "_segmentation", seed=9)
    out = tmp_path / "run"
    result = script.main([*TINY, "--data", str(train), "--mask-suffix", "_segmentation", "--test-data", str(other),
                          "--iterations", "2", "--out", str(out)])
    assert list(result["test_data"]) == [str(other)]
    reported = result["test_data"][str(other)]
    assert json.loads((out / "metrics.json").read_text())["test_data"] == json.loads(json.dumps(result["test_data"]))
    assert f"test on {other} (6 images)" in capsys.readouterr().out
    # The same numbers as the best checkpoint's predictions computed here, image by image.
    from contrastkit.data import SegmentationFolder
    from contrastkit.metrics import aggregate, binary_metrics
    from contrastkit.models import UNet
    from contrastkit.training import load_checkpoint

    model = UNet(3, 1, base_width=4, depth=2, proj_dim=32, norm="group").eval()  # the script's default
    load_checkpoint(out / "best.pt", model)
    folder = SegmentationFolder(other, size=32, mask_suffix="_segmentation")
    images, masks = zip(*(folder[i] for i in range(len(folder))), strict=True)
    with torch.no_grad():
        pred = (model(torch.stack(images)) > 0)[:, 0].numpy()
    expected = aggregate(binary_metrics(p, m[0].numpy() > 0.5) for p, m in zip(pred, masks, strict=True))
    assert reported.keys() == expected.keys() and reported["dice"]["n"] == 6
    for metric, stats in expected.items():
        assert reported[metric] == pytest.approx(stats)


def _error(script, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_reported_before_training(script, tmp_path, capsys, monkeypatch):
    message = _error(script, capsys, ["--preset", "clcc-kvasir", "--grid", "3"])
    assert "--grid 3 does not divide --image-size 320 (from --preset clcc-kvasir)" in message
    message = _error(script, capsys, ["--preset", "clcc-kvasir", "--image-size", "120"])  # 24-pixel patches
    assert ("patches of 24 pixels (--image-size / --grid) are not a multiple of 2^4 = 16, which --depth 4 "
            "(from --preset clcc-kvasir) requires; given --image-size 120, --grid 5 (from --preset clcc-kvasir)"
            in message)
    no_masks = tmp_path / "no_masks"
    (no_masks / "images").mkdir(parents=True)
    message = _error(script, capsys, ["--test-data", str(no_masks)])
    assert f"--test-data {no_masks}" in message and "masks" in message
    missing = _write_folder(tmp_path / "missing", 3)
    (missing / "masks" / "case001.png").unlink()
    message = _error(script, capsys, ["--test-data", str(missing)])
    assert "case001.png has no mask" in message
    message = _error(script, capsys, ["--data", str(_write_folder(tmp_path / "isic", 3, "_segmentation"))])
    assert "--data" in message and "has no mask" in message  # --mask-suffix _segmentation forgotten
    monkeypatch.setenv("WORLD_SIZE", "8")  # as under torchrun --nproc_per_node=8
    message = _error(script, capsys, ["--labeled-batch", "4", "--batch", "8"])
    assert "8 processes but --labeled-batch 4" in message
    monkeypatch.setenv("WORLD_SIZE", "3")
    message = _error(script, capsys, ["--labeled-batch", "3", "--batch", "8"])
    assert "the 5 unlabeled images per batch cannot be split evenly over 3 processes" in message
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "--sync-bn" in _error(script, capsys, ["--sync-bn", "--device", "cpu"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "0"], "argument --iterations: expected an int >= 1; got 0"),
    (["--iterations", "-5"], "argument --iterations: expected an int >= 1; got -5"),
    (["--epochs", "0"], "argument --epochs: expected an int >= 1; got 0"),
    (["--threads", "0"], "argument --threads: expected an int >= 1; got 0"),
    (["--warmup", "-1"], "argument --warmup: expected a number >= 0; got -1"),
    (["--grid", "0"], "argument --grid: expected an int >= 1; got 0"),
    (["--eval-every", "0"], "argument --eval-every: expected an int >= 1; got 0"),
    (["--image-size", "0"], "argument --image-size: expected an int >= 1; got 0"),
    (["--lr", "nan"], "argument --lr: expected a number > 0; got nan"),
    (["--labeled-fraction", "0"], "argument --labeled-fraction: expected a number in (0, 1]; got 0"),
    (["--labeled-fraction", "1.0"], "--labeled-fraction 1.0 leaves no unlabeled images"),
    (["--synthetic-size", "3"], "--synthetic-size 3 with --labeled-fraction 0.1 leaves no validation and no test "
                                "images ({'labeled': 1, 'unlabeled': 2, 'validation': 0, 'test': 0}); validation "
                                "and test take 10% of the images each, so at least 5 images"),
])
def test_flags_out_of_range_are_refused_naming_the_flag(script, capsys, argv, message):
    assert message in _error(script, capsys, argv)


def test_unreadable_resume_file_is_reported_with_its_path(script, tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    assert f"--resume {bad}: {bad} is not a readable checkpoint" in _error(script, capsys, ["--resume", str(bad)])
    missing = tmp_path / "missing.pt"
    assert f"--resume {missing}: no checkpoint at {missing}" in _error(script, capsys, ["--resume", str(missing)])


def test_supervised_baseline_may_label_every_training_image(script, tmp_path):
    argv = [*TINY, "--method", "supervised", "--labeled-fraction", "1", "--iterations", "2", "--out", str(tmp_path)]
    labeled, unlabeled, val, test = script.load_data(script.parse_args(argv))
    assert (len(labeled), len(unlabeled), len(val), len(test)) == (32, 0, 4, 4)
    assert script.main(argv)["test"]["dice"]["n"] == 4


def test_clcc_preset_builds_the_paper_config_and_trains(script, tmp_path):
    from presets import PRESETS

    args = script.parse_args(["--preset", "clcc-kvasir", "--lr", "0.5"])
    expected = {**PRESETS["clcc-kvasir"]["values"], "lr": 0.5}  # explicit flags win
    assert {k: getattr(args, k) for k in expected} == expected
    assert (args.image_size, args.grid, args.batch, args.labeled_batch, args.epochs) == (320, 5, 8, 4, 300)
    assert "lr" not in args.preset_values and "grid" in args.preset_values
    # Two iterations at a reduced size: the rest of the preset as it is.
    result = script.main(["--preset", "clcc-kvasir", "--synthetic-size", "40", "--image-size", "40", "--depth", "3",
                          "--width", "4", "--batch", "4", "--labeled-batch", "2", "--iterations", "2", "--warmup", "1",
                          "--eval-every", "2", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    config = result["config"]
    assert (config["grid"], config["optimizer"], config["weight_decay"], config["lr_schedule"]) == (5, "adamw", 0.01,
                                                                                                    "cosine")
    history = records(tmp_path)
    assert {"sup/loss", "consistency/loss"} <= set(history[0])  # warm-up of 1: contrast, then consistency
    # lr warm-up of a third of 2 iterations = 1 step at full rate, then cosine: the second step at 1e-3.
    assert history[0]["lr"] == pytest.approx(1e-3)


def test_preset_machinery_detects_explicit_flags(script):
    import argparse

    from presets import apply_preset, explicit_flags, flag

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--test-data", action="append", default=None)
    parser.add_argument("-v", action="count", default=0)
    # A flag given with its default value is still explicit; absent ones are not.
    assert explicit_flags(parser, ["--lr", "3e-3"]) == {"lr"}
    given = explicit_flags(parser, ["--fast", "--test-data", "a", "--test-data", "b", "-vv"])
    assert given == {"fast", "test_data", "v"}
    assert explicit_flags(parser, []) == set()
    import presets

    script_presets = {"p": {"script": "x", "source": "", "values": {"lr": 0.1, "grid": 5}}}
    saved = dict(presets.PRESETS)
    presets.PRESETS.update(script_presets)
    try:
        argv = ["--preset", "p", "--lr", "3e-3"]
        args = apply_preset(parser, parser.parse_args(argv), argv)
        assert (args.lr, args.grid, args.preset_values) == (3e-3, 5, ["grid"])
        assert flag(args, "grid") == "--grid 5 (from --preset p)" and flag(args, "lr") == "--lr 0.003"
    finally:
        presets.PRESETS.clear()
        presets.PRESETS.update(saved)
    args = parser.parse_args([])
    assert apply_preset(parser, args, []).preset_values == []


def test_time_budget_stops_validates_and_tests_the_best_checkpoint(script, tmp_path, monkeypatch):
    import contrastkit.training as training

    ticks = iter(range(0, 10_000, 10))  # every clock read is 10 s later: the 25 s budget ends at step 2
    monkeypatch.setattr(training.time, "monotonic", lambda: float(next(ticks)))
    result = run(script, tmp_path, "--iterations", "50", "--eval-every", "20", "--time-budget", "25")
    assert result["stopped_at_time_budget"] and result["iterations_done"] < 50
    history = records(tmp_path)
    assert history[-1]["step"] == result["iterations_done"]  # the cut period was validated
    assert result["best_step"] == max(history, key=lambda r: r["val/dice"])["step"]
    assert (tmp_path / "best.pt").is_file() and result["test"]["dice"]["n"] == 4
    with pytest.raises(SystemExit):
        run(script, tmp_path / "bad", "--time-budget", "0")


def test_groupnorm_by_default_batchnorm_for_the_papers_protocol_and_the_seed_study(script):
    # GroupNorm lifts the default synthetic run from test Dice ~0.33 to ~0.66 (examples/README.md);
    # the CLCC preset and the committed Kvasir seed study keep the BatchNorm they were run with.
    assert script.parse_args([]).norm == "group"
    assert script.parse_args(["--preset", "clcc-kvasir"]).norm == "batch"
    assert script.parse_args(["--preset", "clcc-kvasir", "--norm", "group"]).norm == "group"
    study = importlib.util.spec_from_file_location("study", Path(script.__file__).with_name("study.py"))
    module = importlib.util.module_from_spec(study)
    sys.modules["study"] = module  # its dataclasses look themselves up there
    try:
        study.loader.exec_module(module)
    finally:
        del sys.modules["study"]
    assert module.KVASIR_CPU[-2:] == ("--norm", "batch")
