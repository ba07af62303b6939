r"""Per-task best-validation tracking and an opt-in policy for tasks that overfit early.

Impartial training (IMTL-G/H) makes the same first-order progress along every task's gradient
direction, including a task that is already past its best on held-out data. This module keeps,
per task, the best validation metric so far, when it was reached, and how many evaluations have
passed without improvement; and (opt-in) turns that into IMTL-G/H ``priorities``:

.. math:: p_t = \begin{cases} r\,b_t & \text{if task } t \text{ has not improved for }
          \text{patience evaluations} \\ b_t & \text{otherwise} \end{cases}

with base priorities ``b`` (ones by default) and a reduction ``r`` in [0, 1). With IMTL-G the
shared update ``g`` satisfies ``g . u_t = C p_t``: a small ``p_t`` means the shared update makes
(almost) no first-order progress on task t, while the other tasks keep equal shares among
themselves, i.e. the task's contribution is frozen rather than dropped (dropping it could move
the shared parameters against it). IMTL-G requires ``p_t > 0``, so use ``0 < r``; ``r = 0``
freezes exactly with a loss-weighting method that takes the priorities as loss weights. When
the task improves again (a new best), its priority is restored.

Everything is pure and jittable; the state is a :class:`TaskPolicyState`. Typical use::

    policy = imtl_jax.plateau_policy(patience=3, reduced=0.1)
    pstate = policy.init(num_tasks)
    for step in ...:
        grads, mstate, aux = train_step(params, mstate, batch, priorities=pstate.priorities)
        if step % eval_every == 0:
            pstate = policy.update(validation_losses, pstate, step=step)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from imtl_jax._validation import check_float_array


class TaskPolicyState(NamedTuple):
    """Per-task validation tracking (all (T,) unless noted).

    Attributes:
      best: the best validation metric so far (+inf, or -inf when maximizing, before any).
      best_step: the ``step`` at which ``best`` was reached (-1 before any).
      since_best: evaluations since the last improvement.
      last: the last validation metric (NaN before any).
      evaluations: int32 scalar, the number of updates.
      base: the base priorities ``b``.
      priorities: the priorities to pass to the step: ``r b_t`` for plateaued tasks, ``b_t``
        otherwise.
      maximize: bool, True for tasks whose metric is higher-is-better.
    """

    best: jax.Array
    best_step: jax.Array
    since_best: jax.Array
    last: jax.Array
    evaluations: jax.Array
    base: jax.Array
    priorities: jax.Array
    maximize: jax.Array


class TaskPolicy(NamedTuple):
    """An optax-style pair (see :func:`plateau_policy`).

    Attributes:
      init: ``init(num_tasks, dtype=float32, base=None) -> TaskPolicyState``.
      update: ``update(metrics, state, step=None) -> TaskPolicyState``; ``metrics`` (T,) are the
        validation metrics of one evaluation, ``step`` the training step (defaults to the
        evaluation index).
      patience, reduced, min_delta, maximize: the settings.
    """

    init: Callable[..., TaskPolicyState]
    update: Callable[..., TaskPolicyState]
    patience: int
    reduced: float
    min_delta: float
    maximize: Union[bool, tuple]


def plateau_policy(patience: int, *, reduced: float = 0.1, min_delta: float = 0.0,
                   maximize: Union[bool, Sequence[bool]] = False) -> TaskPolicy:
    """Lowers a task's priority once its validation metric stops improving; restores it after.

    A task *improves* at an evaluation when its metric beats its best so far by more than
    ``min_delta`` (``metric < best - min_delta``, or ``>`` when maximizing); a NaN metric never
    improves. After ``patience`` evaluations in a row without improvement its priority becomes
    ``reduced * base_t``; at its next improvement it is ``base_t`` again. The other tasks'
    priorities are untouched.

    Args:
      patience: evaluations without improvement before the priority drops (int >= 1).
      reduced: the factor ``r`` in [0, 1) applied to a plateaued task's base priority. IMTL-G/H
        need ``r > 0``; ``r = 0`` freezes the task for methods that use priorities as loss
        weights.
      min_delta: the least change that counts as an improvement (>= 0, in the metric's units).
      maximize: False for losses/errors (lower is better), True for accuracies; or one bool per
        task.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> policy = imtl_jax.plateau_policy(patience=2, reduced=0.1)
      >>> state = policy.init(2)
      >>> for val in ([1.0, 1.0], [0.9, 1.1], [0.8, 1.2], [0.7, 0.95]):
      ...     state = policy.update(jnp.array(val), state)
      ...     print(state.priorities)
      [1. 1.]
      [1. 1.]
      [1.  0.1]
      [1. 1.]
    """
    if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
        raise ValueError(f"`patience` must be an int >= 1 (evaluations without improvement), got {patience!r}.")
    if isinstance(reduced, bool) or not isinstance(reduced, (int, float)) or not 0 <= reduced < 1:
        raise ValueError(f"`reduced` must be a float in [0, 1) (the plateaued task's priority factor; "
                         f"IMTL-G/H need > 0), got {reduced!r}.")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ValueError(f"`min_delta` must be a float >= 0, got {min_delta!r}.")
    if isinstance(maximize, (bool, np.bool_)):
        maximize_spec: Union[bool, tuple] = bool(maximize)
    else:
        maximize_spec = tuple(bool(m) for m in maximize)
        if not maximize_spec:
            raise ValueError("`maximize` given per task must have one bool per task, got an empty sequence.")
    patience, reduced, min_delta = int(patience), float(reduced), float(min_delta)

    def sign(num_tasks: int) -> np.ndarray:
        if isinstance(maximize_spec, tuple):
            if len(maximize_spec) != num_tasks:
                raise ValueError(f"`maximize` has {len(maximize_spec)} entries but there are "
                                 f"{num_tasks} tasks; give one bool per task.")
            return np.where(np.array(maximize_spec), -1.0, 1.0)
        return np.full(num_tasks, -1.0 if maximize_spec else 1.0)

    def init(num_tasks: int, dtype: Any = jnp.float32, base: Optional[jax.Array] = None) -> TaskPolicyState:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
            raise ValueError(f"`num_tasks` must be an int >= 1, got {num_tasks!r}.")
        n = int(num_tasks)
        s = jnp.asarray(sign(n), dtype)  # +1: lower is better
        if base is None:
            base = jnp.ones((n,), dtype)
        base = check_float_array(base, "base", ndim=1).astype(dtype)
        if base.shape != (n,):
            raise ValueError(f"`base` must have shape ({n},), got {base.shape}.")
        return TaskPolicyState(best=s * jnp.inf, best_step=jnp.full((n,), -1, jnp.int32),
                               since_best=jnp.zeros((n,), jnp.int32), last=jnp.full((n,), jnp.nan, dtype),
                               evaluations=jnp.zeros((), jnp.int32), base=base, priorities=base,
                               maximize=jnp.asarray(sign(n) < 0))

    def update(metrics: jax.Array, state: TaskPolicyState, step: Optional[jax.Array] = None) -> TaskPolicyState:
        if not isinstance(state, TaskPolicyState):
            raise TypeError(f"`state` must be a TaskPolicyState (from policy.init), got {type(state).__name__}.")
        metrics = check_float_array(metrics, "metrics", ndim=1)
        n = state.best.shape[0]
        if metrics.shape != (n,):
            raise ValueError(f"`metrics` must have shape ({n},) (one validation metric per task), "
                             f"got {metrics.shape}.")
        metrics = metrics.astype(state.best.dtype)
        s = jnp.asarray(sign(n), state.best.dtype)
        step = state.evaluations if step is None else jnp.asarray(step, jnp.int32)
        # In "lower is better" coordinates: improved when s*m < s*best - min_delta.
        improved = (s * metrics < s * state.best - min_delta) & jnp.isfinite(metrics)
        best = jnp.where(improved, metrics, state.best)
        best_step = jnp.where(improved, step, state.best_step)
        since = jnp.where(improved, 0, state.since_best + 1)
        priorities = jnp.where(since >= patience, reduced * state.base, state.base)
        return TaskPolicyState(best=best, best_step=best_step, since_best=since, last=metrics,
                               evaluations=state.evaluations + 1, base=state.base,
                               priorities=priorities, maximize=state.maximize)

    return TaskPolicy(init=init, update=update, patience=patience, reduced=reduced,
                      min_delta=min_delta, maximize=maximize_spec)


def best_final_gap(state: TaskPolicyState) -> jax.Array:
    """Per task, how much worse the last validation metric is than the best: ``last - best``
    for lower-is-better metrics, ``best - last`` when maximizing (0 = ended at its best;
    positive = overfit or drifted past its best).

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> policy = imtl_jax.plateau_policy(patience=5)
      >>> state = policy.init(2)
      >>> for val in ([1.0, 1.0], [0.5, 0.9], [0.4, 1.3]):
      ...     state = policy.update(jnp.array(val), state)
      >>> imtl_jax.best_final_gap(state).round(3), state.best_step
      (Array([0. , 0.4], dtype=float32), Array([2, 1], dtype=int32))
    """
    if not isinstance(state, TaskPolicyState):
        raise TypeError(f"`state` must be a TaskPolicyState, got {type(state).__name__}.")
    s = jnp.where(state.maximize, -1.0, 1.0).astype(state.best.dtype)
    return s * (state.last - state.best)
