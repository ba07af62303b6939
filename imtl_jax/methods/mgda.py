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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._linalg import symmetric_pinv
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, certified_loop, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian, safe_div, support_cosines)
from imtl_jax.methods.equal import IDENTITY


class SolverInfo(NamedTuple):
    """Convergence report of an iterative solver.

    Attributes:
      certificate: the final optimality certificate, relative to the data's scale (the
        solver's ``tol`` is compared with it); 0 at an exact solution.
      iterations: iterations used (int32), at most the solver's cap.
    """

    certificate: jax.Array
    iterations: jax.Array


SOLVERS = ("wolfe", "pairwise", "frank_wolfe")


def default_max_iterations(num_tasks: int, solver: str = "wolfe") -> int:
    """The iteration cap used when none is given (a cap, not a budget: the solvers stop as soon
    as their certificate is below ``tol``): ``50 + 10 T`` major cycles of Wolfe's algorithm
    (measured: at most T + 2 on the hard families), ``1000 T`` Frank-Wolfe steps."""
    return 50 + 10 * num_tasks if solver == "wolfe" else 1000 * num_tasks


def default_tol(dtype) -> float:
    """The default certificate tolerance: ``4 eps`` of the working dtype (float32 round-off of
    ``(M w)_t`` relative to ``max_t M_tt``)."""
    return 4.0 * float(jnp.finfo(dtype).eps)


def kkt_gap(gram: jax.Array, w: jax.Array) -> jax.Array:
    r"""Relative pairwise Frank-Wolfe gap ``(max_{t: w_t > 0} (M w)_t - min_t (M w)_t) / max_t M_tt``.

    Zero exactly at the KKT point of ``min_{w in simplex} w^T M w`` (``(M w)_t >= w^T M w`` for
    all t, with equality on the support), and an upper bound of the plain Frank-Wolfe gap
    ``w^T M w - min_t (M w)_t``, which bounds both ``f(w) - f*`` and the squared distance of the
    aggregate to the min-norm point: ``||v - v*||^2 <= 2 (||v||^2 - min_t g_t . v)``
    (``v* . (v - v*) >= 0`` at the optimum).
    """
    mw = jnp.matmul(gram, w, precision=HIGHEST)
    top = jnp.max(jnp.where(w > 0, mw, -jnp.inf))
    scale = jnp.max(jnp.diag(gram))
    return safe_div(top - jnp.min(mw), scale, 0.0)


