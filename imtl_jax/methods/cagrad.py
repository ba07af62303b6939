"""CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021).

Registered name: ``cagrad`` (``c = 0.5``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian, safe_div)
from imtl_jax.methods.equal import IDENTITY


def default_iterations(num_tasks: int) -> int:
    """The fixed iteration count used when none is given: ``50 + 10 T``."""
    return 50 + 10 * num_tasks


def cagrad_dual(gram: jax.Array, c: float, iterations: int) -> jax.Array:
    r"""``argmin_{w in simplex} F(w) = w^T M 1/T + c ||g_0|| sqrt(w^T M w)`` (fixed iterations).

    ``F`` is CAGrad's dual objective ``g_w . g_0 + sqrt(phi) ||g_w||`` with ``g_0`` the mean
    gradient, ``g_w = sum_t w_t g_t`` and ``phi = c^2 ||g_0||^2``, written on the Gramian ``M``.
    Solved by pairwise Frank-Wolfe: each iteration moves weight from the support vertex with the
    largest partial derivative to the vertex with the smallest, with an exact line search (the
    1-D problem ``min_s A s + rho sqrt(q(s))`` with quadratic ``q`` has a closed-form minimiser).
    ``F`` is convex, so the iterates decrease it monotonically.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    tiny = jnp.finfo(dtype).tiny
    eye = jnp.eye(num_tasks, dtype=dtype)
    lin = jnp.mean(gram, axis=1)                                   # M 1 / T = G g_0
    rho = c * jnp.sqrt(jnp.maximum(jnp.mean(gram), 0.0))           # c ||g_0||

    def body(_, w):
        mw = jnp.matmul(gram, w, precision=HIGHEST)
        q0 = jnp.maximum(jnp.dot(w, mw), 0.0)                      # ||g_w||^2
        grad = lin + rho * mw / jnp.maximum(jnp.sqrt(q0), tiny)
        t = jnp.argmin(grad)
        s = jnp.argmax(jnp.where(w > 0, grad, -jnp.inf))
        # Along w + step (e_t - e_s), 0 <= step <= w_s:
        # F = F(w) + a step + rho sqrt(q0 + 2 b step + k step^2).
        a = lin[t] - lin[s]
        b = mw[t] - mw[s]
        k = gram[t, t] - 2.0 * gram[t, s] + gram[s, s]
        cap = w[s]
        k_safe = jnp.where(k > 0, k, 1.0)
        disc = jnp.maximum(q0 * k - b * b, 0.0)                    # >= 0 by Cauchy-Schwarz
        # Stationary point: y / sqrt(y^2 + disc) = r with y = b + k step, r = -a / (rho sqrt k).
        r = -a / jnp.maximum(rho * jnp.sqrt(k_safe), tiny)
        rc = jnp.clip(r, -1.0, 1.0)
        y = rc * jnp.sqrt(disc) / jnp.sqrt(jnp.maximum(1.0 - rc * rc, tiny))
        unconstrained = jnp.where(r >= 1.0, jnp.inf, jnp.where(r <= -1.0, -jnp.inf,
                                                                (y - b) / k_safe))
        step = jnp.where(k > 0, jnp.clip(unconstrained, 0.0, cap),
                         jnp.where(a < 0, cap, 0.0))               # k = 0: F is linear
        step = jnp.where(t == s, 0.0, step)
        w = w + step * eye[t] - step * eye[s]
        return w.at[s].set(jnp.where(step >= cap, 0.0, w[s]))

    w0 = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    return lax.fori_loop(0, iterations, body, w0)


def _cagrad_weights(grads, c, rescale, iterations):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    gram, _ = normalized_gramian(grads.astype(cdt))
    iters = default_iterations(num_tasks) if iterations is None else iterations
    w = cagrad_dual(gram, c, iters)
    g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(gram), 0.0))
    gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, jnp.matmul(gram, w, precision=HIGHEST)), 0.0))
    lam = safe_div(c * g0_norm, gw_norm, 0.0)                      # sqrt(phi) / ||g_w||
    # d = g_0 + lam g_w, rescaled, times T (to match the sum of the losses at c = 0).
    weights = (1.0 / num_tasks + lam * w) * num_tasks
    if rescale == 1:
        weights = weights / (1.0 + c * c)
    elif rescale == 2:
        weights = weights / (1.0 + c)
    return nan_if_not_finite(weights, grads).astype(grads.dtype), w


