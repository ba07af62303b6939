"""optax aggregators: per-task updates stacked on a leading axis T -> one update."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from imtl_jax._method import (LossScaling, Method, PyTree, Weighting, check_update_form,
                              coordinate_weights_of, direction_of, unflatten_like)
from imtl_jax._validation import check_float_array
from imtl_jax.methods import _mask, get_method


class AggregatorState(NamedTuple):
    """State of :func:`aggregate` / :func:`imtl_g`.

    Attributes:
      weights: (T,) the weights used by the last update (zeros before the first).
      info: the weighting's diagnostics of the last update (e.g. ``common_projection``).
      method_state: the weighting's own state (``()`` for IMTL-G).
    """

    weights: jax.Array
    info: dict
    method_state: PyTree


def _stack_matrix(updates: PyTree, num_tasks: int) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(updates)
    if not leaves:
        raise ValueError("`updates` has no array leaves.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError("every leaf of `updates` must be floating point; found a leaf of "
                            f"dtype {jnp.result_type(leaf)} with shape {jnp.shape(leaf)}.")
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_tasks:
            raise ValueError(
                f"every leaf of `updates` must have the task axis T={num_tasks} first "
                f"(per-task updates stacked on axis 0); found a leaf of shape {jnp.shape(leaf)}.")
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.reshape(x, (num_tasks, -1)).astype(dtype) for x in leaves], axis=1)


def _check_chain_order(updates: PyTree, params: Optional[PyTree], num_tasks: int) -> None:
    """With ``params`` given, every update leaf must be ``(T, *param_shape)``."""
    if params is None:
        return
    u_leaves, p_leaves = jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params)
    same_tree = len(u_leaves) == len(p_leaves)
    if same_tree and all(jnp.shape(u) == (num_tasks,) + jnp.shape(p) for u, p in zip(u_leaves, p_leaves)):
        return
    if same_tree and all(jnp.shape(u) == jnp.shape(p) for u, p in zip(u_leaves, p_leaves)):
        raise ValueError(
            "the aggregator received updates shaped like the parameters, not per-task updates "
            f"(T={num_tasks}, *param_shape): it must come first in optax.chain, before anything "
            "that combines or rescales updates, e.g. optax.chain(imtl_jax.aggregate(...), "
            "optax.clip_by_global_norm(1.0), optax.adam(1e-3)), and it cannot be wrapped by "
            "optax.MultiSteps (use imtl_jax.multi_steps) or optax.apply_if_finite (use "
            "imtl_jax.safe_optimizer).")
    shapes = [jnp.shape(u) for u in u_leaves][:3]
    pshapes = [jnp.shape(p) for p in p_leaves][:3]
    raise ValueError(f"the per-task updates must have the parameters' structure with a leading task "
                     f"axis T={num_tasks} on every leaf; got update shapes {shapes} for parameter "
                     f"shapes {pshapes}.")


def _apply_scaling(scaling: LossScaling, name: str, losses: Any, log_scales: Any,
                   num_tasks: int) -> tuple:
    """``(d scaled_t / d L_t, scaled losses)``: per-task updates of the raw losses times the
    factor are the updates of the scaled losses (chain rule)."""
    if losses is None or log_scales is None:
        missing = " and ".join(n for n, v in (("losses=", losses), ("log_scales=", log_scales)) if v is None)
        raise ValueError(
            f"method {name!r} trains a loss scaling ({scaling.name!r}) whose per-task log-scales s are "
            f"parameters the aggregator does not hold; pass {missing} (both (T,) = ({num_tasks},)) to "
            "update() to apply it (each task's update is multiplied by d scaled_t / d L_t), or use "
            "imtl_jax.mtl_step, which trains the log-scales with the network.")
    losses, log_scales = jnp.asarray(losses), jnp.asarray(log_scales)
    for arg, value in (("losses", losses), ("log_scales", log_scales)):
        if value.shape != (num_tasks,):
            raise ValueError(f"`{arg}` must have shape ({num_tasks},), got {value.shape}.")
        check_float_array(value, arg)
    log_scales = log_scales.astype(losses.dtype)
    scaled, factor = jax.jvp(lambda raw: scaling.scale(raw, log_scales), (losses,),
                             (jnp.ones_like(losses),))  # the scaling is per task: a diagonal Jacobian
    return factor, scaled


def aggregate(method: Union[str, Method, Weighting], num_tasks: int, *,
              dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """An optax transformation that combines T stacked per-task updates with a weighting.

    ``update(updates, state, params=None, *, losses=None, key=None, priorities=None,
    task_mask=None, **extra)`` takes ``updates`` whose every leaf has a leading task axis of
    size ``num_tasks`` and returns one update ``sum_t w_t updates[t]`` of the unstacked shape,
    the weights ``w`` coming from the method's weighting applied to the flattened (T, P) matrix
    of updates. Unknown extra arguments are accepted and ignored, so it composes in
    ``optax.chain``.

    ``task_mask`` (T,) bool or 0/1, traced: partial labels. Absent tasks' updates and losses
    are ignored (NaN included), they get weight 0, stay out of the solve and keep their
    per-task method state; the present tasks get the update of the same method on the present
    tasks only. Only methods whose weighting has ``supports_task_mask`` accept it (see
    ``docs/partial_labels.md``).

    Put it **first** in the chain: with ``params`` given, updates shaped like the parameters
    (already combined) raise a ``ValueError`` naming the fix. Wrap the chain in
    :func:`imtl_jax.safe_optimizer` (not ``optax.apply_if_finite``) and accumulate micro-batches
    with :func:`imtl_jax.multi_steps` (not ``optax.MultiSteps``): both optax wrappers assume
    updates shaped like the parameters.

    A method with a trainable loss scaling (``"imtl_h"``, ``"imtl_l"``, ``"uncertainty"``) needs
    ``losses=`` (raw, (T,)) and ``log_scales=`` (its s, (T,)): task t's update is multiplied by
    ``d scaled_t / d L_t`` (``e^s`` for IMTL-L) and the weighting sees the scaled losses; without
    them ``update`` raises a ``ValueError`` (the log-scales are parameters the aggregator does
    not hold; :func:`imtl_jax.mtl_step` trains them).

    A method whose state is per coordinate (``weighting.needs_dim``: ``"excess_mtl"``,
    ``"moco"``) makes it for F = the parameters' total size: ``tx.init(params)`` must get the
    parameters (a ``ValueError`` says so for ``tx.init(None)``).

    Two update forms besides ``sum_t w_t updates[t]``: a ``per_coordinate`` weighting
    (``"graddrop"``) returns weights ``C`` (T, F) and the update is ``sum_t C_t * updates[t]``,
    ``C`` split over the leaves as the (T, F) matrix was concatenated (``key=`` draws its
    randomness); a ``returns_direction`` weighting (``"moco"``) returns the (F,) update itself,
    unflattened the same way (it needs ``losses=``).

    Args:
      method: a registered name, a :class:`imtl_jax.Method` (its weighting is used) or a
        :class:`imtl_jax.Weighting`.
      num_tasks: T (static: fixes the shape of the state).
      dtype: dtype of the weights kept in the state (default float32).

    Example:
      >>> import jax.numpy as jnp, optax, imtl_jax
      >>> tx = optax.chain(imtl_jax.aggregate("imtl_g", num_tasks=2), optax.sgd(1.0))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> per_task = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
      >>> updates, state = tx.update(per_task, state, params)
      >>> [round(v, 4) for v in (-updates["w"]).tolist()]  # sgd negates: the IMTL-G aggregate
      [0.0767, 1.0, 1.0]
    """
    scaling: Optional[LossScaling] = None
    method_name = ""
    if isinstance(method, Weighting):
        weighting = method
    else:
        resolved = get_method(method)
        weighting = resolved.weighting
        scaling = resolved.scaling if resolved.scaling.trainable else None
        method_name = resolved.name
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
    check_update_form(weighting, method_name or weighting.name)
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)

    def _size(params):
        # F, the columns of the (T, F) matrix of stacked updates: the size of the parameters.
        # A weighting with per-coordinate state (needs_dim: ExcessMTL) needs it; the others are
        # probed with F = 1 when no parameters are given.
        size = sum(math.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params))
        if not size and weighting.needs_dim:
            raise ValueError(
                f"method {method_name or weighting.name!r} keeps per-coordinate state of the "
                "parameters' size F: call init with the parameters, tx.init(params) (F = their "
                f"total size), not {params!r}.")
        return size or 1

    def _info_zeros(size):
        # The info's structure, from an abstract call on a (T, F) matrix.
        shapes = jax.eval_shape(
            lambda: weighting.weigh(jnp.ones((num_tasks, size), dtype), jnp.ones((num_tasks,), dtype),
                                    weighting.init_state(num_tasks, dtype, dim=size), jax.random.key(0),
                                    None).info)
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def init_fn(params):
        size = _size(params)
        return AggregatorState(weights=jnp.zeros((num_tasks,), dtype), info=_info_zeros(size),
                               method_state=weighting.init_state(num_tasks, dtype, dim=size))

    def update_fn(updates, state, params=None, *, losses: Optional[jax.Array] = None,
                  key: Optional[jax.Array] = None, priorities: Optional[jax.Array] = None,
                  log_scales: Optional[jax.Array] = None, task_mask: Optional[jax.Array] = None,
                  **extra_args):
        del extra_args
        matrix = _stack_matrix(updates, num_tasks)
        _check_chain_order(updates, params, num_tasks)
        mask = None
        if task_mask is not None:
            # Partial labels: absent tasks' updates and losses are selected to 0 (NaN dropped),
            # and the weighting leaves them out of its solve (weight 0, state unchanged).
            _mask.require_mask_support(weighting, method_name or weighting.name)
            mask = _mask.check_task_mask(task_mask, num_tasks)
            updates = jax.tree_util.tree_map(
                lambda x: jnp.where(mask.reshape((-1,) + (1,) * (jnp.ndim(x) - 1)), x,
                                    jnp.zeros((), jnp.result_type(x))), updates)
            matrix = _mask.rows(matrix, mask)
            if losses is not None:
                losses = jnp.where(mask, jnp.asarray(losses), 0)
        if scaling is not None:
            factor, losses = _apply_scaling(scaling, method_name, losses, log_scales, num_tasks)
            updates = jax.tree_util.tree_map(
                lambda x: x * factor.astype(x.dtype).reshape((-1,) + (1,) * (jnp.ndim(x) - 1)), updates)
            matrix = matrix * factor.astype(matrix.dtype)[:, None]
        if losses is None:
            # MoCo tracks L_t g_t / |g_t|: zeros would stall it (not with normalize=False, whose
            # weigh says reads_losses=False).
            if weighting.returns_direction and getattr(weighting.weigh, "reads_losses", True):
                raise ValueError(f"weighting {weighting.name!r} updates along tracked estimates of "
                                 "the loss-scaled gradients (returns_direction): pass `losses=` "
                                 f"(shape ({num_tasks},)) to update().")
            if not weighting.needs_grads:
                raise ValueError(f"weighting {weighting.name!r} weighs losses: pass `losses=` "
                                 f"(shape ({num_tasks},)) to update().")
            losses = jnp.zeros((num_tasks,), matrix.dtype)
        else:
            losses = jnp.asarray(losses)
            if losses.shape != (num_tasks,):
                raise ValueError(f"`losses` must have shape ({num_tasks},), got {losses.shape}.")
            check_float_array(losses, "losses")
        out = _mask.weigh(weighting, matrix if weighting.needs_grads else None,
                          losses.astype(matrix.dtype), state.method_state, key, priorities, mask,
                          method_name or weighting.name)
        w = out.weights
        if weighting.per_coordinate:  # sum_t C_t * updates_t, C split over the leaves
            coords = coordinate_weights_of(out, matrix.shape, method_name or weighting.name)
            new_updates = jax.tree_util.tree_map(
                lambda c, x: jnp.sum(c.astype(x.dtype) * x, axis=0),
                unflatten_like(coords, updates, leading=1), updates)
        elif weighting.returns_direction:  # the update itself (MoCo), unflattened
            direction = direction_of(out, matrix.shape[1], method_name or weighting.name)
            new_updates = jax.tree_util.tree_map(
                lambda d, x: d.astype(x.dtype), unflatten_like(direction, updates, leading=1), updates)
        else:
            new_updates = jax.tree_util.tree_map(
                lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), updates)
        info = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), out.info, state.info)
        return new_updates, AggregatorState(w.astype(state.weights.dtype), info, out.state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def imtl_g(num_tasks: int, *, nonconflicting: bool = False,
           dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """IMTL-G as an optax aggregator over per-task updates stacked on axis 0.

    Pass ``priorities=`` (T,) to ``update`` for priority-weighted projections. The state's
    ``weights`` and ``info["common_projection"]`` hold the last alpha and C.

    Args:
      num_tasks: T (static).
      nonconflicting: flip the aggregate's sign when the common projection is negative.
      dtype: dtype of the weights kept in the state (default float32).

    Example:
      >>> import jax, jax.numpy as jnp, optax, imtl_jax
      >>> tx = optax.chain(imtl_jax.imtl_g(num_tasks=2), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> per_task = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
      >>> updates, state = jax.jit(tx.update)(per_task, state, params)
      >>> print(state[0].weights.round(5))
      [0.59233 0.40767]
    """
    from imtl_jax.methods.imtl import imtl_g_weighting
    return aggregate(imtl_g_weighting(nonconflicting=nonconflicting), num_tasks, dtype=dtype)
