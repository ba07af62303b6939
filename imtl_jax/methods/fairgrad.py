"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

Registered name: ``fairgrad`` (``alpha = 2``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      damped_newton, nan_if_not_finite, normalized_gramian)
from imtl_jax.methods.equal import IDENTITY


def default_tol(dtype) -> float:
    """The default certificate tolerance: ``16 eps`` of the working dtype."""
    return 16.0 * float(jnp.finfo(dtype).eps)


def fairness_residual(gram: jax.Array, w: jax.Array, alpha: float) -> jax.Array:
    """``max_t |(M w)_t - w_t^{-1/alpha}| / ((|M| w)_t + w_t^{-1/alpha})``: the residual of
    ``M w = w^{-1/alpha}`` relative to the size of its terms (a backward error: the relative
    change of the entries of ``M`` that makes ``w`` exact is of this order), so its round-off
    floor is ``~T eps`` whatever the spread of the norms or the cancellation in ``M w``."""
    mw = jnp.matmul(gram, w, precision=HIGHEST)
    size = jnp.matmul(jnp.abs(gram), w, precision=HIGHEST)
    target = jnp.exp(-jnp.log(w) / alpha)
    return jnp.max(jnp.abs(mw - target) / (size + target))


def fairgrad_solve(gram: jax.Array, alpha: float, max_iterations: int,
                   tol: Optional[float] = None, task_mask: Optional[jax.Array] = None):
    r"""Solves ``M w = w^{-1/alpha}`` (elementwise power), ``w > 0``, for a PD matrix ``M``;
    returns ``(w, certificate, iterations)``.

    The equation is the stationarity condition of the strictly convex
    ``f(w) = w^T M w / 2 - sum_t u(w_t)`` with ``u' (w) = w^{-1/alpha}`` (``u = log`` at
    ``alpha = 1``, else ``u(w) = w^{1 - 1/alpha} / (1 - 1/alpha)``), minimised by Newton steps
    with an Armijo line search that keeps ``w > 0`` (:func:`imtl_jax.methods._common.damped_newton`).
    Start: ``M_tt^{-alpha/(1+alpha)}`` (exact for orthogonal rows) rescaled by the exact
    minimiser of ``f`` along that ray. Stops when
    :func:`fairness_residual` ``<= tol`` (default ``16 eps``), when no decrease of ``f`` is left
    above its round-off (the residual is then at its floor, ~eps times the conditioning of
    ``M``, and is reported), or after ``max_iterations`` steps.

    ``task_mask`` (T,) bool (partial labels): ``gram`` must be decoupled
    (:func:`imtl_jax.methods._mask.decouple`: identity rows and columns for the absent tasks,
    whose solution is ``w_t = 1``). The absent entries start at 1 and stay there exactly (the
    Newton system is block diagonal); the objective and the start's rescaling sum over the
    present tasks, so the line search sees the T'-task problem's values, and the stopping
    test's round-off threshold is the T'-task problem's ``T' eps``.
    """
    dtype = gram.dtype
    tol = default_tol(dtype) if tol is None else float(tol)
    inv = 1.0 / alpha
    power = 1.0 - inv
    present = jnp.ones(gram.shape[:1], bool) if task_mask is None else task_mask

    def total(x):                        # the sum over the present tasks (last axis)
        return jnp.sum(x if task_mask is None else jnp.where(present, x, 0.0), axis=-1)

    def utility(w):                      # sum_t u(w_t), w > 0 (rows of a (K, T) batch)
        if alpha == 1.0:
            return total(jnp.log(w))
        return total(jnp.exp(power * jnp.log(w))) / power

    def objective(w):
        mw = jnp.einsum("ij,kj->ki", gram, w, precision=HIGHEST)
        return 0.5 * total(w * mw) - utility(w)

    def gradient(w):
        return jnp.matmul(gram, w, precision=HIGHEST) - jnp.exp(-inv * jnp.log(w))

    def scaled_hessian(w):               # diag(w) (M + diag(w^{-1/alpha - 1} / alpha)) diag(w)
        return w[:, None] * gram * w[None, :] + jnp.diag(inv * jnp.exp(power * jnp.log(w)))

    # The solution for orthogonal rows, M_tt^{-alpha / (1 + alpha)} (norms spread over decades
    # put the weights over decades too; Nash-MTL's 1/sqrt(M_tt) is this at alpha = 1).
    v = jnp.exp(-alpha / (1.0 + alpha) * jnp.log(jnp.diag(gram)))
    # argmin_s f(s v): s^{1 + 1/alpha} = sum_t v_t^{1 - 1/alpha} / v^T M v.
    vp = v if task_mask is None else _mask.entries(v, task_mask)
    ratio = total(jnp.exp(power * jnp.log(v))) / jnp.dot(vp, jnp.matmul(gram, vp, precision=HIGHEST))
    w0 = v * jnp.exp(jnp.log(ratio) * alpha / (alpha + 1.0))
    if task_mask is not None:
        w0 = jnp.where(task_mask, w0, 1.0)
    return damped_newton(objective, gradient, scaled_hessian,
                         lambda w: fairness_residual(gram, w, alpha), w0,
                         max_iterations=max_iterations, tol=tol,
                         size=None if task_mask is None else jnp.sum(task_mask))


