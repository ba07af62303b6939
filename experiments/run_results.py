"""What a finished run records: its ``result.json`` (selection on validation, test metrics at
the selected and the last step, counters, timing, configuration, machine) and the one-line
summary; the solver's convergence record of a history. Used by :mod:`experiments.train`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import records, selection

__all__ = ["solver_record", "finish"]


def _solver_record(history: dict) -> tuple[int, int]:
    """(applied steps whose solver reported ``converged``, those of them it reported False);
    (0, 0) for a method without an iterative solver. ``converged`` covers the newest steps
    (a run resumed from a checkpoint of a version without it covers fewer)."""
    conv = (history.get("info") or {}).get("converged") or []
    finite = history["finite"][len(history["finite"]) - len(conv):] if conv else []
    return sum(1 for f in finite if f), sum(1 for c, f in zip(conv, finite) if f and not c)


def _nonconverged(history: dict) -> int:
    """Applied (finite) steps whose solver reported ``converged`` False."""
    return _solver_record(history)[1]


def _finish(bench, run, cfg, out: Path, reference, log, metric_names) -> dict:
    h = run.history
    evals = h["val"]
    names = metric_names(bench, run.spec)
    i = selection.select(evals, bench.higher_is_better, names, reference)
    sel, last = evals[i], evals[-1]
    tm = run.timing
    n_t = tm["step_time_count"]
    steps_done = h["step"][-1] if h["step"] else run.start
    solver_steps, run.nonconverged = _solver_record(h)
    result = {
        "record_version": records.RECORD_VERSION,
        "benchmark": bench.name, "method": run.spec.label, "base_method": run.spec.method,
        "priorities": list(run.spec.priorities) if run.spec.priorities else None,
        "final_priorities": None if run.priorities is None else run.priorities.tolist(),
        "single_task": run.spec.single_task, "seed": run.seed, "tasks": list(bench.task_names),
        "run_dir": str(run.dir.relative_to(out)),
        "status": run.status, "message": run.message, "complete": run.status == "ok",
        "steps_planned": cfg.steps, "steps_done": steps_done if run.status != "ok" else cfg.steps,
        "skipped_steps": run.skipped, "nonconverged_steps": run.nonconverged, "solver_steps": solver_steps,
        "resumed_from": run.resumed_from, "corrupt_checkpoints": run.corrupt,
        "selection": {"criterion": "best validation Δm% over " + ("the task's metrics" if run.spec.single_task
                      is not None else "every task's metrics"),
                      "reference": "single-task validation metrics" if reference is not None else "first evaluation",
                      "metrics": names},
        "selected": {"step": sel["step"], "val": sel["metrics"], "test": sel["test_metrics"]},
        "last": {"step": last["step"], "val": last["metrics"], "test": last["test_metrics"]},
        "val": sel["metrics"], "test": sel["test_metrics"], "val_losses": sel["losses"],
        "test_losses": sel["test_losses"], "val_last": last["metrics"], "test_last": last["test_metrics"],
        "per_task_best": selection.per_task_best(evals, bench.higher_is_better, bench.metric_tasks, reference),
        "final_weights": h["weight"][-1] if h["weight"] else None,
        "final_scales": h["scale"][-1] if h["scale"] else None,
        "wall_time_s": tm["wall_before_s"], "group_size": tm.get("group_size", 1),
        "step_time_ms": 1e3 * tm["step_time_sum"] / n_t if n_t else None, "first_step_s": tm["first_step_s"],
        "config": cfg.describe(), "fingerprint": run.fingerprint, "machine": records.machine(),
    }
    if h.get("probe"):
        result["probe_summary"] = _probe_summary(h["probe"])
    result = records.to_json(result)
    records.write_run(run.dir, result, h, tensorboard=cfg.tensorboard)
    first_metric = names[0]
    log(f"{bench.name} {run.name}: {run.status}, {result['steps_done']} steps, {result['wall_time_s']:.1f} s; "
        f"selected step {sel['step']} of {last['step']} on validation; test {first_metric} "
        f"{sel['test_metrics'].get(first_metric)!s:.8} (last step {last['test_metrics'].get(first_metric)!s:.8})"
        + (f"; solver short of its tolerance on {run.nonconverged} of {solver_steps} steps" if solver_steps else ""))
    return result


def _probe_summary(probes: list) -> dict:
    out = {}
    for k in [k for k in probes[0] if k != "step"]:
        vals = [p[k] for p in probes if isinstance(p.get(k), (int, float))]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                      "last": float(vals[-1]), "n": len(vals)}
    return out


solver_record = _solver_record
finish = _finish
