"""The speed benchmarks that feed the docs run end to end at --tiny and write what is read."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_method_cost_tiny_writes_ratios(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.method_cost", "--tiny", "--benchmark", "qm9",
                        "--methods", "rlw", "imtl_h", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    payload = json.loads((tmp_path / "method_cost.json").read_text())
    assert set(payload["methods"]) == {"equal", "rlw", "imtl_h"}   # EW is always timed: the reference
    assert payload["methods"]["equal"]["ratio_to_equal"] == pytest.approx(1.0)
    assert all(m["median_ms"] > 0 for m in payload["methods"].values())
    assert "load" in r.stdout
    # --update times SI and RLW beside EW and replaces only their rows; EW's and IMTL-H's stay as measured
    first = payload["methods"]
    r = subprocess.run([sys.executable, "-m", "benchmarks.method_cost", "--tiny", "--benchmark", "qm9",
                        "--methods", "si", "rlw", "--update", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    updated = json.loads((tmp_path / "method_cost.json").read_text())
    assert set(updated["methods"]) == {"equal", "rlw", "imtl_h", "si"}
    assert updated["methods"]["equal"] == first["equal"] and updated["methods"]["imtl_h"] == first["imtl_h"]
    assert updated["methods"]["rlw"] != first["rlw"]
    (u,) = updated["updates"]
    assert u["methods"] == ["si", "rlw"] and "--update" in u["command"]
    assert updated["methods"]["si"]["ratio_to_equal"] == pytest.approx(
        updated["methods"]["si"]["median_ms"] / u["equal_median_ms"])
    bad = subprocess.run([sys.executable, "-m", "benchmarks.method_cost", "--tiny", "--benchmark", "multifashion",
                          "--methods", "si", "--update", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "measured on qm9" in bad.stderr


@pytest.mark.slow
def test_cost_vs_tasks_tiny_writes_table_plot_and_exponents(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.cost_vs_tasks", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    payload = json.loads((tmp_path / "cost_vs_tasks.json").read_text())
    assert set(payload["rows"]) == {"2", "4"}
    assert {"equal", "imtl_h", "imtl_g_exact", "mgda", "cagrad", "famo"} <= set(payload["exponents"])
    assert all(row["equal"]["peak_mb"] > 0 for row in payload["rows"].values())
    assert (tmp_path / "cost_vs_tasks.png").stat().st_size > 0
    assert "growth exponent" in (tmp_path / "cost_vs_tasks.md").read_text()
