"""Helpers shared by the baseline weightings: trace-time validation, the scale-normalised
Gramian, and state bookkeeping.

Every helper is pure and jittable; validation runs on static shapes only (it raises at trace
time under ``jax.jit``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import jax.scipy.linalg
import numpy as np

from imtl_jax._linalg import ldexp, pow2_normalize
from imtl_jax._validation import check_float_array, check_task_vector

HIGHEST = lax.Precision.HIGHEST


def compute_dtype(dtype: Any) -> Any:
    """The dtype solvers run in: at least float32 (``eigh`` has no 16-bit kernels)."""
    return jnp.promote_types(dtype, jnp.float32)


def check_priorities(priorities: Any, method: str) -> None:
    """Baselines define no task priorities: a non-None value is rejected (not ignored)."""
    if priorities is not None:
        raise ValueError(
            f"`priorities` is not supported by the {method!r} weighting (only IMTL-G defines "
            "priority-weighted projections); pass priorities=None.")


def check_matrix(grads: Any, method: str) -> jax.Array:
    """Validates a (T, F) float matrix of per-task gradients named ``grads``."""
    if grads is None:
        raise ValueError(f"`grads` is None but the {method!r} weighting needs the (T, F) matrix "
                         "of per-task gradients.")
    grads = check_float_array(grads, "grads", ndim=2)
    num_tasks, dim = grads.shape
    if num_tasks < 1 or dim < 1:
        raise ValueError(f"`grads` must be (T, F) with T >= 1 and F >= 1, got shape {grads.shape}.")
    return grads


def check_grads(grads: Any, losses: Any, priorities: Any, method: str):
    """Validates the inputs of a gradient weighting; returns ``(grads, losses)`` as arrays."""
    grads = check_matrix(grads, method)
    losses = check_task_vector(losses, "losses", grads.shape[0], "grads", grads.shape)
    check_priorities(priorities, method)
    return grads, losses


def check_losses(losses: Any, priorities: Any, method: str) -> jax.Array:
    """Validates the inputs of a loss weighting (``grads`` is ignored); returns ``losses``."""
    losses = check_float_array(losses, "losses", ndim=1)
    if losses.shape[0] < 1:
        raise ValueError(f"`losses` must be (T,) with T >= 1, got shape {losses.shape}.")
    check_priorities(priorities, method)
    return losses


def check_state(state: Any, expected: Any, method: str) -> None:
    """Raises ValueError naming ``state`` when its structure or shapes differ from ``expected``
    (the output of the weighting's ``init`` for the current T)."""
    exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected)
    try:
        leaves, tree_any = jax.tree_util.tree_flatten(state)
        tree: Any = tree_any
    except Exception as err:  # pragma: no cover - exotic pytrees
        raise ValueError(f"`state` of the {method!r} weighting is not a pytree: {err}") from err
    if tree != exp_tree:
        raise ValueError(f"`state` of the {method!r} weighting has structure {tree}, expected "
                         f"{exp_tree}; create it with the weighting's init(num_tasks, dtype).")
    for got, want in zip(leaves, exp_leaves):
        if jnp.shape(got) != jnp.shape(want):
            raise ValueError(
                f"`state` of the {method!r} weighting has a leaf of shape {jnp.shape(got)} where "
                f"{jnp.shape(want)} is expected: it was created for a different number of tasks.")


def cast_like(new: Any, old: Any) -> Any:
    """Casts every leaf of ``new`` to the dtype of the matching leaf of ``old`` (keeps the state's
    dtypes fixed across steps, so a jitted training loop compiles once)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype), new, old)


def normalized_gramian(grads: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(M, scale)`` with ``M = (G / scale)(G / scale)^T`` and ``scale = max|G|`` (1 if G = 0).

    Every baseline that uses it is invariant to (or explicitly tracks) a uniform rescaling of G.
    Two routes, chosen by ``lax.cond`` on a test of T-sized quantities:

    * the *lean* route (regular input): the per-row maxima ``r_t = max_j |G_tj|`` (one reduction
      over the data) and the Gram matrix ``G G^T`` of the raw rows (one matmul); the division by
      ``scale^2`` is T x T work. The (T, D) data is read twice and nothing of its size is
      written. It is taken when ``scale`` is finite, ``D scale^2 <= max / 2^8`` (no overflow in
      the product or its sums) and every non-zero row has ``r_t^2 >= D tiny 2^40 (1 + scale)``
      (``tiny``: the dtype's smallest normal number). A backend that flushes subnormal inputs
      and products (XLA's CPU backend does) then changes each entry by at most
      ``D tiny (1 + scale) <= 2^-40 r_i r_j``: below ``2^-40`` relative to the product of the
      two rows' norms, far under the rounding of the product itself;
    * otherwise (zero, subnormal or huge scales, rows far below the largest, NaN/inf) the
      *exact-scaling* route: the rows are rescaled by an exact power of two
      (:func:`imtl_jax._linalg.pow2_normalize`, integer operations on the bit patterns, as
      IMTL-G does) so that the division by the maximum sees normal numbers: subnormal
      gradients, 1e-30 and values up to the largest finite float give the same ``M`` as at
      scale 1; ``scale`` is ``max|G|`` rebuilt exactly by :func:`imtl_jax._linalg.ldexp` (a
      subnormal maximum may read as 0 on backends that flush denormals; 1 when G = 0). NaN/inf
      in ``grads`` propagates into ``M`` (loud).

    Under ``vmap`` both routes run (as for any ``lax.cond``): the same values, a higher cost.
    """
    dtype = grads.dtype
    lean, scale = _lean_gramian_test(grads)

    def lean_route():
        m = jnp.matmul(grads, grads.T, precision=HIGHEST)
        safe = jnp.where(lean, scale, jnp.ones((), dtype))   # keeps vmap's other lanes finite
        m = (m / safe) / safe
        return 0.5 * (m + m.T), scale

    return lax.cond(lean, lean_route, lambda: _normalized_gramian_exact(grads))


