"""The α-trajectory summary of finished runs (``python -m experiments.alpha_stats``) against
hand-computed values, and its table block."""

import json

import pytest

from experiments import alpha_stats, tables


def _write_run(folder, method, seed, weights):
    d = folder / "runs" / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "history.json").write_text(json.dumps({"weight": weights}))


def test_run_stats_by_hand():
    # steps: equal; one task 95 %; a negative weight (|α| = 1.5, 0.5: top share 0.75); a skipped step
    s = alpha_stats.run_stats([[0.5, 0.5], [0.95, 0.05], [1.5, -0.5], [None, None]])
    assert s["dominated_fraction"] == pytest.approx(1 / 3)
    assert s["mean_l1_jump"] == pytest.approx((0.9 + 1.1) / 2)   # 0.45 + 0.45, then 0.55 + 0.55
    assert s["median_top_share"] == pytest.approx(0.75)
    assert s["negative_fraction"] == pytest.approx(1 / 3)


def test_summary_file_and_table(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "bench"
    _write_run(folder, "imtl_g", 0, [[0.5, 0.5], [1.0, 0.0]])       # one dominated step of 2
    _write_run(folder, "imtl_g", 1, [[0.5, 0.5], [0.5, 0.5]])       # none
    _write_run(folder, "single_task_0", 0, [[1.0], [1.0]])          # skipped by default
    alpha_stats.main([str(folder)])
    record = json.loads((folder / "alpha_stats.json").read_text())
    assert list(record["methods"]) == ["imtl_g"]
    assert record["methods"]["imtl_g"]["seeds"]["0"]["dominated_fraction"] == 0.5
    assert record["methods"]["imtl_g"]["steps"] == [2]
    (folder / "results.json").write_text("{}")
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    row = [line for line in tables.render("bench:alpha").splitlines() if line.startswith("| imtl_g")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean of 0.5 and 0 with its t-interval (n = 2: t_0.975,1 = 12.706, s = 0.3536, half 3.177)
    assert cells[:3] == ["imtl_g", "2", "2"] and cells[3] == "0.250 ± 3.177"
    assert len(cells) == 7   # no stray '|' inside a cell


def test_missing_history_names_the_folder(tmp_path):
    (tmp_path / "runs" / "imtl_g" / "seed0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="imtl_g"):
        alpha_stats.summarize(tmp_path, ["imtl_g"])
