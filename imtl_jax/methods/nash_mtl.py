"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
Learning as a Bargaining Game", ICML 2022).

Registered name: ``nash_mtl``.
"""

from __future__ import annotations

import functools

import jax
import jax.scipy.linalg
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian)
from imtl_jax.methods.equal import IDENTITY


def nash_solve(gram: jax.Array, iterations: int) -> jax.Array:
    r"""Solves ``M alpha = 1 / alpha`` (elementwise), ``alpha > 0``, for a PD matrix ``M``.

    The equation is the stationarity condition of the strictly convex, self-concordant
    ``phi(alpha) = alpha^T M alpha / 2 - sum_t log alpha_t``, minimised by damped Newton steps
    (step ``1 / (1 + lambda)``, ``lambda`` the Newton decrement): every iterate stays positive,
    ``phi`` decreases, and convergence is quadratic near the solution. Start: ``1/sqrt(diag M)``
    rescaled by the exact minimiser of ``phi`` along that ray (exact for orthogonal or duplicate
    rows). Each step solves ``(D M D + I) y = -D grad`` with ``D = diag(alpha)`` (eigenvalues
    >= 1, so the Cholesky factorisation cannot fail). Measured in float64 on random Gramians with
    T <= 40: ``max_t |(M alpha)_t alpha_t - 1| < 1e-14`` after 10 iterations.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eye = jnp.eye(num_tasks, dtype=dtype)
    a0 = 1.0 / jnp.sqrt(jnp.diag(gram))
    a0 = a0 * jnp.sqrt(num_tasks / jnp.dot(a0, jnp.matmul(gram, a0, precision=HIGHEST)))

    def body(_, a):
        grad = jnp.matmul(gram, a, precision=HIGHEST) - 1.0 / a
        scaled = a[:, None] * gram * a[None, :] + eye
        factor = jax.scipy.linalg.cho_factor(scaled)
        delta = a * jax.scipy.linalg.cho_solve(factor, -a * grad)
        decrement = jnp.sqrt(jnp.maximum(-jnp.dot(grad, delta), 0.0))
        new = a + delta / (1.0 + decrement)
        ok = jnp.all(jnp.isfinite(new) & (new > 0))
        return jnp.where(ok, new, a)

    return lax.fori_loop(0, iterations, body, a0)


def _nash_weights(grads, iterations):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    gram, _ = normalized_gramian(grads.astype(cdt))
    fro = jnp.sqrt(jnp.sum(gram * gram))
    nonzero = fro > 0
    # The authors' normalisation GTG / ||GTG||_F, plus a ridge eps * I that keeps alpha finite
    # (<= 1 / sqrt(eps)) when some direction v >= 0 has M v = 0 (a zero row, rows g and -g).
    gram = gram / jnp.where(nonzero, fro, 1.0) + jnp.finfo(cdt).eps * jnp.eye(num_tasks, dtype=cdt)
    alpha = nash_solve(gram, iterations)
    alpha = jnp.where(nonzero, alpha, jnp.ones_like(alpha))
    return nan_if_not_finite(alpha, grads).astype(grads.dtype)


@functools.partial(jax.jit, static_argnames=("iterations",))
def nash_mtl_weights(grads: jax.Array, *, iterations: int = 20) -> jax.Array:
    """Nash-MTL weights for the (T, F) gradients ``grads`` (see :func:`nash_mtl_weighting`)."""
    grads = check_matrix(grads, "nash_mtl")
    return _nash_weights(grads, _check_iterations(iterations))


def _check_iterations(iterations):
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"`iterations` must be a positive int, got {iterations!r}.")
    return iterations


def _nash_weigh(grads, losses, state, key, priorities, *, iterations):
    del key
    grads, losses = check_grads(grads, losses, priorities, "nash_mtl")
    return WeightingOutput(_nash_weights(grads, iterations), state, {})


def nash_mtl_weighting(*, iterations: int = 20) -> Weighting:
    r"""Nash-MTL as a :class:`~imtl_jax.Weighting` (Navon et al., ICML 2022).

    The Nash bargaining solution of the tasks' utilities ``g_t . Delta`` over the ball gives
    ``Delta = sum_t alpha_t g_t`` with ``G G^T alpha = 1 / alpha`` (elementwise reciprocal),
    ``alpha > 0``: the equation this solves, on the Gramian normalised by its Frobenius norm as
    in the authors' code (so the weights are invariant to a uniform rescaling of the gradients,
    and the update scales like equal weighting's), plus a ridge ``eps I`` (eps of the dtype).
    Solver: a fixed number of damped Newton steps on the convex ``alpha^T M alpha / 2 -
    sum log alpha`` (:func:`nash_solve`), instead of the authors' sequence of cvxpy problems.

    Not included from the authors' code: gradient-norm clipping (``max_norm=1``; add
    ``optax.clip_by_global_norm`` to the optimizer) and updating the weights only every k steps.

    Degenerate inputs: duplicate rows share one weight; a zero row, or rows g and -g, have no
    finite solution without the ridge and get weights up to ``1/sqrt(eps)`` (their contribution
    ``alpha_t g_t`` stays bounded); all-zero gradients give weights 1; T = 1 gives ~1.

    Args:
      iterations: damped Newton iterations (default 20).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(iterations T^3) (one
    (T, T) Cholesky per iteration). Gradient method: heads get their own loss gradient.
    """
    iterations = _check_iterations(iterations)
    return Weighting(name="nash_mtl", init=stateless_init,
                     weigh=functools.partial(_nash_weigh, iterations=iterations),
                     needs_grads=True, weights_heads=False)


NASH_MTL = nash_mtl_weighting()

register(Method("nash_mtl", IDENTITY, NASH_MTL))
