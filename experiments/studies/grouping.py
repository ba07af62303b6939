"""Task grouping vs loss balancing (issue 15): is balancing a substitute for grouping, a
complement, or neither?

1. Single-task runs (the Δm baseline) and one network for all tasks with each method
   (default: equal weighting and IMTL-H). While the all-task runs train, a probe records every
   ``--affinity-every`` steps the cosine matrix of the per-task gradients at the shared
   representation (:func:`imtl_jax.with_affinity`, the same (T, F) matrix the step forms) and
   the first-order look-ahead affinity. The task affinity is the mean cosine over the probes of
   the **equal-weighting** all-task runs, all seeds (training batches only: no validation or
   test data enters the grouping).
2. For each k in ``--ks``: the grouping :func:`imtl_jax.propose_groups` proposes, and a random
   grouping with the same group sizes (:func:`imtl_jax.random_groups`, ``--random-seed``).
   Every group gets its own network (the same architecture, steps and batch size as the
   all-task network, heads for its tasks only), trained with each method, every seed.
3. The table: test Δm% against single-task (negative = better) per configuration, mean ±
   95% Student-t interval over seeds, and the paired per-seed difference to the all-task
   equal-weighting network. Each network is selected on its own validation Δm (its tasks).

Compute is not matched: a k-grouping trains k networks of the all-task size (k times the
parameters and about k times the training FLOPs of one all-task network; single-task: T
times); the table states both for every row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

DESCRIPTION = "Groupings proposed from training-time gradient affinity vs one balanced network (QM9)."
DEFAULT_BENCHMARK = "qm9"
DEFAULTS = {"methods": ["equal", "imtl_h"], "seeds": [0, 1, 2]}
TINY = {"seeds": [0, 1]}
#: the study draws no plots: ``--no-plots`` is not offered.
UNUSED_FLAGS = ("plots",)
USAGE = """examples:
  python -m experiments grouping --tiny                    # seconds: k = 2 only, 2 seeds
  python -m experiments grouping --steps 1000 --max-train 5000 --ks 2 3 4
