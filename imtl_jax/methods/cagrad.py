"""CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021).

Registered name: ``cagrad`` (``c = 0.5``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._linalg import symmetric_pinv
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, certified_loop, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian, safe_div, support_cosines)
from imtl_jax.methods.equal import IDENTITY


def default_max_iterations(num_tasks: int) -> int:
    """The cap on the pairwise Frank-Wolfe steps used when none is given: ``1000 T`` (a cap, not a
    budget: the solver stops on its certificate)."""
    return 1000 * num_tasks


def default_tol(dtype) -> float:
    """The default certificate tolerance: ``16 eps`` of the working dtype (the float32 round-off
    plateau of :func:`dual_gap` measured on the hard families is ~10 eps)."""
    return 16.0 * float(jnp.finfo(dtype).eps)


def _dual_gradient(gram, lin, rho, w):
    tiny = jnp.finfo(gram.dtype).tiny
    mw = jnp.matmul(gram, w, precision=HIGHEST)
    q0 = jnp.maximum(jnp.dot(w, mw), 0.0)                          # ||g_w||^2
    return lin + rho * mw / jnp.maximum(jnp.sqrt(q0), tiny), mw, q0


def _dual_terms(gram, c, task_mask=None):
    """``(lin, rho)`` of the dual: ``M 1 / T`` and ``c ||g_0||``; with ``task_mask`` (the absent
    rows and columns of ``gram`` 0) those of the present tasks' problem (``T'``, their mean)."""
    if task_mask is None:
        return jnp.mean(gram, axis=1), c * jnp.sqrt(jnp.maximum(jnp.mean(gram), 0.0))
    num_present = _mask.count(task_mask, gram.dtype)
    return (jnp.sum(gram, axis=1) / num_present,
            c * jnp.sqrt(jnp.maximum(jnp.sum(gram) / (num_present * num_present), 0.0)))


def dual_gap(gram: jax.Array, c: float, w: jax.Array,
             task_mask: Optional[jax.Array] = None) -> jax.Array:
    """Relative pairwise Frank-Wolfe gap of CAGrad's dual at ``w``:
    ``(max_{t: w_t > 0} dF/dw_t - min_t dF/dw_t) / max_t M_tt``; 0 exactly at the optimum (KKT
    on the simplex) where ``g_w != 0``, and an upper bound of the plain gap ``grad F . w -
    min_t dF/dw_t >= F(w) - F*`` (convexity). With ``task_mask``: over the present tasks (the
    simplex of the sub-problem; the absent rows and columns of ``gram`` must be 0)."""
    lin, rho = _dual_terms(gram, c, task_mask)
    grad, _, _ = _dual_gradient(gram, lin, rho, w)
    top = jnp.max(jnp.where(w > 0, grad, -jnp.inf))
    low = jnp.min(grad) if task_mask is None else jnp.min(jnp.where(task_mask, grad, jnp.inf))
    return safe_div(top - low, jnp.max(jnp.diag(gram)), 0.0)


def _value(gram, lin, rho, v):
    return jnp.dot(v, lin) + rho * jnp.sqrt(jnp.maximum(
        jnp.dot(v, jnp.matmul(gram, v, precision=HIGHEST)), 0.0))


def _affine_minimiser(gram, lin, rho, support, size):
    """The minimiser of CAGrad's dual on the affine hull of the face ``support`` (``sum w = 1``,
    ``w = 0`` off it; entries may be negative) and whether it exists. On the face the KKT
    conditions ``lin + rho M w / ||g_w|| = mu 1`` give, with ``s = sqrt(diag M)``, the cosine
    matrix ``K = M / (s s^T)`` (equilibrated, so the solve sees the angles, not the norms),
    ``w = z / s`` and ``p = K^+ (1/s)``, ``q = K^+ (lin/s)``: ``z ∝ mu p - q``, with ``mu`` a root
    of ``(mu p - q)^T K (mu p - q) = rho^2`` and the scale fixed by ``sum w = 1``; of the two
    roots the one with the lower objective.

    Returns ``(y, ok, ray)``. When the quadratic has no real root (``min_mu ||mu p - q||_K >
    rho``: the linear term outweighs ``rho ||g||`` along some direction of the hull) ``F`` is
    unbounded below on the affine hull and has no minimiser there: ``ray`` is true and ``y`` is
    that recession direction, ``d = (mu* p - q) / s`` with ``mu* = (p^T K q) / (p^T K p)``
    (``sum d = 0``). ``F`` is convex and its slope along ``d`` tends to ``||r||_P (rho -
    ||r||_P) < 0`` (``r = mu* 1/s - lin/s``, ``P = K^+``), so it decreases along the whole ray
    ``w + t d``: the simplex bounds the step (a primal active-set method's unbounded
    sub-problem)."""
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    k, s = support_cosines(gram, support)
    pinv = symmetric_pinv(k, 10.0 * size * eps)
    c = jnp.where(support, 1.0 / s, 0.0)
    lin_s = jnp.where(support, lin / s, 0.0)
    p = jnp.matmul(pinv, c, precision=HIGHEST)
    q = jnp.matmul(pinv, lin_s, precision=HIGHEST)
    kp = jnp.matmul(k, p, precision=HIGHEST)
    kq = jnp.matmul(k, q, precision=HIGHEST)
    qa, qb, qc = jnp.dot(p, kp), jnp.dot(p, kq), jnp.dot(q, kq) - rho * rho
    disc2 = qb * qb - qa * qc
    disc = jnp.sqrt(jnp.maximum(disc2, 0.0))
    safe_a = jnp.where(qa > 0, qa, 1.0)
    best = jnp.zeros((num_tasks,), dtype)
    best_value = jnp.asarray(jnp.inf, dtype)
    for mu in ((qb + disc) / safe_a, (qb - disc) / safe_a):
        z = jnp.where(support, mu * p - q, 0.0)
        total = jnp.sum(z * c)
        cand = z * c / jnp.where(total != 0, total, 1.0)
        ok = (qa > 0) & (total > 0) & jnp.all(jnp.isfinite(cand))
        better = ok & (_value(gram, lin, rho, cand) < best_value)
        best = jnp.where(better, cand, best)
        best_value = jnp.where(better, _value(gram, lin, rho, cand), best_value)
    ray = (qa > 0) & (disc2 < 0)
    direction = jnp.where(support, (qb / safe_a) * p - q, 0.0) * c
    direction = direction / jnp.maximum(jnp.max(jnp.abs(direction)), jnp.finfo(dtype).tiny)
    ray = ray & jnp.all(jnp.isfinite(direction)) & jnp.any(direction < 0)
    return jnp.where(ray, direction, best), ray | jnp.isfinite(best_value), ray


def _face_steps(gram, lin, rho, w, threshold, max_steps, present, size):
    """Active-set steps from the simplex point ``w`` (a primal active-set method, Nocedal &
    Wright ch. 16.5, on the simplex). Each step minimises on the affine hull of the working face:
    the support of ``w``, plus, after a step that ended at a face minimiser, the vertex with the
    smallest partial derivative when it undercuts the support's largest by more than
    ``threshold`` (the :func:`dual_gap` units). The minimiser ``y`` is taken when it lies in the
    simplex and is no worse; otherwise the iterate moves from ``w`` towards ``y`` until the first
    coordinate hits 0, which is dropped (``F`` is convex and ``F(y) <= F(w)``, so ``F`` never
    increases). A face on whose affine hull ``F`` is unbounded below (no minimiser: common on
    near-singular Gramians, where a vertex of tiny norm is still in the support) is left along
    its recession direction (:func:`_affine_minimiser`), to the boundary: its first zero is
    dropped, if ``F`` there is no worse. Stops when the face minimiser is KKT-optimal to
    ``threshold``, when a step makes no progress, or after ``max_steps`` solves; the Frank-Wolfe
    steps remain the fallback.
    ``present`` (T,) bool: the vertices that may enter (all but the absent tasks); ``size``:
    the problem's number of tasks (its pseudo-inverse cutoff ``10 size eps``)."""
    num_tasks = gram.shape[0]
    idx = jnp.arange(num_tasks)
    scale = jnp.max(jnp.diag(gram))
    threshold = threshold * jnp.where(scale > 0, scale, 1.0)

    def entering(w):
        grad, _, _ = _dual_gradient(gram, lin, rho, w)
        top = jnp.max(jnp.where(w > 0, grad, -jnp.inf))
        j = jnp.argmin(jnp.where((w > 0) | ~present, jnp.inf, grad))
        return j, (top - grad[j] > threshold) & (w[j] <= 0)

    def cond(carry):
        _, _, go, step = carry
        return go & (step < max_steps)

    def body(carry):
        w, at_face_min, _, step = carry
        j, add = entering(w)
        add = add & at_face_min
        support = (w > 0) | (add & (idx == j))
        y, ok, ray = _affine_minimiser(gram, lin, rho, support, size)
        # The step from w: towards the face minimiser y (alpha <= 1), or along the recession
        # direction y of an unbounded face (alpha up to the boundary).
        direction = jnp.where(ray, y, y - w)
        blocked = support & jnp.where(ray, direction < 0, y < 0)
        ratio = jnp.where(blocked, w / jnp.where(blocked, -direction, 1.0), jnp.inf)
        k = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[k], 0.0, jnp.where(ray, jnp.inf, 1.0))
        moved = jnp.maximum(w + alpha * direction, 0.0).at[k].set(0.0)
        moved = moved / jnp.sum(moved)
        infeasible = jnp.any(blocked)
        ok = ok & (_value(gram, lin, rho, jnp.where(ray, moved, y)) <= _value(gram, lin, rho, w))
        new = jnp.where(ok, jnp.where(infeasible, moved, jnp.maximum(y, 0.0)), w)
        finite = jnp.all(jnp.isfinite(new))
        new = jnp.where(finite, new, w)
        stalled = infeasible & (alpha <= 0)                # the entering vertex left at once
        _, more = entering(new)
        go = ok & finite & ~stalled & (infeasible | more)
        return new, ok & finite & ~infeasible, go, step + 1

    w, _, _, _ = lax.while_loop(cond, body, (w, jnp.zeros((), bool), jnp.ones((), bool),
                                             jnp.zeros((), jnp.int32)))
    return w


