"""MGDA: the minimum-norm point of the convex hull of the task gradients (Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018), and its unconstrained
closed-form variant compared in the IMTL paper.

Registered names:

* ``mgda`` — ``min_w ||sum_t w_t g_t||^2`` s.t. ``w >= 0, sum w = 1`` (Eq. 3 of Sener & Koltun;
  their MGDA-UB applies it to the gradients w.r.t. the shared representation, our default level)
  by Frank-Wolfe on the Gramian (:func:`mgda_weights`).
* ``mgda_closed_form`` — the same without ``w >= 0``: ``w = M^+ 1 / (1^T M^+ 1)``
  (:func:`mgda_closed_form_weights`); the IMTL paper's "MGDA (closed form, no alpha >= 0)".
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
    """The fixed Frank-Wolfe iteration count used when none is given: ``50 + 10 T``."""
    return 50 + 10 * num_tasks


def min_norm_simplex(gram: jax.Array, iterations: int, pairwise: bool = True) -> jax.Array:
    """``argmin_{w in simplex} w^T M w`` by Frank-Wolfe with exact line search (fixed count).

    ``pairwise=False`` is Sener & Koltun's Algorithm 2: move towards the vertex ``e_t`` with the
    smallest ``(M w)_t``, step from their Algorithm 1 (the closed-form min-norm point of a
    segment). ``pairwise=True`` (default) moves weight from the worst vertex of the support
    (largest ``(M w)_s``) to ``e_t`` instead, also with an exact line search (Lacoste-Julien &
    Jaggi, NeurIPS 2015): it can drop a vertex to exactly 0 and converges linearly. After the
    fixed iteration count, one exact solve on the support (``w_S ∝ M_SS^+ 1``, kept if feasible
    and no worse) removes the slow tail: float64 KKT conditions then hold to ~1e-13. For T = 2
    both variants take the closed-form segment minimiser at the first iteration.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eye = jnp.eye(num_tasks, dtype=dtype)

    def pairwise_step(_, w):
        mw = jnp.matmul(gram, w, precision=HIGHEST)
        t = jnp.argmin(mw)
        s = jnp.argmax(jnp.where(w > 0, mw, -jnp.inf))
        slope = mw[t] - mw[s]                                   # <= 0
        curv = gram[t, t] - 2.0 * gram[t, s] + gram[s, s]       # ||g_t - g_s||^2 >= 0
        cap = w[s]
        step = jnp.where(curv > 0, jnp.clip(safe_div(-slope, curv), 0.0, cap),
                         jnp.where(slope < 0, cap, 0.0))
        step = jnp.where(t == s, 0.0, step)
        w = w + step * eye[t] - step * eye[s]
        return w.at[s].set(jnp.where(step >= cap, 0.0, w[s]))  # exact drop step

    def vanilla_step(_, w):
        mw = jnp.matmul(gram, w, precision=HIGHEST)
        t = jnp.argmin(mw)
        vv = jnp.dot(w, mw)
        vg = mw[t]
        curv = vv - 2.0 * vg + gram[t, t]                       # ||v - g_t||^2
        step = jnp.where(curv > 0, jnp.clip(safe_div(vv - vg, curv), 0.0, 1.0), 0.0)
        return (1.0 - step) * w + step * eye[t]

    body = pairwise_step if pairwise else vanilla_step
    w0 = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    return _polish(gram, lax.fori_loop(0, iterations, body, w0))


def _polish(gram: jax.Array, w: jax.Array) -> jax.Array:
    """One exact solve on the support ``S = {w > 0}``: ``w_S ∝ M_SS^+ 1`` (the min-norm point of
    that face), kept only if it is in the simplex and no worse. Exact once Frank-Wolfe has found
    the optimal face, which removes the slow tail of the linear convergence."""
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    support = w > 0
    sub = jnp.where(support[:, None] & support[None, :], gram, jnp.eye(num_tasks, dtype=dtype))
    evals, evecs = jnp.linalg.eigh(sub)
    keep = evals > 10.0 * num_tasks * eps * jnp.max(jnp.abs(evals))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    rhs = jnp.where(support, 1.0, 0.0).astype(dtype)
    x = jnp.matmul(evecs, inv * jnp.matmul(evecs.T, rhs, precision=HIGHEST), precision=HIGHEST)
    x = jnp.where(support, x, 0.0)
    total = jnp.sum(x)
    cand = x / jnp.where(total > 0, total, 1.0)

    def value(v):
        return jnp.dot(v, jnp.matmul(gram, v, precision=HIGHEST))

    ok = (total > 0) & jnp.all(cand >= 0) & jnp.all(jnp.isfinite(cand))
    ok = ok & (value(cand) <= value(w) * (1.0 + 10.0 * eps))
    return jnp.where(ok, cand, w)


