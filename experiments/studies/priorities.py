"""Priority sweep (GitHub issue 8): does ``priorities = (1, r)`` trace a trade-off front?

For each ratio r this trains, through the shared loop and from the same initialization,
batches and seeds,

* **IMTL-H** with ``priorities = (1, r)`` (projections of the shared-feature aggregate on the
  unit task gradients in ratio 1 : r; r = 1 is plain IMTL-H), and
* **linear** weights ``L_1 + r L_2`` (the constant-weights method; r = 1 is equal weighting),

and plots task 1's test metric against task 2's (selected on validation, mean over seeds).
Priorities are traced: every ratio of a method shares one compiled, vmapped program. Needs a
two-task benchmark (multimnist, multifashion; qm9 with ``--targets mu homo``, the default here).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

DESCRIPTION = "Priority sweep: IMTL-H with priorities (1, r) against linear weights (1, r) on two tasks."
USAGE = """examples:
  python -m experiments priorities                          # MultiMNIST, r in 1/8 .. 8
  python -m experiments priorities --benchmark qm9 --steps 400
  python -m experiments priorities --tiny
Writes <out>/front.png, results.json, results.md and the runs.
"""
DEFAULT_RATIOS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0)
DEFAULTS = dict(targets=["mu", "homo"], steps=300)
TINY = dict(steps=6)
#: the runs are the sweep itself (IMTL-H and linear weights at every ratio): ``--method`` is not offered.
UNUSED_FLAGS = ("methods",)
FAMILY_NAMES = {"imtl_h": "IMTL-H, priorities (1, r)", "linear": "linear weights (1, r)"}


def _ratio(s: str) -> float:
    try:
        v = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--ratios: not a number or fraction: {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"--ratios: ratio must be finite and positive, got {s!r}")
    return v


def add_flags(parser):
    parser.add_argument("--ratios", type=_ratio, nargs="+", default=None, metavar="R",
                        help="ratios r of p = (1, r); fractions allowed (default: 1/8 1/4 1/2 1 2 4 8)")
    return ("ratios",)


def ratio_label(r: float) -> str:
    f = Fraction(r).limit_denominator(64)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def sweep_specs(ratios):
    from experiments.runs import RunSpec
    return [RunSpec(fam, (1.0, float(r)), f"{fam}_p{ratio_label(r).replace('/', 'over')}")
            for fam in ("imtl_h", "linear") for r in ratios]


def markdown_table(result: dict) -> str:
    t1, t2 = result["tasks"]
    m1, m2 = result["metric_names"]
    lines = [f"### {result['benchmark']}: test {m1} / {m2} (selected on validation), mean over "
             f"{result['n_seeds']} seed(s), {result['steps']} steps", "",
             f"| method | r | {t1}: {m1} | {t2}: {m2} |", "|---|---:|---:|---:|"]
    for row in result["rows"]:
        name = row["family"]
        if row["ratio"] == 1.0:
            name = "IMTL-H (p = 1)" if name == "imtl_h" else "equal weighting"
        lines.append(f"| {name} | {row['label']} | {row['metric'][0]:.4g} | {row['metric'][1]:.4g} |")
    return "\n".join(lines) + "\n"


def plot_front(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    styles = {"imtl_h": dict(marker="o", color="C0"), "linear": dict(marker="s", color="C1")}
    for family in ("imtl_h", "linear"):
        rows = sorted((r for r in result["rows"] if r["family"] == family), key=lambda r: r["ratio"])
        xs, ys = [r["metric"][0] for r in rows], [r["metric"][1] for r in rows]
        ax.plot(xs, ys, ls=":", lw=1, alpha=0.6, color=styles[family]["color"])
        ax.scatter(xs, ys, label=FAMILY_NAMES[family], s=36, zorder=3, **styles[family])
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                        color=styles[family]["color"])
    t1, t2 = result["tasks"]
    m1, m2 = result["metric_names"]
    ax.set_xlabel(f"{t1}: test {m1}")
    ax.set_ylabel(f"{t2}: test {m2}")
    ax.set_title(f"{result['benchmark']}: priorities p = (1, r), {result['steps']} steps, "
                 f"seeds {','.join(map(str, result['seeds']))}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_plane(sweep: dict, summary: dict, path, title: str = "") -> list:
    """The sweep's fronts on the two-task plane with every method of a results folder beside them.

    ``sweep``: this study's ``results.json``; ``summary``: :func:`experiments.report.summarize` of
    the folder whose methods join it (the same benchmark and budget, e.g.
    ``results/multifashion_converged``): each method at its mean test metrics with 95 % intervals
    on both axes, the single-task networks as a star. Returns the plotted points
    ``[(label, x, y)]`` (the fronts' points first).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m1, m2 = sweep["metric_names"]
    fig, ax = plt.subplots(figsize=(7.2, 5.8), dpi=120)
    points = []
    styles = {"imtl_h": dict(marker="o", color="C0"), "linear": dict(marker="s", color="C1")}
    for family in ("imtl_h", "linear"):
        rows = sorted((r for r in sweep["rows"] if r["family"] == family), key=lambda r: r["ratio"])
        xs, ys = [r["metric"][0] for r in rows], [r["metric"][1] for r in rows]
        ax.plot(xs, ys, ls=":", lw=1, alpha=0.6, color=styles[family]["color"])
        ax.scatter(xs, ys, label=FAMILY_NAMES[family], s=30, zorder=3, alpha=0.8, **styles[family])
        points += [(f"{family} r={r['label']}", x, y) for r, x, y in zip(rows, xs, ys)]
    for m, e in summary["methods"].items():
        t1, t2 = e["test"].get(m1) or {}, e["test"].get(m2) or {}
        if t1.get("mean") is None or t2.get("mean") is None:
            continue
        star = m == "single_task"
        ax.errorbar(t1["mean"], t2["mean"], xerr=t1.get("ci95") or 0.0, yerr=t2.get("ci95") or 0.0,
                    fmt="*" if star else "D", ms=10 if star else 4, color="k" if star else "C2", capsize=2,
                    zorder=4, label="single-task networks" if star else None)
        ax.annotate(m, (t1["mean"], t2["mean"]), textcoords="offset points", xytext=(4, -9), fontsize=7)
        points.append((m, t1["mean"], t2["mean"]))
    t1n, t2n = sweep["tasks"]
    ax.set_xlabel(f"{t1n}: test {m1}")
    ax.set_ylabel(f"{t2n}: test {m2}")
    ax.set_title(title or f"{sweep['benchmark']}: fixed weights and IMTL-H priorities (1, r), every method beside "
                          "them\n(means over seeds; bars: 95 % CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return points


def run(o, command: str) -> dict:
    from experiments import records, suites
    from experiments.errors import CLIError
    from experiments.runs import RunConfig
    from experiments.train import run_experiment
    ratios = o.extra.get("ratios") or list(DEFAULT_RATIOS)
    with suites.build(o.benchmark, o) as bench:
        if bench.num_tasks != 2:
            raise CLIError(f"the priorities sweep needs a two-task benchmark; {bench.name} has {bench.num_tasks} "
                           "tasks (qm9: pass --targets with two names, e.g. --targets mu homo)")
        cfg = RunConfig.from_options(o, bench)
        out = Path(o.out)
        t0 = time.perf_counter()
        specs = sweep_specs(ratios)
        results = run_experiment(bench, specs, o.seeds, cfg, out)
        names = [bench.metric_names_of_task(t)[0] for t in range(2)]
        rows = []
        for spec in specs:
            rs = [r for r in results if r["method"] == spec.label and r["status"] == "ok"]
            if not rs:
                continue
            rows.append({"family": spec.method, "ratio": spec.priorities[1], "label": ratio_label(spec.priorities[1]),
                         "metric": [float(np.mean([r["test"][n] for r in rs])) for n in names],
                         "per_seed": [[r["test"][n] for n in names] for r in rs], "run": spec.label})
        result = {"benchmark": bench.name, "tasks": list(bench.task_names), "metric_names": names,
                  "higher_is_better": [bench.higher_is_better[n] for n in names], "steps": cfg.steps,
                  "config": cfg.describe(), "seeds": list(o.seeds), "n_seeds": len(o.seeds),
                  "ratios": [float(r) for r in ratios], "rows": rows, "command": command,
                  "machine": records.machine(), "seconds": round(time.perf_counter() - t0, 1)}
        (out / "results.json").write_text(json.dumps(records.to_json(result), indent=2) + "\n")
        (out / "results.md").write_text(f"Command: `{command}`\n\n" + markdown_table(result))
        if o.plots:
            plot_front(result, out / "front.png")
        print(markdown_table(result) + f"\nWritten: {out}/results.md, results.json"
              + (", front.png" if o.plots else ""))
        return result
