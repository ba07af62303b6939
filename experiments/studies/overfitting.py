"""Tasks that overfit at different times (issue 15): impartial IMTL-H vs IMTL-H with the
plateau policy vs equal weighting.

Default setting: QM9 with a small training subset (``--max-train 2000``), so that the 11
targets overfit at different steps. Runs (every seed):

* single-task runs (the Δm baseline and the selection reference);
* ``equal`` and ``imtl_h`` (impartial: the same first-order progress on every task, to the end);
* ``imtl_h_policy_p<N>`` (one per ``--patience`` value N): IMTL-H whose priorities follow
  :func:`imtl_jax.plateau_policy` on the per-task validation metric: a task that has not
  improved for N evaluations gets
  priority ``--reduced`` (its share of the shared update's progress nearly frozen), and 1 again
  when it improves. The policy is replayed from the stored evaluations at each evaluation, so a
  resumed run takes the same decisions.

Reported: test Δm% vs single-task at the best-validation step and at the last step (mean ±
95% t-interval over seeds, paired difference to equal weighting), and per task the gap between
its best and its final validation metric (``per_task_best`` of the loop: Δm% points against the
single-task reference, >= 0) with the step of its best evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DESCRIPTION = "Tasks that overfit at different times: IMTL-H vs IMTL-H + plateau priority policy vs EW."
DEFAULT_BENCHMARK = "qm9"
DEFAULTS = {"methods": ["equal", "imtl_h"], "seeds": [0, 1, 2], "max_train": 2000, "steps": 3000,
            "eval_every": 100}
TINY = {"seeds": [0, 1], "steps": 12, "eval_every": 2}
#: the study draws no plots: ``--no-plots`` is not offered.
UNUSED_FLAGS = ("plots",)
USAGE = """examples:
  python -m experiments overfitting --tiny
  python -m experiments overfitting --max-train 1000 --steps 2000 --eval-every 50 --patience 3 10
