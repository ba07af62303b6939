"""The parameter-level ("exact") step: per-task gradients w.r.t. the shared parameters.

For ``imtl_g_exact`` the weights need the Jacobian ``J`` (T, P) of the T losses w.r.t. the P
shared parameters only through its Gramian ``G = J J^T`` (T, T): the cosine matrix is
``K = D^-1 G D^-1`` with ``D = diag(sqrt(G_tt))`` (the row norms). So the step computes

1. the T per-task parameter gradients with one vmapped encoder VJP (T backward passes; this is
   the Jacobian, leaf by leaf, never flattened or concatenated into one (T, P) array);
2. ``G = sum_leaf J_leaf J_leaf^T``, one (T x P_leaf) Gram product per leaf;
3. the T x T solve of :func:`imtl_jax.imtl_g_solve` on ``K`` (Cholesky, pseudo-inverse when
   ill-conditioned), the weights ``alpha_t = (beta_t / |g_t|) / sum_s beta_s / |g_s|``;
4. the shared gradient ``sum_t alpha_t J_t``, leaf by leaf (a (1 x T) by (T x P_leaf) product).

The physical limit of the exact level is T encoder backward passes plus the Gram product
(``T^2 P`` multiply-adds): steps 1 and 2. Step 4 reads the Jacobian once more (``T P``), step 3
is O(T^3). Compared with the generic route (flatten the leaves into a (T, P) matrix, then
:func:`imtl_jax.imtl_g_solve` on it: a concatenation copy, scale, norms, unit rows, cosines, the
aggregate and the projections, ~10 passes over (T, P)), this removes every full pass over the
Jacobian but the Gram product and the contraction.

Accuracy: the same as :func:`imtl_jax.imtl_g_solve` without its refinement step, which that
function already skips above ``2^20`` entries: below that size (small models) the step keeps the
generic route with the compensated refinement, so the gramian route is only taken where the
refinement was skipped anyway. Forming ``G`` squares the data: when its largest diagonal entry is
zero, not finite or outside ``[2^-42, 2^96]`` (float32; the middle third of the exponent range),
``G`` is formed again from the Jacobian divided by a power of two of its largest absolute entry
(``lax.cond``: one branch runs on accelerators; that branch recomputes the Jacobian, T more
VJPs), so inputs at 1e-15 or 1e15 behave like inputs at 1, as in :func:`imtl_jax.imtl_g_solve`.
One difference remains: a row whose norm is below ``2.3e-13`` (float32) of the largest one may
underflow in ``G`` and then counts as zero (``imtl_g_solve``: below ``eps^2 = 1.4e-14``).

Other weightings at the parameter level (a user's ``Method(..., level="parameters")``) get the
generic route: the flattened (T, P) matrix, as their ``weigh`` expects.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.scipy.linalg
import jax.numpy as jnp
import numpy as np
from jax import lax

from imtl_jax._linalg import spd_inverse
from imtl_jax._imtl_g import _REFINE_MAX_SIZE, _check_priorities, _fallback_weights
from imtl_jax._method import (PyTree, Weighting, WeightingOutput, coordinate_weights_of,
                              direction_of, unflatten_like)
from imtl_jax.methods import _mask
from imtl_jax.methods import imtl as _imtl_methods

_HIGHEST = lax.Precision.HIGHEST

def _solve_cosine_system(k: jax.Array, rhs: jax.Array) -> jax.Array:
    """``K^+ rhs`` for the cosine matrix ``K`` (unit diagonal), as in :func:`imtl_g_solve`."""
    num_tasks = k.shape[0]
    max_cond = 1.0 / (10.0 * num_tasks * jnp.finfo(k.dtype).eps)
    inverse, _ = spd_inverse(k, max_cond)
    return jnp.matmul(inverse, rhs, precision=_HIGHEST)


def _gram_exponent_range(dtype) -> tuple[int, int]:
    """The binary exponents of ``max_t G_tt`` for which G is used as formed: the middle of the
    exponent range (float32: [2^-42, 2^96]), far from overflow, and rows down to
    ``2^((minexp - lo) / 2)`` (float32: 2.3e-13) of the largest norm do not underflow when squared."""
    info = jnp.finfo(dtype)
    return int(info.minexp) // 3, int(info.maxexp) * 3 // 4

# Above this many Jacobian entries IMTL-G takes the gramian route (imtl_g_solve skips its
# refinement there anyway); below it, the flattened matrix and imtl_g_solve with refinement.
_GRAMIAN_MIN_SIZE = _REFINE_MAX_SIZE


def per_task_parameter_grads(encoder_vjp: Callable, z_grads: jax.Array) -> PyTree:
    """The T per-task gradients w.r.t. the shared parameters: the encoder VJP, vmapped over the
    leading task axis of the per-task z-cotangents ``z_grads`` (T, *z.shape). Leaves get a
    leading T axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> z, vjp = jax.vjp(lambda w: jnp.ones((2, 3)) @ w, jnp.ones((3, 4)))
      >>> per_task_parameter_grads(vjp, jnp.ones((5,) + z.shape)).shape
      (5, 3, 4)
    """
    return jax.vmap(encoder_vjp)(z_grads)[0]


def _leaf_rows(x: jax.Array, num_tasks: int) -> jax.Array:
    return x.reshape(num_tasks, -1)


def _leaf_gram(rows: jax.Array, dtype) -> jax.Array:
    """``rows rows^T`` for a (T, P_leaf) block."""
    return lax.dot_general(rows, rows, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                           preferred_element_type=dtype).astype(dtype)


def gramian(jacobian: PyTree, num_tasks: int, dtype=jnp.float32,
            shift: Optional[jax.Array] = None) -> jax.Array:
    """``G = J J^T`` (T, T) summed leaf by leaf over a pytree whose leaves have a leading task
    axis T (optionally of ``2^shift J``), accumulated in ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> jac = {"a": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "b": jnp.array([[[1.0]], [[1.0]]])}
      >>> gramian(jac, 2)
      Array([[2., 1.],
             [1., 5.]], dtype=float32)
    """
    total = jnp.zeros((num_tasks, num_tasks), dtype)
    for leaf in jax.tree_util.tree_leaves(jacobian):
        rows = _leaf_rows(leaf, num_tasks)
        if shift is not None:
            rows = _mul_pow2(rows, shift)
        total = total + _leaf_gram(rows, dtype)
    return total


def _safe_gramian(jacobian: PyTree, recompute: Callable[[], PyTree], num_tasks: int,
                  dtype) -> tuple[jax.Array, jax.Array]:
    """``(G_s, f)`` with ``J J^T = G_s 2^f`` exactly and ``max diag(G_s)`` in [1/2, 1) (or 0).

    ``G`` is formed from ``jacobian`` as it is; when that over- or underflowed (its largest
    diagonal entry zero or outside :func:`_gram_exponent_range`, or not finite), a ``lax.cond`` branch forms it
    again from ``recompute()`` (the same Jacobian) divided by a power of two of its largest
    absolute entry. The branch recomputes instead of receiving the Jacobian so that the common
    path does not hand the (T, P) leaves to the conditional (which would fix their layout and
    cost a copy of each).
    """
    gram = gramian(jacobian, num_tasks, dtype)
    top = jnp.max(jnp.diagonal(gram))
    _, e = jnp.frexp(jnp.where(top > 0, top, jnp.ones((), dtype)))
    lo, hi = _gram_exponent_range(dtype)
    ok = jnp.all(jnp.isfinite(gram)) & (top > 0) & (e >= lo) & (e <= hi)

    def rescaled(gram):  # the data squared over/underflowed: scale the Jacobian first
        jac = recompute()
        absmax = jnp.zeros((), dtype)
        for leaf in jax.tree_util.tree_leaves(jac):
            absmax = jnp.maximum(absmax, jnp.max(jnp.abs(leaf)).astype(dtype))
        finite = (absmax > 0) & jnp.isfinite(absmax)
        _, k = jnp.frexp(jnp.where(finite, absmax, jnp.ones((), dtype)))
        scaled = gramian(jac, num_tasks, dtype, shift=-k)
        # absmax inf/NaN: keep the non-finite gram so that the outputs become NaN
        return jnp.where(jnp.isfinite(absmax), scaled, gram), (2 * k).astype(jnp.int32)

    gram, f = lax.cond(ok, lambda g: (g, jnp.zeros((), jnp.int32)), rescaled, gram)
    top = jnp.max(jnp.diagonal(gram))
    _, e = jnp.frexp(jnp.where((top > 0) & jnp.isfinite(top), top, jnp.ones((), dtype)))
    return _mul_pow2(gram, -e), f + e.astype(jnp.int32)


def _mul_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x * 2^k`` for an integer ``|k| <= 250``, by two normal powers of two (XLA's CPU backend
    flushes subnormal factors such as ``2^-128`` in float32 to zero)."""
    k = jnp.asarray(k, jnp.int32)
    half = k // 2
    one = jnp.ones((), x.dtype)
    return (x * jnp.ldexp(one, half)) * jnp.ldexp(one, k - half)