def _masked_gap(gram: jax.Array, w: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`kkt_gap` over the present tasks (the simplex of the sub-problem)."""
    mw = jnp.matmul(gram, w, precision=HIGHEST)
    top = jnp.max(jnp.where(w > 0, mw, -jnp.inf))
    scale = jnp.max(jnp.diag(gram))
    return safe_div(top - jnp.min(jnp.where(mask, mw, jnp.inf)), scale, 0.0)


def min_norm_simplex(gram: jax.Array, max_iterations: int, pairwise: bool = True,
                     tol: Optional[float] = None) -> tuple[jax.Array, SolverInfo]:
    """``argmin_{w in simplex} w^T M w`` by Frank-Wolfe with exact line search, stopped on the
    certificate :func:`kkt_gap` ``<= tol`` (or after ``max_iterations`` steps).

    ``pairwise=False`` is Sener & Koltun's Algorithm 2: move towards the vertex ``e_t`` with the
    smallest ``(M w)_t``, step from their Algorithm 1 (the closed-form min-norm point of a
    segment). ``pairwise=True`` (default) moves weight from the worst vertex of the support
    (largest ``(M w)_s``) to ``e_t`` instead, also with an exact line search (Lacoste-Julien &
    Jaggi, NeurIPS 2015): it can drop a vertex to exactly 0 and converges linearly. Steps run in
    blocks of T under ``lax.while_loop``; after each block one exact solve on the support
    (``w_S ∝ M_SS^+ 1``, kept if feasible and no worse) finishes the job as soon as Frank-Wolfe
    has found the optimal face (the linear rate alone is slow when the norms are spread:
    ~100 T steps at T = 10 with norms over 1e+-2). For T = 2 both variants take the closed-form
    segment minimiser at the first step. Returns ``(w, SolverInfo)``.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eye = jnp.eye(num_tasks, dtype=dtype)
    tol = default_tol(dtype) if tol is None else float(tol)

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

    step_fn = pairwise_step if pairwise else vanilla_step
    w0 = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    w, gap, it = certified_loop(step_fn, lambda w: _polish(gram, w), lambda w: kkt_gap(gram, w), w0,
                                block=min(num_tasks, max_iterations), max_iterations=max_iterations, tol=tol)
    return w, SolverInfo(gap, it)


def _bordered_solve(gram: jax.Array, support: jax.Array) -> jax.Array:
    """The min-norm point of the affine hull of the rows in ``support``: ``y`` with
    ``sum y = 1``, ``y = 0`` off the support and ``M_SS y_S = lambda 1``.

    Solved on the equilibrated bordered KKT system: with ``s_t = sqrt(M_tt)``, ``y = z / s`` and
    the cosine matrix ``K = M / (s s^T)``, ``[[K_SS, c_S], [c_S^T, 0]] [z; -lambda] = [0; 1]``
    with ``c = 1/s`` (scaled to max 1), so the conditioning depends on the angles between the
    rows, not on their norms (which the hard families spread over 1e+-4). Symmetric
    pseudo-inverse with relative cutoff ``10 T eps``: affinely dependent supports give the
    least-squares answer."""
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    top, s = support_cosines(gram, support)
    c = jnp.where(support, 1.0 / s, 0.0)
    cmax = jnp.max(c)
    c = c / jnp.where(cmax > 0, cmax, 1.0)
    bordered = jnp.block([[top, c[:, None]], [c[None, :], jnp.zeros((1, 1), dtype)]])
    evals, evecs = jnp.linalg.eigh(bordered)
    keep = jnp.abs(evals) > 10.0 * (num_tasks + 1) * eps * jnp.max(jnp.abs(evals))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    rhs = jnp.zeros((num_tasks + 1,), dtype).at[-1].set(1.0)
    sol = jnp.matmul(evecs, inv * jnp.matmul(evecs.T, rhs, precision=HIGHEST), precision=HIGHEST)
    y = jnp.where(support, sol[:num_tasks] / s, 0.0)
    total = jnp.sum(y)
    return y / jnp.where(total != 0, total, 1.0)


def min_norm_point(gram: jax.Array, max_iterations: int,
                   tol: Optional[float] = None,
                   task_mask: Optional[jax.Array] = None) -> tuple[jax.Array, SolverInfo]:
    """``argmin_{w in simplex} w^T M w`` by Wolfe's min-norm-point algorithm (Wolfe, "Finding the
    nearest point in a polytope", Math. Programming 11, 1976), an active-set method that
    terminates finitely (in exact arithmetic).

    Major cycle: add the vertex ``t = argmin_t (M w)_t`` to the support ``S`` unless the
    Frank-Wolfe gap ``w^T M w - min_t (M w)_t`` is ``<= tol max_t M_tt``. Minor cycle: move ``w``
    towards the min-norm point ``y`` of the affine hull of ``S``; if ``y`` leaves the simplex,
    stop where the first coordinate reaches 0, drop it and repeat. Both loops are
    ``lax.while_loop``; the major cycles are capped at ``max_iterations`` and stop early when
    the chosen vertex is already in ``S`` (no progress possible in the working precision).
    Returns ``(w, SolverInfo)`` with the certificate :func:`kkt_gap` and the major cycles used.

    ``task_mask`` (T,) bool (partial labels; the absent rows and columns of ``gram`` must be 0):
    the simplex is that of the present tasks. An absent task is never chosen as a vertex (its
    ``(M w)_t`` reads +inf in the choice and the certificate) nor as the start, so it keeps
    ``w_t = 0`` and the path is the sub-problem's.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    tol = default_tol(dtype) if tol is None else float(tol)
    scale = jnp.max(jnp.diag(gram))
    present = jnp.ones((num_tasks,), bool) if task_mask is None else task_mask

    def minor_cond(carry):
        _, support, y, count = carry
        return jnp.any(support & (y <= 0)) & (count < num_tasks)

    def minor_body(carry):
        w, support, y, count = carry
        leaving = support & (y <= 0)
        ratio = jnp.where(leaving, w / jnp.where(leaving, w - y, 1.0), jnp.inf)
        drop = jnp.argmin(ratio)
        theta = jnp.clip(ratio[drop], 0.0, 1.0)
        w = jnp.maximum(w + theta * (y - w), 0.0)
        support = support & (w > 0)
        support = support.at[drop].set(False)
        w = jnp.where(support, w, 0.0)
        w = w / jnp.sum(w)
        return w, support, _bordered_solve(gram, support), count + 1

    def gap_and_vertex(w):
        mw = jnp.matmul(gram, w, precision=HIGHEST)
        if task_mask is not None:
            mw = jnp.where(task_mask, mw, jnp.inf)
        t = jnp.argmin(mw)
        return safe_div(jnp.dot(w, jnp.where(present, mw, 0.0)) - mw[t], scale, 0.0), t

    def cond(carry):
        _, support, it, stalled = carry
        gap, t = gap_and_vertex(carry[0])
        return (gap > tol) & (it < max_iterations) & ~stalled

    def body(carry):
        w, support, it, _ = carry
        _, t = gap_and_vertex(w)
        stalled = support[t]
        support = support.at[t].set(True)
        w_new, support_new, _, _ = lax.while_loop(
            minor_cond, minor_body, (w, support, _bordered_solve(gram, support), jnp.zeros((), jnp.int32)))
        y = _bordered_solve(gram, support_new)
        w_new = jnp.where(jnp.all(jnp.where(support_new, y > 0, True)), y, w_new)
        # Keep the previous point unless the objective strictly decreased (round-off can
        # make the new point no better: stop then, there is no progress left to make).
        def value(v):
            return jnp.dot(v, jnp.matmul(gram, v, precision=HIGHEST))

        worse = ~(value(w_new) < value(w)) | ~jnp.all(jnp.isfinite(w_new))
        w_new = jnp.where(worse, w, w_new)
        support_new = jnp.where(worse, support, support_new)
        return w_new, support_new, it + 1, stalled | worse

    diag = jnp.diag(gram)
    start = jnp.argmin(diag if task_mask is None else jnp.where(task_mask, diag, jnp.inf))
    w0 = jnp.zeros((num_tasks,), dtype).at[start].set(1.0)
    w, _, it, _ = lax.while_loop(cond, body, (w0, w0 > 0, jnp.zeros((), jnp.int32),
                                              jnp.zeros((), bool)))
    if task_mask is None:
        w = jnp.where(scale > 0, w, jnp.full((num_tasks,), 1.0 / num_tasks, dtype))  # all rows zero
        return w, SolverInfo(kkt_gap(gram, w), it)
    uniform = jnp.where(task_mask, 1.0, 0.0).astype(dtype) / jnp.maximum(jnp.sum(task_mask), 1)
    w = jnp.where(scale > 0, w, uniform)
    return w, SolverInfo(_masked_gap(gram, w, task_mask), it)


def _polish(gram: jax.Array, w: jax.Array) -> jax.Array:
    """One exact solve on the support ``S = {w > 0}``: ``w_S ∝ M_SS^+ 1`` (the min-norm point of
    that face), kept only if it is in the simplex and no worse. Exact once Frank-Wolfe has found
    the optimal face, which removes the slow tail of the linear convergence."""
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    support = w > 0
    sub = jnp.where(support[:, None] & support[None, :], gram, jnp.eye(num_tasks, dtype=dtype))
    rhs = jnp.where(support, 1.0, 0.0).astype(dtype)
    x = jnp.matmul(symmetric_pinv(sub, 10.0 * num_tasks * eps), rhs, precision=HIGHEST)
    x = jnp.where(support, x, 0.0)
    total = jnp.sum(x)
    cand = x / jnp.where(total > 0, total, 1.0)

    def value(v):
        return jnp.dot(v, jnp.matmul(gram, v, precision=HIGHEST))

    ok = (total > 0) & jnp.all(cand >= 0) & jnp.all(jnp.isfinite(cand))
    ok = ok & (value(cand) <= value(w) * (1.0 + 10.0 * eps))
    return jnp.where(ok, cand, w)


def _check_solver_args(max_iterations, tol, solver="wolfe"):
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
    if max_iterations is not None and (not isinstance(max_iterations, int)
                                       or isinstance(max_iterations, bool) or max_iterations < 1):
        raise ValueError(f"`max_iterations` must be a positive int or None, got {max_iterations!r}.")
    if tol is not None and not float(tol) >= 0:
        raise ValueError(f"`tol` must be >= 0 or None, got {tol!r}.")
    return max_iterations, None if tol is None else float(tol)


def _solve(grads, max_iterations, solver, tol, task_mask=None):
    num_tasks = grads.shape[0]
    cap = default_max_iterations(num_tasks, solver) if max_iterations is None else max_iterations
    gram, scale = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
    if task_mask is not None:  # Wolfe only (supports_task_mask): a masked simplex
        if max_iterations is None:  # the sub-problem's cap
            cap = 50 + 10 * jnp.sum(task_mask).astype(jnp.int32)
        w, info = min_norm_point(gram, cap, tol=tol, task_mask=task_mask)
    elif solver == "wolfe":
        w, info = min_norm_point(gram, cap, tol=tol)
    else:
        w, info = min_norm_simplex(gram, cap, pairwise=solver == "pairwise", tol=tol)
    return gram, scale, w, info


@functools.partial(jax.jit, static_argnames=("max_iterations", "solver", "tol"))
def mgda_weights(grads: jax.Array, *, max_iterations: Optional[int] = None,
                 solver: str = "wolfe", tol: Optional[float] = None) -> jax.Array:
    """MGDA weights: the min-norm point of the convex hull of the rows of ``grads`` (T, F).

    Returns ``w`` (T,) with ``w >= 0``, ``sum w = 1`` minimising ``||w @ grads||``. The Gramian is
    formed once from the rows divided by ``max|grads|`` (the weights are invariant to a uniform
    scale), then :func:`min_norm_point` (or :func:`min_norm_simplex`) runs until its certificate
    :func:`kkt_gap` is below ``tol`` (default ``4 eps``). KKT: ``(M w)_t >= w^T M w`` for all t, with equality where
    ``w_t > 0``. :func:`mgda_weighting` also reports the certificate and the iterations.

    Degenerate inputs: a zero row is a hull vertex at the origin, so it takes all the weight (the
    aggregate is 0: MGDA stops at a Pareto-stationary point); duplicate rows split their weight;
    all-zero rows give uniform weights; T = 1 gives [1].

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.mgda import mgda_weights
      >>> mgda_weights(jnp.array([[1.0, 0.0], [0.0, 2.0]])).round(6)  # orthogonal: w ∝ 1/|g_t|^2
      Array([0.8, 0.2], dtype=float32)
    """
    grads = check_matrix(grads, "mgda")
    max_iterations, tol = _check_solver_args(max_iterations, tol, solver)
    _, _, w, _ = _solve(grads, max_iterations, solver, tol)
    return nan_if_not_finite(w, grads).astype(grads.dtype)


def _mgda_weigh(grads, losses, state, key, priorities, *, max_iterations, solver, tol,
                task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "mgda")
    if task_mask is not None:
        # Partial labels: a zero row would be a hull vertex at the origin and take all the
        # weight, so absent tasks are zeroed *and* kept out of the simplex (min_norm_point).
        grads = _mask.rows(grads, task_mask)
    gram, scale, w, info = _solve(grads, max_iterations, solver, tol, task_mask)
    norm = jnp.sqrt(jnp.maximum(jnp.dot(w, jnp.matmul(gram, w, precision=HIGHEST)), 0.0)) * scale
    w = nan_if_not_finite(w, grads)
    cap = default_max_iterations(grads.shape[0], solver) if max_iterations is None else max_iterations
    if task_mask is not None and max_iterations is None:
        cap = 50 + 10 * jnp.sum(task_mask).astype(jnp.int32)
    tol = default_tol(gram.dtype) if tol is None else tol
    # Stopped on its certificate (or, Wolfe, with no progress left in the working precision), not at its cap.
    converged = jnp.isfinite(info.certificate) & ((info.certificate <= tol) | (info.iterations < cap))
    return WeightingOutput(w.astype(grads.dtype), state,
                           {"min_norm": norm.astype(grads.dtype),
                            "certificate": info.certificate.astype(grads.dtype),
                            "iterations": info.iterations, "converged": converged})


def mgda_weighting(*, solver: str = "wolfe", max_iterations: Optional[int] = None,
                   tol: Optional[float] = None) -> Weighting:
    r"""MGDA as a :class:`~imtl_jax.Weighting` (Sener & Koltun, NeurIPS 2018).

    Solves Eq. 3 of the paper, ``min_{w >= 0, sum w = 1} ||sum_t w_t g_t||^2``, on the (T, T)
    Gramian by Wolfe's min-norm-point algorithm (default, :func:`min_norm_point`: an
    active-set method, finite, at most T + 2 major cycles measured on the hard families) or by
    Frank-Wolfe with exact line search (the paper's Algorithms 1-2, plain or pairwise,
    :func:`min_norm_simplex`), under ``lax.while_loop`` until the relative KKT gap
    ``(max_{w_t > 0} (M w)_t - min_t (M w)_t) / max_t |g_t|^2`` is ``<= tol``. No gradient
    normalisation (the authors' code offers "l2"/"loss"/"loss+"; the IMTL paper's MGDA baseline
    uses none). Weights sum to 1 (the paper's convention; the aggregate is the min-norm
    element). Gradient method: heads get their own loss gradient.

    Args:
      solver: ``"wolfe"`` (default), ``"pairwise"`` (pairwise Frank-Wolfe plus an exact solve
        on the support every T steps) or ``"frank_wolfe"`` (the paper's plain steps, same).
      max_iterations: cap (default :func:`default_max_iterations`: ``50 + 10 T`` major cycles
        for Wolfe, ``1000 T`` Frank-Wolfe steps).
      tol: certificate tolerance (default ``4 eps`` of the working dtype: float32 round-off).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then per Wolfe cycle one or a
    few (T+1, T+1) eigendecompositions (the affine min-norm solve on the support). Measured on
    the hard families of ``python -m benchmarks.accuracy`` (T <= 20, norms
    over 1e+-4): see docs/method.md. ``info``: ``min_norm`` (``||w @ grads||``), ``certificate``
    (the final relative KKT gap), ``iterations`` (major cycles or Frank-Wolfe steps used, int32)
    and ``converged`` (bool: stopped on its certificate, not at ``max_iterations``).
    """
    max_iterations, tol = _check_solver_args(max_iterations, tol, solver)
    return Weighting(name="mgda", init=stateless_init,
                     weigh=functools.partial(_mgda_weigh, max_iterations=max_iterations,
                                             solver=solver, tol=tol),
                     needs_grads=True, weights_heads=False,
                     # partial labels: the Wolfe solver runs on the masked simplex
                     supports_task_mask=solver == "wolfe")


# ----------------------------------------------------------------------------------------------


def _closed_form(gram: jax.Array, task_mask: Optional[jax.Array] = None) -> jax.Array:
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    ones = jnp.ones((num_tasks,), dtype)
    if task_mask is not None:
        # Partial labels: identity rows and columns for the absent tasks (eigenvalue 1 <= the
        # largest, since the normalized Gramian has a diagonal entry >= 1) and 1 -> mask, so the
        # solve is the sub-problem's and the absent weights are 0.
        both = task_mask[:, None] & task_mask[None, :]
        gram = jnp.where(both, gram, jnp.eye(num_tasks, dtype=dtype))
        ones = jnp.where(task_mask, 1.0, 0.0).astype(dtype)
    present = num_tasks if task_mask is None else jnp.sum(task_mask).astype(dtype)
    evals, evecs = jnp.linalg.eigh(gram)
    cutoff = 10.0 * present * jnp.finfo(dtype).eps * jnp.max(jnp.abs(evals))
    keep = evals > cutoff
    coords = jnp.matmul(evecs.T, ones, precision=HIGHEST)
    # Null-space part of 1: if nonzero, sum w = 1 is reachable with M w = 0 (aggregate 0).
    null_part = jnp.matmul(evecs, jnp.where(keep, 0.0, coords), precision=HIGHEST)
    null_mass = jnp.sum(null_part)                       # = ||P_null 1||^2 >= 0
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    range_part = jnp.matmul(evecs, inv * coords, precision=HIGHEST)   # M^+ 1
    range_mass = jnp.sum(range_part)
    use_null = null_mass > jnp.sqrt(jnp.finfo(dtype).eps)
    w_null = safe_div(null_part, null_mass, ones / present)
    w_range = jnp.where(range_mass > 0, range_part / jnp.where(range_mass > 0, range_mass, 1.0),
                        ones / present)
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


def _mgda_cf_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "mgda_closed_form")
    if task_mask is not None:
        grads = _mask.rows(grads, task_mask)
    gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
    w = nan_if_not_finite(_closed_form(gram, task_mask), grads)
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
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


MGDA = mgda_weighting()
MGDA_CLOSED_FORM = mgda_closed_form_weighting()

register(Method("mgda", IDENTITY, MGDA))
register(Method("mgda_closed_form", IDENTITY, MGDA_CLOSED_FORM))
