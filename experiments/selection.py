"""Model selection on the validation split, as the papers do it.

Every ``eval_every`` steps the loop evaluates the validation (and test) split. The reported
test metrics are those of the evaluation with the best **validation** score; the test split
never takes part in the choice. The score of an evaluation is the Δm% of its validation
metrics against a reference (lower is better)::

    score = 100/K Σ_k (-1)^{δ_k} (M_k - R_k) / |R_k|,   δ_k = 1 where higher is better,

over the metrics of the run's tasks: every task for a multi-task run, task t alone for a
single-task run (one-hot priorities). The reference R is the single-task runs' mean validation
metrics when they are known: the compare study trains them first and hands their metrics to
every other run, so all methods of a table are selected against the same baseline (the Δm of
the tables). Without single-task runs R is the run's own first evaluation; any fixed positive
reference only re-weights the metrics (for one metric per task it does not matter at all).
Every evaluation is stored (``history.json``), so a run can be re-selected later. Ties go to the
earlier step.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

__all__ = ["score", "select", "per_task_best", "task_metric_names"]


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def score(metrics: Mapping[str, float], reference: Mapping[str, float], higher_is_better: Mapping[str, bool],
          names: Sequence[str]) -> float:
    """Δm% of ``metrics`` against ``reference`` over ``names`` (lower = better; inf if a metric is missing)."""
    total = 0.0
    for n in names:
        m, r = metrics.get(n), reference.get(n)
        if not _finite(m) or not _finite(r):
            return math.inf
        rel = (m - r) / (abs(r) if r != 0 else 1.0)
        total += -rel if higher_is_better[n] else rel
    return 100.0 * total / max(len(names), 1)


def task_metric_names(metric_tasks: Mapping[str, str], task: str) -> list[str]:
    """The metric names of ``task`` (``metric_tasks``: {metric: task})."""
    return [m for m, t in metric_tasks.items() if t == task]


def select(evals: Sequence[dict], higher_is_better: Mapping[str, bool], names: Sequence[str],
           reference: Optional[Mapping[str, float]] = None) -> Optional[int]:
    """Index into ``evals`` (each ``{"step", "metrics": validation metrics, ...}``) of the best
    validation score over ``names``; None when there is no evaluation."""
    if not evals:
        return None
    ref = reference if reference is not None else evals[0]["metrics"]
    best, best_i = math.inf, len(evals) - 1
    for i, ev in enumerate(evals):
        s = score(ev["metrics"], ref, higher_is_better, names)
        if s < best:
            best, best_i = s, i
    return best_i


def per_task_best(evals: Sequence[dict], higher_is_better: Mapping[str, bool], metric_tasks: Mapping[str, str],
                  reference: Optional[Mapping[str, float]] = None) -> dict:
    """Per task: its best validation step and metrics, the final ones and the gap between them.

    ``gap`` is the task's final validation score minus its best one (Δm% points against the
    reference, >= 0; large = the task was past its best on held-out data when training ended).
    """
    if not evals:
        return {}
    ref = reference if reference is not None else evals[0]["metrics"]
    out = {}
    for task in dict.fromkeys(metric_tasks.values()):
        names = task_metric_names(metric_tasks, task)
        i = select(evals, higher_is_better, names, ref)
        best = score(evals[i]["metrics"], ref, higher_is_better, names)
        final = score(evals[-1]["metrics"], ref, higher_is_better, names)
        out[task] = {"best_step": evals[i]["step"], "best_val": {n: evals[i]["metrics"].get(n) for n in names},
                     "final_step": evals[-1]["step"],
                     "final_val": {n: evals[-1]["metrics"].get(n) for n in names},
                     "gap": (final - best) if math.isfinite(final) and math.isfinite(best) else None}
    return out
