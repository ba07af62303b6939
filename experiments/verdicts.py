"""Verdicts of a results folder: each method against equal weighting (EW), corrected for the
number of comparisons, beside what the method costs.

* :func:`verdict_rows` / :func:`verdict_table`: per method, Δm% vs single-task, the paired
  Δm − EW interval over seeds, the paired t-test's p-value and its Holm-adjusted value over the
  family (every row but EW; provably identical methods merged into one row first), and the
  verdict: better/worse only where Holm's procedure rejects at 5 %; the fraction of runs whose
  selected step is the last evaluation; the step time relative to EW when
  ``method_cost.json`` (``python -m benchmarks.method_cost --out <folder>``) is present.
* :func:`verdict_headline`: the same verdicts in four lines (the README's summary).
* :func:`plot_delta_m_vs_cost`: Δm% against that cost, one point per method.
* :func:`best_on_validation`: the methods of an untuned folder that join the tuning study (ranked
  on validation, never on test).

The inputs are a folder's ``payload`` and ``summary`` as :func:`experiments.tables.load` gives them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

__all__ = ["FAMILY_ALPHA", "collect_runs", "merge_identical", "best_on_validation", "selected_last", "verdict_rows",
           "method_costs", "verdict_table", "verdict_headline", "plot_delta_m_vs_cost"]


FAMILY_ALPHA = 0.05


def _by_seed(entry: dict) -> dict:
    return {int(k): float(v) for k, v in entry["delta_m"]["by_seed"].items()}


def merge_identical(methods: dict) -> list[list[str]]:
    """Groups of method labels whose per-seed Δm are identical (to 1e-9 relative) on at least
    two common seeds: provably one method (IMTL-L and uncertainty weighting under Adam), reported
    as one row so that it does not count twice in the family of comparisons."""
    groups: list[list[str]] = []
    for m in methods:
        a = _by_seed(methods[m])
        for g in groups:
            b = _by_seed(methods[g[0]])
            common = sorted(set(a) & set(b))
            if len(common) >= 2 and set(a) == set(b) and all(
                    math.isfinite(a[s]) and abs(a[s] - b[s]) <= 1e-9 * max(1.0, abs(a[s])) for s in common):
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


def _method_rank(label: str) -> tuple:
    import imtl_jax
    names = list(imtl_jax.methods.method_names())
    base = label.split("@")[0]
    return (names.index(base) if base in names else len(names), label)


def run_files(folder: Path, name: str) -> list:
    """Every ``runs/<label>/seed<k>/<name>`` of a results folder, sorted; in a tuning study's folder
    (one holding ``tuning.json``) those of the chosen settings, ``test/<grid point>/runs/...``."""
    tuned = (folder / "tuning.json").exists()
    return sorted(folder.glob(f"test/*/runs/*/seed*/{name}" if tuned else f"runs/*/seed*/{name}"))


def untuned_folder(folder: Path) -> Path:
    """The converged folder of a tuning folder's benchmark (``<benchmark>_converged``)."""
    return folder.parent / f"{json.loads((folder / 'tuning.json').read_text())['benchmark']}_converged"


def collect_runs(folder: Path) -> list:
    """Every finished run under ``folder/runs/<label>/seed<k>/result.json`` (whatever call made it),
    single-task runs first, then the methods in registry order, seeds ascending.

    In a tuning study's folder (one holding ``tuning.json``) the runs are those of the chosen
    settings on the test seeds, ``folder/test/<grid point>/runs/...``; a run present at two grid
    points (a choice that changed after its test runs) is an error naming both.
    """
    found: dict = {}
    for path in run_files(folder, "result.json"):
        r = json.loads(path.read_text())
        if not r.get("complete", True):
            continue
        key = (r["method"], r["seed"])
        if key in found:
            raise ValueError(f"{folder}: run {key[0]} seed {key[1]} exists at two grid points ({found[key][0]} and "
                             f"{path}); delete the one the validation choice (tuning.json) did not pick")
        found[key] = (path, r)
    return sorted((r for _, r in found.values()),
                  key=lambda r: (r.get("single_task") is None, r.get("single_task") or 0,
                                 _method_rank(r["method"]), r["seed"]))


