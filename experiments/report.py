"""Reports of an experiment folder: ``results.json``, ``results.md`` and PNG plots.

* ``results.json``: every run (method, seed) with every val/test metric, the per-task losses,
  wall time, mean step time (compile excluded), skipped (non-finite) steps and status, plus the
  per-method summary below.
* ``results.md``: test metrics as mean ± std over seeds (population std, ``ddof=0``; a single
  seed shows ± 0), and the two relative summaries of ``experiments.metrics``:
  **Δm%** (metric-mean, MTAN/Nash-MTL; negative = better) and **Δp%** (task-mean, LibMTL;
  positive = better), each computed per seed against the *mean* baseline metrics, then averaged.
  The baseline is the single-task runs (``--method single_task``: task t's metrics come from the
  model trained on task t alone) when present; otherwise equal weighting (EW), clearly labelled;
  otherwise no Δ columns.
* ``plots/weights_<method>.png``: the task weights α_t and loss scales e^{s_t} over training
  (seed-averaged; the paper's Fig. 4); ``plots/losses_<method>.png``: per-task training loss
  (moving average) and validation loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["summarize", "write_reports", "markdown_table", "fmt_metric", "is_percent_metric"]


def is_percent_metric(name: str) -> bool:
    """Metrics stored as fractions in [0, 1] and shown as percentages."""
    return name.endswith("_acc") or name.endswith("miou")


def fmt_metric(name: str, mean: Optional[float], std: Optional[float] = None) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "n/a"
    k = 100.0 if is_percent_metric(name) else 1.0
    m = mean * k
    if is_percent_metric(name):
        s = f"{m:.2f}"
        return s if std is None else f"{s} ± {std * k:.2f}"
    digits = 4
    s = f"{m:.{digits}g}"
    return s if std is None else f"{s} ± {std * k:.2g}"


def _mean_std(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def _single_task_composites(results, bench) -> dict:
    """{seed: composite run} from the single_task_t runs (task t's metrics from run t)."""
    tmi = bench.task_of_metric_index()
    by_seed = {}
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
    """Per-method summary (mean/std over seeds, Δm, Δp against the baseline)."""
    from experiments import metrics as M
    specs = bench.metric_specs()
    names = [s.name for s in specs]
    hib = M.higher_is_better_map(specs)
    tom = M.task_of_metric_map(specs)

    groups: dict[str, list] = {}
    order: list[str] = []
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

    baseline, baseline_label = None, None
    if "single_task" in groups:
        baseline_label = "single-task runs"
        base_runs = groups["single_task"]
    elif "equal" in groups and any(r.get("status") == "ok" for r in groups["equal"]):
        baseline_label = "equal weighting (EW) -- fallback, no single-task runs"
        base_runs = groups["equal"]
    else:
        base_runs = None
    if base_runs:
        ok = [r for r in base_runs if r.get("status") == "ok"]
        baseline = {n: float(np.mean([r["test"][n] for r in ok])) for n in names}
        if any(v == 0 for v in baseline.values()):
            baseline, baseline_label = None, None  # relative change undefined

    methods = {}
    for m in order:
        runs = groups[m]
        entry = {"seeds": [r["seed"] for r in runs], "n_seeds": len(runs),
                 "status": sorted({r.get("status", "ok") for r in runs}), "test": {}, "val": {}}
        for split in ("test", "val"):
            for n in names:
                mean, std = _mean_std([r[split].get(n) for r in runs if r.get(split)])
                entry[split][n] = {"mean": mean, "std": std}
        if baseline is not None:
            dms, dps = [], []
            for r in runs:
                try:
                    dms.append(M.delta_m(r["test"], baseline, hib))
                    dps.append(M.delta_p(r["test"], baseline, hib, tom))
                except (KeyError, ValueError, TypeError):
                    pass
            entry["delta_m"] = dict(zip(("mean", "std"), _mean_std(dms)), per_seed=dms)
            entry["delta_p"] = dict(zip(("mean", "std"), _mean_std(dps)), per_seed=dps)
        entry["wall_time_s"] = dict(zip(("mean", "std"), _mean_std([r.get("wall_time_s") for r in runs])))
        entry["step_time_ms"] = dict(zip(("mean", "std"), _mean_std([r.get("step_time_ms") for r in runs])))
        entry["skipped_steps"] = int(sum(r.get("skipped_steps", 0) or 0 for r in runs))
        entry["steps_done"] = [r.get("steps_done") for r in runs]
        methods[m] = entry
    return {"methods": methods, "order": order, "baseline": baseline, "baseline_label": baseline_label,
            "metric_names": names}


def markdown_table(bench, summary: dict, split: str = "test", max_inline_metrics: int = 12) -> str:
    """The results table (methods x metrics) in markdown; wide metric sets get a summary column
    in the main table and a transposed per-metric table below."""
    names = summary["metric_names"]
    specs = {s.name: s for s in bench.metric_specs()}
    inline = len(names) <= max_inline_metrics
    has_delta = summary["baseline"] is not None

    def arrow(n):
        return "↑" if specs[n].higher_is_better else "↓"

    def head(n):
        return f"{n}{' (%)' if is_percent_metric(n) else ''} {arrow(n)}"

    cols = ["method", "seeds"]
    if inline:
        cols += [head(n) for n in names]
    else:
        cols += [f"mean of {len(names)} metrics"]
    if has_delta:
        cols += ["Δm% ↓", "Δp% ↑"]
    cols += ["wall s", "step ms", "skipped"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for m in summary["order"]:
        e = summary["methods"][m]
        row = [m + ("" if e["status"] == ["ok"] else f" ({'/'.join(e['status'])})"), str(e["n_seeds"])]
        if inline:
            row += [fmt_metric(n, e[split][n]["mean"], e[split][n]["std"]) for n in names]
        else:
            means = [e[split][n]["mean"] for n in names if e[split][n]["mean"] is not None]
            row += [fmt_metric(names[0], float(np.mean(means))) if means else "n/a"]
        if has_delta:
            for k in ("delta_m", "delta_p"):
                d = e.get(k, {})
                row.append("n/a" if d.get("mean") is None else f"{d['mean']:+.2f} ± {d['std']:.2f}")
        w, st = e["wall_time_s"], e["step_time_ms"]
        row.append("n/a" if w["mean"] is None else f"{w['mean']:.1f}")
        row.append("n/a" if st["mean"] is None else f"{st['mean']:.1f}")
        row.append(str(e["skipped_steps"]))
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    if not inline:
        order = summary["order"]
        t2 = ["| metric | " + " | ".join(order) + " |", "|" + "|".join(["---"] * (len(order) + 1)) + "|"]
        for n in names:
            t2.append(f"| {head(n)} | " + " | ".join(
                fmt_metric(n, summary["methods"][m][split][n]["mean"], summary["methods"][m][split][n]["std"])
                for m in order) + " |")
        table += "\n\nPer metric:\n\n" + "\n".join(t2)
    return table


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    k = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def _stack(histories, method, key):
    seqs = [np.asarray(h[key], dtype=np.float64) for (m, _), h in histories.items() if m == method and h.get(key)]
    if not seqs:
        return None, None
    n = min(len(s) for s in seqs)
    steps = np.asarray(next(h["step"] for (m, _), h in histories.items() if m == method and h.get(key))[:n])
    return steps, np.nanmean(np.stack([s[:n] for s in seqs]), axis=0)


def plot_method(out_dir: Path, method: str, histories: dict, task_names: Sequence[str]) -> list[str]:
    """weights_<method>.png and losses_<method>.png; returns the written paths (relative)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    T = len(task_names)
    legend = T <= 12
    colors = plt.get_cmap("tab20" if T > 10 else "tab10")
    steps, w = _stack(histories, method, "weight")
    if steps is not None:
        _, sc = _stack(histories, method, "scale")
        win = max(1, len(steps) // 50)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for t in range(T):
            axes[0].plot(steps, _smooth(w[:, t], win), color=colors(t % 20), lw=1.2, label=task_names[t])
            axes[1].plot(steps, sc[:, t], color=colors(t % 20), lw=1.2, label=task_names[t])
        axes[0].set_title(f"{method}: task weights α_t (moving avg {win})")
        axes[1].set_title(f"{method}: loss scales e^(s_t)")
        finite = sc[np.isfinite(sc)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
            axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if legend:
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"weights_{method}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    steps, L = _stack(histories, method, "loss")
    if steps is not None:
        win = max(1, len(steps) // 50)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for t in range(T):
            ax.plot(steps, _smooth(L[:, t], win), color=colors(t % 20), lw=1.1,
                    label=f"{task_names[t]} train" if legend else None)
        vals = [h["val"] for (m, _), h in histories.items() if m == method and h.get("val")]
        if vals:
            v = vals[0]  # first seed's validation points
            vs = [p["step"] for p in v]
            for t in range(T):
                ax.plot(vs, [p["losses"][t] for p in v], "o--", color=colors(t % 20), ms=3, lw=0.8,
                        label=f"{task_names[t]} val" if legend else None)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{method}: per-task loss (train: moving avg {win}; val: points)")
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / f"losses_{method}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def write_reports(out: os.PathLike, bench, results: Sequence[dict], histories: dict, *,
                  command: str = "", total_wall_s: Optional[float] = None, title: Optional[str] = None,
                  extra_md: str = "", plots: bool = True) -> dict:
    """Writes results.json, results.md and plots into ``out``; returns the summary plus
    ``markdown`` (the printed table block)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(bench, results)
    table = markdown_table(bench, summary)
    written = []
    if plots:
        plot_dir = out / "plots"
        plot_dir.mkdir(exist_ok=True)
        for m in sorted({r["method"] for r in results}):
            written += plot_method(plot_dir, m, histories, bench.task_names)
    specs = bench.metric_specs()
    payload = {
        "benchmark": bench.name, "command": command, "tasks": list(bench.task_names),
        "metrics": [{"name": s.name, "task": s.task, "higher_is_better": s.higher_is_better} for s in specs],
        "baseline": summary["baseline"], "baseline_label": summary["baseline_label"],
        "summary": summary["methods"], "runs": list(results), "total_wall_s": total_wall_s,
        "notes": bench.notes,
    }
    from experiments.records import to_json
    (out / "results.json").write_text(json.dumps(to_json(payload), indent=1, allow_nan=False, default=_default))
    steps = sorted({r.get("steps_planned") for r in results})
    lines = [f"# {title or bench.name}: results", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"- {n}" for n in bench.notes]
    cfg = results[0]["config"] if results else {}
    seeds = sorted({r.get("seed") for r in results})
    steps_txt = str(steps[0]) if len(steps) == 1 else "/".join(map(str, steps))
    lines += [f"- training: {steps_txt} steps, batch {cfg.get('batch_size')}, Adam lr {cfg.get('lr')}, "
              f"seeds {', '.join(map(str, seeds))}"
              + (f"; task {cfg.get('loss_scale_task')} loss ×{cfg.get('loss_scale')}"
                 if cfg.get("loss_scale_task") is not None else ""), ""]
    lines += ["Test metrics, mean ± std over seeds (population std). "
              + (f"Δm% (metric-mean, negative = better) and Δp% (task-mean, positive = better) "
                 f"against **{summary['baseline_label']}**." if summary["baseline"] is not None
                 else "No Δm: neither single-task nor equal-weighting runs in this folder.")
              + " Step time: mean per training step after compilation (ms); wall: whole run (s).", ""]
    lines += [table, ""]
    bad = [r for r in results if r.get("status") != "ok"]
    for r in bad:
        lines.append(f"- **{r['method']} seed {r['seed']}: {r['status']}** — {r.get('message', '')}")
    if total_wall_s is not None:
        lines.append(f"Total wall time: {total_wall_s:.1f} s.")
    if extra_md:
        lines += ["", extra_md]
    if written:
        lines += ["", "Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in written)]
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    header = f"{title or bench.name}: test metrics, mean ± std over seeds" + (
        f"; Δ vs {summary['baseline_label']}" if summary["baseline"] is not None else "")
    printed = header + "\n\n" + table + "\n" + "".join(
        f"\n{r['method']} seed {r['seed']}: {r['status']}: {r.get('message', '')}" for r in bad) + \
        f"\n\nWritten: {out / 'results.md'}, {out / 'results.json'}" + (f", {len(written)} plots" if written else "")
    return dict(summary, markdown=printed, results_md=md)


def _default(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