def cagrad_dual(gram: jax.Array, c: float, max_iterations,
                tol: Optional[float] = None,
                task_mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``argmin_{w in simplex} F(w) = w^T M 1/T + c ||g_0|| sqrt(w^T M w)``; returns
    ``(w, certificate, iterations)``.

    ``F`` is CAGrad's dual objective ``g_w . g_0 + sqrt(phi) ||g_w||`` with ``g_0`` the mean
    gradient, ``g_w = sum_t w_t g_t`` and ``phi = c^2 ||g_0||^2``, written on the Gramian ``M``.
    Solved by pairwise Frank-Wolfe: each step moves weight from the support vertex with the
    largest partial derivative to the vertex with the smallest, with an exact line search (the
    1-D problem ``min_s A s + rho sqrt(q(s))`` with quadratic ``q`` has a closed-form minimiser).
    ``F`` is convex, so the iterates decrease it monotonically. Steps run in blocks of T, each
    followed by the exact minimiser on the current face (kept if feasible and no worse), under
    ``lax.while_loop`` until :func:`dual_gap` ``<= tol`` (default ``16 eps``) or
    ``max_iterations`` steps.

    ``task_mask`` (T,) bool (partial labels; the absent rows and columns of ``gram`` must be 0):
    the T'-task dual of the present tasks, on the same path (start ``1/T'`` on them, absent
    vertices never chosen, blocks of T' steps, face steps and the certificate over them); the
    absent entries of ``w`` stay 0.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    tiny = jnp.finfo(dtype).tiny
    tol = default_tol(dtype) if tol is None else float(tol)
    eye = jnp.eye(num_tasks, dtype=dtype)
    lin, rho = _dual_terms(gram, c, task_mask)                     # M 1 / T = G g_0, c ||g_0||
    size: Any = num_tasks                       # the problem's number of tasks (T' if masked)
    block: Any = min(num_tasks, max_iterations) if task_mask is None else None
    if task_mask is None:
        present = jnp.ones((num_tasks,), bool)
        w0 = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    else:
        present = task_mask
        size = jnp.sum(task_mask).astype(jnp.int32)
        block = jnp.minimum(size, max_iterations).astype(jnp.int32)   # a traced loop bound
        w0 = _mask.uniform(task_mask, dtype)

    def step(_, w):
        grad, mw, q0 = _dual_gradient(gram, lin, rho, w)
        t = jnp.argmin(jnp.where(present, grad, jnp.inf))
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

    return certified_loop(step, lambda w: _face_steps(gram, lin, rho, w, 0.25 * tol, 2 * size + 2,
                                                      present, size),
                          lambda w: dual_gap(gram, c, w, task_mask), w0, block=block,
                          max_iterations=max_iterations, tol=tol)


def _cagrad_weights(grads, c, rescale, max_iterations, tol, task_mask=None):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(cdt))
        size = num_tasks
    else:
        # Partial labels: the dual of the present tasks (their Gramian block, T' of them); the
        # absent rows and columns are 0 and their dual weights stay 0.
        gram, _ = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
        size = jnp.sum(task_mask).astype(jnp.int32)
    cap = default_max_iterations(size) if max_iterations is None else max_iterations
    w, cert, iters = cagrad_dual(gram, c, cap, tol, task_mask)
    g0_norm = _dual_terms(gram, 1.0, task_mask)[1]                 # ||g_0||
    gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, jnp.matmul(gram, w, precision=HIGHEST)), 0.0))
    lam = safe_div(c * g0_norm, gw_norm, 0.0)                      # sqrt(phi) / ||g_w||
    # d = g_0 + lam g_w, rescaled, times T (to match the sum of the losses at c = 0).
    if task_mask is None:
        weights = (1.0 / num_tasks + lam * w) * num_tasks
    else:
        num_present = _mask.count(task_mask, cdt)
        weights = _mask.entries((1.0 / num_present + lam * w) * num_present, task_mask)
    if rescale == 1:
        weights = weights / (1.0 + c * c)
    elif rescale == 2:
        weights = weights / (1.0 + c)
    tol = default_tol(gram.dtype) if tol is None else tol
    info = {"dual_weights": w.astype(grads.dtype), "certificate": cert.astype(grads.dtype),
            "iterations": iters, "converged": jnp.isfinite(cert) & (cert <= tol)}
    return nan_if_not_finite(weights, grads).astype(grads.dtype), info