@functools.partial(jax.jit, static_argnames=("iterations", "pairwise"))
def mgda_weights(grads: jax.Array, *, iterations: Optional[int] = None,
                 pairwise: bool = True) -> jax.Array:
    """MGDA weights: the min-norm point of the convex hull of the rows of ``grads`` (T, F).

    Returns ``w`` (T,) with ``w >= 0``, ``sum w = 1`` minimising ``||w @ grads||``. The Gramian is
    formed once from the rows divided by ``max|grads|`` (the weights are invariant to a uniform
    scale), then :func:`min_norm_simplex`. KKT: ``(M w)_t >= w^T M w`` for all t, with equality
    where ``w_t > 0``.

    Degenerate inputs: a zero row is a hull vertex at the origin, so it takes all the weight (the
    aggregate is 0: MGDA stops at a Pareto-stationary point); duplicate rows split their weight;
    all-zero rows give uniform weights; T = 1 gives [1].

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.mgda import mgda_weights
      >>> mgda_weights(jnp.array([[1.0, 0.0], [0.0, 2.0]]))  # orthogonal: w ∝ 1/|g_t|^2
      Array([0.8, 0.2], dtype=float32)
    """
    grads = check_matrix(grads, "mgda")
    num_tasks = grads.shape[0]
    iterations = default_iterations(num_tasks) if iterations is None else int(iterations)
    gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
    w = min_norm_simplex(gram, iterations, pairwise=bool(pairwise))
    return nan_if_not_finite(w, grads).astype(grads.dtype)


def _mgda_weigh(grads, losses, state, key, priorities, *, iterations, pairwise):
    del key
    grads, losses = check_grads(grads, losses, priorities, "mgda")
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    iters = default_iterations(num_tasks) if iterations is None else iterations
    gram, scale = normalized_gramian(grads.astype(cdt))
    w = min_norm_simplex(gram, iters, pairwise=pairwise)
    norm = jnp.sqrt(jnp.maximum(jnp.dot(w, jnp.matmul(gram, w, precision=HIGHEST)), 0.0)) * scale
    w = nan_if_not_finite(w, grads)
    return WeightingOutput(w.astype(grads.dtype), state, {"min_norm": norm.astype(grads.dtype)})


def mgda_weighting(*, iterations: Optional[int] = None, pairwise: bool = True) -> Weighting:
    r"""MGDA as a :class:`~imtl_jax.Weighting` (Sener & Koltun, NeurIPS 2018).

    Solves Eq. 3 of the paper, ``min_{w >= 0, sum w = 1} ||sum_t w_t g_t||^2``, by Frank-Wolfe on
    the (T, T) Gramian with exact line search (their Algorithms 1-2; pairwise variant by
    default, see :func:`min_norm_simplex`) for a fixed number of iterations under
    ``lax.fori_loop``. No gradient normalisation (the authors' code offers "l2"/"loss"/"loss+";
    the IMTL paper's MGDA baseline uses none). Weights sum to 1 (the paper's convention; the
    aggregate is the min-norm element). Gradient method: heads get their own loss gradient.

    Args:
      iterations: Frank-Wolfe iterations (default ``50 + 10 T``).
      pairwise: pairwise (default) or the paper's plain Frank-Wolfe steps.

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(iterations T) (each
    iteration one (T, T) matrix-vector product). ``info["min_norm"]`` is ``||w @ grads||``.
    """
    if iterations is not None and (not isinstance(iterations, int) or isinstance(iterations, bool)
                                   or iterations < 1):
        raise ValueError(f"`iterations` must be a positive int or None, got {iterations!r}.")
    return Weighting(name="mgda", init=stateless_init,
                     weigh=functools.partial(_mgda_weigh, iterations=iterations,
                                             pairwise=bool(pairwise)),
                     needs_grads=True, weights_heads=False)


