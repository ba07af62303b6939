"""A fair tuning budget (Kurin et al. 2022; Xin et al. 2022): every method gets the same grid.

For each method (equal weighting, IMTL-H and single-task by default) and every point of the
same grid of learning rates x weight decays, the method trains on the *tuning seeds*; the
point with the best **validation** score is chosen:

* single-task: per task, the best validation metric of that task (each task picks its own point);
* multi-task methods: the best validation Δm% against the chosen single-task runs' validation
  metrics (the reference every multi-task selection uses).

The chosen settings then train on the *test seeds* (disjoint from the tuning seeds) and the test
metrics, at the step with the best validation score, form the table. The test split is never
used for a choice. ``--add-best-untuned FOLDER N`` adds the N methods of an untuned table with
the lowest mean validation Δm% (:func:`experiments.verdicts.best_on_validation`).
``<out>/tuning.json`` stores the grid, every validation score, the choices and the final table's
configuration next to ``<out>/tuning.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

DESCRIPTION = ("Tune learning rate and weight decay on validation with the same grid and seed budget for "
               "every method, then train the chosen settings on the test seeds.")
USAGE = """examples:
  python -m experiments tuning --benchmark qm9 --lr-grid 3e-4 1e-3 3e-3 --wd-grid 0 1e-4 \\
      --tune-seeds 100 --seeds 0 1 2 --epochs 10
  python -m experiments tuning --tiny
Writes <out>/tune/<grid point>/ and <out>/test/<grid point>/ (full reports) and <out>/tuning.{md,json}.
"""
DEFAULT_BENCHMARK = "multimnist"
DEFAULTS = dict(methods=["equal", "imtl_h", "single_task"])
TINY = dict(extra_tuning=dict(lr_grid=[1e-3, 3e-3], wd_grid=[0.0], tune_seeds=[100]))
#: every run takes its learning rate and weight decay from the grid: ``--lr``/``--weight-decay`` are not offered.
UNUSED_FLAGS = ("lr", "weight_decay")

__all__ = ["run", "grid_points", "point_label", "choose_single_task", "choose_multi_task", "copy_finished_runs"]


def add_flags(parser):
    g = parser.add_argument_group("tuning")
    g.add_argument("--lr-grid", type=float, nargs="+", default=None, metavar="LR",
                   help="learning rates every method tries (default: 3e-4 1e-3 3e-3; --tiny: 1e-3 3e-3)")
    g.add_argument("--wd-grid", type=float, nargs="+", default=None, metavar="WD",
                   help="decoupled weight decays every method tries (default: 0 1e-4; --tiny: 0)")
    g.add_argument("--tune-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="seeds of the tuning runs, disjoint from --seeds (default: 100; the same for every "
                        "method: an equal budget)")
    g.add_argument("--reuse-single-task", default=None, metavar="FOLDER",
                   help="a results folder (e.g. results/qm9_converged) whose finished single-task runs on the test "
                        "seeds are copied in place of retraining where a task's chosen point is their configuration "
                        "(a single-task run's selection does not depend on any reference, so it is the run this "
                        "study would train)")
    g.add_argument("--add-best-untuned", nargs=2, default=None, metavar=("FOLDER", "N"),
                   help="also tune the N methods of the untuned results FOLDER (e.g. results/qm9_converged) with "
                        "the lowest mean validation Δm%%, leaving out --methods and methods identical to one of "
                        "them (the ranking is recorded in tuning.json; the test split takes no part)")
    return ("lr_grid", "wd_grid", "tune_seeds", "reuse_single_task", "add_best_untuned")


def grid_points(lrs, wds) -> list[tuple[float, float]]:
    """The grid, in a fixed order (learning rate major)."""
    return [(float(lr), float(wd)) for lr, wd in itertools.product(lrs, wds)]


def point_label(point) -> str:
    """A grid point's folder name under ``tune/`` and ``test/``: ``lr<lr>_wd<weight decay>``."""
    return f"lr{point[0]:g}_wd{point[1]:g}"


