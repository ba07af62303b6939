"""IMTL-G: closed-form impartial gradient weights (Liu et al., ICLR 2021, Eq. 1-2).

Given task gradients ``g_1..g_T`` (rows of a (T, D) matrix), IMTL-G finds weights ``alpha``
with ``sum(alpha) = 1`` such that the aggregate ``g = sum_t alpha_t g_t`` has the same
projection ``C`` on every unit gradient ``u_t = g_t / |g_t|``.

How it is computed (the *normalized route*). With unit rows ``U`` and the cosine matrix
``K = U U^T`` (unit diagonal), equal projections mean ``K beta = C 1`` with
``beta_t = alpha_t |g_t|``. So ``beta = K^+ p`` (``p = 1``, or the user's priorities),
``alpha_t = (beta_t / |g_t|) / sum_tau (beta_tau / |g_tau|)`` and ``C = 1 / sum_t beta_t/|g_t|``.
This is the paper's unique solution (``alpha_{2:T} = g_1 U'^T (D U'^T)^{-1}``, with D, U' the
row-difference matrices of Eq. 2), but its conditioning depends on the angles between the
gradients only, not on their norms: solving the paper's D/U system or the raw Gramian
``J J^T`` directly loses float32 accuracy when the norms differ by orders of magnitude.

Accuracy and cost. float32 (and 16-bit) inputs, from 4 tasks on (the *lean* route): the Gram
matrix of the rows is formed once in float32 (one matmul at float32 speed) and serves only as a
preconditioner: the cosine matrix built from it with float64 norms is factored once (Cholesky),
and ``beta`` is refined until the residual of the equal-projection conditions, evaluated in
float64 on the data (two matrix-vector products per step; two steps on well-conditioned input),
certifies it far below float32's rounding; alpha is formed in float64 and rounded to float32
once. Whenever that certificate, a conditioning test or a range test fails (and for NaN/inf,
rank deficiency, extreme scales), ``lax.cond`` hands the input to the *wide* route, which is
also the route for 1 to 3 tasks: the Gram matrix formed once in float64 (products of float32
numbers are exact in float64, the sums round at ~2^-53) and everything after it T x T work in
float64 (norms, ``K``, its inverse, one refinement step, alpha, ``C``), with alpha rounded to
float32 once. The physical floor of a float32 answer is the projection spread of the exact alpha
rounded to float32; on 200 random float32 Jacobians with cond(U) <= 10 and norms over
1e-3..1e3 ours equalled it on every draw (``python -m benchmarks.accuracy --cases 200``;
tests/test_imtl_g.py asserts <= 2x the floor, for each route). TPUs, whose float64 is emulated,
take the compensated route below instead (same floor, tested too). float64 inputs: ``K^-1`` is
formed once (Cholesky) and used for the solve and one refinement step whose residual is
evaluated on the data in about twice the working precision (error-free transformations); alpha
is formed from the (beta, correction) pairs by compensated division and summation and rounded
once (measured spread 6.1e-15 on the same 200 draws). For matrices above 2^20 entries that
refinement is skipped for speed; the spread is then that of the Cholesky solve alone.

Degenerate inputs (all scale-relative, never an absolute epsilon):

* the matrix is first multiplied by a power of two ``2^-k`` that brings its largest entry into
  [0.5, 1) (IMTL-G is invariant to a uniform scale, Theorem 2), built from the bit patterns
  (integer operations), so it is exact for every finite input: inputs at 1e-15, 1e15, float32's
  largest value (3.4e38) or subnormal (XLA's CPU backend reads subnormals as zero in any
  arithmetic) give the weights of the same rows at scale 1; entries below ``2^-126`` (float32)
  times the largest become 0. Outputs in input units (``aggregate``, ``C``) below the normal
  range are flushed by the backend;
* a row whose norm is ``<= eps**2 * max_norm`` (``eps`` of the dtype) counts as zero: it gets
  ``alpha_t = 0`` and the others are impartial among themselves;
* ``K^-1`` is formed once by Cholesky and used for the solve and the refinement when
  ``cond_1(K) = ||K||_1 ||K^-1||_1 <= 1 / (10 T eps)`` (``K`` has a unit diagonal, so this test
  is scale-free); otherwise a symmetric pseudo-inverse (eigendecomposition) with relative cutoff
  ``10 T eps`` replaces it, behind ``lax.cond``: on GPU/TPU the eigendecomposition runs only
  then (``python -m benchmarks.solve_cost`` counts the kernels of the compiled solve). Duplicate
  or parallel rows share their weight, rank deficiency and ``T > D`` give the finite
  least-squares answer;
* ``common_projection``: where equal projections are reached (the target lies in the range of
  ``K``, always for full row rank) it is the closed form ``C``; where they are not (``T > D`` or
  rank-deficient rows in general position, and the fallback below) it is the mean over the
  non-zero rows of the actual projections ``g . u_t / p_t``, so its sign is that of the average
  task's first-order change;
* if the equal-projection point is at infinity (``sum_t beta_t/|g_t| ~ 0``) or every row is zero,
  the weights fall back to ``alpha_t ∝ 1/|g_t|`` (uniform when all rows are zero);
* a NaN or inf anywhere in ``grads`` makes every output NaN (loud, so that
  ``optax.apply_if_finite`` or the training step can skip the update).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.scipy.linalg
import jax.numpy as jnp
import numpy as np
from jax import lax

from imtl_jax._linalg import ldexp, pow2_normalize, spd_inverse
from imtl_jax._validation import check_float_array, check_task_vector

_HIGHEST = lax.Precision.HIGHEST
_REFINE = 1
_REFINE_MAX_SIZE = 1 << 20


class ImtlGResult(NamedTuple):
    """Result of :func:`imtl_g_solve`.

    Attributes:
      weights: alpha, shape (T,); ``sum(alpha) = 1`` (``-1`` when ``nonconflicting`` flipped
        the sign).
      aggregate: ``g = alpha @ grads``, shape (D,).
      common_projection: ``C = g . u_t`` (the same for every task, or ``C p_t`` with
        priorities); negative means ``-g`` ascends every task's loss to first order. When equal
        projections are out of reach (``T > D``, rank deficiency), the mean of ``g . u_t / p_t``
        over the non-zero rows (see the module docstring).
    """

    weights: jax.Array
    aggregate: jax.Array
    common_projection: jax.Array


def _check_priorities(priorities, num_tasks: int, grads_shape) -> Optional[jax.Array]:
    if priorities is None:
        return None
    p = check_task_vector(priorities, "priorities", num_tasks, "grads", grads_shape)
    if not isinstance(p, jax.core.Tracer):
        host = np.asarray(p)
        if not (np.all(np.isfinite(host)) and np.all(host > 0)):
            raise ValueError(f"`priorities` must be finite and positive, got {host!r}.")
    return p


# --- Error-free transformations, used for one refinement residual ------------------------------
# Robust under XLA fusion and FMA contraction: numbers are split by masking mantissa bits (no
# multiplications whose rounding could be contracted away), every product of halves is exact,
# and rounding errors of additions are recovered with Knuth's two-sum (additions only).

_MASKS = {4: (jnp.uint32, 0xFFFFF000), 8: (jnp.uint64, 0xFFFFFFFFF8000000)}


def _split(a):
    """a = hi + lo exactly, each with at most half the mantissa bits (so products are exact)."""
    utype, mask = _MASKS[a.dtype.itemsize]
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(a, utype) & utype(mask), a.dtype)
    return hi, a - hi


def _exact_products(a, b):
    """The four exact partial products whose sum is a * b, stacked on a new leading axis."""
    ah, al = _split(a)
    bh, bl = _split(b)
    return jnp.stack(jnp.broadcast_arrays(ah * bh, ah * bl, al * bh, al * bl))


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _compensated_sum(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Sum along ``axis`` as an unevaluated pair (hi, lo): a pairwise tree of two-sums."""
    x = jnp.moveaxis(x, axis, 0)
    errors = jnp.zeros(x.shape[1:], x.dtype)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
        s, e = _two_sum(x[0::2], x[1::2])
        errors = errors + jnp.sum(e, axis=0)
        x = s
    return x[0], errors


