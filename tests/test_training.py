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


# --------------------------------------------------------------------------------------------
# Learning-rate schedule

from contrastkit.training import (  # noqa: E402
    AMP_DTYPES,
    DistributedContext,
    LRSchedule,
    MixedPrecision,
    broadcast_object,
    cleanup_distributed,
    derived_seed,
    init_distributed,
    is_main_process,
    mean_over_ranks,
    prepare_model,
    resume_run,
    save_run,
    unwrap_model,
    world_size_from_env,
)


def _optimizer(lr=0.01, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)], momentum=0.9)


def _rates(schedule, steps):
    """The learning rate each of ``steps`` optimizer steps trains at."""
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr())
        schedule.step()
    return rates


def test_poly_schedule_is_the_ssl4mis_rule():
    # SSL4MIS: after iteration i (1-based) lr = base * (1 - i / max_iterations) ** 0.9 for the next one.
    opt = _optimizer(0.01, groups=2)
    schedule = LRSchedule(opt, 30000, "poly")
    rates = _rates(schedule, 5)
    assert rates[0] == [0.01, 0.02]  # step 0 trains at the base rates of both groups
    for i in range(1, 5):
        assert rates[i][0] == pytest.approx(0.01 * (1 - i / 30000) ** 0.9, rel=1e-12)
        assert rates[i][1] == pytest.approx(0.02 * (1 - i / 30000) ** 0.9, rel=1e-12)
    short = LRSchedule(_optimizer(1.0), 4, "poly", power=2.0)
    assert [r[0] for r in _rates(short, 6)] == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0])


def test_cosine_constant_and_warmup_values():
    cosine = LRSchedule(_optimizer(1.0), 4, "cosine")
    assert [r[0] for r in _rates(cosine, 5)] == pytest.approx([1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2, 0.0])
    constant = LRSchedule(_optimizer(0.3), 3, "constant")
    assert [r[0] for r in _rates(constant, 4)] == [0.3] * 4
    # 2 warm-up steps at 1/2 and 2/2 of the base, then poly over the remaining 4 steps.
    warm = LRSchedule(_optimizer(1.0), 6, "poly", warmup_steps=2, power=1.0)
    assert [r[0] for r in _rates(warm, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert warm.factor(0) == 0.5 and warm.factor(100) == 0.0


def test_schedule_state_resumes_exactly_and_keeps_its_shape():
    a = LRSchedule(_optimizer(0.01), 100, "poly")
    _rates(a, 37)
    state = a.state_dict()
    assert state == {"step": 37, "kind": "poly", "total_steps": 100, "power": 0.9, "warmup_steps": 0}
    b = LRSchedule(_optimizer(0.01), 100, "poly")
    b.load_state_dict(state)
    assert b.get_last_lr() == a.get_last_lr() and _rates(b, 10) == _rates(a, 10)
    # The shape is the constructor's: a resumed run may lengthen its schedule on purpose.
    longer = LRSchedule(_optimizer(0.01), 200, "poly")
    longer.load_state_dict(state)
    assert longer.get_last_lr()[0] == pytest.approx(0.01 * (1 - 37 / 200) ** 0.9)
    # The base rate survives an optimizer whose lr was already decayed (resumed optimizer state).
    opt = _optimizer(0.01)
    LRSchedule(opt, 10)
    _ = [g.update(lr=0.001) for g in opt.param_groups]
    assert LRSchedule(opt, 10).base_lrs == [0.01]


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "linear"}, "kind"),
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": 2.5}, "total_steps"),
    ({"warmup_steps": 10}, "warmup_steps"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"power": -1.0}, "power"),
    ({"power": float("nan")}, "power"),
])
def test_schedule_argument_errors(kwargs, match):
    options = {"total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        LRSchedule(_optimizer(), **options)
    with pytest.raises(TypeError, match="optimizer"):
        LRSchedule(torch.nn.Linear(1, 1), 10)
    with pytest.raises(ValueError, match="step"):
        LRSchedule(_optimizer(), 10).factor(-1)


# --------------------------------------------------------------------------------------------
# Mixed precision


def test_bf16_autocast_runs_matmuls_in_bfloat16_on_cpu():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    amp = MixedPrecision("bf16", "cpu")
    with amp.autocast():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and amp.enabled and amp.dtype is torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=5e-2, rtol=2e-2)
    with MixedPrecision("none").autocast():
        assert layer(x).dtype == torch.float32
    assert not MixedPrecision("none").scaler.is_enabled() and not amp.scaler.is_enabled()
    assert set(AMP_DTYPES) == {"none", "bf16", "fp16"}