def _mul_sqrt_pow2(x: jax.Array, f: jax.Array) -> jax.Array:
    """``x * 2^(f/2)`` for an integer f (exact for even f)."""
    f = jnp.asarray(f, jnp.int32)
    return _mul_pow2(jnp.where(f % 2 == 1, x * np.sqrt(2.0).astype(x.dtype), x), f // 2)


def imtl_g_from_gramian(gram: jax.Array, exponent: jax.Array, *, priorities: Optional[jax.Array] = None,
                        nonconflicting: bool = False,
                        task_mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """IMTL-G weights and common projection from the Gramian ``J J^T = gram * 2^exponent``.

    The same solution and degenerate-input policy as :func:`imtl_jax.imtl_g_solve` (zero rows
    relative to ``eps^2`` of the largest norm, Cholesky or pseudo-inverse of the cosine matrix,
    the ``1/|g_t|`` fallback, NaN for non-finite input), without the refinement on the data.

    ``task_mask`` (T,) bool: absent tasks are excluded from the solve (identity rows, zero
    target) and get weight 0, as in :func:`imtl_jax.imtl_g_solve`.

    Returns:
      ``(weights (T,), common_projection ())``.

    Example:
      >>> import jax.numpy as jnp
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> w, c = imtl_g_from_gramian(J @ J.T, jnp.int32(0))
      >>> print(w.round(5))
      [0.59233 0.40767]
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    if task_mask is not None:  # absent rows and columns selected to 0 (NaN dropped)
        both = task_mask[:, None] & task_mask[None, :]
        gram = jnp.where(both, gram, jnp.zeros((), dtype))
        if priorities is not None:
            priorities = jnp.where(task_mask, priorities, jnp.ones((), priorities.dtype))
    diag = jnp.diagonal(gram)
    norms = jnp.sqrt(jnp.maximum(diag, 0.0))
    valid = norms > (eps * eps) * jnp.max(norms)
    if task_mask is not None:
        valid = valid & task_mask
    safe_norms = jnp.where(valid, norms, 1.0)
    eye = jnp.eye(num_tasks, dtype=dtype)
    both_valid = valid[:, None] & valid[None, :]
    cosines = gram / (safe_norms[:, None] * safe_norms[None, :])
    cosines = jnp.where(both_valid, 0.5 * (cosines + cosines.T), eye)
    cosines = jnp.where(eye > 0, 1.0, cosines)

    target = jnp.ones((num_tasks,), dtype) if priorities is None else priorities.astype(dtype)
    target = jnp.where(valid, target, 0.0)
    beta = _solve_cosine_system(cosines, target)

    raw = jnp.where(valid, beta / safe_norms, 0.0)
    total = jnp.sum(raw)
    tol = 10.0 * num_tasks * eps
    solvable = jnp.abs(total) > tol * jnp.sum(jnp.abs(raw))
    fit = jnp.matmul(cosines, beta, precision=_HIGHEST)
    solvable = solvable & (jnp.linalg.norm(fit) > tol * jnp.linalg.norm(target))
    fallback = _fallback_weights(valid, safe_norms, task_mask, num_tasks, dtype)
    safe_total = jnp.where(solvable, total, 1.0)
    weights = jnp.where(solvable, raw / safe_total, fallback)

    # In input units |g_t| = norms_t 2^(f/2): C = 2^(f/2) / total; fallback: mean projection
    # (G w)_t / |g_t| over the non-zero rows.
    projections = jnp.matmul(gram, weights, precision=_HIGHEST) / safe_norms
    mean_projection = jnp.sum(jnp.where(valid, projections, 0.0)) / jnp.maximum(
        jnp.sum(valid), 1).astype(dtype)
    common = _mul_sqrt_pow2(jnp.where(solvable, 1.0 / safe_total, mean_projection), exponent)
    if nonconflicting:
        sign = jnp.where(common < 0, -1.0, 1.0).astype(dtype)
        weights, common = sign * weights, sign * common

    ok = jnp.all(jnp.isfinite(gram))
    if priorities is not None:
        ok = ok & jnp.all(jnp.isfinite(priorities) & (priorities > 0))
    nan = jnp.asarray(jnp.nan, dtype)
    return jnp.where(ok, weights, nan), jnp.where(ok, common, nan)


def _gramian_imtl_g(weighting: Weighting) -> Optional[bool]:
    """``nonconflicting`` when ``weighting`` is the registered IMTL-G weighting, else None."""
    weigh = weighting.weigh
    if isinstance(weigh, functools.partial) and weigh.func is _imtl_methods._imtl_g_weigh:
        return bool(weigh.keywords.get("nonconflicting", False))
    return None


def parameter_level(encoder_vjp: Callable, z_grads: jax.Array, weighting: Weighting,
                    scaled: jax.Array, state: PyTree, key, priorities,
                    pmean: Callable[[PyTree], PyTree], *, task_mask: Optional[jax.Array] = None,
                    name: str = "") -> tuple[PyTree, WeightingOutput]:
    """The shared-parameter gradient ``sum_t w_t J_t`` of the exact level and the weighting's
    output.

    Args:
      encoder_vjp: the encoder's VJP (a cotangent of z to a 1-tuple of shared-parameter grads).
      z_grads: (T, *z.shape) per-task cotangents of the (scaled) losses w.r.t. z.
      weighting: the method's weighting; IMTL-G takes the gramian route above a size.
      scaled: (T,) scaled losses, already averaged over the data-parallel axis.
      state, key, priorities: passed to the weighting.
      task_mask: optional (T,) bool (partial labels; the absent tasks' rows of ``z_grads`` are
        already 0), passed to the weighting; ``name`` names the method in its error.
      pmean: the mean over the data-parallel axis (identity without one); the weights are
        computed from the mean Jacobian, the returned gradient is this device's
        ``sum_t w_t J_t`` (the caller reduces it with the other gradients).

    Returns:
      ``(shared_grads, weighting_output)``.
    """
    jacobian = per_task_parameter_grads(encoder_vjp, z_grads)
    leaves = jax.tree_util.tree_leaves(jacobian)
    num_tasks = z_grads.shape[0]
    size = num_tasks * sum(int(np.prod(x.shape[1:])) for x in leaves)
    nonconflicting = _gramian_imtl_g(weighting)
    if nonconflicting is not None and size > _GRAMIAN_MIN_SIZE:
        dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
        p = _check_priorities(priorities, num_tasks, (num_tasks, size // num_tasks))
        gram, exponent = _safe_gramian(
            pmean(jacobian), lambda: pmean(per_task_parameter_grads(encoder_vjp, z_grads)),
            num_tasks, dtype)
        weights, common = imtl_g_from_gramian(gram, exponent, priorities=p,
                                              nonconflicting=nonconflicting, task_mask=task_mask)
        if task_mask is not None:  # as _mask.weigh: exact zeros, and all-absent gives zeros
            weights = jnp.where(task_mask & jnp.any(task_mask), weights, jnp.zeros((), weights.dtype))
        out_dtype = jnp.result_type(*leaves)
        out = WeightingOutput(weights.astype(out_dtype), state,
                              {"common_projection": common.astype(out_dtype)})
    else:  # the generic route: the flattened (T, P) matrix
        matrix = pmean(jnp.concatenate([_leaf_rows(x, num_tasks) for x in leaves], axis=1))
        out = _mask.weigh(weighting, lax.stop_gradient(matrix), lax.stop_gradient(scaled), state,
                          key, priorities, task_mask, name or weighting.name)
    size_p = size // num_tasks
    if getattr(weighting, "per_coordinate", False):
        # Per-coordinate weights C (T, P), split over the leaves as the matrix was concatenated:
        # sum_t C_t * J_t leaf by leaf.
        coords = lax.stop_gradient(coordinate_weights_of(out, (num_tasks, size_p), name or weighting.name))
        pieces = unflatten_like(coords, jacobian, leading=1)
        shared = jax.tree_util.tree_map(lambda c, x: jnp.sum(c.astype(x.dtype) * x, axis=0),
                                        pieces, jacobian)
        return shared, out
    if getattr(weighting, "returns_direction", False):
        # A direction of its own (MoCo): the (P,) update, unflattened as the matrix was.
        direction = lax.stop_gradient(direction_of(out, size_p, name or weighting.name))
        shared = jax.tree_util.tree_map(lambda d, x: d.astype(x.dtype),
                                        unflatten_like(direction, jacobian, leading=1), jacobian)
        return shared, out
    w = lax.stop_gradient(out.weights)
    shared = jax.tree_util.tree_map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), jacobian)
    return shared, out
