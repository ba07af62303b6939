"""Tables in README/docs are generated from results/ and cannot go stale."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import tables, verdicts

ROOT = Path(__file__).resolve().parents[2]


def _payload(dms_by_method):
    """A results.json with two tasks; run metrics chosen so Δm per seed is as given."""
    runs = []
    for t in (0, 1):  # single-task runs: acc 0.5 on their task for every seed
        for seed in (0, 1, 2):
            runs.append({"method": f"single_task_{t}", "single_task": t, "seed": seed, "status": "ok",
                         "val": {"a_acc": 0.5, "b_acc": 0.5}, "test": {"a_acc": 0.5, "b_acc": 0.5},
                         "wall_time_s": 1.0, "step_time_ms": 1.0, "skipped_steps": 0, "steps_done": 10})
    for m, dms in dms_by_method.items():
        for seed, dm in enumerate(dms):
            acc = 0.5 * (1 - dm / 100)  # both tasks: Δm% = -100·(acc−0.5)/0.5 = dm
            runs.append({"method": m, "seed": seed, "status": "ok", "val": {"a_acc": acc, "b_acc": acc},
                         "test": {"a_acc": acc, "b_acc": acc}, "wall_time_s": 1.0, "step_time_ms": 1.0,
                         "skipped_steps": 0, "steps_done": 10})
    return {"benchmark": "fake", "tasks": ["a", "b"], "command": "x",
            "metrics": [{"name": "a_acc", "task": "a", "higher_is_better": True},
                        {"name": "b_acc", "task": "b", "higher_is_better": True}], "runs": runs}


def test_verdict_reads_the_paired_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "f").mkdir()
    # EW Δm per seed 5, 6, 7; "good" is 2 lower on every seed (paired: interval 0 width, better);
    # "noisy" differs by +3, -3, 0 (interval spans 0: no difference); "bad" is 1 higher on every seed.
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload(
        {"equal": [5, 6, 7], "good": [3, 4, 5], "noisy": [8, 3, 7], "bad": [6, 7, 8]})))
    body = tables.render("f:verdict")
    rows = {line.split(" | ")[1]: line for line in body.splitlines()[2:] if line.startswith("| ")}
    assert "**better**" in rows["good"] and "-2.00" in rows["good"]
    assert "no difference detected" in rows["noisy"]
    assert "**worse**" in rows["bad"]
    assert "(reference)" in rows["equal"]
    assert body.splitlines()[2].split(" | ")[1] == "good"  # ranked by mean Δm
    assert "(m = 3)" in body.splitlines()[0]  # the family: every row but EW


def test_verdicts_need_the_holm_corrected_test(tmp_path, monkeypatch):
    """Five methods each 'significant' alone (paired p ~ 0.02-0.03 < 0.05) but not after Holm's
    correction over the five comparisons: no verdict; one method far below EW survives it."""
    from experiments.stats import paired_t_pvalue
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "f").mkdir()
    ew = [5.0, 6.0, 7.0]
    methods = {"equal": ew}
    for i in range(5):
        methods[f"m{i}"] = [5.0 + 1.0 + 0.01 * i, 6.0 + 1.5, 7.0 + 2.0]   # differences ~1, 1.5, 2
    methods["clear"] = [5.0 - 10.0, 6.0 - 10.1, 7.0 - 9.9]
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload(methods)))
    p, n = paired_t_pvalue(dict(enumerate(methods["m0"])), dict(enumerate(ew)))
    assert n == 3 and 0.01 < p < 0.05
    rows = {r["label"]: r for r in verdicts.verdict_rows(tmp_path / "f", *tables.load(tmp_path / "f")[1:])}
    for i in range(5):
        assert rows[f"m{i}"]["p"] < 0.05 and rows[f"m{i}"]["p_holm"] > 0.05
        assert rows[f"m{i}"]["verdict"] == "no difference detected"
    assert rows["clear"]["verdict"] == "**better**"


def test_headline_names_only_what_survives_holm(tmp_path, monkeypatch):
    """The README's four-line summary agrees with the verdict rows: the method far below EW is
    named better, the one far above worse, the noisy one is counted as no difference; IMTL-H's
    paired difference (hand-computed: -1, -1, -1 -> -1.00 with zero width) is quoted."""
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload(
        {"equal": [5, 6, 7], "clear": [-5, -4.1, -2.9], "awful": [15, 16.1, 16.9], "noisy": [8, 3, 7],
         "imtl_h": [4, 5, 6]})))
    lines = tables.render("f:headline").splitlines()
    assert "4 methods against equal weighting" in lines[0] and "3 seeds" in lines[0]
    assert "better than EW: clear, imtl_h;" in lines[0] and "worse: awful;" in lines[0]  # imtl_h: -1 on every seed
    assert "no difference detected: " in lines[0] and lines[0].rstrip(".").endswith(
        str(sum(r["verdict"] == "no difference detected"
                for r in verdicts.verdict_rows(tmp_path / "f", *tables.load(tmp_path / "f")[1:]))))
    assert "imtl_h -1.00" in lines[1]
    assert "Lowest mean Δm% vs single-task: clear" in lines[2]
    assert len(lines) == 3   # no run records its last step here: no still-improving line


def test_provably_identical_methods_are_one_row(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload(
        {"equal": [5, 6, 7], "imtl_l": [4, 8, 6], "uncertainty": [4, 8, 6], "dwa": [4, 8, 6.5]})))
    labels = [r["label"] for r in verdicts.verdict_rows(tmp_path / "f", *tables.load(tmp_path / "f")[1:])]
    assert "imtl_l = uncertainty" in labels and "dwa" in labels and len(labels) == 3


def test_holm_against_a_hand_computed_case():
    from experiments.stats import holm
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06;
    # 0.04*1 = 0.04 -> max(0.06, 0.04) = 0.06 (monotone). NaN is not in the family.
    got = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert got[4] != got[4]
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_blocks_are_rewritten_and_check_detects_staleness(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload({"equal": [5, 6, 7]})))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table:f -->\ntyped by hand\n<!-- /table:f -->\n"
                   "<!-- table:absent -->\nkeep\n<!-- /table:absent -->\n")
    new, changed, missing = tables.update_file(doc)
    assert changed == ["f"] and "typed by hand" not in new and "keep" in new  # no results: left alone
    assert missing == ["absent"]  # ... and reported: --check fails on it
    doc.write_text(new)
    assert tables.update_file(doc)[1] == []  # idempotent: regenerating gives the same bytes


def test_committed_tables_match_results():
    r = subprocess.run([sys.executable, "-m", "experiments.tables", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_levels_table_pairs_theta_with_z_per_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload(
        {"equal": [5, 6, 7], "imtl_g": [10, 20, 30], "imtl_g_exact": [8, 18, 28],
         "nash_mtl": [1, 2, 3], "nash_mtl@params": [4, 2, 0]})))
    rows = {line.split(" | ")[0].strip("| "): line for line in tables.render("f:levels").splitlines()[2:]}
    assert "-2.00 ± 0.00 (n=3)" in rows["imtl_g"] and "better at θ" in rows["imtl_g"]  # paired: exactly -2
    assert "no difference" in rows["nash_mtl"]  # +3, 0, -3: the interval spans zero


_STEP_COST_OUTPUT = """\
# python -m benchmarks.step_cost -- queue paused, 2-core CPU
# load before: 1.25 2.00 2.10 1/100 1  2026-01-01T00:00:00Z  commit abc1234
Step time: median wall ms, then the ratio to EW of wall time (x) and of process CPU
time (c), each the median over rounds of the ratio within a round
model                T |                  EW |              IMTL-H |        IMTL-G exact |      IMTL-H generic
-----------------------------------------------------------------------------------------------------------
lenet (MultiMNIST)   2 |    60.0 1.00x 1.00c |    61.0 1.02x 1.01c |    90.0 1.50x 1.55c |    66.0 1.10x 1.03c
mlp bfloat16        40 |    25.0 1.00x 1.00c |    27.0 1.08x 1.10c |                   - |                   -