@functools.partial(jax.jit, static_argnames=("c", "rescale", "iterations"))
def cagrad_weights(grads: jax.Array, *, c: float = 0.5, rescale: int = 1,
                   iterations: Optional[int] = None) -> jax.Array:
    """CAGrad weights for the (T, F) gradients ``grads``: ``d = weights @ grads``
    (see :func:`cagrad_weighting`)."""
    grads = check_matrix(grads, "cagrad")
    c, rescale, iterations = _check_args(c, rescale, iterations)
    return _cagrad_weights(grads, c, rescale, iterations)[0]


def _check_args(c, rescale, iterations):
    c = float(c)
    if not c >= 0:
        raise ValueError(f"`c` must be >= 0, got {c!r}.")
    if rescale not in (0, 1, 2):
        raise ValueError(f"`rescale` must be 0, 1 or 2, got {rescale!r}.")
    if iterations is not None and (not isinstance(iterations, int) or isinstance(iterations, bool)
                                   or iterations < 1):
        raise ValueError(f"`iterations` must be a positive int or None, got {iterations!r}.")
    return c, int(rescale), iterations


def _cagrad_weigh(grads, losses, state, key, priorities, *, c, rescale, iterations):
    del key
    grads, losses = check_grads(grads, losses, priorities, "cagrad")
    weights, dual = _cagrad_weights(grads, c, rescale, iterations)
    return WeightingOutput(weights, state, {"dual_weights": dual.astype(grads.dtype)})


def cagrad_weighting(*, c: float = 0.5, rescale: int = 1,
                     iterations: Optional[int] = None) -> Weighting:
    r"""CAGrad as a :class:`~imtl_jax.Weighting` (Liu et al., NeurIPS 2021, Algorithm 1).

    Primal: ``max_d min_t g_t . d`` s.t. ``||d - g_0|| <= c ||g_0||`` with the mean gradient
    ``g_0``. Dual: ``min_{w in simplex} g_w . g_0 + sqrt(phi) ||g_w||`` with
    ``g_w = sum_t w_t g_t`` and ``phi = c^2 ||g_0||^2``; then ``d = g_0 + (sqrt(phi)/||g_w||) g_w``.
    The dual is solved on the (T, T) Gramian by a fixed number of pairwise Frank-Wolfe steps
    with exact line search under ``lax.fori_loop`` (:func:`cagrad_dual`; measured against scipy
    SLSQP in float64: objective equal or lower, to 1e-12 relative). As in the authors' code,
    ``rescale=1`` divides ``d`` by ``1 + c^2`` (0: no rescaling, 2: by ``1 + c``) and ``d`` is
    multiplied by T to match the gradient of the *sum* of the losses, so ``c = 0`` is equal
    weighting. The weights on the original rows are ``T (1/T + lambda w) / (1 + c^2)``.

    Args:
      c: the conflict-aversion radius, >= 0 (0.5: the default of the authors' ``cagrad``
        function; the best value is benchmark dependent, Nash-MTL's code uses 0.4).
      rescale: 0, 1 (default) or 2, see above.
      iterations: Frank-Wolfe iterations (default ``50 + 10 T``).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(iterations T).
    Gradient method: heads get their own loss gradient. ``info["dual_weights"]`` is ``w``.
    """
    c, rescale, iterations = _check_args(c, rescale, iterations)
    return Weighting(name="cagrad", init=stateless_init,
                     weigh=functools.partial(_cagrad_weigh, c=c, rescale=rescale,
                                             iterations=iterations),
                     needs_grads=True, weights_heads=False)


CAGRAD = cagrad_weighting()

register(Method("cagrad", IDENTITY, CAGRAD))
