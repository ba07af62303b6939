"""GradDrop, gradient sign dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just
Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020).

Registered name: ``graddrop`` (representation level; ``level="parameters"`` for TorchJD's
setting). GradDrop is not a weighting of the current gradients: per coordinate j it keeps only
the positive or only the negative task components, so its weighting has ``per_coordinate``: it
returns per-coordinate weights ``C`` (T, F) and the shared update is ``sum_t C_t * g_t``
(elementwise). See :func:`graddrop_weighting`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_grads, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite)
from imtl_jax.methods.equal import IDENTITY


class GradDropState(NamedTuple):
    """State of :func:`graddrop_weighting`: ``count`` (int32), the steps seen; the draw's key when
    ``weigh`` gets ``key=None`` (``fold_in(key(0), count)``)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _init(num_tasks, dtype=None):
    del num_tasks, dtype
    return GradDropState(jnp.zeros((), jnp.int32))


def graddrop_uniforms(key: jax.Array, dim: int, dtype=jnp.float32) -> jax.Array:
    """The F uniform draws ``U_j ~ U[0, 1)`` GradDrop compares the purity with: the weighting
    draws exactly ``graddrop_uniforms(key, F, compute dtype)`` (one per coordinate, independent
    of T, so a masked step draws the same U as the step on the present tasks only).

    Example:
      >>> import jax
      >>> graddrop_uniforms(jax.random.key(0), 3).shape
      (3,)
    """
    return jax.random.uniform(key, (dim,), dtype)


def graddrop_purity(grads: jax.Array) -> jax.Array:
    """The gradient positive sign purity (Eq. 1) per coordinate, ``P_j = (1 + sum_t g_tj /
    sum_t |g_tj|) / 2`` in [0, 1]; ``1/2`` for a column of zeros (no NaN: every task's mask is
    0 there whatever P, as TorchJD's NaN purity gives)."""
    total = jnp.sum(grads, axis=0)
    mass = jnp.sum(jnp.abs(grads), axis=0)
    ratio = jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0)
    return 0.5 * (1.0 + ratio)


def graddrop_coefficients(grads: jax.Array, uniforms: jax.Array, leak: Optional[jax.Array] = None,
                          purity_fn: Optional[Callable] = None) -> jax.Array:
    """GradDrop's per-coordinate weights ``C`` (T, F) for the rows ``grads`` and draws ``U`` (F,):

    ``M_tj = 1[f(P_j) > U_j] 1[g_tj > 0] + 1[f(P_j) < U_j] 1[g_tj < 0]`` (Alg. 1, lines 10-15)
    and ``C_t = leak_t + (1 - leak_t) M_t``; the update is ``sum_t C_t * g_t``. A zero row (an
    absent task) gets ``M_t = 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -2.0], [3.0, 1.0]])     # purity [1, 1/3]
      >>> graddrop_coefficients(g, jnp.array([0.5, 0.5])).tolist()  # + kept, then - kept
      [[1.0, 1.0], [1.0, 0.0]]
    """
    purity = graddrop_purity(grads)
    if purity_fn is not None:
        purity = purity_fn(purity)
    positive = (purity > uniforms)[None, :] & (grads > 0)
    negative = (purity < uniforms)[None, :] & (grads < 0)
    keep = (positive | negative).astype(grads.dtype)
    if leak is None:
        return keep
    leak = jnp.asarray(leak, grads.dtype)[:, None]
    return leak + (1.0 - leak) * keep


def _weigh(grads, losses, state, key, priorities, *, leak, purity_fn, task_mask=None):
    grads, losses = check_grads(grads, losses, priorities, "graddrop")
    del losses
    num_tasks, dim = grads.shape
    if leak is not None and len(leak) != num_tasks:
        raise ValueError(f"the graddrop weighting was built with {len(leak)} `leak` values but "
                         f"`grads` has T = {num_tasks} rows; give one leak per task.")
    if not isinstance(state, GradDropState) or jnp.shape(state.count) != ():
        raise ValueError("`state` of the 'graddrop' weighting must be a GradDropState (from its "
                         f"init), got {type(state).__name__}.")
    cdt = compute_dtype(grads.dtype)
    if key is None:
        key = jax.random.fold_in(jax.random.key(0), state.count)
    uniforms = graddrop_uniforms(key, dim, cdt)
    g = grads.astype(cdt)
    if task_mask is not None:  # absent rows are zero: out of both purity sums, M_t = 0
        g = _mask.rows(g, task_mask)
    coords = graddrop_coefficients(g, uniforms, None if leak is None else jnp.asarray(leak, cdt),
                                   purity_fn)
    if task_mask is not None:
        coords = _mask.rows(coords, task_mask)
    mass = jnp.sum(jnp.abs(g))
    kept = jnp.where(mass > 0, jnp.sum(coords * jnp.abs(g)) / jnp.where(mass > 0, mass, 1.0), 0.0)
    weights = jnp.mean(coords, axis=1)
    weights = nan_if_not_finite(weights, g)
    coords = nan_if_not_finite(coords, g)
    new_state = keep_state_if_not_finite(cast_like(GradDropState(state.count + 1), state), state, g)
    return WeightingOutput(weights.astype(grads.dtype), new_state,
                           {"kept_fraction": kept.astype(grads.dtype)}, coords.astype(grads.dtype))


