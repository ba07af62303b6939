"""Task affinity of the grouping study's all-task EW networks at both levels, side by side.

Trains the study's all-task equal-weighting network (same data, model and schedule as
results/issue15_grouping, 3 seeds) and records every 10 steps the cosine matrix
of the per-task gradients w.r.t. the shared representation z and w.r.t. the shared parameters;
prints the mean matrices' off-diagonal range and the groupings propose_groups makes from each.

    PYTHONPATH=. python results/issue15_grouping/affinity_levels.py OUT_DIR
"""
import dataclasses
import json
import sys

import numpy as np

import imtl_jax
from experiments import benchmarks, cli, records
from experiments.runs import RunConfig, RunSpec
from experiments.train import run_experiment


def probe(program):
    base = imtl_jax.methods.get_method("equal")
    steps = {lvl: imtl_jax.mtl_step(program.pure.encoder, program.pure.task_losses, imtl_jax.with_affinity(
        base if lvl == "representation" else base._replace(name="equal_parameters", level="parameters")))
        for lvl in ("representation", "parameters")}

    def fn(params, method_state, batch, key):
        return {lvl: s(params, s.init(params), batch, key=key)[2].info["cosines"] for lvl, s in steps.items()}
    return fn


def main(out):
    argv = ["--split", "random", "--hidden", "256", "256", "256", "--schedule", "constant", "--max-train", "5000",
            "--max-eval", "2000", "--steps", "600", "--eval-every", "100", "--batch-size", "128", "--seeds", "0-2",
            "--quiet", "--no-plots", "--no-tensorboard", "--checkpoint-every", "0"]
    bmod = benchmarks.module("qm9")
    defaults = {**cli.BASE_DEFAULTS, **bmod.DEFAULTS["qm9"]}
    parser = cli.make_parser("affinity_levels", "", defaults, {})
    keys = benchmarks.add_flags(parser, "qm9")
    o = cli.parse_options(parser, argv, benchmark="qm9", study="affinity_levels", defaults=defaults, tiny={},
                          extra_keys=tuple(keys))
    o = dataclasses.replace(o, out=out)
    with benchmarks.build("qm9", o) as bench:
        names = list(bench.task_names)
        cfg = RunConfig.from_options(o, bench)
        res = run_experiment(bench, [RunSpec("equal")], o.seeds, cfg, out, probe=probe, probe_every=10)
        hist = records.load_histories(out, res)
    report = {"argv": argv, "tasks": names}
    for lvl in ("representation", "parameters"):
        c = np.array([p[lvl] for h in hist.values() for p in h["probe"]], np.float64)
        m, off = c.mean(0), ~np.eye(len(names), dtype=bool)
        report[lvl] = {"probes": len(c), "mean": m.tolist(), "offdiag_min": float(m[off].min()),
                       "offdiag_max": float(m[off].max()),
                       "per_probe_std_median": float(np.median(c.std(0, ddof=1)[off])),
                       "groups": {k: [[names[i] for i in g] for g in imtl_jax.propose_groups(m, k)] for k in (2, 3, 4)}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
