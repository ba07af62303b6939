"""Robustness to loss scale (the paper's Table 1, right half): every method trained twice with
the same seeds, once as is and once with one task's loss multiplied by k; the table reports
|Δ| of every test metric.

Both runs of a method use the same seed (same initialization and batch order), so the
difference comes from the rescaled loss alone. |Δ| per metric is |mean_scaled − mean_base| over
seeds; "mean rel. abs Δ %" averages |Δ|/|base| over the metrics. A method whose shared update is
invariant to loss scale (IMTL-G's direction, Theorem 2; IMTL-L's scales absorb k) should show
|Δ| near run-to-run noise; equal weighting should not. Adam is itself invariant to a *global*
gradient scale, which is why only one task is rescaled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

DESCRIPTION = "Robustness to loss scale: each method with and without one task's loss multiplied by k."
USAGE = """examples:
  python -m experiments robustness                      # MultiMNIST, 6 methods, task 0 x10
  python -m experiments robustness --benchmark qm9 --loss-scale-task homo --loss-scale 10
  python -m experiments robustness --tiny
Writes <out>/base/ and <out>/scaled/ (each a full report) and <out>/results.{md,json}.
"""
DEFAULT_METHODS = ["equal", "uncertainty", "gls", "imtl_l", "imtl_g", "imtl_h"]
DEFAULTS = dict(methods=DEFAULT_METHODS, loss_scale_task="0", loss_scale=10.0)
TINY = dict(methods=["equal", "imtl_g"])


def robustness_table(bench, base_results, scaled_results) -> tuple[str, dict]:
    """Markdown table of |Δ| per metric (methods x metrics) and the JSON payload."""
    from experiments.report import fmt_metric, is_percent_metric
    names = [s.name for s in bench.metrics]

    def by_method(results):
        out = {}
        for r in results:
            if r.get("status") == "ok":
                out.setdefault(r["method"], []).append(r)
        return out

    base, scaled = by_method(base_results), by_method(scaled_results)
    methods = [m for m in dict.fromkeys(r["method"] for r in base_results) if m in base and m in scaled]
    payload = {}
    inline = len(names) <= 12
    cols = ["method"] + ([f"abs Δ {n}{' (pp)' if is_percent_metric(n) else ''}" for n in names] if inline else []) \
        + ["mean rel. abs Δ %", "seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for m in methods:
        b = {n: float(np.mean([r["test"][n] for r in base[m]])) for n in names}
        s = {n: float(np.mean([r["test"][n] for r in scaled[m]])) for n in names}
        d = {n: abs(s[n] - b[n]) for n in names}
        rel = [d[n] / abs(b[n]) * 100 for n in names if b[n] != 0]
        payload[m] = {"base": b, "scaled": s, "abs_delta": d,
                      "mean_rel_abs_delta_pct": float(np.mean(rel)) if rel else None,
                      "seeds": sorted({r["seed"] for r in base[m]} & {r["seed"] for r in scaled[m]})}
        row = [m] + ([fmt_metric(n, d[n]) for n in names] if inline else [])
        row += [f"{payload[m]['mean_rel_abs_delta_pct']:.2f}" if rel else "n/a", str(len(payload[m]["seeds"]))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), payload


def run(o, command: str) -> dict:
    from experiments import records, suites
    from experiments.errors import CLIError
    from experiments.runs import RunConfig, expand_methods
    from experiments.studies.compare import train_and_report
    if o.loss_scale == 1.0:
        raise CLIError("--loss-scale 1 leaves the losses unchanged; give k != 1 (default 10)")
    expand_methods(o.methods, 1)
    with suites.build(o.benchmark, o) as bench:
        specs = [s for s in expand_methods(o.methods, bench.num_tasks) if s.single_task is None]
        if not specs:
            raise CLIError("--method: the robustness study needs registered methods (single_task runs are "
                           "not rescaled)")
        scaled_cfg = RunConfig.from_options(o, bench)
        base_cfg = dataclasses.replace(scaled_cfg, loss_scale_task=None, loss_scale=1.0)
        out = Path(o.out)
        t0 = time.perf_counter()
        runs = {}
        for tag, cfg in (("base", base_cfg), ("scaled", scaled_cfg)):
            runs[tag] = train_and_report(bench, specs, cfg, o, command, title=f"{bench.name} ({tag})",
                                         print_table=False, out=out / tag)["results"]
        table, payload = robustness_table(bench, runs["base"], runs["scaled"])
        wall = time.perf_counter() - t0
        task = bench.task_names[scaled_cfg.loss_scale_task]
        header = (f"{bench.name}: abs Δ = |scaled − base| of test metrics (selected on validation) when task "
                  f"{scaled_cfg.loss_scale_task} ({task}) loss is ×{o.loss_scale:g} (same seeds; pp = percentage "
                  "points)")
        md = "\n".join([f"# Robustness to loss scale: {bench.name}", "", f"Command: `{command}`", "",
                        *[f"- {n}" for n in bench.notes],
                        f"- {scaled_cfg.steps} steps, batch {o.batch_size}, Adam lr {o.lr}; seeds {o.seeds}",
                        "", header + ".", "", table, "",
                        "Full reports: [base](base/results.md), [scaled](scaled/results.md).",
                        f"Total wall time: {wall:.1f} s.", ""])
        (out / "results.md").write_text(md)
        payload_all = {"benchmark": bench.name, "command": command, "loss_scale_task": scaled_cfg.loss_scale_task,
                       "loss_scale_task_name": task, "loss_scale": o.loss_scale, "methods": payload,
                       "runs": runs, "total_wall_s": wall}
        (out / "results.json").write_text(json.dumps(records.to_json(payload_all), indent=1))
        print(header + "\n\n" + table + f"\n\nWritten: {out / 'results.md'}, {out / 'results.json'}")
        return payload_all
