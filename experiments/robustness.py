"""Robustness to loss scale (the paper's Table 1, right half): rerun every method with one
task's loss multiplied by k (default: task 0, ×10) and report |Δ| of every metric.

    python -m experiments.robustness                                  # MultiMNIST, 6 methods
    python -m experiments.robustness --benchmark qm9 --loss-scale-task homo --loss-scale 10
    python -m experiments.robustness --method equal imtl_h --seeds 0-2

Both runs of a method use the same seed (same initialization and batch order), so the
difference comes from the rescaled loss alone. |Δ| per metric is |mean_scaled − mean_base| over
seeds; "mean rel. abs Δ %" averages |Δ|/|base| over the metrics. A method whose shared update is
invariant to loss scale (IMTL-G's direction, Theorem 2; IMTL-L's scales absorb k) should show
|Δ| near run-to-run noise; equal weighting should not. The optimizer (Adam) is itself
invariant to a *global* gradient scale, which is why only one task is rescaled.

Writes ``<out>/base/`` and ``<out>/scaled/`` (each a full report) and ``<out>/results.{md,json}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments import cli

DEFAULT_METHODS = ["equal", "uncertainty", "gls", "imtl_l", "imtl_g", "imtl_h"]
DEFAULTS = dict(methods=None, seeds=[0], steps=600, batch_size=128, lr=1e-3, eval_every=0,
                loss_scale_task="0", loss_scale=10.0)
PROG = "python -m experiments.robustness"


def _flags(parser):
    from experiments.harness import BENCHMARK_BUILDERS
    parser.add_argument("--benchmark", default="multimnist", choices=sorted(BENCHMARK_BUILDERS))
    parser.add_argument("--dataset", default="multimnist",
                        choices=["multimnist", "multifashion", "multi_fashion_mnist"],
                        help="with --benchmark multimnist: which overlay data set")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--max-eval", type=int, default=None)


def robustness_table(bench, base_results, scaled_results) -> tuple[str, dict]:
    """Markdown table of |Δ| per metric (methods x metrics) and the JSON payload."""
    from experiments.report import fmt_metric, is_percent_metric
    names = [s.name for s in bench.metric_specs()]

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


def main(argv=None) -> int:
    def body():
        from experiments import harness, report
        parser = cli.make_parser(PROG, __doc__.split("\n")[0])
        _flags(parser)
        s = cli.parse_settings(parser, argv, dict(DEFAULTS, out="runs/robustness"),
                               extra_keys=("benchmark", "dataset", "image_size", "max_eval"))
        if s.loss_scale == 1.0:
            raise cli.CLIError("--loss-scale 1 leaves the losses unchanged; give k != 1 (default 10)")
        harness.expand_methods(s.methods, 1)  # unknown names fail before any data is loaded
        bench = harness.build_benchmark(s.extra["benchmark"], s)
        try:
            import imtl_jax
            names = s.methods or [m for m in DEFAULT_METHODS if m in imtl_jax.methods.method_names()]
            specs = [sp for sp in harness.expand_methods(names, bench.num_tasks) if sp.task is None]
            if not specs:
                raise cli.CLIError("--method: the robustness study needs registered methods "
                                   "(single_task runs are not rescaled)")
            cfg_scaled = harness.settings_to_run_config(s, bench)
            cfg_base = dataclasses.replace(cfg_scaled, loss_scale_task=None, loss_scale=1.0)
            out = Path(s.out)
            t0 = time.perf_counter()
            task = bench.task_names[cfg_scaled.loss_scale_task]
            cmd = harness.command_line(PROG, argv)
            runs = {}
            for tag, cfg in (("base", cfg_base), ("scaled", cfg_scaled)):
                res = harness.run_experiment(bench, specs, s.seeds, cfg, out / tag)
                report.write_reports(out / tag, bench, res, harness.load_histories(out / tag, res),
                                     command=cmd, title=f"{bench.name} ({tag})")
                runs[tag] = res
            table, payload = robustness_table(bench, runs["base"], runs["scaled"])
            wall = time.perf_counter() - t0
            header = (f"{bench.name}: abs Δ = |scaled − base| of test metrics when task {cfg_scaled.loss_scale_task} "
                      f"({task}) loss is ×{s.loss_scale:g} (same seeds; pp = percentage points)")
            md = "\n".join([f"# Robustness to loss scale: {bench.name}", "", f"Command: `{cmd}`", "",
                            *[f"- {n}" for n in bench.notes],
                            f"- {cfg_scaled.steps} steps, batch {s.batch_size}, Adam lr {s.lr}; seeds {s.seeds}",
                            "", header + ".", "", table, "",
                            "Full reports: [base](base/results.md), [scaled](scaled/results.md).",
                            f"Total wall time: {wall:.1f} s.", ""])
            (out / "results.md").write_text(md)
            (out / "results.json").write_text(json.dumps(harness._jsonable({
                "benchmark": bench.name, "command": cmd, "loss_scale_task": cfg_scaled.loss_scale_task,
                "loss_scale_task_name": task, "loss_scale": s.loss_scale, "methods": payload,
                "runs": {"base": runs["base"], "scaled": runs["scaled"]}, "total_wall_s": wall}), indent=1))
            print(header + "\n\n" + table + f"\n\nWritten: {out / 'results.md'}, {out / 'results.json'}")
        finally:
            if bench.cleanup is not None:
                bench.cleanup()

    return cli.run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
