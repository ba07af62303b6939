"""experiments.curves: validation curves kept beside the results, the flattening rule, the plot."""

import json

import numpy as np
import pytest

from experiments import curves, tables


def _write_run(folder, label, seed, values, steps):
    run = folder / "runs" / label / f"seed{seed}"
    run.mkdir(parents=True)
    val = [{"step": s, "metrics": {"a_mae": v, "b_acc": 1 - v}, "lr": 1e-3} for s, v in zip(steps, values)]
    (run / "history.json").write_text(json.dumps({"val": val}))


def _results(folder):
    runs = [{"method": "equal", "seed": 0, "status": "ok", "selected": {"step": 40}, "last": {"step": 50},
             "config": {"batch_size": 1}}]
    (folder / "results.json").write_text(json.dumps({
        "benchmark": "fake", "tasks": ["a", "b"], "runs": runs,
        "metrics": [{"name": "a_mae", "task": "a", "higher_is_better": False},
                    {"name": "b_acc", "task": "b", "higher_is_better": True}]}))


def test_flattening_and_stored_curves_survive_without_histories(tmp_path, monkeypatch):
    f = tmp_path / "r"
    steps = [10, 20, 30, 40, 50]
    _write_run(f, "equal", 0, [0.5, 0.2, 0.101, 0.1, 0.1005], steps)
    _results(f)
    assert curves.main([str(f)]) == 0
    stored = json.loads((f / "curves.json").read_text())["runs"]
    assert stored["equal"]["0"]["step"] == steps
    # Mean relative gap over the two metrics: at step 20, a_mae (0.2-0.1)/0.1 = 1 and b_acc
    # (0.9-0.8)/0.9 = 0.11 -> 0.56; at step 30, 0.01 and 0.0011 -> 0.0056 < 1 % and it stays below:
    # flattened at step 30 (index 2).
    gap = curves.relative_gap(stored["equal"]["0"]["metrics"], {"a_mae": False, "b_acc": True})
    np.testing.assert_allclose(gap[:3], [(4 + 0.4 / 0.9) / 2, (1 + 0.1 / 0.9) / 2, (0.01 + 0.001 / 0.9) / 2])
    assert curves.flattened_index(gap, 0.01) == 2
    # Late gain (last 10 % of 50 steps: evaluations after step 45): the best before is the best
    # overall (0.1 at step 40, accuracy 0.9), so nothing was gained late.
    assert curves.late_gain(stored["equal"]["0"]["metrics"], {"a_mae": False, "b_acc": True}, steps) == 0.0
    assert (f / "curves.png").exists()
    md = (f / "curves.md").read_text()
    assert "| equal | 1 | 50 | 30 | 0.00 | 0 of 1 |" in md
    # The histories are gone (a fresh checkout): the stored curves are kept, not lost.
    for h in f.glob("runs/*/seed*/history.json"):
        h.unlink()
    assert curves.main([str(f), "--no-plot"]) == 0
    assert json.loads((f / "curves.json").read_text())["runs"] == stored
    # ... and the tables' curves block renders from them.
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert "| equal | 1 | 50 | 30 | 0.00 | 0 of 1 |" in tables.render("r:curves")


def test_late_gain_is_the_relative_improvement_of_the_best_value_in_the_last_steps():
    hib = {"a_mae": False, "b_acc": True}
    # Hand-computed: steps 10..100; the last 10 % is the evaluation at step 100 (after step 90).
    # a_mae best before 0.21 (step 90), best overall 0.20: gain 0.05; b_acc best before 0.80,
    # overall 0.84: gain 0.04 / 0.84. Mean of the two.
    metrics = {"a_mae": [1.0, 0.5, 0.3, 0.25, 0.22, 0.22, 0.21, 0.21, 0.21, 0.20],
               "b_acc": [0.5, 0.6, 0.7, 0.75, 0.78, 0.79, 0.80, 0.80, 0.80, 0.84]}
    steps = list(range(10, 101, 10))
    assert curves.late_gain(metrics, hib, steps) == pytest.approx((0.05 + 0.04 / 0.84) / 2)
    # A wider window reaches back to step 70 (a_mae 0.21, b_acc 0.80 before it): the same gains.
    assert curves.late_gain(metrics, hib, steps, 0.3) == pytest.approx((0.05 + 0.04 / 0.84) / 2)
    # ... and to step 40 (a_mae 0.25, b_acc 0.75): (0.25 - 0.2) / 0.2 and 0.09 / 0.84.
    assert curves.late_gain(metrics, hib, steps, 0.6) == pytest.approx((0.25 + 0.09 / 0.84) / 2)
    # No evaluation before the window: undefined, shown as a dash.
    assert np.isnan(curves.late_gain({"a_mae": [1.0]}, hib, [10]))


def test_never_flattened_is_reported():
    assert curves.flattened_index(np.array([0.5, 0.3, 0.2]), 0.01) == 3
    assert curves.flattened_index(np.array([0.0, 0.0]), 0.01) == 0
    with pytest.raises(SystemExit):
        curves.main(["--help"])


def test_a_tuning_folder_reads_the_test_runs_of_the_chosen_settings(tmp_path):
    f = tmp_path / "tuned"
    _write_run(f / "test" / "lr0.005_wd0", "equal", 0, [0.5, 0.2, 0.1], [10, 20, 30])
    _write_run(f / "tune" / "lr0.001_wd0", "equal", 100, [0.5, 0.4, 0.3], [10, 20, 30])  # a tuning run: not shown
    (f / "tuning.json").write_text("{}")
    got = curves.extract(f)
    assert set(got) == {"equal"} and set(got["equal"]) == {"0"}
    assert got["equal"]["0"]["metrics"]["a_mae"] == [0.5, 0.2, 0.1]


def test_a_finished_run_without_history_is_named_not_silently_dropped(tmp_path):
    f = tmp_path / "r"
    _write_run(f, "equal", 0, [0.5, 0.2, 0.101, 0.1, 0.1005], [10, 20, 30, 40, 50])
    _results(f)
    payload = json.loads((f / "results.json").read_text())
    payload["runs"].append({"method": "equal", "seed": 1, "status": "ok", "selected": {"step": 50},
                            "last": {"step": 50}, "config": {"batch_size": 1}})   # trained elsewhere, no history
    (f / "results.json").write_text(json.dumps(payload))
    assert curves.main([str(f), "--no-plot"]) == 0
    assert "| equal | 1 (no history: seed 1) | 50 | 30 | 0.00 | 1 of 2 |" in (f / "curves.md").read_text()