# ----------------------------------------------------------------------------------------------


def _closed_form(gram: jax.Array) -> jax.Array:
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    ones = jnp.ones((num_tasks,), dtype)
    evals, evecs = jnp.linalg.eigh(gram)
    cutoff = 10.0 * num_tasks * jnp.finfo(dtype).eps * jnp.max(jnp.abs(evals))
    keep = evals > cutoff
    coords = jnp.matmul(evecs.T, ones, precision=HIGHEST)
    # Null-space part of 1: if nonzero, sum w = 1 is reachable with M w = 0 (aggregate 0).
    null_part = jnp.matmul(evecs, jnp.where(keep, 0.0, coords), precision=HIGHEST)
    null_mass = jnp.sum(null_part)                       # = ||P_null 1||^2 >= 0
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    range_part = jnp.matmul(evecs, inv * coords, precision=HIGHEST)   # M^+ 1
    range_mass = jnp.sum(range_part)
    use_null = null_mass > jnp.sqrt(jnp.finfo(dtype).eps)
    w_null = safe_div(null_part, null_mass, 1.0 / num_tasks)
    w_range = jnp.where(range_mass > 0, range_part / jnp.where(range_mass > 0, range_mass, 1.0),
                        ones / num_tasks)
    return jnp.where(use_null, w_null, w_range)


@jax.jit
def mgda_closed_form_weights(grads: jax.Array) -> jax.Array:
    """Unconstrained min-norm weights: ``argmin ||w @ grads||`` s.t. ``sum w = 1`` (w may be < 0).

    KKT: ``M w = lambda 1``. If ``1`` lies in the range of the Gramian ``M`` the solution is
    ``w = M^+ 1 / (1^T M^+ 1)`` (aggregate norm ``1 / sqrt(1^T M^+ 1)``). Otherwise some ``w``
    with ``M w = 0`` and ``sum w = 1`` exists (the affine hull of the rows holds the origin:
    a zero row, or rows such as g and -g) and ``w = P_null 1 / (1^T P_null 1)`` is the minimum
    norm such weight vector (aggregate 0). Both use one eigendecomposition of ``M`` (from rows
    divided by ``max|grads|``) with the cutoff ``10 T eps`` relative to its largest eigenvalue, so
    the rank test is scale-free. Duplicate rows split their weight; T = 1 gives [1].
    """
    grads = check_matrix(grads, "mgda_closed_form")
    gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
    return nan_if_not_finite(_closed_form(gram), grads).astype(grads.dtype)


def _mgda_cf_weigh(grads, losses, state, key, priorities):
    del key
    grads, losses = check_grads(grads, losses, priorities, "mgda_closed_form")
    gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
    w = nan_if_not_finite(_closed_form(gram), grads)
    return WeightingOutput(w.astype(grads.dtype), state, {})


def mgda_closed_form_weighting() -> Weighting:
    r"""Closed-form MGDA without ``w >= 0`` as a :class:`~imtl_jax.Weighting`.

    ``min_w ||sum_t w_t g_t||^2`` s.t. ``sum_t w_t = 1``: ``w = M^+ 1 / (1^T M^+ 1)`` with the
    Gramian ``M = G G^T`` and a scale-relative pseudo-inverse (see
    :func:`mgda_closed_form_weights`). The baseline "MGDA (closed form, without alpha >= 0)" of
    Liu et al., ICLR 2021 (IMTL), from Sener & Koltun's Eq. 3 with the inequality dropped.
    Weights sum to 1 and may be negative (a head then still gets its own loss gradient).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), one (T, T) eigendecomposition.
    Accuracy: the Gramian squares the condition number of G (float32 loses accuracy for
    nearly dependent rows; rank deficiency itself is handled).
    """
    return Weighting(name="mgda_closed_form", init=stateless_init, weigh=_mgda_cf_weigh,
                     needs_grads=True, weights_heads=False)


MGDA = mgda_weighting()
MGDA_CLOSED_FORM = mgda_closed_form_weighting()

register(Method("mgda", IDENTITY, MGDA))
register(Method("mgda_closed_form", IDENTITY, MGDA_CLOSED_FORM))
