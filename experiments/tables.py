"""Tables of the README and docs, generated from the committed results folder, never typed.

``python -m experiments.tables`` rebuilds every table block from ``results/<name>/results.json``
(each run's result as written by the training loop) and rewrites the blocks between
``<!-- table:<name> -->`` and ``<!-- /table:<name> -->`` in README.md and docs/*.md.
``python -m experiments.tables --check`` rewrites nothing and exits 1 when a committed block
differs from what the results give (a test runs it, so a table cannot go stale). It is the
one table renderer: the README's main-job table is a ``multimnist`` block like any other.

Blocks:

* ``<benchmark folder>``: the full table of a results folder (mean ± 95 % CI over seeds, n,
  Δm/Δp against single-task, paired Δm − EW), as :func:`experiments.report.markdown_table`.
* ``<folder>:verdict``: per method, Δm − EW with its interval and what it says at 95 %
  ("better", "worse", "no difference"), ranked by mean Δm.
* ``<folder>:headline``: the verdicts in four lines (the README's summary).
* ``<folder>:levels``: each method run at both levels (z and θ), the paired θ − z difference.
* ``<folder>:provenance``: the command, seeds, configuration and machine of the runs.
* ``<folder>:tuning``: a tuning study's grid (``python -m experiments tuning``): every tuned
  run's validation score at every grid point and the choice. In such a folder every other
  block reads the test runs of the chosen settings (``<folder>/test/<grid point>/runs``).
* ``<folder>:tuning_gain``: in a tuning folder, each run group tuned against the same group at
  the default rate in ``<benchmark>_converged``, both against the tuned single-task networks.
* ``<folder>:diagnosis``: the z-vs-θ probes of an ``ablation_z_vs_theta`` folder per method.
* ``<folder>:alpha``: how α behaved along the runs (``alpha_stats.json``, written by
  ``python -m experiments.alpha_stats``).
* Plots, written beside the tables (not checked): ``<folder>/delta_m_vs_cost.png`` for every
  tabled folder with a step-cost record, and the scalarization sweep on the two-task plane with
  every method of ``PLANES[sweep]`` (``results/scalarization_sweep/plane.png``).
* ``perf:step_cost``: the step-cost table of the committed ``python -m benchmarks.step_cost``
  output (``results/benchmarks/step_cost.txt``), with its load; ``perf:solve_alone``: the weight
  solve alone (``results/benchmarks/solve_alone.txt``); ``perf:cost_vs_tasks``: the
  table of ``results/benchmarks/cost_vs_tasks/cost_vs_tasks.md``.

>>> split_blocks("a\\n<!-- table:x -->\\nold\\n<!-- /table:x -->\\nb")[1]
['x']
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from experiments.verdicts import collect_runs

__all__ = ["RecordedBenchmark", "collect_runs", "load", "full_table", "verdict_table", "levels_table", "provenance",
           "tuning_table", "tuning_gain_table", "diagnosis_table",
           "render", "split_blocks",
           "update_file", "main"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
TARGET_FILES = ("README.md", "docs/does_imtl_help.md", "docs/results.md", "docs/budgets.md", "docs/performance.md")
PERF = {"step_cost": RESULTS / "benchmarks" / "step_cost.txt",
        "solve_alone": RESULTS / "benchmarks" / "solve_alone.txt",
        "cost_vs_tasks": RESULTS / "benchmarks" / "cost_vs_tasks" / "cost_vs_tasks.md"}
#: sweep folder (``python -m experiments priorities``) -> the folder whose methods join its plot
#: on the two-task plane, ``results/<sweep>/plane.png`` (the same benchmark and budget).
PLANES = {"scalarization_sweep": "multifashion_converged"}
_BLOCK = re.compile(r"<!-- table:(?P<name>[\w:@.\-/]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


def _relative_paths(command: str) -> str:
    """A recorded command with its absolute ``.../results/...`` paths made repository-relative, so
    a table does not depend on where the checkout that ran it lived.

    >>> _relative_paths("python -m experiments qm9 --out /work/main/results/qm9_converged")
    'python -m experiments qm9 --out results/qm9_converged'
    """
    return re.sub(r"(?<!\S)/\S*?/(results/)", r"\1", command)


class RecordedBenchmark:
    """The parts of a :class:`experiments.suites.Benchmark` a report needs, read from a results.json."""

    def __init__(self, payload: dict):
        from experiments.metrics import MetricSpec
        self.name = payload["benchmark"]
        self.task_names = tuple(payload["tasks"])
        self.metrics = tuple(MetricSpec(m["name"], m["task"], bool(m["higher_is_better"])) for m in payload["metrics"])
        self.test = None
        self.notes = payload.get("notes", [])

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def metric_specs(self) -> tuple:
        return self.metrics

    @property
    def higher_is_better(self) -> dict:
        return {s.name: s.higher_is_better for s in self.metrics}

    def task_of_metric_index(self) -> dict:
        return {s.name: self.task_names.index(s.task) for s in self.metrics}

    def metric_names_of_task(self, t: int) -> list:
        return [s.name for s in self.metrics if s.task == self.task_names[t]]


def load(folder: Path) -> tuple[RecordedBenchmark, dict, dict]:
    """(benchmark view, payload, summary) of a results folder.

    The metrics and tasks come from ``folder/results.json``; the runs are every finished run of
    the folder (:func:`collect_runs`), so a table built up over several calls (one method at a
    time, resumed) holds all of them.
    """
    from experiments import report
    payload = json.loads((folder / "results.json").read_text())
    if (folder / "runs").is_dir() or (folder / "tuning.json").exists():
        payload["runs"] = collect_runs(folder)
    bench = RecordedBenchmark(payload)
    return bench, payload, report.summarize(bench, payload["runs"])


def full_table(folder: Path) -> str:
    from experiments import report
    bench, _, summary = load(folder)
    return report.markdown_table(bench, summary)


def _verdict(mean: Optional[float], half: Optional[float], n: int) -> str:
    if mean is None or n < 2 or half is None or not math.isfinite(half):
        return "no interval (n < 2)"
    if mean + half < 0:
        return "better than EW"
    if mean - half > 0:
        return "worse than EW"
    return "no difference"


def levels_table(folder: Path) -> str:
    """The z-vs-θ question: each method run at both levels, paired per seed.

    Rows pair a parameter-level run (``<m>@params``; ``imtl_g_exact`` for ``imtl_g``) with the same
    method at the representation level: Δm% of each and the paired difference θ − z (negative:
    the parameter level is better).
    """
    from experiments.stats import format_ci, paired_diff_ci
    _, _, summary = load(folder)
    methods = summary["methods"]
    pairs = [(m, m[: -len("@params")]) for m in methods if m.endswith("@params")]
    pairs += [("imtl_g_exact", "imtl_g")] if "imtl_g_exact" in methods else []
    lines = ["| method | Δm% at z (representation) | Δm% at θ (parameters) | θ − z (paired) | at 95 % |",
             "|---|---|---|---|---|"]
    for theta, z in pairs:
        if z not in methods or "delta_m" not in methods[z] or "delta_m" not in methods[theta]:
            continue
        dz, dt = methods[z]["delta_m"], methods[theta]["delta_m"]
        m, h, n = paired_diff_ci({int(k): v for k, v in dt["by_seed"].items()},
                                 {int(k): v for k, v in dz["by_seed"].items()})
        verdict = _verdict(m if n else None, h if n > 1 else None, n).replace("than EW", "at θ")
        lines.append(f"| {z} | {format_ci(dz['mean'], dz['ci95'] if dz['ci95'] is not None else math.nan, 2, True)}"
                     f" | {format_ci(dt['mean'], dt['ci95'] if dt['ci95'] is not None else math.nan, 2, True)}"
                     f" | {format_ci(m, h, 2, True)} (n={n}) | {verdict} |")
    return "\n".join(lines)


def provenance(folder: Path) -> str:
    """What produced the folder: command(s), seeds, configuration, machine, total time."""
    _, payload, summary = load(folder)
    runs = payload["runs"]
    seeds = sorted({r["seed"] for r in runs})
    cfg = runs[0].get("config", {}) if runs else {}
    lrs = sorted({r.get("config", {}).get("lr") for r in runs if r.get("config")})
    lr = f"Adam lr {cfg.get('lr')}" if len(lrs) <= 1 else \
        f"Adam lr chosen per run on validation ({', '.join(f'{v:g}' for v in lrs)}; the tuning table)"
    machines = sorted({f"{r.get('machine', {}).get('platform', '?')}, {r.get('machine', {}).get('cpus', '?')} CPUs, "
                       f"jax {r.get('machine', {}).get('jax', '?')} ({r.get('machine', {}).get('backend', '?')})"
                       for r in runs})
    loads = [r.get("machine", {}).get("load_1min") for r in runs if r.get("machine", {}).get("load_1min") is not None]
    cpu_s = sum(r.get("wall_time_s") or 0.0 for r in runs)
    methods = [m for m in summary["order"]]
    out = [f"- command (last call; `results/` holds the script that made every call): "
           f"`{_relative_paths(payload.get('command', ''))}`",
           f"- {len(runs)} runs: {len(methods)} methods (single-task counted once) x seeds "
           f"{', '.join(map(str, seeds))}",
           f"- training: {cfg.get('steps')} steps, batch {cfg.get('batch_size')}, {lr}, "
           f"{cfg.get('schedule')} schedule, weight decay {cfg.get('weight_decay')}, evaluated every "
           f"{cfg.get('eval_every')} steps; test metrics at the best validation step",
           f"- machine: {'; '.join(machines)}; 1-minute load during the runs {min(loads):.0f}–{max(loads):.0f}"
           if loads else f"- machine: {'; '.join(machines)}",
           f"- sum of the runs' recorded wall times: {cpu_s / 60:.1f} min (runs vmapped together share theirs)"]
    out += [f"- {n}" for n in payload.get("notes", [])]
    return "\n".join(out)


def headline(folder: Path) -> str:
    """The verdicts in four lines (:func:`experiments.verdicts.verdict_headline`)."""
    from experiments import verdicts
    return verdicts.verdict_headline(folder, *load(folder)[1:])


def verdict_table(folder: Path) -> str:
    """The ranked verdict table of a results folder (:func:`experiments.verdicts.verdict_table`)."""
    from experiments import verdicts
    return verdicts.verdict_table(folder, *load(folder)[1:])


def curves_table(folder: Path) -> str:
    """When each run's validation curve flattened (:mod:`experiments.curves`, from the committed
    ``folder/curves.json``)."""
    from experiments import curves
    stored = folder / "curves.json"
    if not stored.exists():
        return "(no curves.json: run `python -m experiments.curves` on the folder)"
    text = curves.summarize(folder, json.loads(stored.read_text())["runs"], curves.DEFAULT_TOL)
    return "\n".join(text.splitlines()[2:])   # without the page title


_STEP_ROW = re.compile(r"^(?P<model>\S.*?)\s+(?P<t>\d+) \|(?P<cells>.*)$")
_STEP_NAMES = ("EW", "IMTL-H", "IMTL-G exact", "IMTL-H generic", "plain-jax EW")


def _step_cost_rows(text: str, section: str) -> dict:
    """{(model, T): [cell text per variant]} of one table of a step_cost output."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(section))
    rows = {}
    for line in lines[start + 1:]:
        if rows and not line.strip():   # the blank line after the table
            break
        m = _STEP_ROW.match(line)
        if m and not line.startswith("model"):
            rows[(m.group("model"), int(m.group("t")))] = [c.strip() for c in m.group("cells").split("|")]
    return rows