def test_fp16_scales_the_loss_unscales_the_step_and_skips_overflow():
    torch.manual_seed(0)
    reference, scaled = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    scaled.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3)
    amp = MixedPrecision("fp16", "cpu")
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.1)
    reference(x).pow(2).mean().backward()
    opt_ref.step()
    amp.backward(scaled(x).pow(2).mean())
    scale = amp.scaler.get_scale()
    assert scale == 65536.0
    torch.testing.assert_close(scaled.weight.grad, scale * reference.weight.grad)  # the loss was scaled
    amp.step(opt)
    torch.testing.assert_close(scaled.weight, reference.weight)  # the step used the unscaled gradient
    # An overflowing gradient: the step is skipped and the scale backs off by half.
    before = scaled.weight.detach().clone()
    opt.zero_grad()
    amp.backward(scaled(x).sum() * float("inf"))
    amp.step(opt)
    assert torch.equal(scaled.weight, before) and amp.scaler.get_scale() == scale / 2
    restored = MixedPrecision("fp16", "cpu")
    restored.load_state_dict(amp.state_dict())
    assert restored.scaler.get_scale() == scale / 2
    MixedPrecision("none").load_state_dict(amp.state_dict())  # ignored: nothing to scale
    restored.load_state_dict({})  # an fp32 run's (empty) state leaves the scaler as it is
    assert restored.scaler.get_scale() == scale / 2


def test_mixed_precision_errors():
    with pytest.raises(ValueError, match="mode"):
        MixedPrecision("fp8")


# --------------------------------------------------------------------------------------------
# Seeds, wrappers, checkpoints of wrapped models


def test_derived_seed_is_deterministic_and_separates_keys():
    seeds = {derived_seed(0, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert derived_seed(7, 3, 1) == derived_seed(7, 3, 1) != derived_seed(7, 1, 3)
    assert derived_seed(7) != derived_seed(8)
    with pytest.raises(ValueError, match=r"keys\[1\]"):
        derived_seed(0, 1, -2)
    with pytest.raises(ValueError, match="seed"):
        derived_seed(True)


def test_compiled_model_checkpoints_load_into_a_plain_one(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    compiled = torch.compile(model, backend="eager")
    assert unwrap_model(compiled) is model and unwrap_model(model) is model
    save_checkpoint(tmp_path / "c.pt", compiled, step=1)
    keys = torch.load(tmp_path / "c.pt", weights_only=False)["model"].keys()
    assert not any(k.startswith("_orig_mod") for k in keys)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    load_checkpoint(tmp_path / "c.pt", plain)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))
    other = torch.compile(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)),
                          backend="eager")
    load_checkpoint(tmp_path / "c.pt", other)  # and into a compiled one
    assert torch.equal(unwrap_model(other)[0].weight, model[0].weight)


def test_run_state_keeps_schedule_and_scaler(tmp_path):
    import time

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule, amp = LRSchedule(opt, 10), MixedPrecision("fp16")
    _rates(schedule, 3)
    amp.scaler.scale(torch.ones(()))  # the scale starts lazily
    amp.scaler.update(1024.0)
    save_run(tmp_path / "last.pt", model, opt, step=3, best=0.0, best_step=0, history=History(),
             started=time.time(), scheduler=schedule, scaler=amp)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule2, amp2 = LRSchedule(opt2, 10), MixedPrecision("fp16")
    step, *_ = resume_run(tmp_path / "last.pt", model, opt2, scheduler=schedule2, scaler=amp2)
    assert step == 3 and schedule2.step_count == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert amp2.scaler.get_scale() == 1024.0
    # A checkpoint without schedule state (older runs) puts the schedule at the saved step.
    save_run(tmp_path / "old.pt", model, opt, step=5, best=0.0, best_step=0, history=History(), started=time.time())
    schedule3 = LRSchedule(torch.optim.SGD(model.parameters(), lr=0.1), 10)
    resume_run(tmp_path / "old.pt", model, torch.optim.SGD(model.parameters(), lr=0.1), scheduler=schedule3)
    assert schedule3.step_count == 5 and schedule3.get_last_lr()[0] == pytest.approx(0.1 * 0.5**0.9)