def _lean_gramian_test(grads: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(lean, max|G|)``: whether :func:`normalized_gramian` takes its lean route (one pass over
    the data for the row maxima; the rest on T-sized quantities)."""
    dim = grads.shape[1]
    dtype = grads.dtype
    info = jnp.finfo(dtype)
    # One pass over the data: XLA would merge a max of the row maxima into a second full
    # reduction (and then write |G| out for the two), so the row maxima pass a barrier.
    row_max = lax.optimization_barrier(jnp.max(jnp.abs(grads), axis=1))   # NaN if a row holds NaN
    # max|G| and the smallest non-zero row maximum in one reduction of T-sized data.
    extremes = jnp.max(jnp.stack([row_max, jnp.where(row_max > 0, -row_max, -jnp.inf)]), axis=1)
    scale, smallest = extremes[0], -extremes[1]
    ceiling = float(np.sqrt(float(info.max) / 256.0 / dim))
    floor = float(dim) * float(info.tiny) * 2.0 ** 40  # D tiny 2^40: normal for every D
    lean = ((scale > 0) & (scale <= ceiling)
            & (smallest * smallest >= floor * (1.0 + scale)))
    return lean, scale


def _normalized_gramian_exact(grads: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`normalized_gramian`'s exact-scaling route (every finite input, NaN/inf, zero)."""
    y, exponent = pow2_normalize(grads)
    absmax = jnp.max(jnp.abs(y))                                   # in [0.5, 1), or 0
    nonzero = absmax > 0
    top = jnp.where(nonzero, absmax, jnp.ones((), grads.dtype))
    g = y / top
    m = jnp.matmul(g, g.T, precision=HIGHEST)
    scale = jnp.where(nonzero, ldexp(top, exponent), jnp.ones((), grads.dtype))
    return 0.5 * (m + m.T), scale


def support_cosines(gram: jax.Array, support: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(K, s)``: the Gram matrix scaled to cosines on the rows in ``support`` (identity rows and
    columns elsewhere) and the row norms ``s = sqrt(diag gram)`` (1 where the diagonal is not
    positive), so an active-set solve's conditioning depends on the angles, not the norms."""
    num_tasks = gram.shape[0]
    diag = jnp.diag(gram)
    s = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
    both = support[:, None] & support[None, :]
    return jnp.where(both, gram / (s[:, None] * s[None, :]), jnp.eye(num_tasks, dtype=gram.dtype)), s


def safe_div(num: jax.Array, den: jax.Array, fallback: Any = 0.0) -> jax.Array:
    """``num / den`` where ``den != 0``, else ``fallback`` (no NaN in either branch's gradient)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), fallback)


def nan_if_not_finite(weights: jax.Array, *arrays: jax.Array) -> jax.Array:
    """Makes every weight NaN when any of ``arrays`` holds a NaN or inf (loud, so that
    ``optax.apply_if_finite`` or ``StepAux.all_finite`` can skip the step)."""
    return jnp.where(all_finite(*arrays), weights, jnp.asarray(jnp.nan, weights.dtype))


def all_finite(*arrays: jax.Array) -> jax.Array:
    """Scalar bool: every entry of every array is finite."""
    ok = jnp.ones((), bool)
    for a in arrays:
        ok = ok & jnp.all(jnp.isfinite(a))
    return ok


def keep_state_if_not_finite(new_state: Any, old_state: Any, *arrays: jax.Array) -> Any:
    """``new_state`` when every array is finite, else ``old_state`` unchanged: a step skipped for a
    NaN/inf (e.g. by ``optax.apply_if_finite``) does not poison the method's state either."""
    ok = all_finite(*arrays)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, old_state)


def certified_loop(step, finish, certificate, w0: jax.Array, *, block: int, max_iterations: int, tol):
    """The solver loop of the certified simplex methods (MGDA, CAGrad): rounds of ``block``
    ``step(i, w)`` iterations followed by ``finish(w)`` (a face solve or polish), inside one
    ``lax.while_loop`` that stops when ``certificate(w) <= tol`` or after ``max_iterations``
    steps. Returns ``(w, certificate, iterations)``; the caller reports the certificate, so a
    solver stopped at its cap is never silent."""
    def cond(carry):
        _, gap, it = carry
        return (gap > tol) & (it < max_iterations)

    def body(carry):
        w, _, it = carry
        w = finish(lax.fori_loop(0, block, step, w))
        return w, certificate(w), it + block

    return lax.while_loop(cond, body, (w0, certificate(w0), jnp.zeros((), jnp.int32)))


def damped_newton(objective, gradient, scaled_hessian, certificate, w0: jax.Array, *,
                  max_iterations: int, tol, steps: int = 30, size=None):
    """Newton's method for a smooth strictly convex ``objective`` on the positive orthant (the
    solver of FairGrad's ``M w = w^{-1/alpha}``), under one ``lax.while_loop``.

    Each step solves ``H_s y = -w * grad`` with the diagonally scaled Hessian ``H_s = diag(w) H
    diag(w)`` (``scaled_hessian(w)``, PD: Cholesky), so the step ``delta = w * y`` is relative
    to ``w``; it is shortened to 0.99 of the distance to the boundary ``w = 0`` and then by a
    backtracking (Armijo) line search over ``steps`` halvings, evaluated at once
    (``objective`` takes a (K, T) batch). Close to the solution (Newton decrement squared below
    0.1) the full step is taken: there ``objective``'s round-off can hide a decrease that the
    quadratic convergence still makes. Stops when ``certificate(w) <= tol``, when a step neither
    lowers the certificate nor predicts a decrease above round-off (decrement squared ``<= T
    eps``), or no step moves ``w`` (no progress left in the working precision: the certificate
    is then at its floor and reported), or after ``max_iterations``.
    ``size``: the number of variables of the problem, ``T`` (the default, ``w0``'s length) or,
    under a task mask, the number ``T'`` of present tasks (traced): the absent variables are
    decoupled and stay at their start, contributing exact zeros to the decrement, so the
    round-off threshold is the ``T'``-task problem's ``T' eps`` and the masked problem stops
    where its sub-problem does.
    Returns ``(w, certificate, iterations)``.
    """
    dtype = w0.dtype
    num_tasks = jnp.asarray(w0.shape[0] if size is None else size).astype(dtype)
    eps = jnp.finfo(dtype).eps
    halvings = 0.5 ** jnp.arange(steps, dtype=dtype)

    def newton(w):
        grad = gradient(w)
        factor = jax.scipy.linalg.cho_factor(scaled_hessian(w))
        delta = w * jax.scipy.linalg.cho_solve(factor, -w * grad)
        decrement2 = jnp.maximum(-jnp.dot(grad, delta), 0.0)
        shrink = jnp.max(-delta / w)                   # w + t delta > 0 for t < 1 / shrink
        top = jnp.where(shrink > 0, jnp.minimum(1.0, 0.99 / jnp.where(shrink > 0, shrink, 1.0)), 1.0)
        ts = top * halvings
        cand = w[None, :] + ts[:, None] * delta[None, :]
        values = objective(cand)
        base = objective(w[None, :])[0]
        ok = jnp.isfinite(values) & jnp.all(cand > 0, axis=1)
        ok = ok & ((values <= base - 1e-4 * ts * decrement2)
                   | ((decrement2 < 0.1) & (jnp.arange(steps) == 0)))
        new = jnp.where(jnp.any(ok), cand[jnp.argmax(ok)], w)
        return jnp.where(jnp.all(jnp.isfinite(new)), new, w), decrement2

    def cond(carry):
        _, res, it, moved = carry
        return (res > tol) & (it < max_iterations) & moved

    def body(carry):
        w, res, it, _ = carry
        new, decrement2 = newton(w)
        new_res = certificate(new)
        # Progress: the step moved w and either lowered the certificate or still predicts a
        # decrease of the objective above its round-off (T eps).
        moved = jnp.any(new != w) & ((new_res < res) | (decrement2 > num_tasks * eps))
        return new, new_res, it + 1, moved

    w, res, it, _ = lax.while_loop(cond, body, (w0, certificate(w0), jnp.zeros((), jnp.int32),
                                                 jnp.ones((), bool)))
    return w, res, it


def project_simplex(y: jax.Array) -> jax.Array:
    """The Euclidean projection of ``y`` (T,) onto the probability simplex ``{w >= 0, sum w = 1}``
    (sort-based, Held, Wolfe & Crowder 1974; Duchi et al., ICML 2008): ``max(y - theta, 0)``
    with ``theta = (sum_{k <= rho} u_k - 1) / rho`` over the sorted ``u`` and the largest ``rho``
    with ``u_rho > theta``. SDMGrad's and MoDo's weight update."""
    u = -jnp.sort(-y)
    ks = jnp.arange(1, y.shape[0] + 1, dtype=y.dtype)
    thetas = (jnp.cumsum(u) - 1.0) / ks
    rho = jnp.sum(u > thetas)                   # >= 1: u_1 > u_1 - 1
    theta = thetas[jnp.maximum(rho, 1) - 1]
    return jnp.maximum(y - theta, 0.0)
