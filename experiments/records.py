"""What a run leaves on disk: its result (``result.json``), its history (``history.json``) and
TensorBoard event files; JSON conversion; reading runs back.

``result.json`` (``"record_version": 2``; version 1 had no version field and no ``selected``/
``last``/``per_task_best`` blocks) holds, for one (benchmark, method, priorities, seed):

* ``config`` (every hyper-parameter of :class:`experiments.runs.RunConfig` that shapes the run),
  ``seed``, ``method`` (label), ``base_method``, ``priorities``, ``single_task``;
* ``selected``: the evaluation chosen on the **validation** split (best validation Δm over the
  run's tasks, see :mod:`experiments.selection`) with its ``step``, ``val`` and ``test``
  metrics; ``last``: the same at the final step; ``val``/``test`` are the selected ones (the
  numbers tables report), ``val_last``/``test_last`` the final-step ones;
* ``per_task_best``: per task, its best validation step and value and the best-vs-final gap;
* ``status`` (``ok`` / ``diverged``), ``steps_done``, ``skipped_steps``, ``wall_time_s``,
  ``step_time_ms``, ``machine`` (platform, CPUs, load, JAX version and backend);
* ``nonconverged_steps``: applied steps on which the method's iterative solver (MGDA, CAGrad,
  UPGrad, Nash-MTL) reported ``converged`` False, i.e. stopped at its iteration cap short of its
  tolerance; ``solver_steps``: the applied steps that reported ``converged`` at all (0 for a
  method without an iterative solver, so ``nonconverged_steps`` is then 0 too).

``history.json`` holds the per-step training losses, weights α, loss scales, learning rate and
every evaluation (validation and test metrics and losses at each ``eval_every`` step).
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["RECORD_VERSION", "to_json", "new_history", "machine", "write_run", "read_json",
           "load_histories", "write_tensorboard"]

RECORD_VERSION = 2


def to_json(x: Any) -> Any:
    """numpy/jax values -> JSON-safe Python (non-finite floats -> None)."""
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return to_json(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, np.floating):
        return to_json(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x


def new_history(task_names: Sequence[str]) -> dict:
    """An empty history: per-step lists and the evaluations (``evals``)."""
    return {"task_names": list(task_names), "step": [], "loss": [], "weight": [], "scale": [],
            "finite": [], "lr": [], "info": {}, "val": [], "probe": []}


def machine() -> dict:
    """Where a run ran: platform, CPU count, 1-minute load, JAX version and backend."""
    import jax
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_1min": load, "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:8]}


def write_run(run_dir: os.PathLike, result: dict, history: dict, *, tensorboard: bool = True) -> None:
    """``result.json`` and ``history.json`` (and TensorBoard events) of one run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "history.json", json.dumps(to_json(history)))
    write_text_atomic(run_dir / "result.json", json.dumps(to_json(result), indent=1))
    if tensorboard:
        write_tensorboard(run_dir / "tb", history)


def write_text_atomic(path: os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a full disk
    or a kill mid-write leaves the earlier file intact, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: os.PathLike) -> Optional[dict]:
    """The JSON object at ``path``; None when absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def load_histories(out: os.PathLike, results: Sequence[dict]) -> dict:
    """{(method label, seed): history} read back from the run folders under ``out``."""
    hist = {}
    for r in results:
        rel = r.get("run_dir") or f"runs/{r['method']}/seed{r['seed']}"
        h = read_json(Path(out) / rel / "history.json")
        if h is not None:
            hist[(r["method"], r["seed"])] = h
    return hist


def write_tensorboard(directory: os.PathLike, history: dict) -> None:
    """The training curves of ``history`` as TensorBoard event files in ``directory``
    (``tensorboard --logdir <out>/runs``): per-task train loss, weight α, loss scale, the
    learning rate and every validation/test metric. The folder is rewritten from the history,
    so a resumed run leaves one consistent set of events."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: the JSON history is the record
        return
    import shutil
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    names = history.get("task_names") or []
    w = SummaryWriter(logdir=str(directory), flush_secs=3600)
    try:
        for i, step in enumerate(history.get("step", [])):
            for key in ("loss", "weight", "scale"):
                row = history[key][i] if i < len(history.get(key, [])) else None
                for t, v in enumerate(row or []):
                    if v is not None and math.isfinite(v):
                        w.add_scalar(f"train_{key}/{names[t] if t < len(names) else t}", v, step)
            lr = history.get("lr") or []
            if i < len(lr) and lr[i] is not None:
                w.add_scalar("train/learning_rate", lr[i], step)
        for ev in history.get("val", []):
            for split in ("metrics", "test_metrics"):
                tag = "val" if split == "metrics" else "test"
                for k, v in (ev.get(split) or {}).items():
                    if v is not None and math.isfinite(v):
                        w.add_scalar(f"{tag}/{k}", v, ev["step"])
    finally:
        w.close()