# --------------------------------------------------------------------------------------------
# Single-process behaviour of the distributed helpers (the 2-process side: test_training_distributed.py)


def test_single_process_context_and_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_distributed("cpu")
    assert context == DistributedContext(0, 1, 0, torch.device("cpu"), owns_group=False)
    assert context.is_main and not context.distributed
    cleanup_distributed(context)  # nothing to end
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu").world_size == 1
    assert broadcast_object({"a": 1}) == {"a": 1} and is_main_process() and world_size_from_env() == 1
    assert mean_over_ranks({"b": 2.0, "a": 1.0}) == {"b": 2.0, "a": 1.0}
    with pytest.raises(TypeError, match="values"):
        mean_over_ranks([1.0])
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's count, read before any group exists
    assert world_size_from_env() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        world_size_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK"):
        init_distributed("cpu")


def test_prepare_model_single_process():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    plain, train_model = prepare_model(model, DistributedContext(), channels_last=True)
    assert plain is train_model is model
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain, compiled = prepare_model(model, compile_backend="eager")
    assert plain is model and unwrap_model(compiled) is model and compiled is not model
    # SyncBatchNorm in one process: converted, and it falls back to plain batch norm.
    synced, _ = prepare_model(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), sync_batchnorm=True)
    assert isinstance(synced[0], torch.nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="sync_batchnorm"):
        prepare_model(model, DistributedContext(0, 2, 0, torch.device("cpu")), sync_batchnorm=True)
    with pytest.raises(TypeError, match="model"):
        prepare_model("unet")
    with pytest.raises(TypeError, match="compile_backend"):
        prepare_model(model, compile_backend=True)



# --------------------------------------------------------------------------------------------
# Figure colours


def _has_colour(png, colour, tolerance=40, minimum=20):
    """At least ``minimum`` pixels of the RGB image within ``tolerance`` of ``colour`` ("#rrggbb")."""
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    distance = np.abs(png[..., :3].astype(int) - target).max(-1)
    return int((distance <= tolerance).sum()) >= minimum


def test_ground_truth_and_prediction_have_their_own_colour_per_class(tmp_path):
    from matplotlib.image import imread

    from contrastkit.viz import CONTOUR_COLOURS, contour_colours

    pairs = [contour_colours(c) for c in (1, 2, 3)]
    assert len({colour for pair in pairs for colour in pair}) == 6  # 3 classes: 6 distinct colours
    assert contour_colours(5) == CONTOUR_COLOURS[0]
    with pytest.raises(ValueError, match="label"):
        contour_colours(0)

    history = History([{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}])
    images = np.full((2, 48, 48), 0.5)
    target = np.zeros((2, 48, 48), dtype=int)
    target[:, 4:20, 4:20], target[:, 26:44, 4:20], target[:, 4:20, 26:44] = 1, 2, 3
    prediction = np.roll(target, 3, axis=1)
    path = training_figure(history, images, target, prediction, tmp_path / "cardiac.png",
                           class_names=["RV", "Myo", "LV"])
    png = (imread(path) * 255).round().astype(np.uint8)
    for truth, predicted in pairs:
        assert _has_colour(png, truth) and _has_colour(png, predicted)
    # Binary: the polyp's ground truth and prediction in the first pair; no other class colour.
    binary = training_figure(history, images, (target == 1).astype(int), (prediction == 1).astype(int),
                             tmp_path / "polyp.png", class_names=["polyp"])
    png = (imread(binary) * 255).round().astype(np.uint8)
    assert _has_colour(png, pairs[0][0]) and _has_colour(png, pairs[0][1])
    assert not _has_colour(png, pairs[1][1], tolerance=25)


def test_time_budget_expires_after_its_seconds(monkeypatch):
    import contrastkit.training as training

    clock = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    budget = training.TimeBudget(5.0)
    assert not budget.expired() and not budget.stopped
    clock[0] = 104.9
    assert not budget.expired()
    clock[0] = 105.1
    assert budget.expired() and budget.stopped
    clock[0] = 0.0  # once stopped, it stays stopped
    assert budget.expired()
    assert not training.TimeBudget(None).expired()
    for bad in (0, -1.0, "5", True):
        with pytest.raises(ValueError, match="seconds"):
            training.TimeBudget(bad)


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    import shutil
    import subprocess

    from contrastkit import __version__
    from contrastkit.training import code_version

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    outside = code_version(tmp_path)
    assert outside["commit"] is None and outside["dirty"] is None
    assert outside["contrastkit"] == __version__ and outside["torch"] == torch.__version__

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    clean = code_version(tmp_path / "a.py")  # a file: its folder's checkout
    assert clean["commit"] == git("rev-parse", "HEAD") and clean["dirty"] is False
    (tmp_path / "b.py").write_text("untracked files do not count\n")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path)["dirty"] is True