"""

__all__ = ["run", "affinity_probe", "grouping_table"]


def add_flags(parser):
    g = parser.add_argument_group("grouping study")
    g.add_argument("--ks", type=int, nargs="+", default=None, metavar="K",
                   help="numbers of groups to propose (default: 2 3 4; with --tiny: 2)")
    g.add_argument("--affinity-every", type=int, default=None, metavar="N",
                   help="probe the gradient cosines of the all-task runs every N steps (default: 10; --tiny: 1)")
    g.add_argument("--random-seed", type=int, default=0,
                   help="seed of the random groupings (default: 0; k is added to it)")
    g.add_argument("--affinity-level", choices=("representation", "parameters"), default="representation",
                   help="gradients the cosines are taken of: w.r.t. the shared representation z (free in the "
                        "step) or the shared parameters (T encoder backward passes per probe; with linear heads "
                        "the z-gradients are parallel to the head vectors) (default: representation)")
    return ("ks", "affinity_every", "random_seed", "affinity_level")


def affinity_probe(lookahead_lr: float, level: str = "representation"):
    """``probe(program)`` for :func:`experiments.train.run_experiment`: the step's (T, T) cosine
    matrix and look-ahead affinity at the current parameters and batch (no update), of the
    per-task gradients w.r.t. ``z`` (``level="representation"``) or the shared parameters."""
    def make(program):
        import imtl_jax
        base = imtl_jax.methods.get_method("equal")
        if level == "parameters":
            base = base._replace(name="equal_parameters", level="parameters")
        step = imtl_jax.mtl_step(program.pure.encoder, program.pure.task_losses,
                                 imtl_jax.with_affinity(base, lookahead_lr=lookahead_lr))

        def fn(params, method_state, batch, key):
            del method_state
            _, st, aux = step(params, step.init(params), batch, key=key)
            return {"cosines": aux.info["cosines"], "lookahead": st.affinity.lookahead}
        return fn
    return make


def _param_count(bench) -> int:
    import jax
    from flax import nnx
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(nnx.state(bench.make_model(0), nnx.Param))))


def _sub_options(o, targets):
    return dataclasses.replace(o, targets=list(targets))


def run(o, command: str) -> dict:
    import imtl_jax
    from experiments import records, suites
    from experiments.runs import RunConfig, RunSpec, expand_methods, single_task_spec
    from experiments.studies.compare import single_task_reference
    from experiments.train import run_experiment

    ks = o.extra.get("ks") or ([2] if o.tiny else [2, 3, 4])
    every = o.extra.get("affinity_every") or (1 if o.tiny else 10)
    rseed = int(o.extra.get("random_seed") or 0)
    level = o.extra.get("affinity_level") or "representation"
    methods = [m for m in o.methods if m not in ("single_task",)]
    expand_methods(methods, 1)
    out = Path(o.out)
    t0 = time.perf_counter()
    with suites.build(o.benchmark, o) as bench:
        names, T = list(bench.task_names), bench.num_tasks
        if any(not 1 <= k <= T for k in ks):
            from experiments.errors import CLIError
            raise CLIError(f"--ks: every k must be in 1..{T} (the number of tasks)")
        cfg = RunConfig.from_options(o, bench)
        params_all = _param_count(bench)
        single = run_experiment(bench, [single_task_spec(t, T) for t in range(T)], o.seeds, cfg, out / "single")
        ref = single_task_reference(bench, single)
        full = run_experiment(bench, [RunSpec(m) for m in methods], o.seeds, cfg, out / "all", reference=ref,
                              probe=affinity_probe(cfg.lr, level), probe_every=every)
        hist = records.load_histories(out / "all", full)
        src = "equal" if "equal" in methods else methods[0]
        cos = [np.asarray(p["cosines"], np.float64) for (m, _), h in hist.items() if m == src for p in h["probe"]]
        look = [np.asarray(p["lookahead"], np.float64) for (m, _), h in hist.items() if m == src
                for p in h["probe"]]
        affinity = np.mean(cos, axis=0)
        lookahead = np.nanmean(look, axis=0)
        hib, tom = bench.higher_is_better, bench.metric_tasks
        sizes_of = {}
        groupings = {}
        for k in ks:
            prop = imtl_jax.propose_groups(affinity, k)
            sizes_of[k] = tuple(len(g) for g in prop)
            groupings[("proposed", k)] = prop
            groupings[("random", k)] = imtl_jax.random_groups(T, sorted(sizes_of[k], reverse=True), seed=rseed + k)
    for (kind, k), groups in groupings.items():
        for gi, g in enumerate(groups):
            targets = [names[i] for i in g]
            with suites.build(o.benchmark, _sub_options(o, targets)) as sub:
                sub_ref = None if ref is None else {m: v for m, v in ref.items() if tom[m] in targets}
                run_experiment(sub, [RunSpec(m) for m in methods], o.seeds, cfg,
                               out / f"{kind}_k{k}" / f"group{gi}", reference=sub_ref)
    payload = {"study": "grouping", "benchmark": o.benchmark, "command": command, "tasks": names,
               "higher_is_better": dict(hib), "metric_tasks": dict(tom), "methods": methods, "ks": list(ks),
               "seeds": list(o.seeds), "config": cfg.describe(), "affinity_source": f"{src}, all-task network",
               "affinity_every": every, "affinity_level": level, "affinity": affinity.tolist(),
               "lookahead": lookahead.tolist(),
               "probes": len(cos), "groupings": {f"{kind}_k{k}": [list(g) for g in gs]
                                                 for (kind, k), gs in groupings.items()},
               "params_all_task_network": params_all, "notes": bench.notes, "machine": records.machine(),
               "total_wall_s": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records.to_json(payload), indent=1))
    payload = rebuild(out)
    print(payload["markdown"])
    return payload


def load_runs(folder) -> list:
    """Every ``runs/<label>/seed<k>/result.json`` under ``folder``."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("runs/*/seed*/result.json"))]