def graddrop_weighting(*, leak: Optional[Sequence[float]] = None,
                       purity_fn: Optional[Callable] = None) -> Weighting:
    r"""GradDrop (Chen et al., NeurIPS 2020) as a per-coordinate :class:`~imtl_jax.Weighting`
    (the registered ``"graddrop"`` is ``graddrop_weighting()``).

    Each step, from the (T, F) rows ``g`` and F uniform draws ``U`` of the step's key
    (:func:`graddrop_uniforms`):

    1. the sign purity ``P_j = (1 + sum_t g_tj / sum_t |g_tj|) / 2`` (Eq. 1; ``1/2`` where the
       column is zero, no NaN);
    2. the mask ``M_tj = 1[f(P_j) > U_j] 1[g_tj > 0] + 1[f(P_j) < U_j] 1[g_tj < 0]``: coordinate j
       keeps the positive components with probability ``f(P_j)``, else the negative ones;
    3. the per-coordinate weights ``C_t = leak_t + (1 - leak_t) M_t`` and the update
       ``sum_t C_t * g_t``.

    Defaults as TorchJD 0.18's ``GradDrop`` (and LibMTL's): ``f`` the identity, no leak. The
    output's ``coordinate_weights`` is ``C``; ``weights`` (for logs) is ``C``'s mean over the
    coordinates (the fraction of task t's coordinates kept, without leak); heads get the
    gradient of their own loss. ``info["kept_fraction"]``: ``sum C |g| / sum |g|``.

    Where P is taken: at the parameter level (``level="parameters"``) and in
    :func:`imtl_jax.aggregate` the rows are the per-task gradients themselves, as in TorchJD's
    aggregator on a Jacobian. At the representation level (the registered default) the rows
    a weighting receives are the **batch-summed** feature gradients ``sum_b dL_t/dz_b``, so P
    and the mask are per feature coordinate, shared by the examples, and the encoder's
    cotangent is ``sum_t C_t * dL_t/dz_b`` for every example b. This differs from the paper and
    LibMTL, which take the purity on ``sum_b sign(z_b) * dL_t/dz_b`` (the sign of the
    activation inside the sum), and from TorchJD's ``mtl_backward`` at the features, which
    masks each example's coordinates separately (the batch is part of its Jacobian's columns).

    Stochastic: ``U`` from the step's ``key`` (``fold_in(key(0), count)`` with ``key=None``:
    then every run draws the same sequence of ``U``, so seeds differ only through the model;
    pass a ``key`` per step for independent runs); one draw per coordinate, independent of T.
    Partial labels (``task_mask``): an absent task is out of both purity sums and gets
    ``C_t = 0``; the present tasks get the sub-problem's ``C``
    for the same key. Non-finite rows: NaN weights and ``C`` (loud), the counter does not
    advance. Cost per step: per-task gradients + O(T F); at the representation level the
    (T, B, F) per-example gradients are formed (the weighted methods avoid them).

    Args:
      leak: None (default, no leak) or T values in [0, 1]: how much of task t's gradient passes
        unmasked (TorchJD's ``leak``).
      purity_fn: a monotonically increasing function applied to P (TorchJD's ``f``; default
        the identity).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = graddrop_weighting()
      >>> g = jnp.array([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]])
      >>> out = w.weigh(g, jnp.zeros(2), w.init(2), jax.random.key(0), None)
      >>> out.coordinate_weights.shape, w.per_coordinate
      ((2, 3), True)
      >>> float(jnp.sum(out.coordinate_weights[:, 2]))   # a zero column passes nothing
      0.0
    """
    if leak is not None:
        leak = tuple(float(x) for x in leak)
        if not leak or not all(0.0 <= x <= 1.0 for x in leak):
            raise ValueError(f"`leak` must be T values in [0, 1], got {leak!r}.")
    if purity_fn is not None and not callable(purity_fn):
        raise TypeError(f"`purity_fn` must be a callable P -> f(P), got {purity_fn!r}.")
    return Weighting(name="graddrop", init=_init,
                     weigh=functools.partial(_weigh, leak=leak, purity_fn=purity_fn),
                     needs_grads=True, weights_heads=False, supports_task_mask=True,
                     per_coordinate=True)


GRADDROP = graddrop_weighting()

register(Method("graddrop", IDENTITY, GRADDROP))