def step_cost_table(path: Path) -> str:
    """IMTL-H, exact IMTL-G and generic heads against EW per model, from a step_cost output."""
    text = path.read_text()
    times = _step_cost_rows(text, "Step time")
    memory = _step_cost_rows(text, "Peak memory")
    loads = re.findall(r"^# load (before|after): ([\d.]+)", text, re.M)

    def ratio(cell: str) -> str:
        return cell.split()[1].rstrip("x") if cell != "-" else "–"

    out = ["| model | T | EW ms | IMTL-H / EW | exact IMTL-G / EW | generic heads / EW | memory IMTL-H / EW |",
           "|---|---|---|---|---|---|---|"]
    for (model, t), cells in times.items():
        mem = memory.get((model, t), ["-"] * len(cells))
        out.append(f"| {model} | {t} | {cells[0].split()[0]} | {ratio(cells[1])} | {ratio(cells[2])} | "
                   f"{ratio(cells[3]) if len(cells) > 3 else '–'} | {ratio(mem[1])} |")
    load = ", ".join(f"{v} {k}" for k, v in loads)
    out += ["", f"`python -m benchmarks.step_cost` (output: `{path.relative_to(ROOT)}`; experiment queue "
                f"paused, 1-minute load {load}): median "
                "wall time, ratios = median over interleaved rounds of the ratio within a round."]
    return "\n".join(out)


