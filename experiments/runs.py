"""What to run: run specs (method + priorities), the run configuration, where runs live.

A :class:`RunSpec` is one column of a table: a method name, optional task ``priorities``
(traced by the step, so every priority vector of one method shares one compiled program) and
its label. ``single_task`` expands to T specs of the constant-weights method :data:`LINEAR`
with one-hot priorities e_t; the priorities sweep uses ``linear`` with ``(1, r)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from experiments.errors import CLIError

__all__ = ["PARAMS_SUFFIX", "LINEAR", "RunSpec", "RunConfig", "expand_methods", "run_dir", "resolve_method",
           "task_index", "single_task_spec"]


def _make_linear():
    import jax.numpy as jnp
    from imtl_jax import Method, Weighting, WeightingOutput
    from imtl_jax.methods.equal import IDENTITY

    def weigh(grads, losses, state, key, priorities):
        del grads, key
        w = jnp.ones_like(losses) if priorities is None else jnp.asarray(priorities, losses.dtype)
        return WeightingOutput(w, state, {})

    return Method("linear", IDENTITY, Weighting(name="linear", init=lambda num_tasks, dtype=None: (),
                                                 weigh=weigh, needs_grads=False, weights_heads=True))


_LINEAR = None


def LINEAR():
    """Linear scalarization ``Σ_t p_t L_t`` with ``p`` the run's priorities (ones when None): identity
    loss scaling, weights on the whole loss (heads included), no per-task gradients (the cost of
    equal weighting). One-hot ``p = e_t`` is single-task training of task t; ``p = 1`` is equal
    weighting. Replaces the former ``single_task_method`` and the priorities sweep's own method."""
    global _LINEAR
    if _LINEAR is None:
        _LINEAR = _make_linear()
    return _LINEAR


PARAMS_SUFFIX = "@params"


