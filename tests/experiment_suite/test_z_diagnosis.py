"""The z-vs-θ diagnosis: alpha-trajectory statistics against hand-computed values, and the
probe's cosine-matrix and gradient-norm readings on a tiny real run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.studies.ablation_z_vs_theta import alpha_trajectory_stats

ROOT = Path(__file__).resolve().parents[2]


def test_alpha_trajectory_stats_by_hand():
    # Steps: (0.5, 0.5) -> (0.95, 0.05) -> (-1.0, 2.0): shares 0.5, 0.95, 2/3 -> one of three
    # dominated; jumps |0.45| + |0.45| = 0.9 and |1.95| + |1.95| = 3.9 -> mean 2.4. NaN rows dropped.
    stats = alpha_trajectory_stats([[0.5, 0.5], [0.95, 0.05], [np.nan, 1.0], [-1.0, 2.0]])
    assert stats["dominated_fraction"] == pytest.approx(1 / 3)
    assert stats["mean_l1_jump"] == pytest.approx(2.4)
    assert alpha_trajectory_stats([]) == {"dominated_fraction": None, "mean_l1_jump": None}


@pytest.mark.slow
def test_probe_reports_cosine_eigenvalues_and_norm_spreads(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments", "ablation_z_vs_theta", "--benchmark", "qm9", "--tiny",
                        "--methods", "imtl_g", "imtl_g_averaged", "--out", str(tmp_path), "--quiet",
                        "--no-tensorboard"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    payload = json.loads((tmp_path / "results.json").read_text())
    for run in payload["runs"]:
        ps = run["probe_summary"]
        for level in ("z", "theta"):
            assert 0.0 <= ps[f"min_eig_cosines_{level}"]["mean"] <= 1.0 + 1e-5   # K is PSD with unit diagonal
            assert ps[f"grad_norm_spread_{level}"]["mean"] >= 1.0
    assert set(payload["alpha_trajectories"]) == {"imtl_g/seed0", "imtl_g_averaged/seed0"}


def test_diagnosis_table_averages_each_runs_probe_means_over_seeds():
    from experiments.studies.ablation_z_vs_theta import DIAGNOSIS_COLUMNS, diagnosis_table

    def run(method, seed, cos, eig_z):
        probes = {k: {"mean": 1.0} for k in ("alpha_l1_diff", "min_eig_cosines_theta", "grad_norm_spread_z",
                                               "grad_norm_spread_theta")}
        probes.update(cos_shared={"mean": cos}, min_eig_cosines_z={"mean": eig_z})
        return {"method": method, "seed": seed, "status": "ok", "single_task": None, "probe_summary": probes}

    payload = {"probe_every": 432, "runs": [run("imtl_g", 0, 0.9, 0.02), run("imtl_g", 1, 0.7, 0.04),
                                            run("imtl_g_exact", 0, 0.5, 0.3),
                                            {"method": "single_task_0", "seed": 0, "status": "ok", "single_task": 0}],
               "alpha_trajectories": {"imtl_g/seed0": {"dominated_fraction": 0.5, "mean_l1_jump": 0.2},
                                      "imtl_g/seed1": {"dominated_fraction": 0.25, "mean_l1_jump": None}}}
    lines = diagnosis_table(payload).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {line.split(" | ")[0][2:]: [c.strip(" |") for c in line.split(" | ")] for line in lines[2:]
            if line.startswith("| ")}
    col = {title: header.index(title) for title, _ in DIAGNOSIS_COLUMNS}
    assert set(rows) == {"imtl_g", "imtl_g_exact"}                       # single-task runs have no probes
    assert rows["imtl_g"][1] == "0, 1"
    assert rows["imtl_g"][col["cos(update z, update θ)"]] == "0.8 (0.7–0.9)"
    assert rows["imtl_g"][col["min eig K at z"]] == "0.03 (0.02–0.04)"
    assert rows["imtl_g"][col["α dominated (share of steps)"]] == "0.375 (0.25–0.5)"
    assert rows["imtl_g"][col["α L1 jump per step"]] == "0.2"              # the one seed that has it
    assert rows["imtl_g_exact"][col["cos(update z, update θ)"]] == "0.5"
    assert rows["imtl_g_exact"][col["α dominated (share of steps)"]] == "n/a"
    assert "every 432 steps" in lines[-1]