def _fairgrad_weights(grads, alpha, max_iterations, tol, task_mask=None):
    cdt = compute_dtype(grads.dtype)
    if task_mask is None:
        gram, scale = normalized_gramian(grads.astype(cdt))
        num_tasks = grads.shape[0]
    else:
        # Partial labels: the present tasks' Gramian block (absent rows and columns 0, so the
        # scale and the ridge are theirs), decoupled below: the T'-task problem's weights.
        gram, scale = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
        num_tasks = _mask.count(task_mask, cdt)
    eps = jnp.finfo(cdt).eps
    diag = jnp.diag(gram)
    top = jnp.max(diag)
    nonzero = top > 0
    # A ridge eps * max(M_tt, eps max M) on the diagonal keeps w finite when some v >= 0 has
    # M v = 0 (a zero row, rows g and -g): there is no finite solution then (as Nash-MTL's).
    # Relative to each row's own norm, it moves w by ~eps elsewhere, however spread the norms.
    ridge = eps * jnp.maximum(diag, eps * jnp.where(nonzero, top, 1.0))
    gram = gram + jnp.diag(ridge)
    if task_mask is not None:
        gram = _mask.decouple(gram, task_mask)
    w, res, it = fairgrad_solve(gram, alpha, max_iterations, tol, task_mask)
    converged = jnp.isfinite(res) & ((res <= (default_tol(cdt) if tol is None else tol))
                                     | (it < max_iterations))
    # Back to the raw equation G G^T w = w^{-1/alpha}: with G = scale * G_n, w = scale^{-2 alpha /
    # (1 + alpha)} w_n (the paper's weights; the update scales like scale^{(1 - alpha)/(1 + alpha)}).
    # In logs, saturated so that the largest weight stays below the dtype's maximum (gradients of
    # size ~1e-25 at alpha = 2 in float32 ask for weights ~1e33+): the direction is kept.
    log_w = jnp.log(w) - 2.0 * alpha / (1.0 + alpha) * jnp.log(scale)
    ceiling = jnp.log(jnp.finfo(cdt).max) - 2.0 - jnp.log(jnp.asarray(num_tasks, cdt))
    top_log = jnp.max(log_w) if task_mask is None else _mask.maximum(log_w, task_mask)
    log_w = log_w - jnp.maximum(top_log - ceiling, 0.0)
    w = jnp.where(nonzero, jnp.exp(log_w), jnp.ones_like(w))
    if task_mask is not None:
        w = _mask.entries(w, task_mask)
    info = {"certificate": jnp.where(nonzero, res, 0.0).astype(grads.dtype), "iterations": it,
            "converged": converged | ~nonzero}
    return nan_if_not_finite(w, grads).astype(grads.dtype), info


def _check_args(alpha, max_iterations, tol):
    alpha = float(alpha)
    if not alpha > 0 or alpha == float("inf"):
        raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r} (alpha = 0 is "
                         "linear scalarisation: use the 'equal' method).")
    if not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or max_iterations < 1:
        raise ValueError(f"`max_iterations` must be a positive int, got {max_iterations!r}.")
    if tol is not None and not float(tol) >= 0:
        raise ValueError(f"`tol` must be >= 0 or None, got {tol!r}.")
    return alpha, max_iterations, None if tol is None else float(tol)


