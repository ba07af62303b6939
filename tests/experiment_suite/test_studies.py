"""The command line as a user meets it: every benchmark and study runs with ``--tiny`` (CI's
slow step), ``--help`` shows real defaults, the layout has no import cycle and no oversized file."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from experiments import studies, suites
from experiments.__main__ import main
from experiments.errors import EXIT_DATA

ROOT = Path(__file__).resolve().parents[2] / "experiments"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(suites.REGISTRY))
def test_every_benchmark_runs_tiny(name, tmp_path, capsys):
    out = tmp_path / name
    try:
        rc = main([name, "--tiny", "--quiet", "--out", str(out), "--method", "imtl_h", "single_task"])
    except Exception as e:  # pragma: no cover
        raise AssertionError(name) from e
    err = capsys.readouterr().err
    if rc == EXIT_DATA and ("apt-get install" in err or "pip install" in err):
        pytest.skip(err.strip())
    assert rc == 0, err
    data = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in data["metrics"]]
    assert data["runs"] and all(r["status"] == "ok" for r in data["runs"])
    for r in data["runs"]:
        assert set(r["test"]) == set(names) and set(r["test_last"]) == set(names)
        assert r["steps_done"] == r["steps_planned"] and r["record_version"] == 2
        assert (out / r["run_dir"] / "history.json").is_file()
        assert any((out / r["run_dir"] / "tb").iterdir())  # TensorBoard events
    single = data["summary"]["single_task"]
    if data["baseline_label"] is None:  # Δm undefined: a baseline metric is 0 (tiny CelebA: 12 images)
        assert any(single["test"][n]["mean"] == 0 for n in names)
    else:
        assert data["baseline_label"] == "single-task runs"
    # one summary line per finished run on stderr
    assert sum("selected step" in line for line in err.splitlines()) == len(data["runs"])


@pytest.mark.slow
@pytest.mark.parametrize("study", [s for s in studies.STUDIES if s != "compare"])
def test_every_study_runs_tiny(study, tmp_path):
    out = tmp_path / study
    assert main([study, "--tiny", "--quiet", "--benchmark", "qm9", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data and (out / "results.md").is_file()


def test_help_shows_real_defaults(capsys):
    from experiments.suites.multimnist import DEFAULTS, TINY
    assert main(["multimnist", "--help"]) == 0
    text = capsys.readouterr().out
    d = DEFAULTS["multimnist"]
    assert f"(default: {d['steps']}; with --tiny: {TINY['steps']})" in text
    assert "(default: imtl_h equal single_task" in text and "(default: None)" not in text
    assert f"(default: {d['eval_every']}" in text and "(default: 0.001)" in text


@pytest.mark.parametrize("argv, absent, present", [
    (["overfitting"], [], ["(default: 3000; with --tiny: 12)"]),
    (["priorities"], ["--method", "--data-dir", "--norm"], ["--ratios"]),
    (["priorities", "--benchmark", "qm9"], ["--method"], ["train on these targets only (default: mu homo)"]),
    (["tuning"], ["--lr LR", "--weight-decay"], ["--lr-grid"]),
    (["grouping"], ["--no-plots", "--norm"], ["--ks"]),
    (["affinity_levels"], ["--method", "--no-plots"], ["--probe-every"]),
])
def test_help_offers_only_flags_the_study_reads(argv, absent, present, capsys):
    """A study's --help lists no flag it ignores, and a default that is not used is not shown:
    a study that sets --steps on a benchmark whose default is --epochs shows no --epochs default."""
    assert main([*argv, "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    for flag in absent:
        assert flag not in flat, flag
    for flag in present:
        assert flag in flat, flag
    steps = re.search(r"--steps STEPS training steps per run \(default: ([^;)]*)", flat).group(1)
    epochs = re.search(r"--epochs EPOCHS training epochs per run, instead of --steps \(default: ([^;)]*)",
                       flat).group(1)
    assert "none" in (steps, epochs), (steps, epochs)


def test_dispatcher_lists_benchmarks_and_studies(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark or study 'nope'" in err and "priorities" in err and "qm9" in err
    assert main([]) == 2


def _imports(path: Path) -> set:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("experiments"):
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names if a.name.startswith("experiments"))
    return mods


def test_no_import_cycle_and_no_oversized_file():
    """Every import among experiments' modules (module-level or inside functions) points one way."""
    files = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        files[name] = p
    graph = {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}
    # a package's __init__ importing its own submodules lazily (registries) is a downward edge
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and files[m].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    big = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400 and p.parent.name != "data"}
    assert not big, big


