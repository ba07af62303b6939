"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232,
2024; the TorchJD library).

Registered name: ``upgrad``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._linalg import symmetric_pinv
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian)
from imtl_jax.methods.equal import IDENTITY


def _objective(v, gram, lin):
    return 0.5 * jnp.sum(jnp.matmul(v, gram, precision=HIGHEST) * v, axis=1) + jnp.sum(lin * v, axis=1)


def default_tol(dtype) -> float:
    """The default certificate tolerance: ``8 eps`` of the working dtype."""
    return 8.0 * float(jnp.finfo(dtype).eps)


def kkt_residual(gram: jax.Array, lin: jax.Array, v: jax.Array) -> jax.Array:
    r"""Relative KKT residual of ``min_{v >= 0} v^T M v / 2 + lin . v`` (rows of ``v``, ``lin``):
    ``max_k max_t (max(-r_t, 0), |r_t| [v_t > 0]) / max_t M_tt`` with ``r = M v + lin``.

    For UPGrad (``lin = M e_i``) ``r_t = g_t . x`` with ``x = G^T (e_i + v)`` the candidate
    projection of ``g_i`` onto the dual cone ``{x : G x >= 0}``: the residual measures the
    violated constraints and the broken complementarity, relative to ``max_t |g_t|^2``; then
    ``||x - x*||^2 <= sum_t v_t r_t + sum_t v*_t max(-r_t, 0)`` (tests/test_methods_nash_aligned_upgrad.py).
    """
    r = jnp.matmul(v, gram, precision=HIGHEST) + lin
    per = jnp.maximum(jnp.maximum(-r, 0.0), jnp.where(v > 0, jnp.abs(r), 0.0))
    scale = jnp.max(jnp.diag(gram))
    return jnp.where(scale > 0, jnp.max(per) / jnp.where(scale > 0, scale, 1.0), 0.0)


def residual_floor(gram: jax.Array, lin: jax.Array, v: jax.Array, size=None) -> jax.Array:
    r"""The rounding error bound of :func:`kkt_residual` itself: evaluating ``r = M v + lin`` in
    the working precision errs by at most ``gamma_{T+1} (|M| |v| + |lin|)`` per entry (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 3.5, ``gamma_n = n eps /
    (1 - n eps)``), so a residual below this is indistinguishable from 0: derived from the data,
    not tuned. In the certificate's units (relative to ``max_t M_tt``). ``size``: the number of
    tasks of the problem (default T; T' under a task mask, whose absent terms are exact zeros)."""
    n = (gram.shape[0] if size is None else size) + 1
    eps = jnp.finfo(gram.dtype).eps
    gamma = n * eps / (1.0 - n * eps)
    mag = jnp.matmul(jnp.abs(v), jnp.abs(gram), precision=HIGHEST) + jnp.abs(lin)
    scale = jnp.max(jnp.diag(gram))
    return jnp.where(scale > 0, gamma * jnp.max(mag) / jnp.where(scale > 0, scale, 1.0), 0.0)


def _fista(v, gram, lin, step, iterations):
    """Accelerated projected gradient on ``min_{v >= 0} v^T M v / 2 + lin . v`` (row-wise
    problems), with the gradient-based adaptive restart of O'Donoghue & Candes (2015)."""
    one = jnp.ones((), gram.dtype)

    def body(_, carry):
        v, y, t = carry
        grad = jnp.matmul(y, gram, precision=HIGHEST) + lin
        v_new = jnp.maximum(y - step * grad, 0.0)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_new = v_new + ((t - 1.0) / t_new) * (v_new - v)
        restart = jnp.sum((y - v_new) * (v_new - v), axis=1) > 0
        y_new = jnp.where(restart[:, None], v_new, y_new)
        return v_new, y_new, t_new

    v, _, _ = lax.fori_loop(0, iterations, body, (v, v, one))
    return v