def solve_alone_table(path: Path) -> str:
    """The weight solve alone (median, min, projection spread per implementation)."""
    text = path.read_text()
    rows = re.findall(r"^\s*(\S.*?)\s+median\s+([\d.]+) ms\s+min\s+([\d.]+) ms\s+spread (\S+)$", text, re.M)
    loads = re.findall(r"^# load (before|after): ([\d.]+)", text, re.M)
    out = ["| implementation | median ms | min ms | projection spread of the answer |", "|---|---|---|---|"]
    out += [f"| {name.strip()} | {med} | {mn} | {spread} |" for name, med, mn, spread in rows]
    load = ", ".join(f"{v} {k}" for k, v in loads)
    out += ["", f"Output: `{path.relative_to(ROOT)}` (experiment queue paused, 1-minute load {load})."]
    return "\n".join(out)


def perf_table(name: str) -> Optional[str]:
    """The body of a ``perf:<name>`` block, or None when its committed output is absent."""
    path = PERF.get(name)
    if path is None:
        raise ValueError(f"unknown perf block {name!r}; expected one of {sorted(PERF)}")
    if not path.exists():
        return None
    if name == "step_cost":
        return step_cost_table(path)
    if name == "solve_alone":
        return solve_alone_table(path)
    return path.read_text().strip()