@functools.partial(jax.jit, static_argnames=("alpha", "max_iterations", "tol"))
def fairgrad_weights(grads: jax.Array, *, alpha: float = 2.0, max_iterations: int = 100,
                     tol: Optional[float] = None) -> jax.Array:
    """FairGrad weights for the (T, F) ``grads``: ``w > 0`` with ``G G^T w = w^{-1/alpha}``
    (see :func:`fairgrad_weighting`)."""
    grads = check_matrix(grads, "fairgrad")
    return _fairgrad_weights(grads, *_check_args(alpha, max_iterations, tol))[0]


def _fairgrad_weigh(grads, losses, state, key, priorities, *, alpha, max_iterations, tol,
                    task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "fairgrad")
    w, info = _fairgrad_weights(grads, alpha, max_iterations, tol, task_mask)
    return WeightingOutput(w, state, info)


def fairgrad_weighting(*, alpha: float = 2.0, max_iterations: int = 100,
                       tol: Optional[float] = None) -> Weighting:
    r"""FairGrad as a :class:`~imtl_jax.Weighting` (Ban & Ji, ICML 2024, Eq. 4 / Alg. 1).

    The update ``d = G^T w`` maximises the alpha-fair utility of the loss decreases
    ``g_t . d``; its stationarity condition is ``G G^T w = w^{-1/alpha}`` (elementwise power),
    ``w > 0``. ``alpha = 1`` is proportional fairness (Nash-MTL's ``G G^T w = 1/w``); as
    ``alpha -> 0`` the weights tend to 1 (linear scalarisation, the sum of the losses); as
    ``alpha -> inf`` to ``(G G^T)^{-1} 1`` (every task decreases equally: max-min fairness when
    that is positive).

    Solved on the Gramian normalised by ``max|G|^2`` plus a ridge ``eps max_t M_tt I`` by Newton
    steps with a line search on the convex ``w^T M w / 2 - sum_t u(w_t)``
    (:func:`fairgrad_solve`) until the residual ``max_t |w_t^{1/alpha} (M w)_t - 1| <= tol``
    (the authors', LibMTL's and TorchJD's code call ``scipy.optimize.least_squares`` with
    bounds ``w >= 0`` and its default tolerances), then mapped back to the paper's raw equation
    (so the weights scale like ``max|G|^{-2 alpha / (1 + alpha)}`` and the update like
    ``max|G|^{(1 - alpha) / (1 + alpha)}``: invariant to a uniform rescale only at
    ``alpha = 1``; weights that would overflow the dtype, e.g. for gradients ~1e-25 at
    ``alpha = 2`` in float32, are all divided by one factor that keeps the largest finite).
    Not included from the authors' code: the update's factor T ("to match the sum loss") and
    gradient-norm clipping (``max_norm=1``; add ``optax.clip_by_global_norm``).

    Degenerate inputs: a zero row, or rows g and -g, have no finite solution; the ridge bounds
    their weights (``~eps^{-alpha / (1 + alpha)}``, their contribution ``w_t g_t`` stays
    bounded); all-zero gradients give weights 1; duplicate rows share one weight.

    Args:
      alpha: the fairness parameter (2, the authors' scripts for all four supervised
        benchmarks; LibMTL's and the authors' argparse default is 1; TorchJD has no default).
      max_iterations: cap on the Newton iterations (default 100; 5-15 measured).
      tol: certificate tolerance (default ``16 eps`` of the working dtype).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^3) per Newton
    iteration. ``info``: ``certificate`` (the final residual), ``iterations`` (int32) and
    ``converged`` (bool: stopped on ``tol`` or at the residual's round-off floor, not at
    ``max_iterations``). Stateless, deterministic. Gradient method: heads get their own loss
    gradient.

    Partial labels (``task_mask``): the equation of the present tasks (their Gramian block,
    scale and ridge) solved on the T'-task problem's path (:func:`fairgrad_solve`);
    ``certificate``/``converged`` are its own.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.fairgrad import fairgrad_weights
      >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])          # orthogonal: w_t = |g_t|^{-2a/(1+a)}
      >>> fairgrad_weights(g, alpha=1.0).round(5)
      Array([0.5, 1. ], dtype=float32)
    """
    alpha, max_iterations, tol = _check_args(alpha, max_iterations, tol)
    return Weighting(name="fairgrad", init=stateless_init,
                     weigh=functools.partial(_fairgrad_weigh, alpha=alpha,
                                             max_iterations=max_iterations, tol=tol),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


FAIRGRAD = fairgrad_weighting()

register(Method("fairgrad", IDENTITY, FAIRGRAD))