def _active_set(z, gram, lin, s, threshold, max_steps, size):
    r"""Lawson & Hanson's active-set method (NNLS, 1974, ch. 23) on the equilibrated problems
    ``min_{z >= 0} z^T K z / 2 + c . z`` (rows of ``z``, ``c``; ``K`` the cosine matrix), warm
    started from ``z``: each step solves ``K_PP y_P = -c_P`` exactly on the passive set ``P``
    (scale-relative pseudo-inverse); if ``y_P > 0`` it is accepted and the index with the most
    negative scaled residual ``s_t (K y + c)_t`` (the certificate's own units) joins ``P`` when it
    exceeds ``threshold``; otherwise the iterate moves from ``z`` towards ``y`` until the first
    coordinate hits 0, which leaves ``P`` (the objective never increases). Finite in exact
    arithmetic (no set repeats); runs until no row changes or ``max_steps`` steps. Returns
    ``(z, steps)``. ``size``: the problem's number of tasks (the cutoff ``10 size eps``)."""
    num = gram.shape[0]
    eye = jnp.eye(num, dtype=gram.dtype)
    eps = jnp.finfo(gram.dtype).eps

    def solve(free, ci):
        sub = jnp.where(free[:, None] & free[None, :], gram, eye)
        y = jnp.matmul(symmetric_pinv(sub, 10.0 * size * eps), jnp.where(free, -ci, 0.0),
                       precision=HIGHEST)
        return jnp.where(free, y, 0.0)

    def one(zi, free, ci):
        y = solve(free, ci)
        blocked = free & (y <= 0)
        infeasible = jnp.any(blocked)
        ratio = jnp.where(blocked, zi / jnp.where(blocked, zi - y, 1.0), jnp.inf)
        k = jnp.argmin(ratio)
        alpha = jnp.clip(ratio[k], 0.0, 1.0)
        zb = jnp.maximum(zi + alpha * (y - zi), 0.0).at[k].set(0.0)
        zb = jnp.where(free, zb, 0.0)
        neg = jnp.where(free, -jnp.inf, -s * (jnp.matmul(gram, y, precision=HIGHEST) + ci))
        j = jnp.argmax(neg)
        add = jnp.arange(num) == j
        grow = neg[j] > threshold
        z_new = jnp.where(infeasible, zb, y)
        free_new = jnp.where(infeasible, free & (zb > 0), free | (grow & add))
        changed = infeasible | grow
        return z_new, free_new, changed

    def cond(carry):
        _, _, changed, step = carry
        return jnp.any(changed) & (step < max_steps)

    def body(carry):
        z, free, _, step = carry
        z_new, free_new, changed = jax.vmap(one)(z, free, lin)
        ok = jnp.all(jnp.isfinite(z_new), axis=1, keepdims=True)
        return (jnp.where(ok, z_new, z), jnp.where(ok, free_new, free), changed & ok[:, 0],
                step + 1)

    z = jnp.maximum(z, 0.0)
    changed = jnp.ones(z.shape[:1], bool)
    z, _, _, steps = lax.while_loop(cond, body, (z, z > 0, changed, jnp.zeros((), jnp.int32)))
    return z, steps


def project_weights(gram: jax.Array, targets: jax.Array, *, iterations: int = 50,
                    max_rounds: int = 20, tol: Optional[float] = None,
                    task_mask: Optional[jax.Array] = None):
    r"""``W[k] = argmin_{w >= targets[k]} w^T M w`` for each row of ``targets`` (K, T); returns
    ``(W, certificate, rounds, converged)``.

    With ``M = G G^T``, ``G^T W[k]`` is the projection of ``G^T targets[k]`` onto the dual cone
    ``{x : G x >= 0}`` (TorchJD's Proposition; the dual of ``min ||x - G^T u||^2 s.t. G x >= 0``).
    Solved for ``v = w - u >= 0``, equilibrated (``v = z / sqrt(diag M)``), by rounds of
    (``iterations`` steps of accelerated projected gradient with step ``1 / lambda_max``, then
    active-set Newton polishing), all problems
    vmapped, under ``lax.while_loop`` until the largest :func:`kkt_residual` is ``<= tol``
    (default ``8 eps``) or below its own rounding bound :func:`residual_floor` (``converged``),
    or after ``max_rounds`` rounds.

    ``task_mask`` (T,) bool (partial labels): the absent rows and columns of ``gram`` and the
    absent entries of ``targets`` must be 0. Then every gradient, ``lin`` and residual entry of
    an absent task is exactly 0, so its ``v_t`` stays 0 (never enters the passive set) and the
    present block follows the T'-task problem's path; ``size``-dependent constants (cutoffs,
    the rounding bound, the active-set cap) use T'. A row of ``targets`` that is 0 (an absent
    task's problem) is solved by ``v = 0`` at once.
    """
    dtype = gram.dtype
    num_tasks = gram.shape[0]
    size = num_tasks if task_mask is None else jnp.sum(task_mask).astype(jnp.int32)
    tol = default_tol(dtype) if tol is None else float(tol)
    lin = jnp.matmul(targets, gram, precision=HIGHEST)     # rows: M u (M symmetric)
    # Equilibrate: v = z / s with s = sqrt(diag M) turns M into the cosine matrix K (unit
    # diagonal), so the iterations see the angles between the rows, not their norms (spread over
    # 1e+-4 in the hard families, where the unscaled problem needs multipliers ~1e3 that
    # projected gradient with step 1/lambda_max(M) never reaches).
    diag = jnp.diag(gram)
    s = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
    cos = gram / (s[:, None] * s[None, :])
    lin_z = lin / s[None, :]
    lam_max = jnp.max(jnp.linalg.eigvalsh(cos))
    step = jnp.where(lam_max > 0, 1.0 / jnp.where(lam_max > 0, lam_max, 1.0), 0.0)

    def cond(carry):
        z, res, it = carry
        floor = residual_floor(gram, lin, z / s[None, :], size)
        return (res > jnp.maximum(tol, floor)) & (it < max_rounds)

    scale = jnp.max(diag)
    threshold = 0.25 * tol * jnp.where(scale > 0, scale, 1.0)  # in the certificate's units

    def body(carry):
        z, _, it = carry
        z, _ = _active_set(_fista(z, cos, lin_z, step, iterations), cos, lin_z, s, threshold,
                           4 * size + 8, size)
        return z, kkt_residual(gram, lin, z / s[None, :]), it + 1

    z0 = jnp.zeros(targets.shape, dtype)
    z, res, rounds = lax.while_loop(cond, body, (z0, kkt_residual(gram, lin, z0),
                                                 jnp.zeros((), jnp.int32)))
    v = z / s[None, :]
    converged = jnp.isfinite(res) & (res <= jnp.maximum(tol, residual_floor(gram, lin, v, size)))
    return targets + v, res, rounds, converged


