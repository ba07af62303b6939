"""The tables of a tuning study's folder (``python -m experiments tuning``), read from its committed
runs by :mod:`experiments.tables`:

* :func:`choices_table`: every validation score of the tuning runs and the choice, recomputed with
  the study's own rules (:func:`~experiments.studies.tuning.choose_single_task`,
  :func:`~experiments.studies.tuning.choose_multi_task`);
* :func:`gain_table`: what tuning changed, each run group tuned against untuned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.studies.tuning import choose_multi_task, choose_single_task, point_label

__all__ = ["choices_table", "gain_table"]


def _tune_runs(folder: Path) -> dict:
    """{(lr, weight decay): [every finished tuning run at that grid point]} read from ``folder/tune``."""
    by_point: dict = {}
    for path in sorted(Path(folder).glob("tune/*/runs/*/seed*/result.json")):
        r = json.loads(path.read_text())
        if r.get("complete", True):
            by_point.setdefault((float(r["config"]["lr"]), float(r["config"]["weight_decay"])), []).append(r)
    return by_point


def choices_table(folder: Path, bench, test_runs: list) -> str:
    """The validation scores of every tuned run at every grid point and the choice, recomputed
    from the committed tuning runs (``folder/tune``) with :func:`choose_single_task` and
    :func:`choose_multi_task`; a method whose tuning is unfinished shows "…" and no choice.

    Raises ValueError when the test runs (``test_runs``: :func:`experiments.verdicts.collect_runs`)
    or ``tuning.json`` disagree with the recomputed choice: stale runs would otherwise be tabled.
    """
    meta = json.loads((Path(folder) / "tuning.json").read_text())
    points = [(float(lr), float(wd)) for lr, wd in meta["grid"]]
    seeds = set(meta["tune_seeds"])
    by_point = _tune_runs(Path(folder))
    test_point = {r["method"]: (float(r["config"]["lr"]), float(r["config"]["weight_decay"])) for r in test_runs}

    def runs_of(label):
        return {p: [r for r in by_point.get(p, []) if r["method"] == label] for p in points}

    def finished(runs):
        return all({r["seed"] for r in runs[p]} >= seeds for p in points)

    one_wd = len({p[1] for p in points}) == 1
    name = (lambda p: f"lr {p[0]:g}") if one_wd else (lambda p: f"lr {p[0]:g}, wd {p[1]:g}")
    lines = ["| run | " + " | ".join(name(p) for p in points) + " | chosen | test seeds |",
             "|---|" + "---|" * (len(points) + 2)]
    n_test = {}
    for r in test_runs:
        n_test[r["method"]] = n_test.get(r["method"], 0) + 1

    def row(label, shown, scores, choice):
        if choice is not None and label in test_point and test_point[label] != choice:
            raise ValueError(f"{folder}: {label}'s test runs use {name(test_point[label])} but validation chooses "
                             f"{name(choice)}; delete the stale test runs and rerun the tuning call")
        cells = []
        for p in points:
            v = scores.get(point_label(p))
            cell = "…" if v is None else ("diverged" if not math.isfinite(v) else f"{v:+.2f}")
            cells.append(f"**{cell}**" if p == choice else cell)
        lines.append(f"| {shown} | " + " | ".join(cells) + f" | {name(choice) if choice else '(unfinished)'} | "
                     f"{n_test.get(label, 0)} |")

    single = {t: runs_of(f"single_task_{t}") for t in range(bench.num_tasks)}
    reference = None
    if all(finished(single[t]) for t in single):
        st_choice, reference, st_scores = choose_single_task(
            bench, {p: [r for t in single for r in single[t][p]] for p in points})
        for t, p in st_choice.items():
            row(f"single_task_{t}", f"single-task {bench.task_names[t]}", st_scores[bench.task_names[t]], p)
    else:
        lines.append("| single-task | " + " | ".join("…" for _ in points) + " | (unfinished) | – |")
    multi = sorted({r["method"] for rs in by_point.values() for r in rs if r.get("single_task") is None})
    for label in multi:
        runs = runs_of(label)
        if reference is None or not finished(runs):
            row(label, label, {}, None)
            continue
        choice, scores = choose_multi_task(bench, {p: runs[p] for p in points}, reference)
        recorded = meta.get("multi_task_choice", {}).get(label)
        if recorded is not None and recorded != point_label(choice):
            raise ValueError(f"{folder}/tuning.json chose {recorded} for {label}, the tuning runs give "
                             f"{point_label(choice)}: the file is stale; rerun the tuning call")
        row(label, label, scores, choice)
    lines += ["", f"Validation scores on tuning seed(s) {', '.join(map(str, sorted(seeds)))} (lower is better; the "
                  "chosen point in bold): single-task rows, Δm% of the task's metrics against the first grid point; "
                  "multi-task rows, Δm% against the chosen single-task runs. The test seeds enter no choice."]
    added = meta.get("added_best_untuned") or {}
    if added.get("chosen"):
        source = f"results/{Path(added['from']).name}"
        lines += ["", f"{', '.join(added['chosen'])}: the {added['n']} method(s) of `{source}` with the lowest mean "
                      "validation Δm% (beside the methods tuned first; identical methods count once), tuned like them."]
    reused = meta.get("reused_single_task_runs") or {}
    if reused.get("runs"):
        source = Path(reused["from"])
        lines += ["", f"{len(reused['runs'])} single-task test runs are those of `results/{source.name}` (the same "
                      "configuration and seeds, copied rather than retrained; a single-task run's selection needs no "
                      "reference)."]
    return "\n".join(lines)


def gain_table(bench, runs: list, summary: dict, untuned_runs: list, untuned_name: str) -> str:
    """What tuning changed: each run group of a tuning folder (``runs``, ``summary``: its test runs
    and their :func:`experiments.report.summarize`) beside the same group at the default rate
    (``untuned_runs``, the same seeds and budget), both scored against one reference, the tuned
    single-task networks: Δm% untuned, Δm% tuned and the paired per-seed tuned − untuned
    difference (negative: tuning helped). The single-task row compares the untuned single-task
    networks with the tuned ones."""
    from experiments import metrics as M
    from experiments.report import _single_task_composites
    from experiments.stats import format_ci, mean_ci, paired_diff_ci
    reference = summary["baseline"]
    if reference is None:
        return "(no tuned single-task runs yet: no reference)"
    hib = bench.higher_is_better

    def groups(rs):
        out = {"single_task": list(_single_task_composites(rs, bench).values())}
        for r in rs:
            if r.get("single_task") is None and r.get("status") == "ok":
                out.setdefault(r["method"], []).append(r)
        return out

    def by_seed(rs):
        return {r["seed"]: M.delta_m(r["test"], reference, hib) for r in rs}

    def rates(rs, m):
        lrs = {(r.get("config") or {}).get("lr") for r in rs
               if r["method"] == m or (m == "single_task" and r.get("single_task") is not None)}
        return ", ".join(f"{v:g}" for v in sorted(lrs - {None}))

    def ci(d):
        mean, half, k = mean_ci(list(d.values()))
        return format_ci(mean, half if k > 1 else math.nan, 2, True)

    tuned, untuned = groups(runs), groups(untuned_runs)
    lines = ["| run | lr untuned | Δm% untuned | lr tuned | Δm% tuned | tuned − untuned (paired, 95 % CI) |",
             "|---|---|---|---|---|---|"]
    for m in summary["order"]:
        if m not in untuned or not tuned.get(m):
            continue
        a, b = by_seed(untuned[m]), by_seed(tuned[m])
        mean, half, n = paired_diff_ci(b, a)
        lines.append(f"| {m} | {rates(untuned_runs, m)} | {ci(a)} | {rates(runs, m)} | {ci(b)} | "
                     f"{format_ci(mean, half if n > 1 else math.nan, 2, True)} (n={n}) |")
    lines += ["", "Both columns against the tuned single-task networks (test metrics, mean over their seeds); the "
                  f"untuned runs are `{untuned_name}`'s. Paired by seed (the same initialization and data order)."]
    return "\n".join(lines)
