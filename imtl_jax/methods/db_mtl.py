"""DB-MTL, dual balancing (Lin, Ye, Zhang & Kwok, "Dual-Balancing for Multi-Task Learning",
arXiv 2308.12029, 2023).

Registered name: ``db_mtl``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imtl_jax._linalg import ldexp, pow2_normalize
from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite)

#: The additive guard inside the logarithm (LibMTL's ``torch.log(losses + 1e-8)``).
LOG_EPS = 1e-8


def log_scale(losses: jax.Array, log_scales: jax.Array) -> jax.Array:
    """DB-MTL's loss balancing: ``log(L_t + 1e-8)`` (``log_scales`` is unused). Its gradient is
    ``grad L_t / (L_t + 1e-8)``: every task's loss scale cancels."""
    del log_scales
    return jnp.log(losses + jnp.asarray(LOG_EPS, losses.dtype))


LOG = LossScaling(name="log", scale=log_scale, trainable=False)


class DBMTLState(NamedTuple):
    """State of :func:`db_mtl_weighting`.

    ``count`` (int32) steps seen; the exponential moving average of each task's gradient norm
    (starts at 0), held exactly over the whole floating-point range as
    ``norm_ema * 2**norm_exponent``: ``norm_ema`` (T,) mantissas (each in [0.5, 1), or 0) and
    ``norm_exponent`` (T,) int32. Gradients at 1e-30, subnormal ones (which XLA's CPU backend
    reads as 0 in arithmetic) and norms above the dtype's largest finite value (entries near 3e38
    in float32) give the weights they give at scale 1. :meth:`norms` returns the EMA itself.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field
    norm_ema: jax.Array
    norm_exponent: jax.Array

    def norms(self) -> jax.Array:
        """The EMA of the gradient norms, ``norm_ema * 2**norm_exponent``, in ``norm_ema``'s dtype
        (rounded to 0 below its normal range, inf above its largest finite value)."""
        m = self.norm_ema
        cdt = compute_dtype(m.dtype)
        return ldexp(m.astype(cdt), _clamp_shift(self.norm_exponent, cdt)).astype(m.dtype)


def _dbmtl_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return DBMTLState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), dtype),
                      jnp.zeros((num_tasks,), jnp.int32))


def _clamp_shift(k, dtype):
    """``k`` clipped to the range :func:`imtl_jax._linalg.ldexp` handles (twice the exponent
    range): beyond it the result is 0 (or inf) in ``dtype`` anyway."""
    limit = 2 * (int(jnp.finfo(dtype).maxexp) - 2)
    return jnp.clip(jnp.asarray(k, jnp.int32), -limit, limit)


def _split(x):
    """``(m, k)`` with ``x = m 2^k`` exactly, each ``m`` in [0.5, 1) or 0 (per entry)."""
    m, k = jax.vmap(pow2_normalize)(x[:, None])
    return m[:, 0], k


_LOWEST = int(jnp.iinfo(jnp.int32).min)


def _dbmtl_weigh(grads, losses, state, key, priorities, *, beta, beta_sigma, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "db_mtl")
    num_tasks = grads.shape[0]
    check_state(state, _dbmtl_init(num_tasks, grads.dtype), "db_mtl")
    cdt = compute_dtype(grads.dtype)
    g = grads.astype(cdt)
    if task_mask is not None:
        g = _mask.rows(g, task_mask)
    # ||g_t|| = r_t 2^k_t: each row rescaled by its own exact power of two (bit operations), so
    # neither a subnormal row (read as 0 in arithmetic on XLA's CPU backend), nor squares below
    # the normal range, nor a norm above the largest finite value is lost.
    y, k = jax.vmap(pow2_normalize)(g)
    r = jnp.sqrt(jnp.sum(y * y, axis=1))                       # in [0.5, sqrt F), or 0
    # Task by task, the old EMA m_t 2^e_t and the new norm at the larger of the two exponents
    # (a term shifted below the normal range is negligible beside the other), then renormalized.
    old = state.norm_ema.astype(cdt)
    e = state.norm_exponent.astype(jnp.int32)
    top_exp = jnp.maximum(jnp.where(old != 0, e, _LOWEST), jnp.where(r > 0, k, _LOWEST))
    top_exp = jnp.where(top_exp == _LOWEST, 0, top_exp)
    step = (state.count + 1).astype(cdt)
    b = beta / step ** beta_sigma
    ema = (b * ldexp(old, _clamp_shift(e - top_exp, cdt))
           + (1.0 - b) * ldexp(r, _clamp_shift(k - top_exp, cdt)))
    mant, shift = _split(ema)
    exp = top_exp + shift
    if task_mask is not None:  # an absent task's norm EMA does not move (bit for bit)
        mant = _mask.keep(mant, old, task_mask)
        exp = _mask.keep(exp, e, task_mask)
    # w_t = max_s ema_s / ema_t = (m_max / m_t) 2^(e_max - e_t): the largest EMA is the one of
    # the largest exponent, then mantissa, among the present tasks with a history. Bounded by
    # 1 / tiny (finite): a task with no gradient history (ema_t = 0, or below max * tiny) gets 0
    # (its gradient is 0 or negligible anyway).
    live = mant > 0
    if task_mask is not None:
        live = live & task_mask
    e_max = jnp.max(jnp.where(live, exp, _LOWEST))
    m_max = jnp.max(jnp.where(live & (exp == e_max), mant, 0.0))
    ratio = m_max / jnp.where(live, mant, 1.0)
    weights = ldexp(ratio, _clamp_shift(jnp.where(live, e_max - exp, 0), cdt))
    ok = live & (weights <= 1.0 / jnp.finfo(cdt).tiny)
    weights = jnp.where(ok, weights, 0.0)
    if task_mask is not None:
        weights = _mask.entries(weights, task_mask)
    weights = nan_if_not_finite(weights, grads)
    new_state = cast_like(DBMTLState(state.count + 1, mant, exp), state)
    new_state = keep_state_if_not_finite(new_state, state, grads)
    absolute = ldexp(mant, _clamp_shift(exp, cdt))
    return WeightingOutput(weights.astype(grads.dtype), new_state,
                           {"norm_ema": absolute.astype(grads.dtype)})


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

    Cost per step: the per-task gradients and their norms, O(T F). State: a step counter and
    the (T,) norm EMA, held as mantissas and power-of-two exponents (:class:`DBMTLState`), so
    gradients anywhere in the floating-point range, subnormals included, give the weights they
    give at scale 1. ``info["norm_ema"]``: the EMA after this step, in the gradients' dtype
    (rounded to 0 / inf outside its range; ``state.norms()`` likewise). NaN or inf anywhere in
    ``grads``: all weights NaN and the state unchanged (so ``optax.apply_if_finite`` /
    ``StepAux.all_finite`` skip the step). LibMTL runs DB-MTL at the parameter level only;
    here the registered method works at the representation level like every baseline
    (``Method("db_mtl", LOG, weighting, level="parameters")`` for the paper's level). Gradient
    method: heads get their own ``grad log L_t``.

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
