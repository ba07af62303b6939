"""Partial labels: the task mask shared by the training step, the aggregator and the weightings.

A task mask ``m`` (T,) says which tasks have labels in the current batch. Under ``jax.jit``
shapes are static, so a masked step cannot drop the absent tasks; instead every weighting that
supports masks (``Weighting.supports_task_mask``) runs *masked math*: the same computation with
the absent tasks neutralised so that the present tasks get exactly the weights of the method
run on the sub-problem of the present tasks only (e.g. IMTL-G replaces the absent rows and
columns of its cosine system by identity rows with a zero right-hand side; a softmax runs over
the present entries; a mean divides by the number of present tasks). The helpers below are the
pieces those weightings share; each method file keeps only its own math.

Conventions (tested for every supporting method against the sub-problem, tests/test_task_mask.py):

* the inputs of a masked task (its gradient row, its loss) are ignored, whatever their value:
  selected away with ``jnp.where`` (never multiplied by 0, since ``0 * nan = nan``);
* a masked task's weight is exactly 0;
* a masked task's per-task state entries are returned unchanged; shared entries (step
  counters) advance as they do in the sub-problem.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from imtl_jax._method import Weighting, WeightingOutput, check_output_form
from imtl_jax.methods._common import compute_dtype, normalized_gramian


def check_task_mask(task_mask: Any, num_tasks: int) -> jax.Array:
    """Validates a task mask and returns it as a (T,) bool array (traced values allowed).

    Accepts bool or 0/1 numbers (nonzero means present). Raises ``ValueError`` for a wrong
    shape and, when the mask is concrete, for a mask with no present task (a traced all-absent
    mask gives zero weights, zero gradients and an unchanged state).
    """
    if isinstance(task_mask, (list, tuple)):
        task_mask = np.asarray(task_mask)
    if not hasattr(task_mask, "shape") or not hasattr(task_mask, "dtype"):
        raise TypeError(f"`task_mask` must be a (T,) bool or 0/1 array, got {type(task_mask).__name__}.")
    if tuple(task_mask.shape) != (num_tasks,):
        raise ValueError(f"`task_mask` must have shape ({num_tasks},) (one entry per task), got "
                         f"{tuple(task_mask.shape)}.")
    dtype = np.dtype(task_mask.dtype)
    is_bool = dtype == np.bool_
    if not (is_bool or np.issubdtype(dtype, np.number)):
        raise TypeError(f"`task_mask` must be bool or numeric (0/1), got dtype {dtype}.")
    mask = jnp.asarray(task_mask)
    mask = mask if is_bool else mask != 0
    if not isinstance(mask, jax.core.Tracer) and not bool(np.any(np.asarray(mask))):
        raise ValueError("`task_mask` has no present task: at least one task needs labels in the "
                         "batch (skip the step instead).")
    return mask


def mask_supported_methods() -> tuple[str, ...]:
    """The registered method names whose weighting supports ``task_mask``."""
    from imtl_jax.methods import get_method, method_names
    return tuple(n for n in method_names() if get_method(n).weighting.supports_task_mask)


def require_mask_support(weighting: Weighting, name: str) -> None:
    """Raises ``ValueError`` naming the method and the methods that support masks."""
    if not getattr(weighting, "supports_task_mask", False):
        raise ValueError(
            f"method {name!r} (weighting {weighting.name!r}) does not support `task_mask` "
            f"(partial labels). Methods that do: {', '.join(mask_supported_methods())}. "
            "Pass task_mask=None, or pick one of those.")


def weigh(weighting: Weighting, grads, losses, state, key, priorities,
          task_mask: Optional[jax.Array], name: str) -> WeightingOutput:
    """``weighting.weigh`` with an optional mask.

    Without a mask this is exactly ``weighting.weigh(grads, losses, state, key, priorities)``
    (no extra operation is traced; the output's form is checked against the weighting's flags,
    statically: ``check_output_form``). With one, the weighting gets ``task_mask=`` and the output
    is guarded: masked weights are exactly 0 and, when no task is present (a traced all-absent
    mask), every weight is 0 and the state is returned unchanged.
    """
    if task_mask is None:
        out = weighting.weigh(grads, losses, state, key, priorities)
        check_output_form(out, weighting, name)
        return out
    require_mask_support(weighting, name)
    out = weighting.weigh(grads, losses, state, key, priorities, task_mask=task_mask)
    check_output_form(out, weighting, name)
    present = jnp.any(task_mask)
    weights = jnp.where(task_mask & present, out.weights, jnp.zeros_like(out.weights))
    new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(present, n, o), out.state, state)
    coords, direction = out.coordinate_weights, out.direction
    if coords is not None:  # per-coordinate weights: masked rows exactly 0
        coords = jnp.where((task_mask & present)[:, None], coords, jnp.zeros((), coords.dtype))
    if direction is not None:  # no task present: no update
        direction = jnp.where(present, direction, jnp.zeros((), direction.dtype))
    return WeightingOutput(weights, new_state, out.info, coords, direction)


# --- pieces of masked math -----------------------------------------------------------------


def rows(grads: jax.Array, mask: jax.Array) -> jax.Array:
    """``grads`` with the rows of masked tasks set to 0 (selected, so NaN rows are dropped)."""
    return jnp.where(mask[:, None], grads, jnp.zeros((), grads.dtype))


def entries(x: jax.Array, mask: jax.Array, fill: Any = 0.0) -> jax.Array:
    """``x`` (T,) with the entries of masked tasks replaced by ``fill``."""
    return jnp.where(mask, x, jnp.asarray(fill, x.dtype))


def count(mask: jax.Array, dtype: Any) -> jax.Array:
    """T', the number of present tasks, as a ``dtype`` scalar."""
    return jnp.sum(mask).astype(dtype)


