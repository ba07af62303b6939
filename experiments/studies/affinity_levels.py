"""Task affinity at both levels, side by side: is the grouping study's affinity a property of
the tasks or of the level it is measured at?

Trains the all-task equal-weighting network of the grouping study (every seed) and records,
every ``--probe-every`` steps, the cosine matrix of the per-task gradients w.r.t. the shared
representation z and w.r.t. the shared parameters θ, on the same parameters and batch
(:func:`experiments.studies.grouping.affinity_probe` at each level; training batches only).
Reports per level the mean matrix's off-diagonal range, the median per-probe spread and the
groupings :func:`imtl_jax.propose_groups` makes from it for each k in ``--ks``.

The committed run (``results/grouping/affinity_levels.json``) used the grouping study's data,
model and schedule::

    python -m experiments affinity_levels --split random --hidden 256 256 256 --schedule constant \\
        --max-train 5000 --max-eval 2000 --steps 600 --eval-every 100 --batch-size 128 --seeds 0-2 \\
        --quiet --no-plots --no-tensorboard --checkpoint-every 0 --out <dir>
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DESCRIPTION = ("Task affinity of the all-task equal-weighting network measured at z and at θ, side by side, "
               "with the groupings proposed from each.")
DEFAULT_BENCHMARK = "qm9"
DEFAULTS = {"seeds": [0, 1, 2]}
TINY = {"seeds": [0]}
#: always the equal-weighting network, and no plots: ``--method`` and ``--no-plots`` are not offered.
UNUSED_FLAGS = ("methods", "plots")
USAGE = """examples:
  python -m experiments affinity_levels --tiny
  python -m experiments affinity_levels --steps 600 --max-train 5000 --probe-every 10
"""
LEVELS = ("representation", "parameters")

__all__ = ["run", "two_level_probe", "LEVELS"]


def add_flags(parser):
    g = parser.add_argument_group("affinity levels")
    g.add_argument("--probe-every", type=int, default=None, metavar="N",
                   help="probe the gradient cosines at both levels every N steps (default: 10; with --tiny: 1)")
    g.add_argument("--ks", type=int, nargs="+", default=None, metavar="K",
                   help="numbers of groups to propose from each level's affinity (default: 2 3 4)")
    return ("probe_every", "ks")


def two_level_probe(lookahead_lr: float):
    """``probe(program)`` for :func:`experiments.train.run_experiment`: the (T, T) cosine matrix
    of the per-task gradients at each of :data:`LEVELS`, on the same parameters and batch."""
    from experiments.studies.grouping import affinity_probe
    makers = {lvl: affinity_probe(lookahead_lr, lvl) for lvl in LEVELS}

    def make(program):
        fns = {lvl: m(program) for lvl, m in makers.items()}

        def fn(params, method_state, batch, key):
            return {lvl: f(params, method_state, batch, key)["cosines"] for lvl, f in fns.items()}
        return fn
    return make


def run(o, command: str) -> dict:
    import imtl_jax
    from experiments import records, suites
    from experiments.errors import CLIError
    from experiments.runs import RunConfig, RunSpec
    from experiments.train import run_experiment

    every = o.extra.get("probe_every") or (1 if o.tiny else 10)
    if every < 1:
        raise CLIError("--probe-every must be >= 1")
    out = Path(o.out)
    t0 = time.perf_counter()
    with suites.build(o.benchmark, o) as bench:
        names = list(bench.task_names)
        ks = [k for k in (o.extra.get("ks") or [2, 3, 4]) if 1 <= k <= len(names)]
        if not ks:
            raise CLIError(f"--ks: every k must be in 1..{len(names)} (the number of tasks)")
        cfg = RunConfig.from_options(o, bench)
        res = run_experiment(bench, [RunSpec("equal")], o.seeds, cfg, out, probe=two_level_probe(cfg.lr),
                             probe_every=every)
        hist = records.load_histories(out, res)
    report = {"study": "affinity_levels", "benchmark": o.benchmark, "command": command, "tasks": names,
              "seeds": list(o.seeds), "config": cfg.describe(), "probe_every": every}
    off = ~np.eye(len(names), dtype=bool)
    lines = ["| level | probes | off-diagonal mean cosine: min … max | median per-probe std | "
             + " | ".join(f"groups, k = {k}" for k in ks) + " |", "|---|---:|---|---:|" + "---|" * len(ks)]
    for lvl in LEVELS:
        c = np.array([p[lvl] for h in hist.values() for p in h["probe"]], np.float64)
        m = c.mean(0)
        spread = float(np.median(c.std(0, ddof=1)[off])) if len(c) > 1 else float("nan")
        groups = {k: [[names[i] for i in g] for g in imtl_jax.propose_groups(m, k)] for k in ks}
        report[lvl] = {"probes": len(c), "mean": m.tolist(), "offdiag_min": float(m[off].min()),
                       "offdiag_max": float(m[off].max()), "per_probe_std_median": spread, "groups": groups}
        lines.append(f"| {lvl} | {len(c)} | {m[off].min():.4f} … {m[off].max():.4f} | {spread:.4f} | "
                     + " | ".join(" / ".join(", ".join(g) for g in groups[k]) for k in ks) + " |")
    report["machine"] = records.machine()
    report["total_wall_s"] = time.perf_counter() - t0
    text = (f"# Task affinity at z and θ ({o.benchmark})\n\nCommand: `{command}`\n\n"
            f"Equal-weighting all-task network, seeds {', '.join(map(str, o.seeds))}, {cfg.steps} steps; "
            f"cosines probed every {every} steps on training batches.\n\n" + "\n".join(lines) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records.to_json(report), indent=1))
    (out / "results.md").write_text(text)
    print(text)
    return report