def _producers() -> dict[str, Callable[[Path], str]]:
    return {"": full_table, "verdict": verdict_table, "headline": headline, "curves": curves_table,
            "levels": levels_table, "provenance": provenance, "alpha": _alpha_table, "tuning": tuning_table,
            "tuning_gain": tuning_gain_table, "diagnosis": diagnosis_table}


def tuning_table(folder: Path) -> str:
    """A tuning study's grid: every run's validation score at every point and the choice
    (:func:`experiments.studies.tuning_tables.choices_table`, recomputed from the committed runs)."""
    from experiments.studies.tuning_tables import choices_table
    bench, payload, _ = load(folder)
    return choices_table(folder, bench, payload["runs"])


def tuning_gain_table(folder: Path) -> str:
    """What tuning changed (:func:`experiments.studies.tuning_tables.gain_table`): the tuning folder's run
    groups beside the same groups at the default rate in ``<benchmark>_converged``."""
    from experiments.studies.tuning_tables import gain_table
    from experiments.verdicts import untuned_folder
    bench, payload, summary = load(folder)
    untuned = untuned_folder(folder)
    if not (untuned / "results.json").exists():
        raise FileNotFoundError(f"{untuned}/results.json is missing: the tuning gain compares with it")
    return gain_table(bench, payload["runs"], summary, load(untuned)[1]["runs"], f"results/{untuned.name}")