def softmax(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the present entries of ``x``; masked entries get exactly 0."""
    z = jnp.where(mask, x, -jnp.inf)
    top = jnp.max(z)
    e = jnp.where(mask, jnp.exp(z - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    return e / jnp.sum(e)


def maximum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``max`` over the present entries of ``x`` (masked entries cannot win)."""
    return jnp.max(jnp.where(mask, x, -jnp.inf))


def compact_index(mask: jax.Array) -> jax.Array:
    """For each task its position among the present tasks (``cumsum(mask) - 1``): present task
    ``t`` is task ``compact_index[t]`` of the sub-problem."""
    return jnp.cumsum(mask.astype(jnp.int32)) - 1


def keep(new: jax.Array, old: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """``new`` where the task of index ``axis`` is present, ``old`` where it is masked."""
    axis = axis % jnp.ndim(new)
    shape = [1] * jnp.ndim(new)
    shape[axis] = mask.shape[0]
    return jnp.where(mask.reshape(shape), new, old)


def keep_pairs(new: jax.Array, old: jax.Array, mask: jax.Array) -> jax.Array:
    """For a (T, T) per-pair leaf: ``new`` where both tasks are present, else ``old``."""
    return jnp.where(mask[:, None] & mask[None, :], new, old)


def keep_vectors(new: Any, old: Any, mask: jax.Array) -> Any:
    """Every (T,) leaf of ``new`` is kept at the masked entries of ``old`` (an optimizer state
    over (T,) parameters: per-task moments); other leaves (counters) advance."""
    num_tasks = mask.shape[0]

    def one(n, o):
        if jnp.shape(n) == (num_tasks,):
            return jnp.where(mask, n, o)
        return n

    return jax.tree_util.tree_map(one, new, old)


def mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean of ``x`` (T,) over the present entries (masked entries, NaN included, ignored)."""
    return jnp.sum(entries(x, mask)) / count(mask, x.dtype)


def uniform(mask: jax.Array, dtype: Any) -> jax.Array:
    """``1 / T'`` on the present entries, exactly 0 on the masked ones."""
    return entries(jnp.ones(mask.shape, dtype), mask) / count(mask, dtype)


def gramian(grads: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``normalized_gramian`` of the present rows, padded: ``(M, scale)`` where the present
    block of ``M`` and ``scale`` are exactly those of the sub-problem (the zero rows change
    neither ``max|G|`` nor any product) and the masked rows and columns are exactly 0."""
    return normalized_gramian(rows(grads, mask).astype(compute_dtype(grads.dtype)))


def decouple(matrix: jax.Array, mask: jax.Array) -> jax.Array:
    """A (T, T) ``matrix`` with the masked rows and columns replaced by those of the identity:
    a block-diagonal system whose present block is the sub-problem's and whose masked
    variables are decoupled (a solver started at their known solution keeps them there, and a
    Cholesky factor keeps exact zeros off the blocks)."""
    both = mask[:, None] & mask[None, :]
    return jnp.where(both, matrix, jnp.eye(mask.shape[0], dtype=matrix.dtype))


def present_first(mask: jax.Array) -> jax.Array:
    """The task indices with the present tasks first (in order), then the masked ones: entry
    ``k < T'`` is the task that is task ``k`` of the sub-problem (the inverse of
    :func:`compact_index` on the present tasks)."""
    return jnp.argsort((~mask).astype(jnp.int32), stable=True).astype(jnp.int32)


def project_simplex(y: jax.Array, mask: jax.Array) -> jax.Array:
    """The Euclidean projection of the present entries of ``y`` onto the simplex of the present
    tasks (masked entries exactly 0): the sub-problem's ``_common.project_simplex``, with the
    same sorted prefix sums, so the same numbers."""
    num_present = jnp.sum(mask)
    u = -jnp.sort(-jnp.where(mask, y, -jnp.inf))          # present entries first, descending
    ks = jnp.arange(1, y.shape[0] + 1)
    valid = ks <= num_present
    u = jnp.where(valid, u, 0.0)
    thetas = (jnp.cumsum(u) - 1.0) / ks.astype(y.dtype)
    rho = jnp.sum(valid & (u > thetas))                   # >= 1 when a task is present
    theta = thetas[jnp.maximum(rho, 1) - 1]
    return entries(jnp.maximum(y - theta, 0.0), mask)
