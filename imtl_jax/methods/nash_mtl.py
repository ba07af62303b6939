"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
Learning as a Bargaining Game", ICML 2022).

Registered name: ``nash_mtl``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.scipy.linalg
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian)
from imtl_jax.methods.equal import IDENTITY


def default_tol(dtype) -> float:
    """The default certificate tolerance: ``16 eps`` of the working dtype."""
    return 16.0 * float(jnp.finfo(dtype).eps)


def bargaining_residual(gram: jax.Array, alpha: jax.Array) -> jax.Array:
    """``max_t |alpha_t (M alpha)_t - 1|``: the relative residual of ``M alpha = 1 / alpha``
    (dimensionless, so already relative to the data's scale)."""
    return jnp.max(jnp.abs(alpha * jnp.matmul(gram, alpha, precision=HIGHEST) - 1.0))


def nash_solve(gram: jax.Array, max_iterations: int, tol: Optional[float] = None,
               task_mask: Optional[jax.Array] = None):
    r"""Solves ``M alpha = 1 / alpha`` (elementwise), ``alpha > 0``, for a PD matrix ``M``; returns
    ``(alpha, certificate, iterations)``.

    The equation is the stationarity condition of the strictly convex, self-concordant
    ``phi(alpha) = alpha^T M alpha / 2 - sum_t log alpha_t``, minimised by damped Newton steps
    (step ``1 / (1 + lambda)``, ``lambda`` the Newton decrement): every iterate stays positive,
    ``phi`` decreases, and convergence is quadratic near the solution. Start: ``1/sqrt(diag M)``
    rescaled by the exact minimiser of ``phi`` along that ray (exact for orthogonal or duplicate
    rows). Each step solves ``(D M D + I) y = -D grad`` with ``D = diag(alpha)`` (eigenvalues
    >= 1, so the Cholesky factorisation cannot fail). Under ``lax.while_loop`` until
    :func:`bargaining_residual` ``<= tol`` (default ``16 eps``), the Newton decrement squared
    falls below ``T eps`` (no decrease of ``phi`` left above its round-off: the residual is then
    at its floor, ~eps times the conditioning of ``M``, reported as the certificate), or
    ``max_iterations`` steps.

    ``task_mask`` (T,) bool (partial labels): ``gram`` must be decoupled
    (:func:`imtl_jax.methods._mask.decouple`: identity rows and columns for the absent tasks,
    whose solution is ``alpha_t = 1``). The absent entries start at 1 and the Newton steps keep
    them there exactly (block-diagonal system), the start's rescaling and the round-off
    threshold are the present tasks' (T'), so the present entries follow the path of the
    T'-task problem.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    tol = default_tol(dtype) if tol is None else float(tol)
    eye = jnp.eye(num_tasks, dtype=dtype)
    a0 = 1.0 / jnp.sqrt(jnp.diag(gram))
    size: Any = num_tasks                       # the problem's number of tasks (T' if masked)
    if task_mask is None:
        a0 = a0 * jnp.sqrt(num_tasks / jnp.dot(a0, jnp.matmul(gram, a0, precision=HIGHEST)))
    else:
        size = _mask.count(task_mask, dtype)
        present = _mask.entries(a0, task_mask)
        a0 = jnp.where(task_mask, a0 * jnp.sqrt(size / jnp.dot(present, jnp.matmul(
            gram, present, precision=HIGHEST))), 1.0)

    def newton(a):
        grad = jnp.matmul(gram, a, precision=HIGHEST) - 1.0 / a
        scaled = a[:, None] * gram * a[None, :] + eye
        factor = jax.scipy.linalg.cho_factor(scaled)
        delta = a * jax.scipy.linalg.cho_solve(factor, -a * grad)
        decrement = jnp.sqrt(jnp.maximum(-jnp.dot(grad, delta), 0.0))
        new = a + delta / (1.0 + decrement)
        ok = jnp.all(jnp.isfinite(new) & (new > 0))
        return jnp.where(ok, new, a), decrement

    def cond(carry):
        _, res, it, moved = carry
        return (res > tol) & (it < max_iterations) & moved

    def body(carry):
        a, _, it, _ = carry
        new, decrement = newton(a)
        # Progress left: the step changed alpha and the predicted decrease of phi, lambda^2 / 2,
        # is above the round-off of phi (~ T eps): past that, the residual is at its floor
        # (eps times the conditioning of M), not reducible in the working precision.
        moved = jnp.any(new != a) & (decrement * decrement > size * jnp.finfo(dtype).eps)
        return new, bargaining_residual(gram, new), it + 1, moved

    a, res, it, _ = lax.while_loop(cond, body, (a0, bargaining_residual(gram, a0),
                                                 jnp.zeros((), jnp.int32), jnp.ones((), bool)))
    return a, res, it


def _nash_weights(grads, max_iterations, tol, task_mask=None):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(cdt))
    else:
        # Partial labels: the present tasks' Gramian block (the absent rows and columns 0, so
        # the Frobenius norm is theirs), decoupled below; their weights are then those of the
        # T'-task problem (nash_solve).
        gram, _ = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
    fro = jnp.sqrt(jnp.sum(gram * gram))
    nonzero = fro > 0
    # The authors' normalisation GTG / ||GTG||_F, plus a ridge eps * I that keeps alpha finite
    # (<= 1 / sqrt(eps)) when some direction v >= 0 has M v = 0 (a zero row, rows g and -g).
    gram = gram / jnp.where(nonzero, fro, 1.0) + jnp.finfo(cdt).eps * jnp.eye(num_tasks, dtype=cdt)
    if task_mask is not None:
        gram = _mask.decouple(gram, task_mask)
    alpha, res, it = nash_solve(gram, max_iterations, tol, task_mask)
    alpha = jnp.where(nonzero, alpha, jnp.ones_like(alpha))
    if task_mask is not None:
        alpha = _mask.entries(alpha, task_mask)
    # Stopped on its certificate, or with no decrease of phi left above round-off (the
    # residual's floor), not at its cap.
    converged = jnp.isfinite(res) & ((res <= (default_tol(cdt) if tol is None else tol)) | (it < max_iterations))
    info = {"certificate": jnp.where(nonzero, res, 0.0).astype(grads.dtype), "iterations": it,
            "converged": converged | ~nonzero}
    return nan_if_not_finite(alpha, grads).astype(grads.dtype), info


@functools.partial(jax.jit, static_argnames=("max_iterations", "tol"))
def nash_mtl_weights(grads: jax.Array, *, max_iterations: int = 50,
                     tol: Optional[float] = None) -> jax.Array:
    """Nash-MTL weights for the (T, F) gradients ``grads`` (see :func:`nash_mtl_weighting`)."""
    grads = check_matrix(grads, "nash_mtl")
    return _nash_weights(grads, *_check_args(max_iterations, tol))[0]


def _check_args(max_iterations, tol):
    if not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or max_iterations < 1:
        raise ValueError(f"`max_iterations` must be a positive int, got {max_iterations!r}.")
    if tol is not None and not float(tol) >= 0:
        raise ValueError(f"`tol` must be >= 0 or None, got {tol!r}.")
    return max_iterations, None if tol is None else float(tol)


def _nash_weigh(grads, losses, state, key, priorities, *, max_iterations, tol, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "nash_mtl")
    w, info = _nash_weights(grads, max_iterations, tol, task_mask)
    return WeightingOutput(w, state, info)


def nash_mtl_weighting(*, max_iterations: int = 50, tol: Optional[float] = None) -> Weighting:
    r"""Nash-MTL as a :class:`~imtl_jax.Weighting` (Navon et al., ICML 2022).

    The Nash bargaining solution of the tasks' utilities ``g_t . Delta`` over the ball gives
    ``Delta = sum_t alpha_t g_t`` with ``G G^T alpha = 1 / alpha`` (elementwise reciprocal),
    ``alpha > 0``. We solve it on the Gramian normalised by its Frobenius norm, plus a ridge
    ``eps I`` (eps of the dtype): the weights are invariant to a uniform rescaling of the
    gradients and the update scales like equal weighting's. The authors' code divides
    ``G G^T`` by its Frobenius norm too but re-uses that factor inside its constraint, so its
    weights solve the raw equation ``G G^T a = 1 / a``: ours are ``sqrt(||G G^T||_F)`` times
    theirs, the same direction (their update's scale follows the gradients' scale instead).
    Solver: damped Newton steps on the convex ``alpha^T M alpha / 2 - sum log alpha``
    (:func:`nash_solve`) until the residual ``max_t |alpha_t (M alpha)_t - 1| <= tol``, instead
    of the authors' sequence of cvxpy problems.

    Not included from the authors' code: gradient-norm clipping (``max_norm=1``; add
    ``optax.clip_by_global_norm`` to the optimizer) and updating the weights only every k steps.

    Degenerate inputs: duplicate rows share one weight; a zero row, or rows g and -g, have no
    finite solution without the ridge and get weights up to ``1/sqrt(eps)`` (their contribution
    ``alpha_t g_t`` stays bounded); all-zero gradients give weights 1; T = 1 gives ~1.

    Args:
      max_iterations: cap on the damped Newton iterations (default 50).
      tol: certificate tolerance (default ``16 eps`` of the working dtype).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^3) per Newton
    iteration (one (T, T) Cholesky). ``info``: ``certificate`` (the final residual),
    ``iterations`` (int32) and ``converged`` (bool: stopped on ``tol`` or at the residual's
    round-off floor, not at ``max_iterations``). Gradient method: heads get their own loss gradient.

    Partial labels (``task_mask``): the bargaining problem of the present tasks (their Gramian
    block and its Frobenius norm), solved on the T'-task problem's path (:func:`nash_solve`);
    ``certificate``/``converged`` are its own. Stateless (no warm start).
    """
    max_iterations, tol = _check_args(max_iterations, tol)
    return Weighting(name="nash_mtl", init=stateless_init,
                     weigh=functools.partial(_nash_weigh, max_iterations=max_iterations, tol=tol),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


NASH_MTL = nash_mtl_weighting()

register(Method("nash_mtl", IDENTITY, NASH_MTL))