def copy_finished_runs(source: Path, dest: Path, specs, seeds, steps: int, lr: float, weight_decay: float) -> list:
    """Copy ``source/runs/<label>/seed<k>/{result,history}.json`` to ``dest/runs/...`` for every
    (spec, seed) that ``dest`` lacks and whose source run finished ``steps`` steps at this learning
    rate and weight decay; returns the copied run folders (relative to ``dest``). The training loop
    then skips a copied run only if its whole fingerprint matches (:func:`experiments.train`'s
    ``--resume`` rule) and retrains it otherwise, so a copy never stands in for a different run."""
    import shutil
    copied = []
    for spec in specs:
        for seed in seeds:
            rel = Path("runs") / spec.label / f"seed{seed}"
            src = Path(source) / rel
            if (Path(dest) / rel / "result.json").exists() or not (src / "result.json").exists():
                continue
            r = json.loads((src / "result.json").read_text())
            cfg = r.get("config", {})
            if not (r.get("complete") and r.get("steps_planned") == steps and cfg.get("lr") == lr
                    and cfg.get("weight_decay") == weight_decay):
                continue
            (Path(dest) / rel).mkdir(parents=True, exist_ok=True)
            for name in ("result.json", "history.json"):
                if (src / name).exists():
                    shutil.copyfile(src / name, Path(dest) / rel / name)
            copied.append(str(rel))
    return copied


def _same_runs(source: Path, dest: Path, specs, seeds) -> list:
    """The run folders (relative) whose ``result.json`` in ``dest`` is byte-identical to ``source``'s."""
    same = []
    for spec in specs:
        for seed in seeds:
            rel = Path("runs") / spec.label / f"seed{seed}" / "result.json"
            if (source / rel).exists() and (dest / rel).exists() and (source / rel).read_bytes() == \
                    (dest / rel).read_bytes():
                same.append(str(rel.parent))
    return same