# --------------------------------------------------------------------------------------------
# Resuming: unreadable files, another optimizer, files that travel, configurations that differ


def _run_checkpoint(path, optimizer_class=torch.optim.AdamW, **extra):
    model = torch.nn.Linear(2, 2)
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_run(path, model, optimizer, step=4, best=0.5, best_step=2, history=History(), started=0.0, **extra)
    return model, optimizer


def test_unreadable_checkpoints_are_named(tmp_path):
    from contrastkit.training import checkpoint_state

    _run_checkpoint(tmp_path / "last.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "last.pt").read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save([1, 2], foreign)
    for path, match in ((truncated, "is not a readable checkpoint"), (foreign, "is not a checkpoint")):
        with pytest.raises(ValueError, match=f"{path}.*{match}"):
            checkpoint_state(path)
        with pytest.raises(ValueError, match=str(path)):
            resume_run(path, torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
    with pytest.raises(ValueError, match="its weights do not fit this model"):
        load_checkpoint(tmp_path / "last.pt", torch.nn.Linear(3, 2))


def test_resume_names_both_optimizers_when_they_differ(tmp_path):
    # SGD would load AdamW's state, then fail at its first step with KeyError 'momentum'.
    _run_checkpoint(tmp_path / "last.pt")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="holds the optimizer state of AdamW, which SGD cannot take over"):
        resume_run(tmp_path / "last.pt", model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def test_carried_files_reach_another_folder_and_spare_the_runs_own(tmp_path):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    best, _ = _run_checkpoint(run_dir / "best.pt")
    _run_checkpoint(run_dir / "last.pt", carry=[run_dir / "best.pt"])
    own = (run_dir / "best.pt").read_bytes()
    model = torch.nn.Linear(2, 2)
    resume_run(run_dir / "last.pt", model, torch.optim.AdamW(model.parameters()), carry_to=run_dir)
    assert (run_dir / "best.pt").read_bytes() == own  # the run's own folder keeps its full best.pt
    (other / "best.pt").parent.mkdir()
    torch.save({"model": {}, "state": {}}, other / "best.pt")  # another run's leftover: replaced
    resume_run(run_dir / "last.pt", model, torch.optim.AdamW(model.parameters()), carry_to=other)
    fresh = torch.nn.Linear(2, 2)
    load_checkpoint(other / "best.pt", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), best.parameters(), strict=True))


def test_compare_configs_and_the_changes_a_run_records():
    from contrastkit.training import RESUME_MAY_CHANGE, compare_configs, config_changes

    saved = {"lr": 0.1, "seed": 0, "data": "a", "out": "A", "threads": 1, "device": "cpu", "old_flag": 1}
    current = {"lr": 0.2, "seed": 0, "data": "b", "out": "B", "threads": 4, "device": "cuda", "new_flag": 2}
    assert {"out", "threads", "device"} <= RESUME_MAY_CHANGE
    # Only settings both sides know are compared: a flag newer than the checkpoint cannot differ from it.
    assert compare_configs(saved, current) == {"data": ("a", "b"), "lr": (0.1, 0.2)}
    assert compare_configs(saved, current, ignore={"data", "out", "threads", "device"}) == {"lr": (0.1, 0.2)}
    assert config_changes({"step": 4, "config": saved}, {**saved, "out": "B"}) == []
    first = config_changes({"step": 4, "config": saved}, current)
    assert first == [{"step": 4, "differences": {"data": ["a", "b"], "lr": [0.1, 0.2]}, "resumed_from_config": saved}]
    # A later resume keeps the earlier change the checkpoint records, then adds its own.
    later = config_changes({"step": 8, "config": current, "config_changes": first}, {**current, "seed": 1})
    assert later == [*first, {"step": 8, "differences": {"seed": [0, 1]}, "resumed_from_config": current}]