@functools.partial(jax.jit, static_argnames=("c", "rescale", "max_iterations", "tol"))
def cagrad_weights(grads: jax.Array, *, c: float = 0.5, rescale: int = 1,
                   max_iterations: Optional[int] = None, tol: Optional[float] = None) -> jax.Array:
    """CAGrad weights for the (T, F) gradients ``grads``: ``d = weights @ grads``
    (see :func:`cagrad_weighting`)."""
    grads = check_matrix(grads, "cagrad")
    return _cagrad_weights(grads, *_check_args(c, rescale, max_iterations, tol))[0]


def _check_args(c, rescale, max_iterations, tol):
    c = float(c)
    if not c >= 0:
        raise ValueError(f"`c` must be >= 0, got {c!r}.")
    if rescale not in (0, 1, 2):
        raise ValueError(f"`rescale` must be 0, 1 or 2, got {rescale!r}.")
    if max_iterations is not None and (not isinstance(max_iterations, int)
                                       or isinstance(max_iterations, bool) or max_iterations < 1):
        raise ValueError(f"`max_iterations` must be a positive int or None, got {max_iterations!r}.")
    if tol is not None and not float(tol) >= 0:
        raise ValueError(f"`tol` must be >= 0 or None, got {tol!r}.")
    return c, int(rescale), max_iterations, None if tol is None else float(tol)