def _mean_val(results, names) -> dict:
    """Mean validation metrics (at the selected step) over the finished runs."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("val")]
    return {n: float(np.mean([r["val"][n] for r in ok])) for n in names} if ok else {}


def choose_single_task(bench, st_results_by_point: dict) -> tuple[dict, dict, dict]:
    """Per task t: the grid point whose single-task runs have the best mean validation score of t.

    ``st_results_by_point``: {point: [result of every single-task run, all seeds]}.
    Returns (choice {task index: point}, reference {metric: val of the chosen runs}, scores
    {task: {point label: score}}); the score is Δm% of the task's metrics against the first
    grid point (any fixed reference gives the same argmin per task).
    """
    from experiments.selection import score
    hib = bench.higher_is_better
    choice, reference, scores = {}, {}, {}
    points = list(st_results_by_point)
    for t in range(bench.num_tasks):
        names = bench.metric_names_of_task(t)
        vals = {p: _mean_val([r for r in st_results_by_point[p] if r.get("single_task") == t], names)
                for p in points}
        base = vals[points[0]]
        s = {p: score(vals[p], base, hib, names) if vals[p] else math.inf for p in points}
        best = min(points, key=lambda p: (s[p], points.index(p)))
        choice[t], scores[bench.task_names[t]] = best, {point_label(p): s[p] for p in points}
        reference.update(vals[best])
    return choice, reference, scores


def choose_multi_task(bench, results_by_point: dict, reference: dict) -> tuple[tuple, dict]:
    """The grid point with the lowest mean validation Δm% (against ``reference``) over the tuning seeds."""
    from experiments.selection import score
    names = [s.name for s in bench.metrics]
    hib = bench.higher_is_better
    s = {}
    for p, results in results_by_point.items():
        vals = [score(r["val"], reference, hib, names) for r in results if r.get("status") == "ok" and r.get("val")]
        s[p] = float(np.mean(vals)) if vals else math.inf
    points = list(results_by_point)
    return min(points, key=lambda p: (s[p], points.index(p))), {point_label(p): s[p] for p in points}


def _untuned_folder(flag, benchmark: str) -> tuple[Optional[Path], int]:
    """``--add-best-untuned FOLDER N`` checked before any data is loaded: (folder, N) or (None, 0)."""
    from experiments.errors import CLIError
    if not flag:
        return None, 0
    folder, n = Path(flag[0]), flag[1]
    results = folder / "results.json"
    if not str(n).isdigit() or int(n) < 1 or not (folder / "runs").is_dir() or not results.exists():
        raise CLIError(f"--add-best-untuned {flag[0]} {n}: expected an untuned results folder holding runs/ and "
                       "results.json (e.g. results/qm9_converged) and a number of methods >= 1")
    recorded = json.loads(results.read_text()).get("benchmark")
    if recorded != benchmark:
        raise CLIError(f"--add-best-untuned: {folder} holds {recorded} runs, this study tunes {benchmark}")
    return folder, int(n)


def run(o, command: str) -> dict:
    from experiments import records, suites
    from experiments.errors import CLIError
    from experiments.runs import RunConfig, expand_methods
    from experiments.train import run_experiment

    extra = {**(TINY["extra_tuning"] if o.tiny else {}), **{k: v for k, v in o.extra.items() if v is not None}}
    points = grid_points(extra.get("lr_grid", [3e-4, 1e-3, 3e-3]), extra.get("wd_grid", [0.0, 1e-4]))
    tune_seeds = [int(s) for s in extra.get("tune_seeds", [100])]
    if set(tune_seeds) & set(o.seeds):
        raise CLIError(f"--tune-seeds {tune_seeds} overlap --seeds {o.seeds}: tuning and test runs must use "
                       "different seeds")
    untuned, n_best = _untuned_folder(extra.get("add_best_untuned"), o.benchmark)
    out = Path(o.out)
    t0 = time.perf_counter()
    with suites.build(o.benchmark, o) as bench:
        specs = expand_methods(o.methods, bench.num_tasks)
        added: Optional[dict] = None
        if untuned is not None:
            from experiments.verdicts import best_on_validation
            try:
                best, ranking = best_on_validation(untuned, bench, n_best, [s.label for s in specs])
            except ValueError as e:
                raise CLIError(f"--add-best-untuned: {e}") from None
            if len(best) < n_best:
                raise CLIError(f"--add-best-untuned: {untuned} has {len(best)} method(s) beside --methods with every "
                               f"seed of its single-task runs finished, {n_best} asked for: run them first")
            added = {"from": str(untuned), "n": n_best, "chosen": best, "validation_delta_m": ranking}
            specs += expand_methods(best, bench.num_tasks)
        single = [s for s in specs if s.single_task is not None]
        multi = [s for s in specs if s.single_task is None]
        if not single:
            raise CLIError("--method must include single_task: it is the reference of the validation Δm")
        base = RunConfig.from_options(o, bench)
        cfgs = {p: dataclasses.replace(base, lr=p[0], weight_decay=p[1], resume=True) for p in points}
        # 1. single-task runs on the grid (tuning seeds): each task picks its point.
        st = {p: run_experiment(bench, single, tune_seeds, cfgs[p], out / "tune" / point_label(p)) for p in points}
        st_choice, reference, st_scores = choose_single_task(bench, st)
        # 2. every multi-task method on the same grid and seeds, selected on validation Δm.
        mt_choice, mt_scores = {}, {}
        for spec in multi:
            by_point = {p: run_experiment(bench, [spec], tune_seeds, cfgs[p], out / "tune" / point_label(p),
                                          reference=reference) for p in points}
            mt_choice[spec.label], mt_scores[spec.label] = choose_multi_task(bench, by_point, reference)
        # 3. the chosen settings on the test seeds; the single-task runs first (the table's baseline).
        final, reused = [], []
        for p in points:
            chosen = [s for s in single if st_choice[s.single_task] == p]
            if chosen:
                dest = out / "test" / point_label(p)
                if extra.get("reuse_single_task"):
                    copy_finished_runs(Path(extra["reuse_single_task"]), dest, chosen, o.seeds, base.steps, *p)
                final += run_experiment(bench, chosen, o.seeds, cfgs[p], dest)
                if extra.get("reuse_single_task"):
                    # the copies the training loop kept (a copy whose fingerprint did not match was retrained
                    # over), in this call or an earlier one: the runs identical to the source's
                    reused += [f"{point_label(p)}/{rel}" for rel in _same_runs(Path(extra["reuse_single_task"]), dest,
                                                                          chosen, o.seeds)]
        test_ref = {m: float(np.mean([r["val"][m] for r in final if r.get("single_task") == t and r.get("val")]))
                    for m, t in bench.task_of_metric_index().items()}
        for spec in multi:
            p = mt_choice[spec.label]
            final += run_experiment(bench, [spec], o.seeds, cfgs[p], out / "test" / point_label(p), reference=test_ref)
        from experiments import report
        summary = report.write_reports(out, bench, final, records.load_histories(out / "test", final),
                                       command=command, total_wall_s=time.perf_counter() - t0,
                                       title=f"{bench.name}: tuned on validation (equal budget)", plots=o.plots)
        payload = {
            "benchmark": bench.name, "command": command, "grid": [list(p) for p in points],
            "tune_seeds": tune_seeds, "test_seeds": list(o.seeds), "base_config": base.describe(),
            "single_task_choice": {bench.task_names[t]: point_label(p) for t, p in st_choice.items()},
            "single_task_val_scores": st_scores, "validation_reference": reference,
            "multi_task_choice": {k: point_label(p) for k, p in mt_choice.items()},
            "multi_task_val_delta_m": mt_scores,
            "added_best_untuned": added,
            "reused_single_task_runs": {"from": extra.get("reuse_single_task"), "runs": reused} if reused else None,
            "budget": {"grid_points": len(points), "tuning_seeds": len(tune_seeds),
                       "runs_per_method": len(points) * len(tune_seeds)},
        }
        (out / "tuning.json").write_text(json.dumps(records.to_json(payload), indent=1))
        md = [f"# {bench.name}: equal tuning budget", "", f"Command: `{command}`", "",
              f"Grid (lr x weight decay, {len(points)} points) x tuning seeds {tune_seeds} for every method; "
              f"choice on validation only; test seeds {list(o.seeds)}.", "",
              "| run | chosen | validation scores (Δm% vs first point for single-task; Δm% vs single-task for MTL) |",
              "|---|---|---|"]
        for task, lab in payload["single_task_choice"].items():
            sc = ", ".join(f"{k}: {v:+.2f}" for k, v in st_scores[task].items())
            md.append(f"| single_task {task} | {lab} | {sc} |")
        for m, lab in payload["multi_task_choice"].items():
            sc = ", ".join(f"{k}: {v:+.2f}" for k, v in mt_scores[m].items())
            md.append(f"| {m} | {lab} | {sc} |")
        if added:
            md += ["", f"Joined from `{added['from']}` (the {added['n']} lowest mean validation Δm% among the methods "
                       "not listed): " + ", ".join(f"{m} ({added['validation_delta_m'][m]:+.2f})"
                                                    for m in added["chosen"]) + "."]
        if reused:
            md += ["", f"Single-task test runs copied from `{extra['reuse_single_task']}` (the same configuration and "
                       f"seeds, not retrained): {', '.join(reused)}."]
        md += ["", "## Test (chosen settings)", "", summary["markdown"]]
        (out / "tuning.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        return dict(summary, tuning=payload)