def _upgrad_weights(grads, iterations, max_rounds, tol, task_mask=None):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(cdt))
        weights, res, rounds, converged = project_weights(
            gram, jnp.eye(num_tasks, dtype=cdt), iterations=iterations, max_rounds=max_rounds, tol=tol)
        w = jnp.mean(weights, axis=0)
    else:
        # Partial labels: the present rows' projections (their Gramian block; an absent task's
        # problem has the zero target and is solved by v = 0), averaged over the T' of them.
        gram, _ = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
        targets = _mask.rows(jnp.eye(num_tasks, dtype=cdt), task_mask)
        weights, res, rounds, converged = project_weights(
            gram, targets, iterations=iterations, max_rounds=max_rounds, tol=tol, task_mask=task_mask)
        w = _mask.entries(jnp.sum(weights, axis=0) / _mask.count(task_mask, cdt), task_mask)
    w = nan_if_not_finite(w, grads).astype(grads.dtype)
    return w, {"certificate": res.astype(grads.dtype), "iterations": rounds,
               "converged": converged}


def _check_args(iterations, max_rounds, tol=None):
    for name, val in (("iterations", iterations), ("max_rounds", max_rounds)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"`{name}` must be a positive int, got {val!r}.")
    if tol is not None and not float(tol) >= 0:
        raise ValueError(f"`tol` must be >= 0 or None, got {tol!r}.")
    return iterations, max_rounds, None if tol is None else float(tol)


@functools.partial(jax.jit, static_argnames=("iterations", "max_rounds", "tol"))
def upgrad_weights(grads: jax.Array, *, iterations: int = 50, max_rounds: int = 20,
                   tol: Optional[float] = None) -> jax.Array:
    """UPGrad weights for the (T, F) ``grads`` (see :func:`upgrad_weighting`)."""
    grads = check_matrix(grads, "upgrad")
    return _upgrad_weights(grads, *_check_args(iterations, max_rounds, tol))[0]


def _upgrad_weigh(grads, losses, state, key, priorities, *, iterations, max_rounds, tol,
                  task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "upgrad")
    w, info = _upgrad_weights(grads, iterations, max_rounds, tol, task_mask)
    return WeightingOutput(w, state, info)


def upgrad_weighting(*, iterations: int = 50, max_rounds: int = 20,
                     tol: Optional[float] = None) -> Weighting:
    r"""UPGrad as a :class:`~imtl_jax.Weighting` (Quinton & Rey 2024; TorchJD ``UPGrad``).

    ``A(G) = (1/T) sum_i pi(g_i)`` where ``pi(g_i)`` is the projection of row i onto the dual
    cone of the rows, ``{x : g_t . x >= 0 for all t}``. So the update never conflicts with any
    task: ``g_t . A(G) >= 0`` for all t. Each projection is ``G^T w_i`` with
    ``w_i = argmin_{w >= e_i} w^T M w`` on the Gramian ``M``, solved by
    :func:`project_weights` (jittable, stopped on the KKT residual :func:`kkt_residual`); the
    weights are ``mean_i w_i`` (TorchJD's default uniform preference; they sum to ~1, i.e. the
    mean of the gradients when none conflict). Unlike TorchJD, no ridge ``reg_eps`` is added to
    the Gramian.

    Args:
      iterations: accelerated projected-gradient steps per round (default 50).
      max_rounds: cap on the rounds of (iterations + active-set Newton polish) (default 20).
      tol: certificate tolerance (default ``8 eps`` of the working dtype).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then per round
    O(iterations T^3 + T^4) for the T vmapped (T, T) problems (two (T, T) eigendecompositions
    per problem in the polish). ``info``: ``certificate`` (the largest relative KKT residual),
    ``iterations`` (rounds used, int32) and ``converged`` (bool: the certificate reached ``tol``
    before ``max_rounds``). Gradient method: heads get their own loss gradient.

    Partial labels (``task_mask``): the mean of the projections of the present rows onto the
    dual cone of the present rows (the T'-task problem, on its solver path:
    :func:`project_weights`); ``certificate``/``converged`` are its own.
    """
    iterations, max_rounds, tol = _check_args(iterations, max_rounds, tol)
    return Weighting(name="upgrad", init=stateless_init,
                     weigh=functools.partial(_upgrad_weigh, iterations=iterations,
                                             max_rounds=max_rounds, tol=tol),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


UPGRAD = upgrad_weighting()

register(Method("upgrad", IDENTITY, UPGRAD))