def resolve_method(name: str):
    """A registered :class:`imtl_jax.Method`, or :func:`LINEAR` for ``linear``.

    ``<gradient method>@params`` is that method at the parameter level (its weights computed
    from the gradients w.r.t. the shared parameters, T encoder VJPs), as the published QM9
    tables run the gradient methods; e.g. ``nash_mtl@params``.
    """
    import imtl_jax
    if name == "linear":
        return LINEAR()
    if name.endswith(PARAMS_SUFFIX):
        base = imtl_jax.methods.get_method(name[: -len(PARAMS_SUFFIX)])
        if not base.weighting.needs_grads:
            raise CLIError(f"--method {name}: {base.name} weights the losses, not gradients; "
                           f"{PARAMS_SUFFIX} applies to gradient methods only")
        return base._replace(name=name, level="parameters")
    return imtl_jax.methods.get_method(name)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One method configuration: ``method`` (registered name or ``linear``), ``priorities``
    (None or T positive numbers), ``name`` (its label in folders and tables) and, for
    single-task runs, the ``single_task`` index."""

    method: str
    priorities: Optional[tuple] = None
    name: Optional[str] = None
    single_task: Optional[int] = None

    @property
    def label(self) -> str:
        return self.name or self.method

    def fingerprint(self) -> dict:
        return {"method": self.method, "priorities": list(self.priorities) if self.priorities else None}


def single_task_spec(t: int, num_tasks: int) -> RunSpec:
    p = tuple(1.0 if i == t else 0.0 for i in range(num_tasks))
    return RunSpec("linear", p, f"single_task_{t}", single_task=t)


def expand_methods(names: Sequence[str], num_tasks: int) -> list[RunSpec]:
    """``--method`` values -> run specs (``all`` = every registered method; ``single_task`` = one
    run per task; ``linear`` = constant weights). Raises :class:`CLIError` for unknown names."""
    import imtl_jax
    registered = list(imtl_jax.methods.method_names())
    out: list[RunSpec] = []
    for n in names:
        if n == "all":
            out.extend(RunSpec(m) for m in registered)
        elif n == "single_task":
            out.extend(single_task_spec(t, num_tasks) for t in range(num_tasks))
        elif n in registered or n == "linear":
            out.append(RunSpec(n))
        elif n.endswith(PARAMS_SUFFIX) and n[: -len(PARAMS_SUFFIX)] in registered:
            resolve_method(n)  # a loss method with @params fails here, before any data is loaded
            out.append(RunSpec(n))
        else:
            raise CLIError(f"--method: unknown method {n!r}; choose from {', '.join(registered)}, "
                           "linear, all, single_task")
    seen, uniq = set(), []
    for s in out:
        if s.label not in seen:
            seen.add(s.label)
            uniq.append(s)
    return uniq


@dataclasses.dataclass
class RunConfig:
    """Hyper-parameters and options of a run (the flags of :mod:`experiments.cli`).

    ``parallel_seeds``: how many runs of one method train as one vmapped program (0: all seeds
    and priority vectors of the method at once; 1: one by one; None: 0, except 1 for a benchmark
    with ``vmap_on_cpu=False`` on a CPU backend).
    ``checkpoint_every`` None: automatic (every ~minute of training; see ``train.py``); 0: never.
    ``interrupt_at`` (tests only): request a stop (as SIGTERM does) once this many steps are done.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    eval_every: int = 0
    checkpoint_every: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    max_skipped: int = 20
    loss_scale_task: Optional[int] = None
    loss_scale: float = 1.0
    quiet: bool = True
    keep_checkpoints: int = 2
    parallel_seeds: Optional[int] = 0
    tensorboard: bool = True
    interrupt_at: Optional[int] = None

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (not ``steps``: runs may be extended)."""
        return {"batch_size": self.batch_size, "lr": self.lr, "loss_scale_task": self.loss_scale_task,
                "loss_scale": self.loss_scale, "optimizer": "adam", "weight_decay": self.weight_decay,
                "schedule": self.schedule, "warmup": self.warmup, "eval_every": self.eval_every}

    def describe(self) -> dict:
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "optimizer": "adam",
                "weight_decay": self.weight_decay, "schedule": self.schedule, "warmup": self.warmup,
                "plateau_patience": self.plateau_patience, "plateau_factor": self.plateau_factor,
                "eval_every": self.eval_every, "loss_scale_task": self.loss_scale_task,
                "loss_scale": self.loss_scale}

    @staticmethod
    def from_options(o, bench) -> "RunConfig":
        """Resolves ``--steps``/``--epochs`` and ``--loss-scale-task`` for ``bench``."""
        if o.batch_size > len(bench.train):
            raise CLIError(f"--batch-size {o.batch_size} exceeds the {len(bench.train)} training examples; "
                           "lower --batch-size")
        steps = o.steps
        if steps is None:
            steps = max(1, int(math.ceil(o.epochs * (len(bench.train) // o.batch_size))))
        task = task_index(o.loss_scale_task, bench.task_names)
        return RunConfig(steps=steps, batch_size=o.batch_size, lr=o.lr, weight_decay=o.weight_decay,
                         schedule=o.schedule, warmup=o.warmup, plateau_patience=o.plateau_patience,
                         plateau_factor=o.plateau_factor, eval_every=o.eval_every,
                         checkpoint_every=o.checkpoint_every, resume=o.resume, overwrite=o.overwrite,
                         max_skipped=o.max_skipped, loss_scale_task=task,
                         loss_scale=o.loss_scale if task is not None else 1.0, quiet=o.quiet,
                         parallel_seeds=o.parallel_seeds, tensorboard=o.tensorboard)


def task_index(value, task_names) -> Optional[int]:
    """A task given by index or name -> its index (None stays None); CLIError if unknown."""
    if value is None:
        return None
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        idx = int(value)
    elif value in task_names:
        return list(task_names).index(value)
    else:
        raise CLIError(f"--loss-scale-task: unknown task {value!r}; give an index 0..{len(task_names) - 1} "
                       f"or one of {', '.join(task_names)}")
    if not 0 <= idx < len(task_names):
        raise CLIError(f"--loss-scale-task: index {idx} out of range; this benchmark has "
                       f"{len(task_names)} tasks (0..{len(task_names) - 1})")
    return idx


def run_dir(out: os.PathLike, spec: RunSpec, seed: int) -> Path:
    return Path(out) / "runs" / spec.label / f"seed{seed}"