def _cagrad_weigh(grads, losses, state, key, priorities, *, c, rescale, max_iterations, tol,
                  task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "cagrad")
    weights, info = _cagrad_weights(grads, c, rescale, max_iterations, tol, task_mask)
    return WeightingOutput(weights, state, info)


def cagrad_weighting(*, c: float = 0.5, rescale: int = 1, max_iterations: Optional[int] = None,
                     tol: Optional[float] = None) -> Weighting:
    r"""CAGrad as a :class:`~imtl_jax.Weighting` (Liu et al., NeurIPS 2021, Algorithm 1).

    Primal: ``max_d min_t g_t . d`` s.t. ``||d - g_0|| <= c ||g_0||`` with the mean gradient
    ``g_0``. Dual: ``min_{w in simplex} g_w . g_0 + sqrt(phi) ||g_w||`` with
    ``g_w = sum_t w_t g_t`` and ``phi = c^2 ||g_0||^2``; then ``d = g_0 + (sqrt(phi)/||g_w||) g_w``.
    The dual is solved on the (T, T) Gramian by pairwise Frank-Wolfe steps with exact line
    search and an exact solve on the current face every T steps, under ``lax.while_loop`` until
    the relative gap :func:`dual_gap` is ``<= tol`` (:func:`cagrad_dual`; checked against scipy
    SLSQP in float64 and on the hard families of tests/inputs.py). As in the authors' code,
    ``rescale=1`` divides ``d`` by ``1 + c^2`` (0: no rescaling, 2: by ``1 + c``) and ``d`` is
    multiplied by T to match the gradient of the *sum* of the losses, so ``c = 0`` is equal
    weighting. The weights on the original rows are ``T (1/T + lambda w) / (1 + c^2)``.

    Args:
      c: the conflict-aversion radius, >= 0 (0.5: the default of the authors' ``cagrad``
        function; the best value is benchmark dependent, Nash-MTL's code uses 0.4).
      rescale: 0, 1 (default) or 2, see above.
      max_iterations: cap on the Frank-Wolfe steps (default ``1000 T``; a cap, the solver
        stops on its certificate).
      tol: certificate tolerance (default ``16 eps`` of the working dtype).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^2) per step and one
    (T, T) eigendecomposition per block of T steps. ``info``: ``dual_weights`` (``w``),
    ``certificate`` (the final relative gap), ``iterations`` (steps used, int32) and
    ``converged`` (bool: the certificate reached ``tol`` before ``max_iterations``).
    Gradient method: heads get their own loss gradient.

    Partial labels (``task_mask``): the dual of the T'-task problem of the present tasks
    (``g_0`` their mean, the simplex of the present tasks, the factor T'), solved on the same
    path as that problem (:func:`cagrad_dual`); ``certificate``/``converged`` are its own.
    """
    c, rescale, max_iterations, tol = _check_args(c, rescale, max_iterations, tol)
    return Weighting(name="cagrad", init=stateless_init,
                     weigh=functools.partial(_cagrad_weigh, c=c, rescale=rescale,
                                             max_iterations=max_iterations, tol=tol),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


CAGRAD = cagrad_weighting()

register(Method("cagrad", IDENTITY, CAGRAD))
