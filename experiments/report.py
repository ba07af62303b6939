"""Reports of an experiment folder: ``results.json``, ``results.md`` and PNG plots.

* ``results.json``: every run (its ``result.json``), the per-method summary below, the command,
  the notes and the test-set size.
* ``results.md``: test metrics (selected on validation) as **mean ± 95 % Student-t interval
  over n seeds** (n in the ``seeds`` column; one seed shows no interval), and the two relative
  summaries of :mod:`experiments.metrics`: **Δm%** (metric-mean, MTAN/Nash-MTL; negative =
  better) and **Δp%** (task-mean, LibMTL; positive = better), each computed per seed against
  the *mean* baseline metrics. The baseline is the single-task runs (task t's metrics from the
  model trained on task t alone) when present; otherwise equal weighting (labelled). The
  column **Δm − EW** is the paired per-seed difference of Δm to equal weighting with its
  interval (seeds share initialization and data order, so pairing removes their noise).
  Accuracy tables also state the standard error of one test accuracy given the test-set size.
* ``plots/compare_<metric>.png``: each method's validation metric over training, mean and
  min-max band over seeds; ``plots/weights_<method>.png`` (task weights α_t and loss scales
  e^{s_t}, seed mean; skipped when both are constant, e.g. equal weighting);
  ``plots/losses_<method>.png`` (per-task training loss, moving average, and validation loss).

Summary keys per method and metric: ``mean``, ``std`` (population, ddof=0, as before),
``ci95`` (half-width) and ``n``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from experiments import stats

__all__ = ["summarize", "write_reports", "markdown_table", "fmt_metric", "is_percent_metric"]


def is_percent_metric(name: str) -> bool:
    """Metrics stored as fractions in [0, 1] and shown as percentages."""
    return name.endswith("_acc") or name.endswith("miou")


def fmt_metric(name: str, mean: Optional[float], half: Optional[float] = None) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    k = 100.0 if is_percent_metric(name) else 1.0
    if is_percent_metric(name):
        s = f"{mean * k:.2f}"
        return s if half is None or not math.isfinite(half) else f"{s} ± {half * k:.2f}"
    s = f"{mean:.4g}"
    return s if half is None or not math.isfinite(half) else f"{s} ± {half:.2g}"


def _ci(values) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    m, h, n = stats.mean_ci(vals)
    return {"mean": m if n else None, "std": float(np.std(vals)) if vals else None,
            "ci95": h if n > 1 else None, "n": n}


def _single_task_composites(results, bench) -> dict:
    """{seed: composite run} from the single_task_t runs (task t's metrics from run t)."""
    tmi = bench.task_of_metric_index()
    by_seed: dict = {}
    for r in results:
        if r.get("single_task") is not None and r.get("status") == "ok":
            by_seed.setdefault(r["seed"], {})[r["single_task"]] = r
    out = {}
    for seed, runs in by_seed.items():
        if len(runs) != bench.num_tasks:
            continue
        comp = {"method": "single_task", "seed": seed, "status": "ok"}
        for split in ("val", "test"):
            comp[split] = {m: runs[t][split][m] for m, t in tmi.items()}
        comp["wall_time_s"] = sum(r["wall_time_s"] for r in runs.values())
        st = [r["step_time_ms"] for r in runs.values() if r.get("step_time_ms") is not None]
        comp["step_time_ms"] = float(np.mean(st)) if st else None
        comp["skipped_steps"] = sum(r["skipped_steps"] for r in runs.values())
        comp["steps_done"] = min(r["steps_done"] for r in runs.values())
        out[seed] = comp
    return out


def summarize(bench, results: Sequence[dict]) -> dict:
    """Per-method summary: mean, interval and n over seeds; Δm, Δp; paired Δm difference to EW."""
    from experiments import metrics as M
    specs = bench.metric_specs()
    names = [s.name for s in specs]
    hib = M.higher_is_better_map(specs)
    tom = M.task_of_metric_map(specs)
    groups: dict = {}
    order: list = []
    for r in results:
        if r.get("single_task") is not None:
            continue
        if r["method"] not in groups:
            order.append(r["method"])
        groups.setdefault(r["method"], []).append(r)
    comps = _single_task_composites(results, bench)
    if comps:
        groups["single_task"] = [comps[s] for s in sorted(comps)]
        order.insert(0, "single_task")
    baseline, baseline_label, base_runs = None, None, None
    if "single_task" in groups:
        baseline_label, base_runs = "single-task runs", groups["single_task"]
    elif "equal" in groups and any(r.get("status") == "ok" for r in groups["equal"]):
        baseline_label, base_runs = "equal weighting (EW) -- fallback, no single-task runs", groups["equal"]
    if base_runs:
        ok = [r for r in base_runs if r.get("status") == "ok"]
        baseline = {n: float(np.mean([r["test"][n] for r in ok])) for n in names}
        if any(v == 0 for v in baseline.values()):
            baseline, baseline_label = None, None
    methods = {}
    for m in order:
        runs = groups[m]
        entry = {"seeds": [r["seed"] for r in runs], "n_seeds": len(runs),
                 "status": sorted({r.get("status", "ok") for r in runs}), "test": {}, "val": {}}
        for split in ("test", "val"):
            for n in names:
                entry[split][n] = _ci([r[split].get(n) for r in runs if r.get(split)])
        if baseline is not None:
            dms, dps = {}, {}
            for r in runs:
                try:
                    dms[r["seed"]] = M.delta_m(r["test"], baseline, hib)
                    dps[r["seed"]] = M.delta_p(r["test"], baseline, hib, tom)
                except (KeyError, ValueError, TypeError):
                    pass
            entry["delta_m"] = dict(_ci(list(dms.values())), per_seed=list(dms.values()), by_seed=dms)
            entry["delta_p"] = dict(_ci(list(dps.values())), per_seed=list(dps.values()))
        entry["wall_time_s"] = _ci([r.get("wall_time_s") for r in runs])
        entry["step_time_ms"] = _ci([r.get("step_time_ms") for r in runs])
        entry["skipped_steps"] = int(sum(r.get("skipped_steps", 0) or 0 for r in runs))
        entry["nonconverged_steps"] = int(sum(r.get("nonconverged_steps", 0) or 0 for r in runs))
        entry["solver_steps"] = int(sum(r.get("solver_steps", 0) or 0 for r in runs))
        entry["steps_done"] = [r.get("steps_done") for r in runs]
        methods[m] = entry
    if "equal" in methods and "delta_m" in methods["equal"]:
        ew = methods["equal"]["delta_m"]["by_seed"]
        for _m, e in methods.items():
            if "delta_m" in e:
                mean, half, n = stats.paired_diff_ci(e["delta_m"]["by_seed"], ew)
                e["delta_m_minus_ew"] = {"mean": mean if n else None, "ci95": half if n > 1 else None, "n": n}
    for e in methods.values():
        if "delta_m" in e:
            e["delta_m"]["by_seed"] = {str(k): v for k, v in e["delta_m"]["by_seed"].items()}
    return {"methods": methods, "order": order, "baseline": baseline, "baseline_label": baseline_label,
            "metric_names": names}


def _pm(d: dict, digits: int = 2, signed: bool = True) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return stats.format_ci(d["mean"], d["ci95"] if d.get("ci95") is not None else math.nan, digits, signed)


def markdown_table(bench, summary: dict, split: str = "test", max_inline_metrics: int = 12) -> str:
    """The results table (methods x metrics); wide metric sets get a mean column and a transposed table."""
    names = summary["metric_names"]
    specs = {s.name: s for s in bench.metric_specs()}
    inline = len(names) <= max_inline_metrics
    has_delta = summary["baseline"] is not None
    has_ew = any("delta_m_minus_ew" in e for e in summary["methods"].values())

    def head(n):
        return f"{n}{' (%)' if is_percent_metric(n) else ''} {'↑' if specs[n].higher_is_better else '↓'}"

    cols = ["method", "seeds"] + ([head(n) for n in names] if inline else [f"mean of {len(names)} metrics"])
    # Iterative solvers that stopped at their cap: shown when any method of the table has one.
    has_solver = any(e.get("solver_steps") for e in summary["methods"].values())
    cols += ((["Δm% ↓", "Δp% ↑"] if has_delta else []) + (["Δm − EW"] if has_ew else [])
             + ["wall s", "step ms", "skipped"])
    cols += ["solver short of tolerance"] if has_solver else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for m in summary["order"]:
        e = summary["methods"][m]
        row = [m + ("" if e["status"] == ["ok"] else f" ({'/'.join(e['status'])})"), str(e["n_seeds"])]
        if inline:
            row += [fmt_metric(n, e[split][n]["mean"], e[split][n]["ci95"]) for n in names]
        else:
            means = [e[split][n]["mean"] for n in names if e[split][n]["mean"] is not None]
            row += [fmt_metric(names[0], float(np.mean(means))) if means else "n/a"]
        if has_delta:
            row += [_pm(e.get("delta_m")), _pm(e.get("delta_p"))]
        if has_ew:
            row.append(_pm(e.get("delta_m_minus_ew")))
        w, st = e["wall_time_s"], e["step_time_ms"]
        row += ["n/a" if w["mean"] is None else f"{w['mean']:.1f}",
                "n/a" if st["mean"] is None else f"{st['mean']:.1f}",
                str(e["skipped_steps"])]
        if has_solver:
            row.append(f"{e['nonconverged_steps']} of {e['solver_steps']} steps" if e.get("solver_steps") else "–")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    if not inline:
        order = summary["order"]
        t2 = ["| metric | " + " | ".join(order) + " |", "|" + "|".join(["---"] * (len(order) + 1)) + "|"]
        for n in names:
            t2.append(f"| {head(n)} | " + " | ".join(
                fmt_metric(n, summary["methods"][m][split][n]["mean"], summary["methods"][m][split][n]["ci95"])
                for m in order) + " |")
        table += "\n\nPer metric:\n\n" + "\n".join(t2)
    return table


def _accuracy_note(bench, summary) -> str:
    accs = [e["test"][n]["mean"] for e in summary["methods"].values() for n in summary["metric_names"]
            if n.endswith("_acc") and e["test"][n]["mean"] is not None]
    n_test = len(bench.test) if bench.test is not None else 0
    if not accs or not n_test:
        return ""
    p = float(np.mean(accs))
    se = stats.accuracy_standard_error(min(max(p, 0.0), 1.0), n_test)
    return (f"One test accuracy near {100 * p:.1f} % on {n_test} test examples has a standard error of "
            f"{100 * se:.2f} points (√(p(1−p)/n)): differences smaller than that are test-set noise.")


def write_reports(out: os.PathLike, bench, results: Sequence[dict], histories: dict, *,
                  command: str = "", total_wall_s: Optional[float] = None, title: Optional[str] = None,
                  extra_md: str = "", plots: bool = True) -> dict:
    """Writes results.json, results.md and plots into ``out``; returns the summary plus
    ``markdown`` (the printed block) and ``results_md``."""
    from experiments.plots import plot_all
    from experiments.records import to_json, write_text_atomic
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(bench, results)
    table = markdown_table(bench, summary)
    written = plot_all(out / "plots", bench, results, histories) if plots else []
    specs = bench.metric_specs()
    payload = {
        "record_version": 2, "benchmark": bench.name, "command": command, "tasks": list(bench.task_names),
        "metrics": [{"name": s.name, "task": s.task, "higher_is_better": s.higher_is_better} for s in specs],
        "baseline": summary["baseline"], "baseline_label": summary["baseline_label"],
        "summary": summary["methods"], "runs": list(results), "total_wall_s": total_wall_s,
        "notes": bench.notes, "n_test": len(bench.test) if bench.test is not None else None,
    }
    write_text_atomic(out / "results.json", json.dumps(to_json(payload), indent=1, allow_nan=False))
    seeds = sorted({r.get("seed") for r in results})
    cfg = results[0]["config"] if results else {}
    steps = sorted({r.get("steps_planned") for r in results})
    lines = [f"# {title or bench.name}: results", ""] + ([f"Command: `{command}`", ""] if command else [])
    lines += [f"- {n}" for n in bench.notes]
    lines += [f"- training: {'/'.join(map(str, steps))} steps, batch {cfg.get('batch_size')}, Adam lr {cfg.get('lr')}"
              f" ({cfg.get('schedule', 'constant')} schedule, weight decay {cfg.get('weight_decay', 0)}), evaluated "
              f"every {cfg.get('eval_every')} steps; seeds {', '.join(map(str, seeds))}"
              + (f"; task {cfg.get('loss_scale_task')} loss ×{cfg.get('loss_scale')}"
                 if cfg.get("loss_scale_task") is not None else ""), ""]
    lines += ["Test metrics at the step with the best validation Δm (single-task runs: the best validation "
              "metric of their task), mean ± 95 % Student-t interval over the n seeds of the `seeds` column "
              "(no interval for one seed). "
              + (f"Δm% (metric-mean, negative = better) and Δp% (task-mean, positive = better) against "
                 f"**{summary['baseline_label']}**; Δm − EW: paired per-seed difference to equal weighting."
                 if summary["baseline"] is not None else "No Δm: neither single-task nor equal-weighting runs.")
              + " Step time: mean per training step after compilation (ms); wall: whole run (s).", ""]
    lines += [table, ""]
    note = _accuracy_note(bench, summary)
    if note:
        lines += [note, ""]
    bad = [r for r in results if r.get("status") != "ok"]
    lines += [f"- **{r['method']} seed {r['seed']}: {r['status']}** — {r.get('message', '')}" for r in bad]
    if total_wall_s is not None:
        lines.append(f"Total wall time: {total_wall_s:.1f} s.")
    if extra_md:
        lines += ["", extra_md]
    if written:
        lines += ["", "Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in written)]
    md = "\n".join(lines) + "\n"
    write_text_atomic(out / "results.md", md)
    header = f"{title or bench.name}: test metrics (selected on validation), mean ± 95% CI over seeds" + (
        f"; Δ vs {summary['baseline_label']}" if summary["baseline"] is not None else "")
    printed = header + "\n\n" + table + "\n" + (f"\n{note}\n" if note else "") + "".join(
        f"\n{r['method']} seed {r['seed']}: {r['status']}: {r.get('message', '')}" for r in bad) + \
        f"\n\nWritten: {out / 'results.md'}, {out / 'results.json'}" + (f", {len(written)} plots" if written else "")
    return dict(summary, markdown=printed, results_md=md)