def best_on_validation(folder: Path, bench, n: int, exclude) -> tuple[list[str], dict]:
    """The (up to) ``n`` methods of a results folder with the lowest mean **validation** Δm% (at each
    run's selected step, against the mean validation metrics of the folder's single-task runs),
    leaving out the labels in ``exclude`` and any method identical to one of them
    (:func:`merge_identical` on the per-seed scores; a group is represented by its first method in
    registry order).

    Only methods with a finished ``ok`` run and a finite score on every seed of the single-task
    runs compete (their other seeds are ignored). The test split takes no part in the choice.
    Returns (the chosen labels, best first; ``{label: mean validation Δm%}`` of every competing
    group's representative). Raises ValueError when a task has no finished single-task run.
    """
    from experiments.selection import score
    runs = collect_runs(Path(folder))
    single = [r for r in runs if r.get("single_task") is not None and r.get("status") == "ok" and r.get("val")]
    reference, seeds = {}, {r["seed"] for r in single}
    for metric, t in bench.task_of_metric_index().items():
        vals = [v for r in single if r["single_task"] == t and isinstance(v := r["val"].get(metric), (int, float))
                and math.isfinite(v)]
        if not vals:
            raise ValueError(f"{folder}: no finished single-task run of task {bench.task_names[t]!r}: the reference "
                             "of the validation Δm is missing")
        reference[metric] = sum(vals) / len(vals)
    names = [s.name for s in bench.metrics]
    by_method: dict = {}
    for r in runs:
        if r.get("single_task") is None and r["seed"] in seeds and r.get("status") == "ok" and r.get("val"):
            by_method.setdefault(r["method"], {})[r["seed"]] = score(r["val"], reference, bench.higher_is_better,
                                                                     names)
    scores = {m: {"delta_m": {"by_seed": s}} for m, s in by_method.items()
              if set(s) == seeds and all(math.isfinite(v) for v in s.values())}
    means = {g[0]: sum(_by_seed(scores[g[0]]).values()) / len(seeds)
             for g in merge_identical(scores) if not set(g) & set(exclude)}
    return sorted(means, key=lambda m: (means[m], m))[:n], means


def selected_last(runs: list) -> dict:
    """``{method: (runs whose selected step is the last evaluation, finished runs)}``."""
    out: dict = {}
    for r in runs:
        if r.get("status") != "ok" or not r.get("selected") or not r.get("last"):
            continue
        hit, n = out.get(r["method"], (0, 0))
        out[r["method"]] = (hit + int(r["selected"]["step"] == r["last"]["step"]), n + 1)
    return out


def verdict_rows(folder: Path, payload: dict, summary: dict) -> list[dict]:
    """Per method (identical methods merged), Δm, the paired Δm − EW interval, the paired t-test's
    p-value and its Holm-adjusted value over the family (every row but EW), and the verdict:
    better/worse only where Holm's procedure rejects at 5 %."""
    from experiments.stats import holm, paired_t_pvalue
    methods = {m: e for m, e in summary["methods"].items() if m != "single_task" and "delta_m" in e}
    ew = _by_seed(methods["equal"]) if "equal" in methods else None
    last = selected_last(payload["runs"])
    rows = []
    for group in merge_identical(methods):
        m = group[0]
        e = methods[m]
        p, n = paired_t_pvalue(_by_seed(e), ew) if ew is not None and m != "equal" else (math.nan, 0)
        hit = sum(last.get(g, (0, 0))[0] for g in group)
        tot = sum(last.get(g, (0, 0))[1] for g in group)
        rows.append({"label": " = ".join(group), "methods": group, "delta_m": e["delta_m"],
                     "diff": e.get("delta_m_minus_ew", {}), "p": p, "n_pairs": n, "last": (hit, tot)})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        mean = row["diff"].get("mean")
        if "equal" in row["methods"]:
            row["verdict"] = "(reference)"
        elif not math.isfinite(adj):
            row["verdict"] = "no test (n < 2)"
        elif adj <= FAMILY_ALPHA:
            row["verdict"] = "**better**" if mean < 0 else "**worse**"
        else:
            row["verdict"] = "no difference detected"
    return sorted(rows, key=lambda r: (r["delta_m"]["mean"] if r["delta_m"]["mean"] is not None else math.inf,
                                       r["label"]))


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _cost_record(folder: Path) -> Optional[dict]:
    """``folder/method_cost.json`` (written by ``python -m benchmarks.method_cost --out <folder>``
    on an idle machine), or None. A tuning study's folder without one uses the record of the
    converged folder of its benchmark (``<benchmark>_converged``): a step's cost does not depend
    on the learning rate, and the table's caption names the command that measured it."""
    path = folder / "method_cost.json"
    if not path.exists() and (folder / "tuning.json").exists():
        path = untuned_folder(folder) / "method_cost.json"
    return json.loads(path.read_text()) if path.exists() else None