Peak memory of the compiled step: MB, then the ratio to EW
model                T |                  EW |              IMTL-H |        IMTL-G exact |      IMTL-H generic | traces
-------------------------------------------------------------------------------------------------------------------
lenet (MultiMNIST)   2 |    34.7 1.00x       |    38.2 1.10x       |    77.7 2.24x       |    34.7 1.00x       | 1,1,1,1
mlp bfloat16        40 |    24.9 1.00x       |    24.9 1.00x       |                   - |                   - | 1,1
  EW: mtl_step(method='equal').
# load after: 1.75 2.00 2.10 1/100 1
"""


def test_step_cost_block_reads_the_committed_output(tmp_path):
    """Each row's EW time, the time ratios and IMTL-H's memory ratio, in the file's order, with
    the load; '-' cells read as '–' (not run)."""
    path = tables.ROOT / "results" / "_fixture_step_cost.txt"   # relative_to(ROOT) must work
    try:
        path.write_text(_STEP_COST_OUTPUT)
        body = tables.step_cost_table(path)
    finally:
        path.unlink()
    lines = body.splitlines()
    assert lines[2] == "| lenet (MultiMNIST) | 2 | 60.0 | 1.02 | 1.50 | 1.10 | 1.10 |"
    assert lines[3] == "| mlp bfloat16 | 40 | 25.0 | 1.08 | – | – | 1.00 |"
    assert "1-minute load 1.25 before, 1.75 after)" in body
    assert "abc1234" not in body   # no commit hashes in the docs (the output file keeps its own)


def test_solve_alone_block_keeps_every_implementation():
    text = ("# cmd\n# load before: 1.4 x\n"
            "ours (jit)        median   1.500 ms  min   0.600 ms  spread 8.3e-08\n"
            "  indented route  median  10.000 ms  min   6.000 ms  spread 8.3e-08\n# load after: 1.6 x\n")
    path = tables.ROOT / "results" / "_fixture_solve_alone.txt"
    try:
        path.write_text(text)
        body = tables.solve_alone_table(path)
    finally:
        path.unlink()
    assert body.splitlines()[2:4] == ["| ours (jit) | 1.500 | 0.600 | 8.3e-08 |",
                                      "| indented route | 10.000 | 6.000 | 8.3e-08 |"]
    assert "1-minute load 1.4 before, 1.6 after" in body


@pytest.mark.parametrize("costs, log_axis", [({"equal": 1.0, "good": 1.1, "bad": 0.98}, False),
                                             ({"equal": 1.0, "good": 6.6, "bad": 0.98}, True)])
def test_delta_m_vs_cost_plot_places_each_method_at_its_cost(tmp_path, monkeypatch, costs, log_axis):
    """One point per method at (step time / EW, mean Δm%), a log axis only once the shown ratios
    span 3x; no method-cost record, no plot."""
    import matplotlib.pyplot as plt
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(_payload(
        {"equal": [5, 6, 7], "good": [3, 4, 5], "bad": [6, 7, 8]})))
    assert verdicts.plot_delta_m_vs_cost(folder, *tables.load(folder)[1:]) is None
    (folder / "method_cost.json").write_text(json.dumps(
        {"methods": {m: {"ratio_to_equal": r} for m, r in {**costs, "not_run": 50.0}.items()}}))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    out = verdicts.plot_delta_m_vs_cost(folder, *tables.load(folder)[1:])
    assert out == folder / "delta_m_vs_cost.png" and out.stat().st_size > 0
    ax = figures[0].axes[0]
    points = {t.get_text(): t.xy for t in ax.texts}
    want = {"equal": (1.0, 6.0), "good": (costs["good"], 4.0), "bad": (0.98, 7.0)}
    assert set(points) == set(want)
    for m, xy in want.items():   # Δm% from accuracies: exact up to rounding
        assert points[m] == pytest.approx(xy, rel=1e-12), m
    assert (ax.get_xscale() == "log") is log_axis
    figures[0].canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
    assert labels and all(label.endswith("x") and "10" not in label for label in labels), labels


def _tuned_folder(root, stale=None, unfinished=False):
    """A tuning study's folder (two tasks, accuracies; grid lr 1e-3 / 3e-3; tuning seed 100; test
    seeds 0-2), with validation values whose choices are worked out by hand:

    single-task a: 0.80 at 1e-3, 0.90 at 3e-3 -> 3e-3 (Δm vs the first point -12.5 %);
    single-task b: 0.70, 0.60 -> 1e-3; the validation reference is then a 0.90, b 0.70.
    equal: (0.90, 0.70) -> Δm 0; (0.81, 0.63) -> +10 -> 1e-3.
    imtl_h: (0.45, 0.35) -> +50; (0.90, 0.77) -> -5 -> 3e-3.
    Test seeds: single-task accuracy 0.5; equal's Δm 5, 6, 7; imtl_h's 3, 4, 5 (2 lower on every seed).
    """
    folder = root / "tun"
    p1, p2 = (1e-3, 0.0), (3e-3, 0.0)

    def put(split, point, method, seed, acc, single_task=None):
        d = folder / split / f"lr{point[0]:g}_wd0" / "runs" / method / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({
            "method": method, "single_task": single_task, "seed": seed, "status": "ok", "complete": True,
            "val": {"a_acc": acc[0], "b_acc": acc[1]}, "test": {"a_acc": acc[0], "b_acc": acc[1]},
            "config": {"lr": point[0], "weight_decay": 0.0, "steps": 10, "batch_size": 4},
            "wall_time_s": 1.0, "step_time_ms": 1.0, "skipped_steps": 0, "steps_done": 10}))

    put("tune", p1, "single_task_0", 100, (0.80, 0.0), 0)
    put("tune", p2, "single_task_0", 100, (0.90, 0.0), 0)
    put("tune", p1, "single_task_1", 100, (0.0, 0.70), 1)
    put("tune", p2, "single_task_1", 100, (0.0, 0.60), 1)
    put("tune", p1, "equal", 100, (0.90, 0.70))
    put("tune", p2, "equal", 100, (0.81, 0.63))
    put("tune", p1, "imtl_h", 100, (0.45, 0.35))
    put("tune", p2, "imtl_h", 100, (0.90, 0.77))
    if unfinished:
        put("tune", p1, "pcgrad", 100, (0.9, 0.7))
    for seed in range(3):
        put("test", p2, "single_task_0", seed, (0.5, 0.0), 0)
        put("test", p1, "single_task_1", seed, (0.0, 0.5), 1)
        put("test", stale or p1, "equal", seed, (0.5 * (1 - (5 + seed) / 100),) * 2)
        put("test", p2, "imtl_h", seed, (0.5 * (1 - (3 + seed) / 100),) * 2)
    meta = {"benchmark": "fake", "grid": [list(p1), list(p2)], "tune_seeds": [100], "test_seeds": [0, 1, 2],
            "multi_task_choice": {"imtl_h": "lr0.003_wd0"}}
    (folder / "tuning.json").write_text(json.dumps(meta))
    payload = _payload({})
    payload["runs"] = []
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


def test_tuned_tables_recompute_the_validation_choice_and_read_the_chosen_test_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    _tuned_folder(tmp_path, unfinished=True)
    grid = tables.render("tun:tuning")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in grid.splitlines() if line.startswith("| ")}
    assert rows["single-task a"] == ["+0.00", "**-12.50**", "lr 0.003", "3 |"]
    assert rows["single-task b"][:3] == ["**+0.00**", "+14.29", "lr 0.001"]     # 0.6 vs 0.7: 14.29 % worse
    assert rows["equal"] == ["**+0.00**", "+10.00", "lr 0.001", "3 |"]
    assert rows["imtl_h"] == ["+50.00", "**-5.00**", "lr 0.003", "3 |"]
    assert rows["pcgrad"] == ["…", "…", "(unfinished)", "0 |"]                  # one grid point of two
    verdict = {line.split(" | ")[1]: line for line in tables.render("tun:verdict").splitlines()[2:]
               if line.startswith("| ")}
    assert "**better**" in verdict["imtl_h"] and "-2.00" in verdict["imtl_h"]   # test seeds at the chosen points
    assert "lr chosen per run on validation (0.001, 0.003" in tables.render("tun:provenance")
    meta = json.loads((tmp_path / "tun" / "tuning.json").read_text())
    meta["reused_single_task_runs"] = {"from": "/somewhere/results/fake_converged",
                                       "runs": ["lr0.001_wd0/runs/single_task_1/seed0"]}
    (tmp_path / "tun" / "tuning.json").write_text(json.dumps(meta))
    assert "1 single-task test runs are those of `results/fake_converged`" in tables.render("tun:tuning")
    meta["added_best_untuned"] = {"from": "/somewhere/results/fake_converged", "n": 1, "chosen": ["imtl_h"],
                                  "validation_delta_m": {"imtl_h": -1.0}}
    (tmp_path / "tun" / "tuning.json").write_text(json.dumps(meta))
    assert "imtl_h: the 1 method(s) of `results/fake_converged` with the lowest mean validation Δm%" in \
        tables.render("tun:tuning")


def test_tuned_tables_refuse_stale_test_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    folder = _tuned_folder(tmp_path, stale=(3e-3, 0.0))      # equal's test runs at the point not chosen
    with pytest.raises(ValueError, match="equal's test runs use lr 0.003 but validation chooses lr 0.001"):
        tables.render("tun:tuning")
    d = folder / "test" / "lr0.001_wd0" / "runs" / "equal" / "seed0"
    d.mkdir(parents=True)
    (d / "result.json").write_text((folder / "test" / "lr0.003_wd0" / "runs" / "equal" / "seed0" /
                                    "result.json").read_text())
    with pytest.raises(ValueError, match="exists at two grid points"):
        tables.render("tun:verdict")


def test_tuned_verdicts_take_the_step_cost_of_the_converged_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    _tuned_folder(tmp_path)
    (tmp_path / "fake_converged").mkdir()
    (tmp_path / "fake_converged" / "method_cost.json").write_text(json.dumps(
        {"command": "python -m benchmarks.method_cost --out results/fake_converged", "rounds": 3,
         "load_1min_before": 0.5, "load_1min_after": 0.6,
         "methods": {"equal": {"ratio_to_equal": 1.0}, "imtl_h": {"ratio_to_equal": 1.25}}}))
    body = tables.render("tun:verdict")
    assert "step time / EW" in body.splitlines()[0]
    assert [line for line in body.splitlines() if line.startswith("| 1 | imtl_h")][0].endswith(" 1.25 |")
    assert "--out results/fake_converged" in body
    record = json.loads((tmp_path / "fake_converged" / "method_cost.json").read_text())
    record["methods"]["imtl_h"]["ratio_to_equal"] = 1.5
    record["updates"] = [{"command": "python -m benchmarks.method_cost --methods imtl_h --update",
                          "methods": ["imtl_h"], "load_1min_before": 0.7, "load_1min_after": 0.8}]
    (tmp_path / "fake_converged" / "method_cost.json").write_text(json.dumps(record))
    body = tables.render("tun:verdict")
    assert [line for line in body.splitlines() if line.startswith("| 1 | imtl_h")][0].endswith(" 1.50 |")
    assert "imtl_h: `python -m benchmarks.method_cost --methods imtl_h --update` (against the EW of that run; " \
           "load 0.70 before, 0.80 after)" in body


def test_sweep_plane_puts_every_method_at_its_mean_test_metrics(tmp_path, monkeypatch):
    """`python -m experiments.tables` draws the scalarization sweep's fronts with every method of
    the paired folder at its mean test accuracies (the fixture's: equal 0.475, good 0.485)."""
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "TARGET_FILES", ())
    monkeypatch.setattr(tables, "PLANES", {"sweep": "f"})
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text(json.dumps(_payload({"equal": [5, 5, 5], "good": [3, 3, 3]})))
    (tmp_path / "sweep").mkdir()
    rows = [{"family": fam, "ratio": r, "label": lab, "metric": [0.4 + 0.01 * i, 0.5 - 0.01 * i]}
            for fam in ("imtl_h", "linear") for i, (r, lab) in enumerate([(0.5, "1/2"), (1.0, "1"), (2.0, "2")])]
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(
        {"benchmark": "fake", "tasks": ["a", "b"], "metric_names": ["a_acc", "b_acc"], "rows": rows}))
    assert tables.main([]) == 0
    assert (tmp_path / "sweep" / "plane.png").stat().st_size > 0
    from experiments.studies.priorities import plot_plane
    points = {label: (x, y) for label, x, y in plot_plane(
        json.loads((tmp_path / "sweep" / "results.json").read_text()), tables.load(tmp_path / "f")[2],
        tmp_path / "again.png")}
    assert points["equal"] == pytest.approx((0.475, 0.475)) and points["good"] == pytest.approx((0.485, 0.485))
    assert points["single_task"] == pytest.approx((0.5, 0.5))
    assert points["linear r=2"] == pytest.approx((0.42, 0.48))