def _compensated_dot(x: jax.Array, y: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``sum(x * y, axis)`` as a pair (hi, lo), about twice the working precision."""
    parts = _exact_products(x, y)  # (4, ...)
    parts = jnp.moveaxis(parts, 0, -1)
    ax = axis if axis >= 0 else axis - 1
    parts = jnp.moveaxis(parts, ax, -2)
    return _compensated_sum(parts.reshape(parts.shape[:-2] + (-1,)), axis=-1)


def _product_remainder(value, q, d):
    """``value - q * d`` with the product taken exactly (only the final subtractions round)."""
    parts = _exact_products(q, d)
    return ((value - parts[0]) - parts[1] - parts[2]) - parts[3]


def _divide(hi, lo, d_hi, d_lo):
    """(hi + lo) / (d_hi + d_lo) as a pair, to about twice the working precision."""
    q = hi / d_hi
    return q, (_product_remainder(hi, q, d_hi) + lo - q * d_lo) / d_hi


def _compensated_norms(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row norms of ``g`` as pairs (hi, lo)."""
    sq_hi, sq_lo = _compensated_dot(g, g, axis=1)
    n_hi = jnp.sqrt(sq_hi)
    safe = jnp.where(n_hi > 0, n_hi, 1.0)
    return n_hi, jnp.where(n_hi > 0, (_product_remainder(sq_hi, n_hi, n_hi) + sq_lo) / (2.0 * safe), 0.0)


def _compensated_residual(g, n_hi, n_lo, beta, target):
    """``target_t - g_t . (sum_tau beta_tau g_tau / |g_tau|) / |g_t|`` in about double precision.

    Evaluated on the data ``g`` and the compensated norms, not on the rounded unit rows, so that
    one refinement step leaves only the rounding of the final weights (measured in float32:
    the projection spread drops from ~cond(U)^2 eps to a few eps).
    """
    c_hi, c_lo = _divide(beta, jnp.zeros_like(beta), n_hi, n_lo)
    v_hi, v_lo = _compensated_dot(c_hi[:, None], g, axis=0)
    v_lo = v_lo + jnp.matmul(c_lo, g, precision=_HIGHEST)
    w_hi, w_lo = _compensated_dot(g, v_hi[None, :], axis=1)
    w_lo = w_lo + jnp.matmul(g, v_lo, precision=_HIGHEST)
    x_hi, x_lo = _divide(w_hi, w_lo, n_hi, n_lo)
    r_hi, r_err = _two_sum(target, -x_hi)
    return r_hi + (r_err - x_lo)


def _fallback_weights(valid, safe_norms, task_mask, num_tasks: int, dtype) -> jax.Array:
    """The weights of an unsolvable system: proportional to 1/‖g_t‖ over the non-zero rows
    (equal projections for orthogonal gradients), uniform over the present tasks if none is."""
    inverse_norms = jnp.where(valid, 1.0 / safe_norms, 0.0)
    any_valid = jnp.any(valid)
    uniform = (jnp.full((num_tasks,), 1.0 / num_tasks, dtype) if task_mask is None
               else jnp.where(task_mask, 1.0, 0.0).astype(dtype) / jnp.maximum(jnp.sum(task_mask), 1))
    return jnp.where(any_valid, inverse_norms / jnp.where(any_valid, jnp.sum(inverse_norms), 1.0), uniform)


def _finish(weights, aggregate, common, finite, priorities, nonconflicting: bool) -> ImtlGResult:
    """Both routes' last step: the ``nonconflicting`` sign flip, then NaN everywhere when the
    gradients were not ``finite`` or the priorities not finite and positive."""
    dtype = weights.dtype
    if nonconflicting:
        sign = jnp.where(common < 0, -1.0, 1.0).astype(dtype)
        weights, aggregate, common = sign * weights, sign * aggregate, sign * common
    ok = finite
    if priorities is not None:
        ok = ok & jnp.all(jnp.isfinite(priorities) & (priorities > 0))
    nan = jnp.asarray(jnp.nan, dtype)
    return ImtlGResult(
        weights=jnp.where(ok, weights, nan),
        aggregate=jnp.where(ok, aggregate, nan),
        common_projection=jnp.where(ok, common, nan),
    )


def _imtl_g_impl(grads: jax.Array, priorities: Optional[jax.Array],
                 nonconflicting: bool, task_mask: Optional[jax.Array] = None) -> ImtlGResult:
    num_tasks = grads.shape[0]
    dtype = grads.dtype
    eps = jnp.finfo(dtype).eps
    if task_mask is not None:
        # Partial labels: absent rows are selected to 0 (NaN dropped) and excluded from `valid`
        # below, so the cosine system gets identity rows with a zero right-hand side for them:
        # the present tasks get the alpha of the sub-problem of the present rows.
        grads = jnp.where(task_mask[:, None], grads, jnp.zeros((), dtype))
        if priorities is not None:
            priorities = jnp.where(task_mask, priorities, jnp.ones((), priorities.dtype))

    # Uniform rescale by an exact power of two 2^-k (alpha is invariant, Theorem 2), taken from
    # the bit patterns: exact for every finite input, float32's largest values and subnormals
    # included, so every later test is relative to the data and the refinement sees the data.
    g, shift = pow2_normalize(grads)
    norms, norms_lo = _compensated_norms(g)
    valid = norms > (eps * eps) * jnp.max(norms)
    if task_mask is not None:
        valid = valid & task_mask
    safe_norms = jnp.where(valid, norms, 1.0)
    units = jnp.where(valid[:, None], g / safe_norms[:, None], 0.0)

    both_valid = valid[:, None] & valid[None, :]
    eye = jnp.eye(num_tasks, dtype=dtype)
    cosines = jnp.matmul(units, units.T, precision=_HIGHEST)
    cosines = jnp.where(both_valid, 0.5 * (cosines + cosines.T), eye)
    cosines = jnp.where(eye > 0, 1.0, cosines)  # |u_t| = 1 exactly in exact arithmetic

    target = jnp.ones((num_tasks,), dtype) if priorities is None else priorities.astype(dtype)
    target = jnp.where(valid, target, 0.0)
    # K^-1 by Cholesky when cond_1(K) <= 1 / (10 T eps) (K has a unit diagonal, so the test is
    # scale-free), else the pseudo-inverse with that relative cutoff; lax.cond, so accelerators
    # run the eigendecomposition only for ill-conditioned K. One factorisation serves the solve
    # and the refinement.
    inverse, _ = spd_inverse(cosines, 1.0 / (10.0 * num_tasks * eps))
    beta = jnp.matmul(inverse, target, precision=_HIGHEST)
    # One step of iterative refinement with the residual evaluated on the unit rows themselves
    # (not on the rounded K): the projections then match to the round-off of U (U^T beta)
    # instead of cond(U)^2 times the round-off of K (halves the float32 spread, measured).
    # The refinement costs ~30 elementwise passes over (T, D); above ~1M entries (parameter-level
    # IMTL-G on large models) it would dominate the step, so it is skipped there (measured:
    # (2, 2.1M) 1.3 s with it, 84 ms without) and the accuracy is that of the Cholesky solve.
    # The correction is kept as the low part of an unevaluated pair (beta, beta_lo), and alpha is
    # formed from the pairs in about twice the working precision (compensated division and sum),
    # so alpha is rounded once: its projection spread approaches the floor set by rounding the
    # exact alpha to the working precision (benchmarks/accuracy.py measures the ratio).
    beta_lo = jnp.zeros_like(beta)
    safe_norms_lo = jnp.where(valid, norms_lo, 0.0)
    for _ in range(_REFINE if grads.size <= _REFINE_MAX_SIZE else 0):
        residual = _compensated_residual(g, safe_norms, safe_norms_lo, beta, target)
        residual = jnp.where(valid, residual, 0.0)
        beta_lo = jnp.matmul(inverse, residual, precision=_HIGHEST)

    raw_hi, raw_lo = _divide(beta, beta_lo, safe_norms, safe_norms_lo)
    raw_hi, raw_lo = jnp.where(valid, raw_hi, 0.0), jnp.where(valid, raw_lo, 0.0)
    total_hi, total_lo = _compensated_sum(jnp.concatenate([raw_hi, raw_lo]), axis=0)
    raw = raw_hi + raw_lo
    beta = beta + beta_lo
    total = total_hi + total_lo
    tol = 10.0 * num_tasks * eps
    solvable = jnp.abs(total) > tol * jnp.sum(jnp.abs(raw))
    # When the target is (numerically) orthogonal to range(K) — e.g. a rank-1 matrix whose row
    # signs balance — beta is round-off and so would be alpha: fall back instead.
    fit = jnp.matmul(cosines, beta, precision=_HIGHEST)
    target_norm = jnp.linalg.norm(target)
    solvable = solvable & (jnp.linalg.norm(fit) > tol * target_norm)
    # Equal (priority-proportional) projections are reachable iff the target lies in range(K):
    # always for full-rank K; for rank-deficient K (T > D, dependent rows) only in special cases
    # (duplicate or parallel rows). Otherwise beta is the least-squares answer and the
    # projections differ, so C below is their mean instead of the closed form.
    consistent = jnp.linalg.norm(fit - target) <= jnp.sqrt(eps) * target_norm
    fallback = _fallback_weights(valid, safe_norms, task_mask, num_tasks, dtype)
    safe_hi = jnp.where(solvable, total_hi, 1.0)
    safe_lo = jnp.where(solvable, total_lo, 0.0)
    w_hi, w_lo = _divide(raw_hi, raw_lo, safe_hi, safe_lo)
    weights = jnp.where(solvable, w_hi + w_lo, fallback)
    c_hi, c_lo = _divide(jnp.ones((), dtype), jnp.zeros((), dtype), safe_hi, safe_lo)

    scaled_aggregate = jnp.matmul(weights, g, precision=_HIGHEST)
    aggregate = ldexp(scaled_aggregate, shift)
    # C in input units. Where equal projections are reached, C = 2^k / sum_t beta_t/|g_t| (the
    # closed form, more accurate than any computed projection); otherwise (least-squares or
    # fallback weights) the projections g . u_t / p_t differ and C is their mean over the
    # non-zero rows, so that its sign is the sign of the average task's first-order change.
    ratios = jnp.matmul(units, scaled_aggregate, precision=_HIGHEST) / jnp.where(valid, target, 1.0)
    mean_ratio = jnp.sum(jnp.where(valid, ratios, 0.0)) / jnp.maximum(
        jnp.sum(valid), 1).astype(dtype)
    common = ldexp(jnp.where(solvable & consistent, c_hi + c_lo, mean_ratio), shift)

    return _finish(weights, aggregate, common, jnp.all(jnp.isfinite(grads)), priorities, nonconflicting)


# Which route float32 (and 16-bit) inputs take: "auto" (where the backend has float64 arithmetic,
# i.e. not on TPU: the lean route from _LEAN_MIN_TASKS tasks on, the wide route below, where the
# float64 Gram matrix of 2 or 3 rows costs less than the lean route's extra passes; the
# compensated route on TPU), "lean", "wide" (the float64 Gram matrix, also the lean route's
# fallback) or "compensated" (tests compare them).
_FLOAT32_ROUTE = "auto"


def _float32_route(dtype, num_tasks: int) -> str:
    if jnp.dtype(dtype) != jnp.float32:
        return "compensated"
    if _FLOAT32_ROUTE != "auto":
        return _FLOAT32_ROUTE
    if jax.default_backend() == "tpu":  # TPUs emulate float64 slowly
        return "compensated"
    return "lean" if num_tasks >= _LEAN_MIN_TASKS else "wide"


def _imtl_g_wide(grads: jax.Array, priorities: Optional[jax.Array], nonconflicting: bool,
                 task_mask: Optional[jax.Array] = None) -> ImtlGResult:
    """The float32 route with the float64 Gram matrix (see :func:`_wide_parts`)."""
    if task_mask is not None:  # as in _imtl_g_impl: absent rows are 0 (NaN dropped), not valid
        grads = jnp.where(task_mask[:, None], grads, jnp.zeros((), grads.dtype))
        if priorities is not None:
            priorities = jnp.where(task_mask, priorities, jnp.ones((), priorities.dtype))
    weights, aggregate, common, finite = _wide_parts(grads, priorities, task_mask)
    return _finish(weights, aggregate, common, finite, priorities, nonconflicting)


def _wide_parts(grads: jax.Array, priorities: Optional[jax.Array],
                task_mask: Optional[jax.Array] = None):
    """The float32 route: the rows converted exactly to float64 and their Gram matrix ``g g^T``
    formed once (one matmul; products of float32 numbers are exact in float64 and the sum's
    rounding is ~2^-53 relative), then everything on T x T quantities in float64: norms, the
    cosine matrix, its inverse, one refinement step, alpha, C and the projections. alpha is
    rounded to float32 once, so its projection spread is that of the exact alpha rounded (the
    floor), and the (T, D) data is read about four times (a max, the conversion, the Gram
    product, the aggregate) instead of ~30.
    Thresholds (zero rows, conditioning, solvability) use float32's eps, as the compensated
    route does, so both routes take the same decisions on the same data.
    ``grads`` and ``priorities`` come with masked rows already set to 0 and 1. Returns
    ``(weights, aggregate, common, finite)`` before :func:`_finish`.
    """
    num_tasks = grads.shape[0]
    dtype = grads.dtype
    eps = float(jnp.finfo(dtype).eps)
    # float32 -> float64 exactly, subnormals included (XLA's CPU backend reads float32 subnormals
    # as zero in arithmetic, conversions too, so they are rebuilt from their bits: mantissa *
    # 2^-149, a normal float64). In float64 no float32 input can overflow or underflow the Gram
    # matrix (3.4e38^2 * D and (1.4e-45)^2 are in range), so no rescaling is needed.
    bits = lax.bitcast_convert_type(grads, jnp.uint32)
    magnitude = bits & jnp.uint32(0x7FFFFFFF)
    finite = jnp.max(magnitude) < jnp.uint32(0x7F800000)   # inf and NaN have the largest magnitudes
    with jax.enable_x64(True):
        wide = jnp.float64
        subnormal = (magnitude >> jnp.uint32(23)) == 0
        tiny = (magnitude.astype(wide) * 2.0 ** -149) * jnp.where(bits >> jnp.uint32(31) > 0, -1.0, 1.0)
        g64 = jnp.where(subnormal, tiny, jnp.where(finite, grads, jnp.zeros((), dtype)).astype(wide))
        gram = jnp.matmul(g64, g64.T, precision=_HIGHEST)
        gram = 0.5 * (gram + gram.T)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        valid = norms > (eps * eps) * jnp.max(norms)
        if task_mask is not None:
            valid = valid & task_mask
        safe_norms = jnp.where(valid, norms, 1.0)
        eye = jnp.eye(num_tasks, dtype=wide)
        cosines = gram / (safe_norms[:, None] * safe_norms[None, :])
        cosines = jnp.where(valid[:, None] & valid[None, :], cosines, eye)
        cosines = jnp.where(eye > 0, 1.0, cosines)
        target = (jnp.ones((num_tasks,), wide) if priorities is None else priorities.astype(wide))
        target = jnp.where(valid, target, 0.0)
        inverse, _ = spd_inverse(cosines, jnp.asarray(1.0 / (10.0 * num_tasks * eps), wide))
        beta = jnp.matmul(inverse, target, precision=_HIGHEST)
        beta = beta + jnp.matmul(inverse, target - jnp.matmul(cosines, beta, precision=_HIGHEST),
                                 precision=_HIGHEST)
        raw = jnp.where(valid, beta / safe_norms, 0.0)
        total = jnp.sum(raw)
        tol = 10.0 * num_tasks * eps
        fit = jnp.matmul(cosines, beta, precision=_HIGHEST)
        target_norm = jnp.linalg.norm(target)
        solvable = (jnp.abs(total) > tol * jnp.sum(jnp.abs(raw))) & (jnp.linalg.norm(fit) > tol * target_norm)
        consistent = jnp.linalg.norm(fit - target) <= jnp.sqrt(eps) * target_norm
        fallback = _fallback_weights(valid, safe_norms, task_mask, num_tasks, wide)
        weights = jnp.where(solvable, raw / jnp.where(solvable, total, 1.0), fallback)
        # The projections u_t . (alpha @ g) from the Gram matrix (no pass over the data); alpha
        # is taken as rounded to float32, as the caller's aggregate uses it.
        weights32 = weights.astype(dtype)
        projections = jnp.matmul(gram, weights32.astype(wide), precision=_HIGHEST) / safe_norms
        ratios = projections / jnp.where(valid, target, 1.0)
        mean_ratio = jnp.sum(jnp.where(valid, ratios, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        common = jnp.where(solvable & consistent, 1.0 / jnp.where(solvable, total, 1.0), mean_ratio)
        common = common.astype(dtype)
        aggregate = jnp.matmul(weights32.astype(wide), g64, precision=_HIGHEST).astype(dtype)
    return weights32, aggregate, common, finite


# The lean route's limits. The float32 Gram matrix is a preconditioner only: every residual is
# evaluated in float64 on the data, and the answer is taken only when the residuals certify
# convergence far below float32's rounding (_LEAN_RESIDUAL relative to the target) within
# _LEAN_MAX_STEPS steps, when K is well away from the wide route's conditioning cutoff
# (_LEAN_COND_MARGIN) and when no decision (zero rows, solvability) sits near its threshold
# (_LEAN_MARGIN); otherwise the wide route runs. "auto" takes it from _LEAN_MIN_TASKS tasks on.
_LEAN_MAX_STEPS = 8
_LEAN_MIN_TASKS = 4
_LEAN_RESIDUAL = 2.0 ** -40
_LEAN_COND_MARGIN = 16.0
_LEAN_MARGIN = 2.0 ** -20


def _imtl_g_lean(grads: jax.Array, priorities: Optional[jax.Array], nonconflicting: bool,
                 task_mask: Optional[jax.Array] = None) -> ImtlGResult:
    """The float32 route off TPU: the Gram matrix in float32 (one matmul at float32 speed) as a
    preconditioner, the norms and every residual in float64 on the data.

    The cosine matrix ``K~ = G32 / (n n^T)`` (float64 norms ``n``, unit diagonal) is factored
    once (Cholesky, then ``K~^-1 = L^-T L^-1``); ``beta = K~^-1 p`` is refined with the residual
    ``r = p - (u_t . sum_tau beta_tau u_tau)_t`` of the equal-projection conditions evaluated in
    float64 on the data (two matrix-vector products per step, ``O(T D)``; products of float32
    numbers with float64 ones round at ~2^-53), ``beta += K~^-1 r``. Each step multiplies the
    error by about ``cond(K) |K~ - K|`` (~1e-5 on well-conditioned inputs: two steps), and the
    loop (``lax.while_loop``, at most ``_LEAN_MAX_STEPS``) stops once the residuals certify the
    answer: the last ``|r|`` at most 1/16 of the one before (or below the goal) and the next one,
    extrapolated geometrically, below ``2^-40 |p|``. alpha, formed in float64 and rounded to
    float32 once, then reaches the rounding floor as the wide route does. The (T, D) data is read
    by the float32 Gram product, one conversion to float64, the norms, two matrix-vector products
    per step and the aggregate; the rest is T x T work kept to few kernels (XLA's CPU backend
    spends ~2 us per kernel, as much as a pass over small data).

    ``lax.cond`` hands the input to the wide route (:func:`_wide_parts`: the float64 Gram matrix,
    eigh fallback included) whenever this one cannot vouch for its answer: non-finite input;
    rows so small that the backend's flushing of float32 subnormals (in the float64 conversion)
    could matter (largest row norm below ``2^67 sqrt(D) 2^-126``, a non-zero row below
    ``2^40 sqrt(D) 2^-126``); a zero-row decision within ``2^-20`` of its threshold;
    ``cond_1(K~)`` (or a failed Cholesky) above 1/16 of the wide route's Cholesky cutoff (then no
    refinement step runs); no certificate within ``_LEAN_MAX_STEPS`` steps; or the solvability
    test within a factor 16 of its threshold. So the weights are those of the wide route up to its
    rounding, and the degenerate-input behaviour (zero, parallel and duplicate rows, rank
    deficiency, T > D, NaN, extreme scales) is the wide route's, decided by its own tests. Under
    ``vmap`` both branches run (as for any ``lax.cond``) and the loop runs until every member is
    certified: the same values, a higher cost.
    """
    num_tasks, dim = grads.shape
    dtype = grads.dtype
    eps = float(jnp.finfo(dtype).eps)
    if task_mask is not None:  # as in _imtl_g_impl: absent rows are 0 (NaN dropped), not valid
        grads = jnp.where(task_mask[:, None], grads, jnp.zeros((), dtype))
        if priorities is not None:
            priorities = jnp.where(task_mask, priorities, jnp.ones((), priorities.dtype))
    gram32 = jnp.matmul(grads, grads.T, precision=_HIGHEST)
    with jax.enable_x64(True):
        wide = jnp.float64
        g64 = grads.astype(wide)  # subnormals may read as 0 here: see the range test below
        norms = jnp.sqrt(jnp.sum(g64 * g64, axis=1))  # finite float32 rows cannot overflow
        max_norm = jnp.max(norms)                     # NaN or inf when any entry is
        threshold = (eps * eps) * max_norm
        valid = norms > threshold
        if task_mask is not None:
            valid = valid & task_mask
        flush = float(np.sqrt(dim)) * 2.0 ** -126     # the most a row's norm can lose to flushing
        bad_rows = (jnp.abs(norms - threshold) <= _LEAN_MARGIN * threshold) | (
            valid & (norms < 2.0 ** 40 * flush))
        usable = jnp.isfinite(max_norm) & (max_norm >= 2.0 ** 67 * flush) & ~jnp.any(bad_rows)
        safe_norms = jnp.where(valid, norms, 1.0)
        eye = jnp.eye(num_tasks, dtype=wide)
        cosines = jnp.where(valid[:, None] & valid[None, :] & (eye == 0),
                            gram32.astype(wide) / (safe_norms[:, None] * safe_norms[None, :]), eye)
        target = (jnp.ones((num_tasks,), wide) if priorities is None else priorities.astype(wide))
        target = jnp.where(valid, target, 0.0)

        # K~^-1 = M^T M with M = L^-1 (NaN when the factorization fails, and then cond1 is NaN).
        factor = jnp.linalg.cholesky(cosines)
        m = jax.scipy.linalg.solve_triangular(factor, eye, lower=True)
        inverse = lax.dot_general(m, m, (((0,), (0,)), ((), ())), precision=_HIGHEST)
        col_sums = jnp.sum(jnp.abs(jnp.stack([cosines, inverse])), axis=1)   # (2, T)
        norm1 = jnp.max(col_sums, axis=1)
        well_conditioned = norm1[0] * norm1[1] <= 1.0 / (_LEAN_COND_MARGIN * 10.0 * num_tasks * eps)

        small = (_LEAN_RESIDUAL ** 2) * jnp.sum(target * target)

        def certified(before, last):
            """The last squared residual converged and the next one, extrapolated, is below
            2^-40 |p| (NaN, before two residuals exist, certifies nothing)."""
            return ((last <= before / 256.0) | (last <= small)) & (
                last * jnp.minimum(last, before) <= small * before)

        def refine(carry):
            steps, beta, _, last = carry
            coef = jnp.where(valid, beta / safe_norms, 0.0)
            combo = jnp.matmul(coef, g64, precision=_HIGHEST)
            r = jnp.where(valid, target - jnp.matmul(g64, combo, precision=_HIGHEST) / safe_norms, 0.0)
            return steps + 1, beta + jnp.matmul(inverse, r, precision=_HIGHEST), last, jnp.sum(r * r)

        def more(carry):
            steps, _, before, last = carry
            return (steps < _LEAN_MAX_STEPS) & usable & well_conditioned & ~certified(before, last)

        nan = jnp.asarray(jnp.nan, wide)
        start = (jnp.zeros((), jnp.int32), jnp.matmul(inverse, target, precision=_HIGHEST), nan, nan)
        _, beta, before, last = lax.while_loop(more, refine, start)
        raw = jnp.where(valid, beta / safe_norms, 0.0)
        sums = jnp.sum(jnp.stack([raw, jnp.abs(raw)]), axis=1)
        total, abs_total = sums[0], sums[1]
        solvable = jnp.abs(total) > _LEAN_COND_MARGIN * 10.0 * num_tasks * eps * abs_total
        lean = usable & well_conditioned & certified(before, last) & solvable

        def lean_parts():
            with jax.enable_x64(True):
                weights32 = (raw / total).astype(dtype)
                aggregate = jnp.matmul(weights32.astype(wide), g64, precision=_HIGHEST).astype(dtype)
                return weights32, aggregate, (1.0 / total).astype(dtype), jnp.ones((), bool)

        def wide_parts():
            with jax.enable_x64(True):
                return _wide_parts(grads, priorities, task_mask)

        weights, aggregate, common, ok = lax.cond(lean, lean_parts, wide_parts)
    return _finish(weights, aggregate, common, ok, priorities, nonconflicting)


def imtl_g_solve(grads: jax.Array, *, priorities: Optional[jax.Array] = None,
           nonconflicting: bool = False, task_mask: Optional[jax.Array] = None) -> ImtlGResult:
    r"""IMTL-G weights, aggregated gradient and common projection.

    Solves ``g . u_t = C p_t`` for all t with ``g = sum_t alpha_t g_t`` and ``sum(alpha) = 1``
    (``p = 1``: the paper's impartial gradient, Eq. 1-2). See the module docstring for the
    normalized solve and the degenerate-input policy.

    Args:
      grads: (T, D) float array, one task gradient per row.
      priorities: optional (T,) positive weights ``p``: projections proportional to ``p``
        instead of equal. Traced, so sweeping it does not recompile. Concrete non-positive
        or non-finite values raise; traced ones make every output NaN.
      nonconflicting: if True and ``C < 0`` (every task would ascend to first order), return
        ``-alpha``, ``-g`` and ``-C`` instead (so ``sum(alpha) = -1`` then). Static.
        Guarantee: when the projections are equal (full row rank), no task's projection is
        negative afterwards; when they differ (``T > D``, rank deficiency), the mean projection
        is non-negative afterwards, and if either sign makes every projection non-negative,
        that sign is the one returned up to round-off (no sign can help every task otherwise).
      task_mask: optional (T,) bool (traced): partial labels. Masked rows are ignored (any
        value, NaN included) and get ``alpha_t = 0``; the present rows get the solution of the
        sub-problem of the present rows only (impartial among them, ``sum alpha = 1``).

    Returns:
      :class:`ImtlGResult` ``(weights (T,), aggregate (D,), common_projection ())`` in the
      dtype of ``grads``.

    Raises:
      TypeError: ``grads`` is not floating point.
      ValueError: ``grads`` is not (T, D) with T, D >= 1, or ``priorities`` has the wrong
        shape or (when concrete) non-positive values.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> res = imtl_jax.imtl_g_solve(jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
      >>> print(res.weights.round(5))
      [0.59233 0.40767]
      >>> float(res.common_projection)  # doctest: +ELLIPSIS
      0.3990...

      Partial labels: task 2 has no labels in this batch (its row is garbage), so alpha is
      that of the two present tasks (T = 2: ``(|g_3|, |g_1|) / (|g_1| + |g_3|)``):

      >>> g = jnp.array([[3.0, 0.0], [jnp.nan, jnp.nan], [0.0, 1.0]])
      >>> res = imtl_jax.imtl_g_solve(g, task_mask=jnp.array([True, False, True]))
      >>> [round(float(a), 4) for a in res.weights]
      [0.25, 0.0, 0.75]

    Reference:
      L. Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2.
    """
    grads = check_float_array(grads, "grads", ndim=2)
    num_tasks, dim = grads.shape
    if num_tasks < 1 or dim < 1:
        raise ValueError(f"`grads` must be (T, D) with T >= 1 and D >= 1, got shape {grads.shape}.")
    p = _check_priorities(priorities, num_tasks, grads.shape)
    if task_mask is not None:
        from imtl_jax.methods._mask import check_task_mask
        task_mask = check_task_mask(task_mask, num_tasks)
    compute_dtype = jnp.promote_types(grads.dtype, jnp.float32)  # eigh has no 16-bit kernels
    impl = {"lean": _imtl_g_lean, "wide": _imtl_g_wide,
            "compensated": _imtl_g_impl}[_float32_route(compute_dtype, num_tasks)]
    res = impl(grads.astype(compute_dtype), p, bool(nonconflicting), task_mask)
    return ImtlGResult(*(x.astype(grads.dtype) for x in res))


def imtl_g_weights(grads: jax.Array, *, priorities: Optional[jax.Array] = None,
                   nonconflicting: bool = False) -> jax.Array:
    """IMTL-G weights alpha (T,) for the (T, D) task gradients ``grads``.

    ``sum(alpha) = 1`` and ``alpha @ grads`` has the same projection on every unit task
    gradient. alpha may be negative for T >= 3. See :func:`imtl_g_solve` for the arguments and the
    aggregate and common projection.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> alpha = imtl_jax.imtl_g_weights(jnp.array([[3.0, 0.0], [0.0, 1.0]]))
      >>> alpha  # T = 2: alpha = (|g_2|, |g_1|) / (|g_1| + |g_2|)
      Array([0.25, 0.75], dtype=float32)
    """
    return imtl_g_solve(grads, priorities=priorities, nonconflicting=nonconflicting).weights
