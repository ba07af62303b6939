"""MoDo, multi-objective gradient descent with double sampling (Chen, Fernando, Ying & Chen,
"Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023; JMLR 2024).

Registered name: ``modo`` (``gamma = 0.1``, ``rho = 0.1``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite,
                                      normalized_gramian, project_simplex)
from imtl_jax.methods.equal import IDENTITY


class MoDoState(NamedTuple):
    """State of :func:`modo_weighting`: ``weights`` (T,), the simplex weights ``lambda`` carried
    from step to step (``1/T`` at first)."""

    weights: jax.Array


def _modo_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return MoDoState(jnp.full((num_tasks,), 1.0 / num_tasks, dtype))


def modo_step(a: jax.Array, lam: jax.Array, *, gamma: float = 0.1, rho: float = 0.1,
              a_scale=1.0, task_mask: Optional[jax.Array] = None) -> jax.Array:
    r"""One MoDo weight update: ``P_simplex(lam - gamma (a_scale a lam + rho lam))`` for a (T, T)
    matrix ``a`` (``J_z1 J_z2^T`` of two independent batches in the paper; ``G G^T`` here,
    passed as ``a_scale`` times a normalised matrix). ``gamma a_scale`` is capped at
    ``sqrt(max float)``, beyond which the projection's answer (the vertices minimising
    ``(a lam)_t``) no longer changes but the products would overflow.

    ``task_mask`` (T,) bool (partial labels; the absent rows and columns of ``a`` must be 0):
    the step of the present tasks, projected on their simplex (absent entries 0)."""
    step = jnp.minimum(gamma * a_scale, jnp.sqrt(jnp.finfo(a.dtype).max))
    if task_mask is None:
        return project_simplex(lam * (1.0 - gamma * rho) - step * jnp.matmul(a, lam, precision=HIGHEST))
    lam = _mask.entries(lam, task_mask)
    return _mask.project_simplex(lam * (1.0 - gamma * rho) - step * jnp.matmul(a, lam, precision=HIGHEST),
                                 task_mask)


def _modo_weigh(grads, losses, state, key, priorities, *, gamma, rho, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "modo")
    check_state(state, _modo_init(grads.shape[0], grads.dtype), "modo")
    cdt = compute_dtype(grads.dtype)
    old = state.weights.astype(cdt)
    if task_mask is None:
        gram, scale = normalized_gramian(grads.astype(cdt))
    else:
        # Partial labels: the present tasks' step (their rows of the Gramian, their stored
        # weights, the simplex of the present tasks); the absent tasks' stored weights are kept.
        gram, scale = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
    # G G^T = scale^2 gram: the square formed in logs, as it under/overflows for |G| ~ 1e+-19
    # in float32 (0 is then the right answer, inf is capped by modo_step).
    a_scale = jnp.exp(2.0 * jnp.log(scale))
    lam = modo_step(gram, old, gamma=gamma, rho=rho, a_scale=a_scale, task_mask=task_mask)
    weights = nan_if_not_finite(lam, grads)
    if task_mask is not None:
        lam = _mask.keep(lam, old, task_mask)
    new_state = keep_state_if_not_finite(cast_like(MoDoState(lam), state), state, grads)
    return WeightingOutput(weights.astype(grads.dtype), new_state, {})


def modo_weighting(*, gamma: float = 0.1, rho: float = 0.1) -> Weighting:
    r"""MoDo as a :class:`~imtl_jax.Weighting` (Chen et al., NeurIPS 2023, Alg. 1).

    MGDA's weights tracked by one projected gradient step per training step instead of solved:
    ``lambda <- P_simplex(lambda - gamma (G G^T lambda + rho lambda))`` (kept in the state,
    ``1/T`` at first), and the update is ``G^T lambda`` with the new ``lambda`` (weights sum
    to 1). With fixed gradients and ``rho = 0`` the iteration converges to MGDA's min-norm
    weights; ``rho > 0`` regularises towards uniform weights. Unlike SDMGrad, ``G G^T`` is not
    normalised: ``gamma`` is relative to the squared gradient norms.

    The paper's stochastic algorithm draws independent batches: ``J_z1 J_z2^T`` from two of
    them (unbiased for ``G G^T``), the update from a third (or the first two). The
    :class:`~imtl_jax.Weighting` interface sees one batch's (T, F) matrix, so here
    ``G G^T`` of that batch is used for both; :func:`modo_step` takes any ``A`` for a loop that
    draws the batches itself.

    Args:
      gamma: the weight step size (0.1: the authors' code and TorchJD; LibMTL 1e-3).
      rho: the l2 regularisation of the weights (0.1, all three).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^2 + T log T).
    State: the weights (T,). Deterministic (no key). Gradient method: heads get their own
    loss gradient.

    Partial labels (``task_mask``): the step of the T'-task problem of the present tasks from
    their stored weights (which need not sum to 1 there: the projection puts the new ones on
    the present tasks' simplex); the absent tasks' stored weights are kept.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.modo import modo_weighting
      >>> w = modo_weighting(gamma=0.5, rho=0.0)
      >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> out = w.weigh(g, jnp.zeros(2), w.init(2), None, None)   # 1/2 - 0.5 [0.5, 2] -> projected
      >>> [round(v, 4) for v in out.weights.tolist()]
      [0.875, 0.125]
    """
    gamma, rho = float(gamma), float(rho)
    if not gamma > 0:
        raise ValueError(f"`gamma` must be > 0, got {gamma!r}.")
    if not rho >= 0:
        raise ValueError(f"`rho` must be >= 0, got {rho!r}.")
    return Weighting(name="modo", init=_modo_init,
                     weigh=functools.partial(_modo_weigh, gamma=gamma, rho=rho),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


MODO = modo_weighting()

register(Method("modo", IDENTITY, MODO))