"""

POLICY = "imtl_h_policy"

__all__ = ["run", "policy_priorities", "policy_label", "POLICY"]


def policy_label(patience: int) -> str:
    """The run label of the policy with this patience (its folder under ``runs/``)."""
    return f"{POLICY}_p{patience}"


def add_flags(parser):
    g = parser.add_argument_group("overfitting study")
    g.add_argument("--patience", type=int, nargs="+", default=None, metavar="N",
                   help="evaluations without improvement before a task's priority drops; several values "
                        "train one policy run each (default: 3)")
    g.add_argument("--reduced", type=float, default=0.1,
                   help="a plateaued task's IMTL-H priority, in (0, 1) (default: 0.1)")
    return ("patience", "reduced")


def _task_metrics(bench) -> list:
    """The first metric of each task (the one the policy watches) and whether higher is better."""
    return [bench.metric_names_of_task(t)[0] for t in range(bench.num_tasks)]


def policy_priorities(evals, metric_names, maximize, patience, reduced):
    """Replays :func:`imtl_jax.plateau_policy` over ``evals``; returns the final state and the
    priorities after every evaluation."""
    import jax.numpy as jnp
    import imtl_jax
    policy = imtl_jax.plateau_policy(patience, reduced=reduced, maximize=tuple(maximize))
    state = policy.init(len(metric_names))
    trail = []
    for ev in evals:
        vals = [ev["metrics"].get(n) for n in metric_names]
        vals = jnp.asarray([np.nan if v is None else float(v) for v in vals], jnp.float32)
        state = policy.update(vals, state, int(ev["step"]))
        trail.append(np.asarray(state.priorities).tolist())
    return state, trail


def run(o, command: str) -> dict:
    from experiments import records, suites
    from experiments.metrics import delta_m
    from experiments.runs import RunConfig, RunSpec, expand_methods, single_task_spec
    from experiments.stats import format_ci, mean_ci, paired_diff_ci
    from experiments.studies.compare import single_task_reference
    from experiments.train import run_experiment

    patiences = [int(p) for p in (o.extra.get("patience") or [3])]
    if any(p < 1 for p in patiences):
        from experiments.errors import CLIError
        raise CLIError("--patience values must be >= 1")
    by_label = {policy_label(p): p for p in patiences}
    reduced = float(o.extra.get("reduced") if o.extra.get("reduced") is not None else 0.1)
    if not 0 < reduced < 1:
        from experiments.errors import CLIError
        raise CLIError("--reduced must be in (0, 1): IMTL-H priorities must stay positive")
    methods = [m for m in o.methods if m != "single_task"]
    expand_methods(methods, 1)
    out = Path(o.out)
    t0 = time.perf_counter()
    with suites.build(o.benchmark, o) as bench:
        T, names = bench.num_tasks, list(bench.task_names)
        cfg = RunConfig.from_options(o, bench)
        watched = _task_metrics(bench)
        maximize = [bench.higher_is_better[n] for n in watched]

        def on_eval(spec, seed, evals, priorities):
            if spec.label not in by_label:
                return None
            _, trail = policy_priorities(evals, watched, maximize, by_label[spec.label], reduced)
            return np.asarray(trail[-1], np.float32)

        single = run_experiment(bench, [single_task_spec(t, T) for t in range(T)], o.seeds, cfg, out)
        ref = single_task_reference(bench, single)
        specs = [RunSpec(m) for m in methods] + [RunSpec("imtl_h", tuple([1.0] * T), lab) for lab in by_label]
        multi = run_experiment(bench, specs, o.seeds, cfg, out, reference=ref, on_eval=on_eval)
        hib, tom = bench.higher_is_better, bench.metric_tasks
        notes = list(bench.notes)
    single_test = {m: float(np.mean([r["test"][m] for r in single if r["single_task"] == names.index(tom[m])]))
                   for m in hib}
    labels = [s.label for s in specs]
    hist = records.load_histories(out, multi)
    summary = {}
    for lab in labels:
        rs = [r for r in multi if r["method"] == lab]
        sel = {r["seed"]: delta_m(r["test"], single_test, hib) for r in rs}
        last = {r["seed"]: delta_m(r["test_last"], single_test, hib) for r in rs}
        gaps = {t: [r["per_task_best"][t]["gap"] for r in rs] for t in names}
        best_steps = {t: [r["per_task_best"][t]["best_step"] for r in rs] for t in names}
        mean_gap = {r["seed"]: float(np.nanmean([np.nan if r["per_task_best"][t]["gap"] is None
                                                 else r["per_task_best"][t]["gap"] for t in names])) for r in rs}
        entry = {"selected": sel, "last": last, "gaps": gaps, "best_steps": best_steps, "mean_gap": mean_gap}
        if lab in by_label:
            reduced_frac = []
            for r in rs:
                _, trail = policy_priorities(hist[(lab, r["seed"])]["val"], watched, maximize, by_label[lab],
                                             reduced)
                reduced_frac.append((np.asarray(trail) < 1).mean(axis=0).tolist())
            entry["reduced_fraction"] = np.mean(reduced_frac, axis=0).tolist()
        summary[lab] = entry
    base = summary.get("equal")
    lines = [f"Test Δm% vs single-task (negative = better), mean ± 95% t-interval over n = {len(o.seeds)} seeds; "
             "paired per-seed difference to equal weighting (negative = better than EW). Mean gap: mean over "
             "tasks of (final − best) validation score, Δm% points of the task's metric vs single-task (>= 0).", "",
             "| method | Δm% selected step | − EW | Δm% last step | − EW | mean best→final gap |",
             "|---|---:|---:|---:|---:|---:|"]
    for lab in labels:
        e = summary[lab]
        cells = []
        for key in ("selected", "last"):
            cells.append(format_ci(*mean_ci(list(e[key].values()))[:2], signed=True))
            cells.append(format_ci(*paired_diff_ci(e[key], base[key])[:2], signed=True) if base else "–")
        cells.append(format_ci(*mean_ci(list(e["mean_gap"].values()))[:2]))
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    pols = [lab for lab in labels if lab in by_label]
    lines += ["", "Per task: best→final validation gap (Δm% points, mean ± 95% CI) @ mean step of the best "
                  "validation evaluation; for each policy run, the fraction of evaluations the task spent at "
                  "reduced priority (mean over seeds).", "",
              "| task | " + " | ".join(labels) + "".join(f" | reduced ({lab})" for lab in pols) + " |",
              "|---|" + "---:|" * (len(labels) + len(pols))]
    for ti, t in enumerate(names):
        cells = [f"{format_ci(*mean_ci(summary[lab]['gaps'][t])[:2])} @ {np.mean(summary[lab]['best_steps'][t]):.0f}"
                 for lab in labels]
        cells += [f"{summary[lab]['reduced_fraction'][ti]:.2f}" for lab in pols]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    text = (f"# Overfitting study ({o.benchmark})\n\nCommand: `{command}`\n\n" + "\n".join(f"- {n}" for n in notes)
            + f"\n- {cfg.steps} steps, batch {cfg.batch_size}, Adam lr {cfg.lr}, evaluation every {cfg.eval_every} "
            f"steps, seeds {', '.join(map(str, o.seeds))}; policy: patience {'/'.join(map(str, patiences))} "
            f"evaluations, reduced priority {reduced} "
            f"on each task's validation metric ({watched[0]}, ...)\n\n{table}\n")
    payload = {"study": "overfitting", "benchmark": o.benchmark, "command": command, "tasks": names,
               "seeds": list(o.seeds), "config": cfg.describe(), "patience": patiences, "reduced": reduced,
               "single_task_test": single_test, "summary": summary, "notes": notes,
               "machine": records.machine(), "total_wall_s": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records.to_json(payload), indent=1))
    (out / "results.md").write_text(text)
    print(text)
    return payload
