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
