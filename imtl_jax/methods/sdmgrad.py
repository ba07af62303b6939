"""SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji,
"Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS 2023).

Registered name: ``sdmgrad`` (``lambda = 0.3``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite,
                                      normalized_gramian, project_simplex, safe_div)
from imtl_jax.methods.equal import IDENTITY


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad_weighting`: ``weights`` (T,), the simplex weights ``w`` of the
    inner problem, warm-started from one step to the next (``1/T`` at first)."""

    weights: jax.Array


def _sdmgrad_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return SDMGradState(jnp.full((num_tasks,), 1.0 / num_tasks, dtype))


def sdmgrad_inner(a: jax.Array, w: jax.Array, *, lam: float = 0.3, lr: float = 10.0,
                  momentum: float = 0.5, iterations: int = 20,
                  task_mask: Optional[jax.Array] = None) -> jax.Array:
    r"""SDMGrad's inner loop on a (T, T) matrix ``a`` (``J_xi J_xi'^T`` of two independent
    batches in the paper; ``G G^T`` here): ``iterations`` steps of projected heavy-ball
    descent on ``w -> (w + lam w~)^T a (w + lam w~) / 2`` over the simplex, ``w~ = 1/T``:
    ``v <- momentum v + a (w + lam w~)`` (``v = 0`` at first), ``w <- P_simplex(w - lr v)``.
    ``a`` is first divided by ``(mean_t sqrt(max(a_tt, 0)))^2`` (the authors', LibMTL's and
    TorchJD's normalisation; none when that is 0). Returns the new ``w``.

    ``task_mask`` (T,) bool (partial labels; the absent rows and columns of ``a`` must be 0):
    the T'-task problem of the present tasks (means over them, ``w~ = 1/T'`` on them, the
    simplex of the present tasks); the absent entries of the returned ``w`` are 0."""
    num_tasks = a.shape[0]
    if task_mask is None:
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(a), 0.0)))
        pref = jnp.full((num_tasks,), lam / num_tasks, a.dtype)
        project = project_simplex
    else:
        scale = _mask.mean(jnp.sqrt(jnp.maximum(jnp.diag(a), 0.0)), task_mask)
        pref = lam * _mask.uniform(task_mask, a.dtype)
        w = _mask.entries(w, task_mask)

        def project(y):
            return _mask.project_simplex(y, task_mask)
    a = safe_div(a, scale * scale, 0.0)

    def body(_, carry):
        w, v = carry
        v = momentum * v + jnp.matmul(a, w + pref, precision=HIGHEST)
        return project(w - lr * v), v

    w, _ = lax.fori_loop(0, iterations, body, (w, jnp.zeros_like(w)))
    return w


def _sdmgrad_weigh(grads, losses, state, key, priorities, *, lam, lr, momentum, iterations,
                   task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "sdmgrad")
    num_tasks = grads.shape[0]
    check_state(state, _sdmgrad_init(num_tasks, grads.dtype), "sdmgrad")
    cdt = compute_dtype(grads.dtype)
    old = state.weights.astype(cdt)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(cdt))
        w = sdmgrad_inner(gram, old, lam=lam, lr=lr, momentum=momentum, iterations=iterations)
        weights = (w + lam / num_tasks) / (1.0 + lam)
    else:
        # Partial labels: the inner loop of the present tasks (warm-started from their stored
        # weights); the absent tasks' stored weights are kept.
        gram, _ = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
        w = sdmgrad_inner(gram, old, lam=lam, lr=lr, momentum=momentum, iterations=iterations,
                          task_mask=task_mask)
        weights = _mask.entries((w + lam * _mask.uniform(task_mask, cdt)) / (1.0 + lam), task_mask)
        w = _mask.keep(w, old, task_mask)
    weights = nan_if_not_finite(weights, grads)
    new_state = keep_state_if_not_finite(cast_like(SDMGradState(w), state), state, grads)
    return WeightingOutput(weights.astype(grads.dtype), new_state, {})


def sdmgrad_weighting(*, lam: float = 0.3, lr: float = 10.0, momentum: float = 0.5,
                      iterations: int = 20) -> Weighting:
    r"""SDMGrad as a :class:`~imtl_jax.Weighting` (Xiao et al., NeurIPS 2023, Alg. 1).

    Direction-oriented MGDA: the update ``d = (G^T w + lam g_0) / (1 + lam)``, with the mean
    gradient ``g_0 = G^T 1 / T``, and ``w`` on the simplex minimising
    ``||G^T (w + lam 1/T)||^2 / 2`` approximately, by ``iterations`` steps of projected SGD with
    momentum warm-started from the previous step's ``w`` (:func:`sdmgrad_inner`, kept in the
    state). Weights ``(w + lam / T) / (1 + lam)`` sum to 1. ``lam = 0`` is a stochastic MGDA;
    ``lam -> inf`` the mean gradient.

    The paper's stochastic algorithm draws three independent batches: ``A = J_xi J_xi'^T`` from
    two of them (an unbiased estimate of ``G G^T``), the update from the third. The
    :class:`~imtl_jax.Weighting` interface sees one batch's (T, F) matrix, so here
    ``A = G G^T`` of that batch and the update uses it too (the authors' deterministic
    variant); :func:`sdmgrad_inner` takes any ``A`` for a loop that draws the batches itself.
    Not included from the authors' code: the update's factor T ("to match the sum loss") and
    gradient-norm clipping (``max_norm=1``; add ``optax.clip_by_global_norm``). TorchJD adds
    1e-8 to the normalising ``scale^2`` (LibMTL too; the authors add 1e-4 to each ``a_tt``):
    ours is exactly scale-free.

    Args:
      lam: the pull towards the mean gradient (0.3: the authors' scripts, LibMTL, TorchJD; the
        authors' class default 0.6).
      lr: the inner step size (10: the authors' code and TorchJD; LibMTL 5).
      momentum: the inner heavy-ball momentum (0.5, all three).
      iterations: inner steps per training step (20, all three).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(iterations T^2).
    State: the inner weights (T,). Deterministic (no key). Gradient method: heads get their own
    loss gradient.

    Partial labels (``task_mask``): the step of the T'-task problem of the present tasks, warm
    started from their stored weights (which need not sum to 1 there: the first projection puts
    them on the present tasks' simplex); the absent tasks' stored weights are kept.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.sdmgrad import sdmgrad_weighting
      >>> w = sdmgrad_weighting()
      >>> g = jnp.array([[1.0, 0.0], [0.0, 3.0]])
      >>> out = w.weigh(g, jnp.zeros(2), w.init(2), None, None)
      >>> round(float(out.weights.sum()), 5), bool(out.weights[0] > out.weights[1])  # the smaller gradient
      (1.0, True)
    """
    lam, lr, momentum = float(lam), float(lr), float(momentum)
    if not lam >= 0:
        raise ValueError(f"`lam` must be >= 0, got {lam!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"`iterations` must be a positive int, got {iterations!r}.")
    return Weighting(name="sdmgrad", init=_sdmgrad_init,
                     weigh=functools.partial(_sdmgrad_weigh, lam=lam, lr=lr, momentum=momentum,
                                             iterations=iterations),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


SDMGRAD = sdmgrad_weighting()

register(Method("sdmgrad", IDENTITY, SDMGRAD))