def rebuild(out) -> dict:
    """Recomputes the table of ``out/results.json`` from the run folders under ``out`` (no
    training) and rewrites ``results.json`` and ``results.md``:
    ``python -m experiments.studies.grouping OUT``."""
    from experiments import records
    out = Path(out)
    payload = json.loads((out / "results.json").read_text())
    names, hib, tom = payload["tasks"], payload["higher_is_better"], payload["metric_tasks"]
    single, full = load_runs(out / "single"), load_runs(out / "all")
    assembled: dict = {}  # (kind, k, method, seed) -> test metrics of every task, from its group's network
    for key, groups in payload["groupings"].items():
        kind, k = key.rsplit("_k", 1)
        for gi in range(len(groups)):
            for r in load_runs(out / key / f"group{gi}"):
                assembled.setdefault((kind, int(k), r["method"], r["seed"]), {}).update(r["test"])
    own = [(r, {m: v for m, v in r["test"].items() if m in tom and tom[m] == names[r["single_task"]]})
           for r in single if r.get("single_task") is not None]
    single_test = {m: float(np.mean([mt[m] for _, mt in own if m in mt])) for m in hib}
    rows = _rows(full, assembled, own, single_test, hib, payload["methods"], payload["ks"], len(names),
                 payload["params_all_task_network"], payload["seeds"])
    payload.update(single_task_test=single_test, rows=rows)
    (out / "results.json").write_text(json.dumps(records.to_json(payload), indent=1))
    groups_md = "\n".join(f"- {key.replace('_k', ' k=')}: " + " | ".join(", ".join(names[i] for i in g) for g in gs)
                          for key, gs in payload["groupings"].items())
    cfg = payload["config"]
    text = (f"# Grouping study ({payload['benchmark']})\n\nCommand: `{payload['command']}`\n\n"
            + "\n".join(f"- {n}" for n in payload["notes"])
            + f"\n- {cfg['steps']} steps per network, batch {cfg['batch_size']}, Adam lr {cfg['lr']} "
            f"({cfg['schedule']}), seeds {', '.join(map(str, payload['seeds']))}; affinity: mean gradient cosine "
            f"({payload.get('affinity_level', 'representation')} level) over {payload['probes']} probes of the "
            f"{payload['affinity_source']} runs (every "
            f"{payload['affinity_every']} steps)\n\nGroupings:\n{groups_md}\n\n"
            f"{grouping_table(rows, payload['seeds'])}\n")
    (out / "results.md").write_text(text)
    return dict(payload, markdown=text)


def _rows(full, assembled, own, single_test, hib, methods, ks, T, params_all, seeds) -> list:
    from experiments.metrics import delta_m
    from experiments.stats import mean_ci, paired_diff_ci

    def dm(metrics):
        return delta_m(metrics, single_test, hib) if all(m in metrics for m in hib) else float("nan")

    per_seed = {}
    by_seed: dict = {}
    for r, mt in own:  # each single-task run contributes its own task's metrics only
        by_seed.setdefault(r["seed"], {}).update(mt)
    per_seed[("single-task", T, "linear")] = {s: dm(v) for s, v in by_seed.items()}
    for m in methods:
        per_seed[("all tasks", 1, m)] = {r["seed"]: dm(r["test"]) for r in full if r["method"] == m}
    for kind in ("proposed", "random"):
        for k in ks:
            for m in methods:
                per_seed[(f"{kind} k={k}", k, m)] = {s: dm(assembled.get((kind, k, m, s), {})) for s in seeds}
    base = per_seed.get(("all tasks", 1, "equal"))
    rows = []
    for (label, nets, m), vals in per_seed.items():
        mean, half, n = mean_ci(list(vals.values()))
        row = {"config": label, "method": m, "networks": nets, "params": nets * params_all,
               "relative_compute": nets, "delta_m": mean, "delta_m_ci": half, "n": n, "per_seed": vals}
        if base is not None and label != "single-task":
            d, dh, _ = paired_diff_ci(vals, base)
            row.update(diff_vs_all_equal=d, diff_vs_all_equal_ci=dh)
        if label.startswith("proposed"):
            d, dh, _ = paired_diff_ci(vals, per_seed[(label.replace("proposed", "random"), nets, m)])
            row.update(diff_vs_random=d, diff_vs_random_ci=dh)
        rows.append(row)
    return rows


def grouping_table(rows, seeds) -> str:
    from experiments.stats import format_ci
    lines = [f"Test Δm% vs single-task (negative = better), mean ± 95% t-interval over n = {len(seeds)} seeds; "
             "paired per-seed differences to the all-task equal-weighting network and, for proposed groupings, to "
             "the random grouping with the same k and group sizes (negative = the row is better). "
             "Networks: how many all-task-sized networks the row trains (≈ parameters and training compute "
             "relative to one all-task network).", "",
             "| configuration | method | networks | parameters | Δm% | Δm% − all-task EW | Δm% − random (same k) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        diff = format_ci(r["diff_vs_all_equal"], r["diff_vs_all_equal_ci"], signed=True) \
            if "diff_vs_all_equal" in r else "–"
        rnd = format_ci(r["diff_vs_random"], r["diff_vs_random_ci"], signed=True) if "diff_vs_random" in r else "–"
        lines.append(f"| {r['config']} | {r['method']} | {r['networks']} | {r['params']:,} | "
                     f"{format_ci(r['delta_m'], r['delta_m_ci'], signed=True)} | {diff} | {rnd} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print(rebuild(sys.argv[1])["markdown"])
