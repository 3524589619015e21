"""examples/study.py: plans become the right commands; summaries give paired intervals that are right."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

stats = pytest.importorskip("scipy.stats")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


def polyp_metrics(dice, seed):
    test = {name: {"mean": value, "std": 0.1, "n": 10, "n_nan": 0}
            for name, value in (("dice", dice), ("iou", dice / 2), ("precision", 0.5), ("recall", 0.6),
                                ("hd95", 40.0))}
    return {"config": {"seed": seed, "out": "x", "method": "m"}, "test": test, "wall_time_s": 60.0, "best_step": 10}


def cardiac_metrics(dice, seed):
    per_class = {name: {"dice": {"mean": dice + k / 100}, "hd95": {"mean": 5.0}} for k, name in
                 enumerate(("RV", "Myo", "LV"))}
    return {"config": {"seed": seed}, "test": {**per_class, "mean": {"dice": {"mean": dice}, "hd95": {"mean": 5.0}}}}


def write_runs(root, arms, make=polyp_metrics):
    for arm, values in arms.items():
        for seed, value in values.items():
            (root / f"{arm}_s{seed}").mkdir(parents=True)
            (root / f"{arm}_s{seed}" / "metrics.json").write_text(json.dumps(make(value, seed)))


def test_paired_difference_matches_a_paired_t_test(study, tmp_path):
    base = {0: 0.45, 1: 0.48, 2: 0.41, 3: 0.50, 4: 0.47}
    other = {0: 0.49, 1: 0.47, 2: 0.46, 3: 0.55, 4: 0.52, 5: 0.9}  # seed 5 has no pair: left out
    write_runs(tmp_path, {"supervised": base, "cross_level": other})
    summary = study.summarize(tmp_path, "supervised")
    d = summary["differences"]["cross_level"]["dice"]
    seeds = sorted(base)
    a, b = [other[s] for s in seeds], [base[s] for s in seeds]
    t, _ = stats.ttest_rel(a, b)
    assert d["seeds"] == seeds and d["n"] == 5
    assert d["t"] == pytest.approx(t, rel=1e-12)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    interval = stats.t.interval(0.95, 4, loc=sum(diffs) / 5, scale=stats.sem(diffs))
    assert d["ci95"] == pytest.approx(list(interval), rel=1e-12)
    arm = summary["arms"]["supervised"]["metrics"]["dice"]
    assert arm["mean"] == pytest.approx(sum(b) / 5) and arm["std"] == pytest.approx(stats.tstd(b))
    md = study.markdown(summary, "t")
    assert "| cross_level | dice | 5 |" in md and "| supervised | 5 |" in md


def test_summaries_come_with_a_figure(study, tmp_path):
    pytest.importorskip("matplotlib")
    write_runs(tmp_path / "runs", {"supervised": {0: 0.45, 1: 0.48, 2: 0.41}, "cross_level": {0: 0.49, 1: 0.47}})
    for baseline in ("supervised", None):  # with and without the paired panel
        out = tmp_path / f"summary-{baseline}"
        study.write_summary(study.summarize(tmp_path / "runs", baseline), out, "a study")
        png = out.with_suffix(".png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert out.with_suffix(".md").exists() and out.with_suffix(".json").exists()


def test_cardiac_runs_compare_the_mean_and_each_class(study, tmp_path):
    write_runs(tmp_path, {"sup": {0: 0.4, 1: 0.5}, "proto": {0: 0.45, 1: 0.5}}, cardiac_metrics)
    summary = study.summarize(tmp_path, "sup")
    assert set(summary["arms"]["sup"]["metrics"]) == {"dice", "hd95", "dice_RV", "dice_Myo", "dice_LV"}
    d = summary["differences"]["proto"]["dice_Myo"]
    assert d["per_seed"] == pytest.approx([0.05, 0.0]) and "ci95" in d
    one = tmp_path / "one"
    write_runs(one, {"sup": {0: 0.4}, "proto": {0: 0.5}}, cardiac_metrics)
    single = study.summarize(one, "sup")["differences"]["proto"]["dice"]
    assert single["n"] == 1 and "ci95" not in single and math.isnan(single["std"])


def test_summaries_say_which_commits_the_runs_trained_at(study, tmp_path):
    def at(commit, dirty=False):
        def make(dice, seed):
            return {**polyp_metrics(dice, seed), "code": {"commit": commit, "dirty": dirty}}
        return make

    write_runs(tmp_path / "one", {"supervised": {0: 0.4, 1: 0.5}}, at("a" * 40))
    write_runs(tmp_path / "one", {"cross_level": {0: 0.45, 1: 0.5}}, at("a" * 40))
    one = study.summarize(tmp_path / "one", "supervised")
    assert one["trained_at"] == ["a" * 10] and f"Trained at commit: {'a' * 10}." in study.markdown(one, "t")
    write_runs(tmp_path / "mixed", {"supervised": {0: 0.4}}, at("b" * 40, dirty=True))
    write_runs(tmp_path / "mixed", {"cross_level": {0: 0.45}})  # an older run: no record
    mixed = study.summarize(tmp_path / "mixed", "supervised")
    assert mixed["trained_at"] == ["b" * 10 + "+", "unknown"]
    assert "trained at different commits" in study.markdown(mixed, "t")
    write_runs(tmp_path / "old", {"supervised": {0: 0.4}})
    assert "do not record the commit" in study.markdown(study.summarize(tmp_path / "old", None), "t")


def test_summaries_show_the_validation_number_settings_are_chosen_by(study, tmp_path):
    def with_val(dice, seed):
        return {**polyp_metrics(dice, seed), "best_val_dice": dice + 0.1}

    write_runs(tmp_path / "val", {"supervised": {0: 0.4, 1: 0.5}, "cross_level": {0: 0.45, 1: 0.55}}, with_val)
    summary = study.summarize(tmp_path / "val", "supervised")
    chosen = summary["arms"]["cross_level"]["best_val_dice"]
    assert chosen["per_seed"] == pytest.approx([0.55, 0.65]) and chosen["mean"] == pytest.approx(0.6)
    assert chosen["std"] == pytest.approx(stats.tstd([0.55, 0.65]))
    table = [line for line in study.markdown(summary, "t").splitlines() if line.startswith("|")][:4]
    assert table[0].startswith("| arm | seeds | val dice | dice |")
    assert all(line.count("|") == table[0].count("|") for line in table)
    row = next(line for line in table if line.startswith("| cross_level |"))
    assert row.split(" | ")[2:4] == ["0.600 ± 0.071", "0.500 ± 0.071"]  # validation, then test
    write_runs(tmp_path / "val", {"old": {0: 0.3}})  # a run that does not record it: no column
    summary = study.summarize(tmp_path / "val", "supervised")
    assert summary["arms"]["old"]["best_val_dice"] is None and "val dice" not in study.markdown(summary, "t")


def test_summaries_refuse_what_they_cannot_read(study, tmp_path):
    with pytest.raises(FileNotFoundError, match="arm"):
        study.summarize(tmp_path, None)
    write_runs(tmp_path, {"a": {0: 0.4}})
    with pytest.raises(ValueError, match="baseline arm 'b'"):
        study.summarize(tmp_path, "b")
    (tmp_path / "oops").mkdir()
    (tmp_path / "oops" / "metrics.json").write_text(json.dumps(polyp_metrics(0.1, 0)))
    with pytest.raises(ValueError, match="<arm>_s<seed>"):
        study.summarize(tmp_path, "a")


def test_plans_become_commands(study, tmp_path):
    plan = study.PLANS["kvasir-cpu"]
    runs = study.commands(plan, tmp_path, Path("/data"), 300, None)
    assert [name for name, _ in runs[:3]] == ["supervised_s0", "cross_level_s0", "supervised_s1"]
    assert len(runs) == 10
    argv = dict(runs)["cross_level_s3"]
    assert argv[argv.index("--data") + 1] == "/data/kvasir-seg" and argv[argv.index("--seed") + 1] == "3"
    assert argv[argv.index("--time-budget") + 1] == "300" and "--threads" in argv
    with pytest.raises(ValueError, match="--data-root"):
        study.commands(plan, tmp_path, None, None, None)
    assert all("--data" in argv and "synthetic" in argv for _, argv in study.commands(
        study.PLANS["tiny"], tmp_path, None, None, "cpu"))


def test_a_stopped_study_continues_where_it_was(study, tmp_path):
    record = "import json, pathlib, sys; pathlib.Path(sys.argv[1]).write_text(json.dumps(sys.argv[2:]))"
    runs = [(name, [sys.executable, "-c", record, str(tmp_path / f"{name}.args"), "--seed", "0"])
            for name in ("fresh_s0", "cut_s0", "done_s0")]
    (tmp_path / "cut_s0").mkdir()
    (tmp_path / "cut_s0" / "last.pt").write_bytes(b"checkpoint")
    (tmp_path / "done_s0").mkdir()
    (tmp_path / "done_s0" / "metrics.json").write_text("{}")
    runs.append(("cutfork_s0", [*runs[0][1][:3], str(tmp_path / "cutfork_s0.args"), "--stage1-from", "elsewhere"]))
    (tmp_path / "cutfork_s0").mkdir()  # started from another run's stage 1, then cut: resumes from its own
    (tmp_path / "cutfork_s0" / "last.pt").write_bytes(b"checkpoint")
    done = study.run_plan(study.PLANS["tiny"], tmp_path, 2, runs, None)
    assert sorted(name for name, code, _ in done if code == 0) == ["cut_s0", "cutfork_s0", "done_s0", "fresh_s0"]
    resumed = ["--resume", str(tmp_path / "cutfork_s0" / "last.pt")]
    assert json.loads((tmp_path / "cutfork_s0.args").read_text()) == resumed
    assert json.loads((tmp_path / "fresh_s0.args").read_text()) == ["--seed", "0"]
    assert json.loads((tmp_path / "cut_s0.args").read_text()) == ["--seed", "0", "--resume",
                                                                  str(tmp_path / "cut_s0" / "last.pt")]
    assert not (tmp_path / "done_s0.args").exists()  # finished earlier: not run again


def test_a_run_that_starts_from_another_stage1_waits_for_it(study, tmp_path):
    # "base" writes its stage1.pt only once "free" (no wait) has started in the second slot, so the
    # check does not depend on how fast processes start; "fork" must start after that file exists.
    # "orphan" waits for a run that never writes one: it fails.
    log = tmp_path / "order.txt"
    stamp = (f"import pathlib, sys, time; open({str(log)!r}, 'a').write(sys.argv[1] + ' start ' + "
             f"str(pathlib.Path({str(tmp_path / 'base_s0' / 'stage1.pt')!r}).is_file()) + '\\n')")
    base = stamp + (f"; log = pathlib.Path({str(log)!r}); t = time.monotonic()"
                    "\nwhile 'free start' not in log.read_text() and time.monotonic() - t < 60: time.sleep(0.05)"
                    f"\np = pathlib.Path({str(tmp_path / 'base_s0')!r}); p.mkdir(exist_ok=True); "
                    "(p / 'stage1.pt').write_text('x')")
    runs = [("base_s0", [sys.executable, "-c", base, "base"]),
            ("fork_s0", [sys.executable, "-c", stamp, "fork", "--stage1-from", str(tmp_path / "base_s0")]),
            ("orphan_s0", [sys.executable, "-c", stamp, "orphan", "--stage1-from", str(tmp_path / "nobody_s0")]),
            ("free_s0", [sys.executable, "-c", stamp, "free"])]
    done = {name: code for name, code, _ in study.run_plan(study.PLANS["tiny"], tmp_path, 2, runs, None)}
    assert done == {"base_s0": 0, "fork_s0": 0, "free_s0": 0, "orphan_s0": 1}
    lines = log.read_text().split("\n")[:-1]
    assert sorted(lines) == ["base start False", "fork start True", "free start False"]
    assert study.commands(study.PLANS["acdc-cpu"], tmp_path, Path("/d"), None, None)[1][1][-4:-2] == [
        "--stage1-from", str(tmp_path / "supervised_s0")]


def test_the_tiny_agenda_runs_end_to_end(tmp_path):
    # The CPU dry run of the GPU agenda's machinery: both scripts, parallel runs, budgets, summaries.
    import subprocess

    done = subprocess.run([sys.executable, str(SCRIPT), "run", "tiny", "--seeds", "0", "--out", str(tmp_path),
                           "--device", "cpu", "--budget-s", "120"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for script, arms in (("train_cross_level", ("supervised", "cross_level")),
                         ("train_pseudo_label", ("cardiac_supervised", "cardiac_prototype"))):
        summary = json.loads((tmp_path / f"summary-{script}.json").read_text())
        assert sorted(summary["arms"]) == sorted(arms) and summary["facts"]["cpus"] >= 1
        assert all(data["seeds"] == [0] for data in summary["arms"].values())
        assert list(summary["differences"]) == [arms[1]]
        assert (tmp_path / f"summary-{script}.md").read_text().startswith("# ")
        assert (tmp_path / f"summary-{script}.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "cross_level_s0" / "metrics.json").read_text())
    assert metrics["config"]["time_budget"] == 120 and not metrics["stopped_at_time_budget"]
    assert metrics["code"]["torch"] and "commit" in metrics["code"]


def test_pretrained_arms_load_their_seeds_weights_and_wait_for_them(study, tmp_path):
    runs = dict(study.commands(study.PLANS["acdc-pretrain-cpu"], tmp_path, Path("/d"), None, None, seeds=[1]))
    assert list(runs) == ["pretrain_s1", "supervised_s1", "pretrained_supervised_s1", "pixel_s1",
                          "pretrained_pixel_s1"]
    assert runs["pretrain_s1"][1].endswith("pretrain_global_local.py") and "--init" not in runs["pretrain_s1"]
    weights = tmp_path / "pretrain_s1" / "pretrained.pt"
    for name in ("pretrained_supervised_s1", "pretrained_pixel_s1"):
        argv = runs[name]
        assert argv[argv.index("--init") + 1] == str(weights)
        assert weights in study._waits_for(argv)
    assert study._waits_for(runs["pretrained_pixel_s1"]) == [tmp_path / "pretrained_supervised_s1" / "stage1.pt",
                                                             weights]
    assert "--init" not in runs["supervised_s1"] and "--init" not in runs["pixel_s1"]
    # a run waiting for weights that never come fails; one whose weights exist runs
    stamp = "import sys; open(sys.argv[1], 'w').write('ran')"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "pretrained.pt").write_text("x")
    fake = [("ok_s0", [sys.executable, "-c", stamp, str(tmp_path / "ok.txt"), "--init",
                       str(tmp_path / "w" / "pretrained.pt")]),
            ("orphan_s0", [sys.executable, "-c", stamp, str(tmp_path / "orphan.txt"), "--init",
                           str(tmp_path / "nobody" / "pretrained.pt")])]
    done = {name: code for name, code, _ in study.run_plan(study.PLANS["tiny"], tmp_path, 1, fake, None)}
    assert done == {"ok_s0": 0, "orphan_s0": 1} and not (tmp_path / "orphan.txt").exists()