def diagnosis_table(folder: Path) -> str:
    """The z-vs-θ probes of ``python -m experiments ablation_z_vs_theta`` (its ``results.json``):
    :func:`experiments.studies.ablation_z_vs_theta.diagnosis_table`."""
    from experiments.studies.ablation_z_vs_theta import diagnosis_table as table
    return table(json.loads((folder / "results.json").read_text()))


def _alpha_table(folder: Path) -> str:
    from experiments.alpha_stats import alpha_table
    if not (folder / "alpha_stats.json").exists():
        raise FileNotFoundError(f"{folder / 'alpha_stats.json'} is missing: run python -m experiments.alpha_stats "
                                f"{folder}")
    return alpha_table(folder)


def render(name: str) -> Optional[str]:
    """The body of block ``name`` (``folder`` or ``folder:kind``), or None when its results are absent."""
    folder, _, kind = name.partition(":")
    if folder == "perf":
        body = perf_table(kind)
        return None if body is None else body.rstrip("\n") + "\n"
    path = RESULTS / folder
    if not (path / "results.json").exists():
        return None
    fn = _producers().get(kind)
    if fn is None:
        raise ValueError(f"unknown table kind {kind!r} in block {name!r}; expected one of {sorted(_producers())}")
    return fn(path).rstrip("\n") + "\n"


def split_blocks(text: str) -> tuple[str, list]:
    """(text, names of the table blocks it holds, in order)."""
    return text, [m.group("name") for m in _BLOCK.finditer(text)]


def update_file(path: Path) -> tuple[str, list, list]:
    """(new text, names of blocks whose body changed, names of blocks whose results folder is
    missing); a block without results is left as it is (and ``--check`` fails on it)."""
    text = path.read_text()
    changed: list = []
    missing: list = []

    def sub(m):
        body = render(m.group("name"))
        if body is None:
            missing.append(m.group("name"))
            return m.group(0)
        if body == m.group("body"):
            return m.group(0)
        changed.append(m.group("name"))
        return f"<!-- table:{m.group('name')} -->\n{body}<!-- /table:{m.group('name')} -->"

    return _BLOCK.sub(sub, text), changed, missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a committed table is stale")
    a = p.parse_args(argv)
    stale = []
    for rel in TARGET_FILES:
        path = ROOT / rel
        if not path.exists():
            continue
        new, changed, missing = update_file(path)
        stale += [f"{rel}: {c} (no results folder results/{c.partition(':')[0]})" for c in missing]
        if changed:
            stale += [f"{rel}: {c}" for c in changed]
            if not a.check:
                path.write_text(new)
    if not a.check:
        for sweep, methods in PLANES.items():
            if (RESULTS / sweep / "results.json").exists() and (RESULTS / methods / "results.json").exists():
                from experiments.studies.priorities import plot_plane
                plot_plane(json.loads((RESULTS / sweep / "results.json").read_text()),
                           load(RESULTS / methods)[2], RESULTS / sweep / "plane.png")
        for folder in sorted({n.partition(":")[0] for rel in TARGET_FILES if (ROOT / rel).exists()
                              for n in split_blocks((ROOT / rel).read_text())[1]}):
            if (RESULTS / folder / "results.json").exists():
                from experiments import verdicts
                verdicts.plot_delta_m_vs_cost(RESULTS / folder, *load(RESULTS / folder)[1:])
    verb = "stale" if a.check else "updated"
    print("\n".join(f"{verb}: {s}" for s in stale) or "all tables match results/")
    return 1 if (a.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
