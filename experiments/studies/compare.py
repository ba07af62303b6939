"""Compare methods on one benchmark: every (method, seed) run, then the results table.

Single-task runs (``--method single_task``) train first: their mean validation metrics become
the reference of every other run's model selection (the best validation Δm), and their test
metrics the baseline of the table's Δm. Without them the baseline is equal weighting (labelled).
"""

from __future__ import annotations

import time
from pathlib import Path

DESCRIPTION = "Train methods x seeds on one benchmark and write the results table, plots and records."
USAGE = """examples:
  python -m experiments multimnist                      # the main job (defaults below)
  python -m experiments multimnist --tiny               # seconds: a smoke test
  python -m experiments qm9 --method all single_task --seeds 0-2 --schedule plateau
"""

__all__ = ["run", "train", "train_and_report", "single_task_reference"]


def single_task_reference(bench, results) -> dict | None:
    """Mean validation metrics of the single-task runs (task t's metrics from run t), or None."""
    import numpy as np
    tmi = bench.task_of_metric_index()
    by_task: dict = {}
    for r in results:
        if r.get("single_task") is not None and r.get("status") == "ok":
            by_task.setdefault(r["single_task"], []).append(r)
    if len(by_task) != bench.num_tasks:
        return None
    return {m: float(np.mean([r["val"][m] for r in by_task[t]])) for m, t in tmi.items()}


def train_and_report(bench, specs, cfg, o, command: str, *, title=None, extra_md: str = "", print_table=True,
                     out=None, **run_kw) -> dict:
    """Trains ``specs`` x ``o.seeds`` (single-task first) and writes the reports into ``out``."""
    from experiments import records, report
    from experiments.train import run_experiment
    out = Path(out or o.out)
    t0 = time.perf_counter()
    single = [s for s in specs if s.single_task is not None]
    multi = [s for s in specs if s.single_task is None]
    st_seeds = (o.extra or {}).get("single_task_seeds") or o.seeds
    results = run_experiment(bench, single, st_seeds, cfg, out, **run_kw) if single else []
    ref = single_task_reference(bench, results)
    results += run_experiment(bench, multi, o.seeds, cfg, out, reference=ref, **run_kw) if multi else []
    summary = report.write_reports(out, bench, results, records.load_histories(out, results), command=command,
                                   total_wall_s=time.perf_counter() - t0, title=title, extra_md=extra_md,
                                   plots=o.plots)
    if print_table:
        print(summary["markdown"])
    return dict(summary, results=results)


def train(benchmark: str, methods, seeds, out, *, tiny: bool = False, reference=None, bench=None,
          **overrides) -> list[dict]:
    """Trains ``methods`` x ``seeds`` on ``benchmark`` (its defaults, ``--tiny``'s with ``tiny``,
    then ``overrides``: ``lr=``, ``weight_decay=``, ``schedule=``, ``steps=``, ...) into ``out``
    and returns the result records, one per run. ``r["val"]`` holds the validation metrics at the
    step selected on validation (what a tuning study compares); ``r["test"]`` must not be used
    for any choice. ``bench``: an already built :class:`Benchmark` to reuse (data loaded once).

    >>> results = train("qm9", ["equal"], [0, 1], "/tmp/tune/lr1e-3", tiny=True, lr=1e-3)  # doctest: +SKIP
    >>> [r["val"]["mu_mae"] for r in results]                                            # doctest: +SKIP
    """
    from experiments import suites
    from experiments.runs import RunConfig, expand_methods
    from experiments.train import run_experiment
    o = suites.options(benchmark, tiny=tiny, quiet=overrides.pop("quiet", True), **overrides)
    own = bench is None
    bench = bench or suites.build(benchmark, o)
    try:
        specs = expand_methods(list(methods), bench.num_tasks)
        return run_experiment(bench, specs, list(seeds), RunConfig.from_options(o, bench), out, reference=reference)
    finally:
        if own:
            bench.close()


def add_flags(parser):
    g = parser.add_argument_group("compare")
    g.add_argument("--single-task-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="seeds of the single-task runs (default: --seeds); fewer seeds make the baseline "
                        "cheaper where T single-task networks cost T times a multi-task run (QM9: 11)")
    return ("single_task_seeds",)


def run(o, command: str) -> dict:
    from experiments import suites
    from experiments.runs import RunConfig, expand_methods
    expand_methods(o.methods, 1)  # unknown names fail before any data is loaded
    with suites.build(o.benchmark, o) as bench:
        specs = expand_methods(o.methods, bench.num_tasks)
        cfg = RunConfig.from_options(o, bench)
        summary = train_and_report(bench, specs, cfg, o, command)
    extra = getattr(suites.module(o.benchmark), "report", None)  # e.g. qm9_mpnn's throughput estimate
    if extra is not None:
        print(extra({"runs": summary["results"]}))
    return summary