def method_costs(folder: Path, record: Optional[dict] = None) -> dict:
    """``{method: step time / EW}`` from the folder's method-cost record, or {}."""
    record = _cost_record(folder) if record is None else record
    return {m: float(r["ratio_to_equal"]) for m, r in record["methods"].items()} if record else {}


def verdict_table(folder: Path, payload: dict, summary: dict) -> str:
    """Methods ranked by mean Δm%, with the paired Δm − EW interval, its paired t-test p-value,
    the Holm-adjusted p-value over the family of comparisons with EW, and the verdict (better or
    worse only where the corrected test rejects at 5 %)."""
    from experiments.stats import format_ci
    rows = verdict_rows(folder, payload, summary)
    cost = _cost_record(folder)
    costs = method_costs(folder, cost)
    m_family = sum(1 for r in rows if math.isfinite(r["p_holm"]))
    lines = ["| rank | method | seeds | Δm% vs single-task ↓ | Δm − EW (paired, 95 % CI) | p | p, Holm "
             f"(m = {m_family}) | verdict at 5 % (Holm) | selected step = last |"
             + (" step time / EW |" if costs else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if costs else "")]
    for i, r in enumerate(rows, 1):
        dm, d = r["delta_m"], r["diff"]
        half = d.get("ci95")
        ref = "equal" in r["methods"]
        diff = "–" if ref else format_ci(d.get("mean") if d.get("mean") is not None else math.nan,
                                         half if half is not None else math.nan, 2, True)
        hit, tot = r["last"]
        lines.append(f"| {i} | {r['label']} | {dm['n']} | "
                     f"{format_ci(dm['mean'], dm['ci95'] if dm['ci95'] is not None else math.nan, 2, True)} | {diff} | "
                     f"{'–' if ref else _p(r['p'])} | {'–' if ref else _p(r['p_holm'])} | {r['verdict']} | "
                     f"{hit} of {tot} |" + (f" {costs[r['methods'][0]]:.2f} |" if r["methods"][0] in costs
                                            else " – |" if costs else ""))
    hit = sum(r["last"][0] for r in rows)
    tot = sum(r["last"][1] for r in rows)
    lines += ["", f"Runs whose selected (best-validation) step is the last evaluation: {hit} of {tot}"
                  f"{f' ({100 * hit / tot:.0f} %)' if tot else ''}."]
    if cost:
        lines += [f"Step time / EW: `{cost['command']}` (median of {cost['rounds']} interleaved rounds; 1-minute "
                  f"load {cost['load_1min_before']:.2f} before, {cost['load_1min_after']:.2f} after)"
                  + "".join(f"; {', '.join(u['methods'])}: `{u['command']}` (against the EW of that run; load "
                            f"{u['load_1min_before']:.2f} before, {u['load_1min_after']:.2f} after)"
                            for u in cost.get("updates", [])) + "."]
    return "\n".join(lines)


HEADLINE_METHODS = ("imtl_h", "imtl_g", "imtl_g_exact")


