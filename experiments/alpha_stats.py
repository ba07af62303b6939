"""How the task weights α behaved along finished runs: the α-trajectory part of the diagnosis of
the representation level (issue 22, item 7), from the runs' own histories.

``python -m experiments.alpha_stats results/qm9_converged --methods imtl_g imtl_h imtl_g_exact``
reads ``runs/<method>/seed*/history.json`` (the per-step α the training loop records; not
committed, so the summary is) and writes ``alpha_stats.json`` beside the results, from which
``python -m experiments.tables`` renders the ``<folder>:alpha`` block. Per run:

* ``dominated_fraction``: the fraction of steps where one task holds more than 90 % of ``Σ|α|``
  (:func:`experiments.studies.ablation_z_vs_theta.alpha_trajectory_stats`);
* ``mean_l1_jump``: the mean L1 distance between consecutive steps' α (same function);
* ``median_top_share``: the median over steps of ``max_t |α_t| / Σ|α_t|`` (``1/T`` for equal
  weights, 1 when one task has all the weight);
* ``negative_fraction``: the fraction of steps with some ``α_t < 0`` (IMTL-G's closed form
  allows negative weights; a negative weight pushes the shared update against that task's loss
  gradient's component orthogonal to the others).

Steps with a non-finite α (skipped steps) are left out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from experiments.records import write_text_atomic

FIELDS = ("dominated_fraction", "mean_l1_jump", "median_top_share", "negative_fraction")


def run_stats(weights) -> dict:
    """The four statistics of one run's per-step weights (steps, T).

    >>> {k: round(v, 4) for k, v in run_stats([[0.5, 0.5], [0.95, 0.05], [1.5, -0.5]]).items()}
    {'dominated_fraction': 0.3333, 'mean_l1_jump': 1.0, 'median_top_share': 0.75, 'negative_fraction': 0.3333}
    """
    from experiments.studies.ablation_z_vs_theta import alpha_trajectory_stats
    w = np.asarray(weights, np.float64)
    w = w.reshape(len(w), -1)
    w = w[np.all(np.isfinite(w), axis=1)]
    out = alpha_trajectory_stats(w)
    if len(w) == 0:
        return {**out, "median_top_share": None, "negative_fraction": None}
    share = np.max(np.abs(w), axis=1) / np.maximum(np.sum(np.abs(w), axis=1), 1e-30)
    return {**out, "median_top_share": float(np.median(share)),
            "negative_fraction": float(np.mean(np.any(w < 0, axis=1)))}


def summarize(folder: Path, methods: Optional[Sequence[str]] = None) -> dict:
    """``{"methods": {method: {"seeds": {seed: stats}, "steps": n}}}`` for the runs of ``folder``
    that have a ``history.json`` (single-task runs are skipped)."""
    folder = Path(folder)
    runs = folder / "runs"
    names = list(methods) if methods else sorted(
        p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("single_task"))
    out: dict = {}
    for name in names:
        seeds = {}
        steps = set()
        for seed_dir in sorted((runs / name).glob("seed*")):
            history = seed_dir / "history.json"
            if not history.exists():
                continue
            weights = json.loads(history.read_text()).get("weight") or []
            seeds[seed_dir.name[len("seed"):]] = run_stats(weights)
            steps.add(len(weights))
        if not seeds:
            raise FileNotFoundError(f"no runs/{name}/seed*/history.json under {folder}")
        out[name] = {"seeds": seeds, "steps": sorted(steps)}
    return {"methods": out}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def alpha_table(folder: Path) -> str:
    """The ``<folder>:alpha`` block: per method, each statistic's mean ± 95 % CI over seeds."""
    from experiments.stats import format_ci, mean_ci
    record = json.loads((Path(folder) / "alpha_stats.json").read_text())
    lines = ["| method | seeds | steps | steps where one task holds > 90 % of ‖α‖₁ | mean ‖Δα‖₁ between "
             "steps | largest share of ‖α‖₁ (median over steps) | steps with some α_t < 0 |",
             "|---|---|---|---|---|---|---|"]
    for name, rec in record["methods"].items():
        cells = []
        for field in FIELDS:
            mean, half, _ = mean_ci([s[field] for s in rec["seeds"].values()])
            cells.append(format_ci(mean, half, 3))
        steps = ", ".join(str(s) for s in rec["steps"])
        lines.append(f"| {name} | {len(rec['seeds'])} | {steps} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"`{record['command']}` (at {record['commit']}), from the runs' per-step α; mean ± 95 % CI "
                 "over seeds.")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a results folder (with runs/<method>/seed*/history.json)")
    ap.add_argument("--methods", nargs="+", default=None, help="the runs to summarize (default: all "
                    "but the single-task networks)")
    args = ap.parse_args(argv)
    record = summarize(args.folder, args.methods)
    folder = args.folder.resolve()
    try:
        shown = folder.relative_to(Path.cwd())
    except ValueError:
        shown = folder
    record["command"] = "python -m experiments.alpha_stats " + " ".join(
        [str(shown)] + (["--methods", *args.methods] if args.methods else []))
    record["commit"] = _commit()
    path = args.folder / "alpha_stats.json"
    write_text_atomic(path, json.dumps(record, indent=1))
    print(alpha_table(args.folder))
    print(f"\nWritten: {path}")


if __name__ == "__main__":
    main()