def test_tuning_gain_pairs_tuned_and_untuned_runs_against_the_tuned_reference(tmp_path, monkeypatch):
    """Tuned: single-task accuracy 0.5 (the reference), equal Δm 5, 6, 7, imtl_h 3, 4, 5 (the
    fixture of `_tuned_folder`). Untuned (lr 1e-3): single-task 0.45 -> Δm +10 against 0.5 on
    every seed; equal Δm 8, 9, 10 -> tuning gains -3 on every seed; imtl_h unchanged -> 0."""
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    _tuned_folder(tmp_path)
    untuned = _payload({"equal": [8, 9, 10], "imtl_h": [3, 4, 5]})
    for r in untuned["runs"]:
        r["config"] = {"lr": 1e-3}
        if r.get("single_task") is not None:
            r["test"] = {"a_acc": 0.45, "b_acc": 0.45}
    (tmp_path / "fake_converged").mkdir()
    (tmp_path / "fake_converged" / "results.json").write_text(json.dumps(untuned))
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in tables.render("tun:tuning_gain").splitlines()
            if line.startswith("| ") and not line.startswith("| run")}
    assert rows["single_task"][:4] == ["0.001", "+10.00 ± 0.00", "0.001, 0.003", "+0.00 ± 0.00"]
    assert rows["single_task"][4].startswith("-10.00 ± 0.00 (n=3)")
    assert rows["equal"][:4] == ["0.001", "+9.00 ± 2.48", "0.001", "+6.00 ± 2.48"]
    assert rows["equal"][4].startswith("-3.00 ± 0.00 (n=3)")
    assert rows["imtl_h"][4].startswith("+0.00 ± 0.00 (n=3)")
