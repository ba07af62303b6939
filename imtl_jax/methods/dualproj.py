"""DualProj (TorchJD; Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
2406.16232, 2024): the mean gradient projected onto the dual cone of the task gradients, the
projection of Lopez-Paz & Ranzato's GEM (NeurIPS 2017, Eq. 11).

Registered name: ``dualproj``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (check_grads, check_matrix, compute_dtype, nan_if_not_finite,
                                      normalized_gramian)
from imtl_jax.methods.equal import IDENTITY
from imtl_jax.methods.upgrad import _check_args, project_weights


def _dualproj_weights(grads, iterations, max_rounds, tol, task_mask=None):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(cdt))
        target = jnp.full((1, num_tasks), 1.0 / num_tasks, cdt)
    else:
        # Partial labels: the present rows' mean projected onto their dual cone (the T'-task
        # problem: their Gramian block, the target 1/T' on them and 0 elsewhere).
        gram, _ = _mask.gramian(grads, task_mask)
        grads = _mask.rows(grads, task_mask)
        target = _mask.uniform(task_mask, cdt)[None, :]
    weights, res, rounds, converged = project_weights(gram, target, iterations=iterations,
                                                      max_rounds=max_rounds, tol=tol,
                                                      task_mask=task_mask)
    w = nan_if_not_finite(weights[0], grads).astype(grads.dtype)
    return w, {"certificate": res.astype(grads.dtype), "iterations": rounds,
               "converged": converged}


@functools.partial(jax.jit, static_argnames=("iterations", "max_rounds", "tol"))
def dualproj_weights(grads: jax.Array, *, iterations: int = 50, max_rounds: int = 20,
                     tol: Optional[float] = None) -> jax.Array:
    """DualProj weights for the (T, F) ``grads`` (see :func:`dualproj_weighting`)."""
    grads = check_matrix(grads, "dualproj")
    return _dualproj_weights(grads, *_check_args(iterations, max_rounds, tol))[0]


def _dualproj_weigh(grads, losses, state, key, priorities, *, iterations, max_rounds, tol,
                    task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "dualproj")
    w, info = _dualproj_weights(grads, iterations, max_rounds, tol, task_mask)
    return WeightingOutput(w, state, info)


def dualproj_weighting(*, iterations: int = 50, max_rounds: int = 20,
                       tol: Optional[float] = None) -> Weighting:
    r"""DualProj as a :class:`~imtl_jax.Weighting` (TorchJD ``DualProj``).

    The mean gradient ``g_0 = (1/T) sum_t g_t`` projected onto the dual cone of the rows,
    ``{x : g_t . x >= 0 for all t}``: ``argmin_x ||x - g_0||`` subject to ``G x >= 0``. The
    update never conflicts with any task (``g_t . update >= 0``) and is ``g_0`` itself when no
    task conflicts with the mean. Its dual on the Gramian ``M = G G^T`` is
    ``w = argmin_{w >= 1/T} w^T M w`` with the update ``w @ G`` (TorchJD's proposition), solved by
    the same certified solver as UPGrad (:func:`imtl_jax.methods.upgrad.project_weights`:
    equilibrated accelerated projected gradient + active-set polish, under ``lax.while_loop``
    until the relative KKT residual is ``<= tol``). Weights are ``>= 1/T`` and sum to ``>= 1``
    (the mean's scale, as TorchJD's default preference ``1/T``). Unlike TorchJD, the Gramian is
    not regularised (TorchJD adds ``reg_eps = 1e-4`` to the normalised Gramian's diagonal).

    Args:
      iterations: accelerated projected-gradient steps per round (default 50).
      max_rounds: cap on the rounds (default 20).
      tol: certificate tolerance (default ``8 eps`` of the working dtype).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then per round
    O(iterations T^2 + T^3) (one (T, T) problem). ``info``: ``certificate``, ``iterations``
    (rounds used, int32), ``converged``. Stateless, deterministic. Gradient method: heads get
    their own loss gradient.

    Partial labels (``task_mask``): the mean of the present rows projected onto the dual cone
    of the present rows (the T'-task problem, on its solver path); ``certificate``/``converged``
    are its own.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.dualproj import dualproj_weights
      >>> g = jnp.array([[1.0, 0.0], [-2.0, 1.0]])
      >>> d = dualproj_weights(g) @ g
      >>> bool(jnp.all(g @ d >= -1e-6))
      True
    """
    iterations, max_rounds, tol = _check_args(iterations, max_rounds, tol)
    return Weighting(name="dualproj", init=stateless_init,
                     weigh=functools.partial(_dualproj_weigh, iterations=iterations,
                                             max_rounds=max_rounds, tol=tol),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


DUALPROJ = dualproj_weighting()

register(Method("dualproj", IDENTITY, DUALPROJ))
