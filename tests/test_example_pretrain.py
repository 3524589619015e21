"""examples/pretrain_global_local.py: the three stages end to end, resume, and train_pseudo_label.py --init."""

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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    if str(EXAMPLES) not in sys.path:  # the scripts import examples/presets.py from beside them
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    return load("pretrain_global_local")


@pytest.fixture(scope="module")
def finetune():
    return load("train_pseudo_label")


TINY = ["--image-size", "32", "--width", "4", "--depth", "2", "--synthetic-volumes", "4", "--batch", "8",
        "--regions", "1", "--region-grid", "2", "--val-volumes", "2", "--threads", "1"]
TINY_FINETUNE = ["--image-size", "32", "--width", "4", "--depth", "2", "--synthetic-volumes", "4",
                 "--labeled-patients", "1", "--batch", "4", "--labeled-batch", "2", "--val-volumes", "1",
                 "--test-volumes", "2", "--iterations", "2", "--rounds", "1", "--eval-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def pretrained(pretrain, tmp_path_factory):
    """A tiny pre-training run: 3 global (G^D) and 3 local iterations on the synthetic hearts."""
    out = tmp_path_factory.mktemp("pretrain")
    result = pretrain.main(TINY + ["--iterations", "3", "--local-iterations", "3", "--eval-every", "2",
                                   "--out", str(out)])
    return out, result


def test_pretraining_writes_weights_curves_and_probes(pretrained):
    out, result = pretrained
    assert {"pretrained.pt", "pretrained_global.pt", "last.pt", "metrics.json", "history.json", "curves.png"} \
        <= {p.name for p in out.iterdir()}
    assert result["iterations_done"] == 6 and result["training_volumes"] == 4
    full = torch.load(out / "pretrained.pt", weights_only=False)
    encoder = torch.load(out / "pretrained_global.pt", weights_only=False)
    assert set(full["state_dict"]) == {k for k in full["state_dict"] if k.startswith(("down.", "up.0."))}
    assert {k.split(".")[0] for k in encoder["state_dict"]} == {"down"}
    assert any(k.startswith("up.0.") for k in full["state_dict"])
    assert full["unet"] == {"in_channels": 1, "base_width": 4, "depth": 2, "norm": "batch"}
    assert full["parts"]["decoder_blocks"] == 1 and encoder["parts"]["decoder_blocks"] == 0
    # stage 2 leaves the encoder as stage 1 ended, BatchNorm statistics included
    for name, tensor in encoder["state_dict"].items():
        assert torch.equal(full["state_dict"][name], tensor), name
    history = json.loads((out / "history.json").read_text())
    stages = [(r["step"], r["stage"]) for r in history]
    assert stages == [(0, 1), (2, 1), (3, 1), (3, 2), (4, 2), (6, 2)]
    assert all(0 <= r.get("probe/partition_knn", r.get("probe/region_knn")) <= 1 for r in history)
    assert "global/loss" in history[1] and "local/loss" in history[-1]
    assert (out / "curves.png").stat().st_size > 5000


def test_pretraining_resumes_to_the_same_weights(pretrain, pretrained, tmp_path, monkeypatch):
    out, _ = pretrained
    probe, calls = pretrain.probe, []

    def crash_in_stage_2(model, volumes, args, stage):
        calls.append(stage)
        if len(calls) == 5:  # step 4, the first evaluation inside stage 2
            raise KeyboardInterrupt
        return probe(model, volumes, args, stage)

    monkeypatch.setattr(pretrain, "probe", crash_in_stage_2)
    args = TINY + ["--iterations", "3", "--local-iterations", "3", "--eval-every", "2"]
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(pretrain, "probe", probe)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["state"]["step"] == 3
    pretrain.main(args + ["--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "cut" / "last.pt")])
    want = torch.load(out / "pretrained.pt", weights_only=False)["state_dict"]
    got = torch.load(tmp_path / "resumed" / "pretrained.pt", weights_only=False)["state_dict"]
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    steps = [r["step"] for r in json.loads((tmp_path / "resumed" / "history.json").read_text())]
    assert steps == [0, 2, 3, 3, 4, 6]


def test_init_loads_exactly_the_pretrained_tensors(finetune, pretrained, tmp_path, monkeypatch):
    out, _ = pretrained
    file = torch.load(out / "pretrained.pt", weights_only=False)["state_dict"]

    class Stop(Exception):
        pass

    def start_of_training(argv):
        """The model as the script's training would start from it."""
        seen = {}

        def capture(net, *args, **kwargs):
            seen.update({k: v.clone() for k, v in net.state_dict().items()})
            raise Stop

        monkeypatch.setattr(finetune, "prepare_model", capture)
        with pytest.raises(Stop):
            finetune.main(argv)
        return seen

    argv = TINY_FINETUNE + ["--method", "supervised", "--out", str(tmp_path)]
    seen = start_of_training(argv + ["--init", str(out / "pretrained.pt")])
    fresh = start_of_training(argv)  # the random-init arm of the same seed
    assert seen.keys() == fresh.keys()
    for name, tensor in seen.items():
        assert torch.equal(tensor, file[name] if name in file else fresh[name]), name
    assert not all(torch.equal(seen[k], fresh[k]) for k in file)  # the file's tensors did replace the random ones
    assert {k.split(".")[0] for k in seen if k not in file} == {"up", "head", "projector"}


def test_pretrained_then_finetuned_arms_run_end_to_end(finetune, pretrained, tmp_path):
    out, _ = pretrained
    for method in ("supervised", "pseudo_label"):
        result = finetune.main(TINY_FINETUNE + ["--method", method, "--mode", "pixel", "--init",
                                                str(out / "pretrained.pt"), "--out", str(tmp_path / method)])
        assert result["config"]["init"] == str(out / "pretrained.pt")
        assert 0 <= result["test"]["mean"]["dice"]["mean"] <= 1


def test_init_refuses_a_checkpoint_of_another_shape(finetune, pretrained, tmp_path, capsys):
    out, _ = pretrained
    wider = [a if a != "4" or TINY_FINETUNE[i - 1] != "--width" else "8" for i, a in enumerate(TINY_FINETUNE)]
    with pytest.raises(SystemExit):
        finetune.parse_args(wider + ["--init", str(out / "pretrained.pt")])
    message = capsys.readouterr().err
    assert "down.0.0.weight (4, 1, 3, 3) (model: (8, 1, 3, 3))" in message and "base_width=4" in message
    with pytest.raises(SystemExit):
        finetune.parse_args(TINY_FINETUNE + ["--norm", "group", "--init", str(out / "pretrained.pt")])
    assert "tensor(s) the model lacks: down.0.1.running_mean" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a training checkpoint is not a pre-trained file
        finetune.parse_args(TINY_FINETUNE + ["--init", str(out / "last.pt")])
    assert "is not a pre-trained U-Net file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(TINY_FINETUNE + ["--init", str(tmp_path / "missing.pt")])
    assert "--init" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--batch", "6"], "--batch 6 is not a multiple of --partitions 4"),
    (["--regions", "3"], "--regions 3 exceeds --depth 2"),
    (["--region-grid", "3"], "--region-grid 3 does not divide the 16x16 output of decoder block 1"),
    (["--iterations", "0", "--local-iterations", "0"], "nothing to train"),
    (["--strategy", "G"], "argument --strategy: invalid choice"),
    (["--partitions", "0"], "argument --partitions: expected an int >= 1; got 0"),
])
def test_bad_arguments_are_named(pretrain, capsys, extra, message):
    with pytest.raises(SystemExit):
        pretrain.parse_args(TINY + extra)
    assert message in capsys.readouterr().err


def test_default_batch_follows_the_original(pretrain):
    base = [a for a in TINY if a not in ("--batch", "8")]
    assert pretrain.parse_args(base).batch == 8  # G^D
    assert pretrain.parse_args(base + ["--strategy", "GR"]).batch == 12
    preset = pretrain.parse_args(["--preset", "chaitanya2020-acdc"])
    assert (preset.image_size, preset.volumes, preset.partitions, preset.tau, preset.lr, preset.iterations,
            preset.local_iterations, preset.batch) == (192, 52, 4, 0.1, 1e-3, 10000, 10000, 8)


def test_pretrained_file_moves_with_its_folder(pretrained, tmp_path):
    out, _ = pretrained
    shutil.copyfile(out / "pretrained.pt", tmp_path / "weights.pt")
    sys.path.insert(0, str(EXAMPLES))
    from presets import load_pretrained

    from contrastkit.models import UNet

    net = UNet(1, 4, base_width=4, depth=2)
    loaded = load_pretrained(net, tmp_path / "weights.pt")
    assert loaded and all(k.startswith(("down.", "up.0.")) for k in loaded)


def test_the_preset_trains_at_a_reduced_size(pretrain, tmp_path):
    result = pretrain.main(["--preset", "chaitanya2020-acdc", "--image-size", "32", "--width", "4", "--depth", "2",
                            "--synthetic-volumes", "4", "--volumes", "3", "--iterations", "2", "--local-iterations",
                            "2", "--regions", "1", "--region-grid", "2", "--val-volumes", "2", "--threads", "1",
                            "--out", str(tmp_path)])
    config = result["config"]
    assert (config["strategy"], config["partitions"], config["tau"], config["lr"], config["weight_decay"],
            config["lr_schedule"], config["batch"]) == ("GD", 4, 0.1, 1e-3, 0.0, "constant", 8)
    assert result["training_volumes"] == 3 and result["iterations_done"] == 4
