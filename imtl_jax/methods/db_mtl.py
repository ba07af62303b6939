"""DB-MTL, dual balancing (Lin, Ye, Zhang & Kwok, "Dual-Balancing for Multi-Task Learning",
arXiv 2308.12029, 2023).

Registered name: ``db_mtl``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite,
                                      normalized_gramian)

#: The additive guard inside the logarithm (LibMTL's ``torch.log(losses + 1e-8)``).
LOG_EPS = 1e-8


def log_scale(losses: jax.Array, log_scales: jax.Array) -> jax.Array:
    """DB-MTL's loss balancing: ``log(L_t + 1e-8)`` (``log_scales`` is unused). Its gradient is
    ``grad L_t / (L_t + 1e-8)``: every task's loss scale cancels."""
    del log_scales
    return jnp.log(losses + jnp.asarray(LOG_EPS, losses.dtype))


LOG = LossScaling(name="log", scale=log_scale, trainable=False)


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl_weighting`: ``count`` (int32) steps seen, and ``norm_ema`` (T,), the
    exponential moving average of the per-task gradient norms (starts at 0)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field
    norm_ema: jax.Array


def _dbmtl_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return DBMTLState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), dtype))


def _dbmtl_weigh(grads, losses, state, key, priorities, *, beta, beta_sigma, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "db_mtl")
    num_tasks = grads.shape[0]
    check_state(state, _dbmtl_init(num_tasks, grads.dtype), "db_mtl")
    cdt = compute_dtype(grads.dtype)
    if task_mask is not None:
        grads = _mask.rows(grads, task_mask)
    gram, scale = normalized_gramian(grads.astype(cdt))
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)) * scale
    step = (state.count + 1).astype(cdt)
    b = beta / step ** beta_sigma
    ema = b * state.norm_ema.astype(cdt) + (1.0 - b) * norms
    if task_mask is not None:  # an absent task's norm EMA does not move, nor enter the max
        ema = _mask.keep(ema, state.norm_ema.astype(cdt), task_mask)
    top = jnp.max(ema) if task_mask is None else _mask.maximum(ema, task_mask)
    # w_t = max_s ema_s / ema_t, bounded by 1 / tiny (finite): a task with no gradient history
    # (ema_t = 0, or below max * tiny) gets 0 (its gradient is 0 or negligible anyway).
    ok = (ema > 0) & (ema * (1.0 / jnp.finfo(cdt).tiny) >= top)
    weights = jnp.where(ok, top / jnp.where(ok, ema, 1.0), 0.0)
    if task_mask is not None:
        weights = _mask.entries(weights, task_mask)
    weights = nan_if_not_finite(weights, grads)
    new_state = cast_like(DBMTLState(state.count + 1, ema), state)
    new_state = keep_state_if_not_finite(new_state, state, grads)
    return WeightingOutput(weights.astype(grads.dtype), new_state,
                           {"norm_ema": ema.astype(grads.dtype)})


def db_mtl_weighting(*, beta: float = 0.9, beta_sigma: float = 0.0) -> Weighting:
    r"""DB-MTL's gradient balancing as a :class:`~imtl_jax.Weighting` (use with the ``log`` loss
    scaling, as the registered ``db_mtl`` does).

    Dual balancing (Lin et al. 2023, Alg. 1): the losses are balanced by taking their
    logarithm (:data:`LOG`, ``log(L_t + 1e-8)`` as LibMTL), and the gradients by rescaling each
    task's gradient of ``log L_t`` to the largest gradient norm:
    ``update = sum_t (max_s n_s / n_t) g_t`` with ``n_t`` an exponential moving average of
    ``||g_t||``: ``n_t <- b_k n_t + (1 - b_k) ||g_t||``, ``b_k = beta / k^beta_sigma`` at step k
    (``n = 0`` before the first step). The weights are ``w_t = max_s n_s / n_t >= 1``; the task
    with the largest norm keeps weight 1.

    **Difference from the paper and LibMTL**, forced by the interface (the update must be a
    combination of the *current* task gradients, and the state cannot hold (T, F) vectors):
    the paper keeps the EMA of the gradient *vectors* ``g_hat_t`` and updates with
    ``sum_t (max_s ||g_hat_s|| / ||g_hat_t||) g_hat_t``; here the EMA is of their *norms* and
    the current gradients are rescaled. The two coincide for ``beta = 0`` (tested); with an
    optimizer's momentum (Adam, SGD with momentum) the vector EMA is largely redundant.

    Args:
      beta: the EMA coefficient (0.9, LibMTL's ``DB_beta`` default).
      beta_sigma: decay exponent of the coefficient, ``b_k = beta / k^beta_sigma`` (0: constant,
        LibMTL's ``DB_beta_sigma`` default).

    Cost per step: the per-task gradients, the Gramian O(T^2 F) (only its diagonal is used).
    State: a step counter and the (T,) norm EMA. ``info["norm_ema"]``: the EMA after this
    step. LibMTL runs DB-MTL at the parameter level only; here the registered method works at
    the representation level like every baseline (``Method("db_mtl", LOG, weighting,
    level="parameters")`` for the paper's level). Gradient method: heads get their own
    ``grad log L_t``.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> w = imtl_jax.methods.get_method("db_mtl").weighting
      >>> g = jnp.array([[3.0, 0.0], [0.0, 0.5]])
      >>> out = w.weigh(g, jnp.zeros(2), w.init(2), None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]   # both rescaled to norm 3
      [1.0, 6.0]
    """
    beta = float(beta)
    beta_sigma = float(beta_sigma)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
    if not beta_sigma >= 0.0:
        raise ValueError(f"`beta_sigma` must be >= 0, got {beta_sigma!r}.")
    return Weighting(name="db_mtl", init=_dbmtl_init,
                     weigh=functools.partial(_dbmtl_weigh, beta=beta, beta_sigma=beta_sigma),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


DB_MTL = db_mtl_weighting()

register(Method("db_mtl", LOG, DB_MTL))