def verdict_headline(folder: Path, payload: dict, summary: dict) -> str:
    """The verdict table in four lines: the family, which methods the Holm-corrected test calls
    better or worse than EW, IMTL's paired differences, and how many runs were still improving."""
    from experiments.stats import format_ci
    rows = verdict_rows(folder, payload, summary)
    tested = [r for r in rows if math.isfinite(r["p_holm"])]
    seeds = sorted({r["delta_m"]["n"] for r in rows})
    cfg = next((r.get("config") for r in payload["runs"] if r.get("config")), {}) or {}

    def names(verdict: str) -> str:
        hits = [r["label"] for r in tested if r["verdict"] == verdict]
        return ", ".join(hits) if hits else "none"

    def diff(r: dict) -> str:
        d = r["diff"]
        return (f"{format_ci(d['mean'], d['ci95'] if d.get('ci95') is not None else math.nan, 2, True)} "
                f"(Holm p {_p(r['p_holm'])})")

    imtl = [f"{r['label']} {diff(r)}" for m in HEADLINE_METHODS for r in rows if r["methods"][0] == m]
    best = rows[0] if rows else None
    hit = sum(r["last"][0] for r in rows)
    tot = sum(r["last"][1] for r in rows)
    budget = (f"up to {cfg['steps']:,} steps of batch {cfg['batch_size']}" if cfg.get("steps") and cfg.get("batch_size")
              else "the recorded budget")
    n, plural = len(tested), "s" * (len(tested) != 1)
    lines = [f"- **{payload.get('benchmark', folder.name)}** (`results/{folder.name}`): {n} method{plural} against "
             f"equal weighting (EW), {'–'.join(map(str, seeds))} seeds each, {budget}. At 5 % after Holm's correction "
             f"over the {n} comparison{plural}: better than EW: {names('**better**')}; worse: {names('**worse**')}; "
             f"no difference detected: {sum(r['verdict'] == 'no difference detected' for r in tested)}.",
             f"- Paired Δm − EW (%, 95 % CI; lower is better): "
             f"{'; '.join(imtl) if imtl else 'no IMTL run in this folder yet'}."]
    if best is not None:
        dm = best["delta_m"]
        half = dm["ci95"] if dm["ci95"] is not None else math.nan
        lines.append(f"- Lowest mean Δm% vs single-task: {best['label']} ({format_ci(dm['mean'], half, 2, True)}).")
    if tot:
        lines.append(f"- Runs whose best-validation step is their last evaluation (still improving when stopped): "
                     f"{hit} of {tot} ({100 * hit / tot:.0f} %).")
    return "\n".join(lines)


def plot_delta_m_vs_cost(folder: Path, payload: dict, summary: dict) -> Optional[Path]:
    """``folder/delta_m_vs_cost.png``: each method's Δm% (mean, 95 % CI over seeds) against its
    step time relative to EW (a log axis once the ratios span 3x), verdict rows marked; None without
    ``method_cost.json``."""
    costs = method_costs(folder)
    if not costs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = []
    for r in verdict_rows(folder, payload, summary):
        m = r["methods"][0]
        if m not in costs or r["delta_m"]["mean"] is None:
            continue
        half = r["delta_m"]["ci95"] or 0.0
        color = {"**better**": "tab:green", "**worse**": "tab:red"}.get(r["verdict"], "tab:blue")
        shown.append(costs[m])
        ax.errorbar(costs[m], r["delta_m"]["mean"], yerr=half, fmt="o", color=color, capsize=3, ms=4)
        ax.annotate(r["label"], (costs[m], r["delta_m"]["mean"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    # Log axis once the ratios span a factor of 3 (parameter-level methods cost 6-8x), linear
    # below; plain tick labels either way ("1.1x", not "1.1 x 10^0").
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    log_axis = bool(shown) and min(shown) > 0 and max(shown) / min(shown) >= 3
    if log_axis:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())   # else "3 x 10^0" on the minor ticks
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.4g}x"))
    ax.margins(x=0.12)   # room for the labels of the rightmost points
    ax.set_xlabel(f"training step time / equal weighting ({'log; ' if log_axis else ''}"
                  "benchmarks.method_cost, idle machine)")
    ax.set_ylabel("Δm% vs single-task (lower is better)")
    ax.set_title(f"{folder.name}: what each method costs for what it gains\n"
                 "(95 % CI over seeds; green/red: better/worse than EW after Holm)", fontsize=9)
    ax.axvline(1.0, color="k", lw=0.6, ls=":")
    fig.tight_layout()
    out = folder / "delta_m_vs_cost.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
