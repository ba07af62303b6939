"""The tuning study chooses on validation only, per task for single-task runs, with one grid for all."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.suites import Benchmark
from experiments.metrics import MetricSpec
from experiments.studies import tuning


def _bench():
    return Benchmark(name="fake", task_names=("a", "b"), train=None, val=None, test=None, make_model=None,
                     pure_model=None, metrics=(MetricSpec("a_acc", "a", True), MetricSpec("b_mae", "b", False)),
                     stats=None, finalize=None)


def _r(val, test, single_task=None):
    return {"status": "ok", "val": val, "test": test, "single_task": single_task}


def test_grid_is_the_same_for_every_method_and_ordered():
    assert tuning.grid_points([1e-3, 3e-3], [0.0, 1e-4]) == [(1e-3, 0.0), (1e-3, 1e-4), (3e-3, 0.0), (3e-3, 1e-4)]


def test_single_task_choice_is_per_task_and_ignores_test():
    b = _bench()
    p1, p2 = (1e-3, 0.0), (3e-3, 0.0)
    # task a is best at p2 on validation (higher acc) but best at p1 on test; task b best at p1 (lower mae)
    st = {p1: [_r({"a_acc": 0.80}, {"a_acc": 0.99}, 0), _r({"b_mae": 1.0}, {"b_mae": 9.0}, 1)],
          p2: [_r({"a_acc": 0.90}, {"a_acc": 0.10}, 0), _r({"b_mae": 2.0}, {"b_mae": 0.1}, 1)]}
    choice, reference, scores = tuning.choose_single_task(b, st)
    assert choice == {0: p2, 1: p1}
    assert reference == {"a_acc": 0.90, "b_mae": 1.0}  # the chosen runs' validation metrics
    assert scores["a"]["lr0.003_wd0"] == pytest.approx(-12.5)  # Δm% of 0.9 vs 0.8, higher is better


def test_multi_task_choice_minimizes_validation_delta_m_over_tuning_seeds():
    b = _bench()
    ref = {"a_acc": 0.9, "b_mae": 1.0}
    p1, p2 = (1e-3, 0.0), (3e-3, 0.0)
    by_point = {p1: [_r({"a_acc": 0.9, "b_mae": 1.1}, {"a_acc": 1.0, "b_mae": 0.0}),
                     _r({"a_acc": 0.9, "b_mae": 1.1}, {"a_acc": 1.0, "b_mae": 0.0})],
                p2: [_r({"a_acc": 0.9, "b_mae": 1.0}, {"a_acc": 0.0, "b_mae": 9.0}),
                     {"status": "diverged", "val": {}, "test": {}}]}
    choice, scores = tuning.choose_multi_task(b, by_point, ref)
    assert choice == p2  # validation Δm 0 < 5 %, whatever the test metrics say
    assert scores["lr0.001_wd0"] == pytest.approx(5.0) and scores["lr0.003_wd0"] == pytest.approx(0.0)
    none_ok = {p1: [{"status": "diverged", "val": {}, "test": {}}]}
    assert math.isinf(tuning.choose_multi_task(b, none_ok, ref)[1]["lr0.001_wd0"])


@pytest.mark.slow
def test_tuning_study_tiny_end_to_end(tmp_path):
    out = tmp_path / "tun"
    subprocess.run([sys.executable, "-m", "experiments", "tuning", "--tiny", "--out", str(out), "--quiet"],
                   check=True, capture_output=True, text=True, timeout=900)
    payload = json.loads((out / "tuning.json").read_text())
    assert payload["budget"] == {"grid_points": 2, "tuning_seeds": 1, "runs_per_method": 2}
    assert set(payload["multi_task_choice"]) == {"equal", "imtl_h"}
    assert (out / "tuning.md").exists() and (out / "results.json").exists()


def test_copy_finished_runs_takes_only_finished_runs_of_the_same_rate_steps_and_decay(tmp_path):
    from experiments.runs import single_task_spec
    src, dest = tmp_path / "src", tmp_path / "dest"

    def put(folder, label, seed, **kw):
        d = folder / "runs" / label / f"seed{seed}"
        d.mkdir(parents=True)
        r = {"complete": True, "steps_planned": 100, "config": {"lr": 1e-3, "weight_decay": 0.0}}
        r.update(kw)
        (d / "result.json").write_text(json.dumps(r))
        (d / "history.json").write_text("{}")

    put(src, "single_task_0", 0)                                           # copied
    put(src, "single_task_0", 1, complete=False)                           # unfinished
    put(src, "single_task_0", 2, steps_planned=50)                         # another budget
    put(src, "single_task_1", 0, config={"lr": 3e-3, "weight_decay": 0.0})  # another rate
    put(src, "single_task_1", 1, config={"lr": 1e-3, "weight_decay": 1e-4})  # another decay
    put(src, "single_task_1", 2)
    put(dest, "single_task_1", 2, marker="dest's own")                       # never overwritten
    specs = [single_task_spec(0, 2), single_task_spec(1, 2)]
    copied = tuning.copy_finished_runs(src, dest, specs, [0, 1, 2, 3], 100, 1e-3, 0.0)
    assert copied == [str(Path("runs/single_task_0/seed0"))]
    assert (dest / copied[0] / "history.json").exists()
    assert json.loads((dest / "runs/single_task_1/seed2/result.json").read_text())["marker"] == "dest's own"


@pytest.mark.slow
def test_tuning_reuses_single_task_runs_only_where_the_whole_fingerprint_matches(tmp_path):
    """One grid point (lr 1e-3): every task chooses it. Runs trained earlier at that rate and budget
    are copied and kept (the same bytes); runs of another batch size are copied, fail the
    fingerprint check of the training loop and are retrained, so they are not reported as reused."""
    run = [sys.executable, "-m", "experiments"]
    for name, batch in (("same", []), ("other_batch", ["--batch-size", "7"])):
        subprocess.run(run + ["multimnist", "--tiny", "--quiet", "--methods", "single_task", "--lr", "0.001",
                              "--out", str(tmp_path / name)] + batch, check=True, capture_output=True, text=True,
                       timeout=900)
    for name in ("same", "other_batch"):
        out = tmp_path / f"tun_{name}"
        subprocess.run(run + ["tuning", "--tiny", "--quiet", "--lr-grid", "0.001", "--methods", "single_task",
                              "equal", "--reuse-single-task", str(tmp_path / name), "--out", str(out)],
                       check=True, capture_output=True, text=True, timeout=900)
        payload = json.loads((out / "tuning.json").read_text())
        dests = sorted((out / "test" / "lr0.001_wd0" / "runs").glob("single_task_*/seed*/result.json"))
        assert dests
        if name == "same":
            assert sorted(payload["reused_single_task_runs"]["runs"]) == sorted(
                f"lr0.001_wd0/{p.parent.relative_to(out / 'test' / 'lr0.001_wd0')}" for p in dests)
            src = tmp_path / name
            for p in dests:
                assert p.read_bytes() == (src / p.parent.relative_to(p.parents[3]) / "result.json").read_bytes()
        else:
            assert payload["reused_single_task_runs"] is None


def test_params_suffix_puts_a_gradient_method_on_the_parameters():
    from experiments.errors import CLIError
    from experiments.runs import expand_methods, resolve_method

    m = resolve_method("nash_mtl@params")
    assert m.level == "parameters" and m.weighting.name == resolve_method("nash_mtl").weighting.name
    assert resolve_method("nash_mtl").level == "representation"
    assert [s.label for s in expand_methods(["nash_mtl@params"], 3)] == ["nash_mtl@params"]
    with pytest.raises(CLIError, match="gradient methods only"):
        expand_methods(["uncertainty@params"], 3)


def _put_run(folder, label, seed, val, single_task=None, status="ok", test=None):
    d = folder / "runs" / label / f"seed{seed}"
    d.mkdir(parents=True)
    d.joinpath("result.json").write_text(json.dumps(
        {"method": label, "seed": seed, "complete": True, "status": status, "single_task": single_task,
         "val": val, "test": test or val}))


def test_best_untuned_methods_are_ranked_on_validation_with_identical_methods_once(tmp_path):
    from experiments.verdicts import best_on_validation
    b, f = _bench(), tmp_path / "untuned"
    for seed, acc in ((0, 0.8), (1, 1.0)):  # reference: a_acc 0.9 (mean of the seeds), b_mae 1.0
        _put_run(f, "single_task_0", seed, {"a_acc": acc}, single_task=0)
        _put_run(f, "single_task_1", seed, {"b_mae": 1.0}, single_task=1)
    for seed in (0, 1):
        _put_run(f, "equal", seed, {"a_acc": 0.9, "b_mae": 1.0})                        # listed: never added
        # Δm = (0 + (0.9 - 1) / 1 * 100) / 2 = -5 on validation, though its test metrics are the worst
        _put_run(f, "imtl_l", seed, {"a_acc": 0.9, "b_mae": 0.9}, test={"a_acc": 0.0, "b_mae": 99.0})
        _put_run(f, "uncertainty", seed, {"a_acc": 0.9, "b_mae": 0.9})                  # identical to imtl_l
        _put_run(f, "mgda", seed, {"a_acc": 0.9, "b_mae": 0.98})                        # Δm -1
        _put_run(f, "gls", seed, {"a_acc": 0.81, "b_mae": 1.0})                         # Δm (10 + 0) / 2 = 5
        _put_run(f, "cagrad", seed, {"a_acc": 1.0, "b_mae": 0.1}, status="diverged" if seed else "ok")
    _put_run(f, "pcgrad", 0, {"a_acc": 1.0, "b_mae": 0.1})                               # one seed only
    for seed in (0, 1, 2):  # an extra seed does not matter: Δm (0 + (0.95 - 1) * 100) / 2 = -2.5 on seeds 0, 1
        _put_run(f, "famo", seed, {"a_acc": 0.9, "b_mae": 0.95 if seed < 2 else 9.0})
    for seed in (0, 1):  # a metric missing on validation: an infinite score, neither chosen nor merged
        _put_run(f, "dwa", seed, {"a_acc": 0.9})
        _put_run(f, "nash_mtl@params", seed, {"a_acc": 0.9, "b_mae": 0.99})              # Δm -0.5
    listed = ["single_task_0", "single_task_1", "equal"]
    chosen, means = best_on_validation(f, b, 2, listed)
    assert chosen == ["imtl_l", "famo"]
    # one row for imtl_l = uncertainty
    assert means == pytest.approx({"imtl_l": -5.0, "famo": -2.5, "mgda": -1.0, "nash_mtl@params": -0.5, "gls": 5.0})
    assert best_on_validation(f, b, 2, listed + ["uncertainty"])[0] == ["famo", "mgda"]  # the group leaves whole
    assert best_on_validation(f, b, 9, listed)[0] == ["imtl_l", "famo", "mgda", "nash_mtl@params", "gls"]
    for p in (f / "runs" / "single_task_1").glob("seed*/result.json"):
        p.unlink()
    with pytest.raises(ValueError, match="task 'b'"):
        best_on_validation(f, b, 2, listed)


@pytest.mark.slow
def test_tuning_adds_the_best_untuned_method_and_trains_it(tmp_path):
    """An untuned tiny table of EW, RLW and SI; the tuning study of EW asked for the best other method
    adds the one whose mean validation Δm (recomputed here from the runs' records) is lowest. QM9's
    errors are continuous (a tiny classification split can tie two methods' every metric)."""
    run = [sys.executable, "-m", "experiments"]
    untuned, out = tmp_path / "untuned", tmp_path / "tuned"
    subprocess.run(run + ["qm9", "--tiny", "--quiet", "--seeds", "0", "1", "--methods", "single_task", "equal",
                          "rlw", "si", "--out", str(untuned)], check=True, capture_output=True, text=True, timeout=900)
    records = [json.loads(p.read_text()) for p in untuned.glob("runs/*/seed*/result.json")]
    table = json.loads((untuned / "results.json").read_text())
    names, hib = [m["name"] for m in table["metrics"]], {m["name"]: m["higher_is_better"] for m in table["metrics"]}
    task = {m["name"]: table["tasks"].index(m["task"]) for m in table["metrics"]}
    ref = {n: np.mean([r["val"][n] for r in records if r["single_task"] == task[n]]) for n in names}
    dm = {m: np.mean([np.mean([(-1 if hib[n] else 1) * (r["val"][n] - ref[n]) / abs(ref[n]) * 100 for n in names])
                      for r in records if r["method"] == m]) for m in ("rlw", "si")}
    best = min(dm, key=dm.get)
    res = subprocess.run(run + ["tuning", "--benchmark", "qm9", "--tiny", "--quiet", "--lr-grid", "0.001", "--methods",
                                "single_task", "equal",
                                "--add-best-untuned", str(untuned), "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    payload = json.loads((out / "tuning.json").read_text())
    assert payload["added_best_untuned"]["chosen"] == [best]
    assert payload["added_best_untuned"]["validation_delta_m"] == pytest.approx(dm)
    assert set(payload["multi_task_choice"]) == {"equal", best}
    assert len(list(out.glob(f"test/*/runs/{best}/seed*/result.json"))) == len(payload["test_seeds"])
    for benchmark, folder, n, message in (("qm9", tmp_path / "nowhere", "1", "expected an untuned results folder"),
                                          ("qm9", untuned, "0", "a number of methods >= 1"),
                                          ("multifashion", untuned, "1", "holds qm9 runs"),
                                          ("qm9", untuned, "3", "has 2 method(s) beside --methods")):
        bad = subprocess.run(run + ["tuning", "--benchmark", benchmark, "--tiny", "--quiet", "--methods", "single_task",
                                    "equal", "--add-best-untuned", str(folder), n, "--out", str(tmp_path / "bad")],
                             capture_output=True, text=True, timeout=900)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr
