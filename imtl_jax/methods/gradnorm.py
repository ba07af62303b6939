"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

Registered names:

* ``gradnorm`` — asymmetry ``gamma = 1.5`` (the paper's alpha; its usual value);
* ``gradnorm_gamma0`` — ``gamma = 0``: pure gradient-magnitude equalisation (the IMTL paper's
  "GradNorm (gamma = 0)" baseline; equals IMTL-G when all pairwise cosines are equal, Lemma 3).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite, safe_div)
from imtl_jax.methods.equal import IDENTITY


class GradNormState(NamedTuple):
    """State of :func:`gradnorm_weighting`.

    Attributes:
      weights: (T,) the learnable task weights ``w`` (sum T), used by the next step.
      initial_losses: (T,) ``L(0)``, stored at the first step.
      count: int32 number of steps seen.
    """

    weights: jax.Array
    initial_losses: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _gradnorm_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return GradNormState(jnp.ones((num_tasks,), dtype), jnp.zeros((num_tasks,), dtype),
                         jnp.zeros((), jnp.int32))


def _gradnorm_weigh(grads, losses, state, key, priorities, *, gamma, lr, name, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, name)
    num_tasks = grads.shape[0]
    check_state(state, _gradnorm_init(num_tasks, losses.dtype), name)
    cdt = compute_dtype(grads.dtype)
    mask = jnp.ones((num_tasks,), bool) if task_mask is None else task_mask
    if task_mask is not None:
        # Partial labels: every mean and the renormalisation run over the present tasks (T'
        # of them); the absent tasks' weights and initial losses are kept below.
        grads, losses = _mask.rows(grads, mask), _mask.entries(losses, mask)
    g = grads.astype(cdt)
    x = losses.astype(cdt)
    w = state.weights.astype(cdt)
    num_present = _mask.count(mask, cdt)

    # Gradient norms of the *unweighted* losses, up to one common factor (scale-free).
    absmax = jnp.max(jnp.abs(g))
    g = g / jnp.where(absmax > 0, absmax, 1.0)
    norms = jnp.sqrt(jnp.sum(g * g, axis=1))
    mean_norm = _mask.mean(norms, mask)

    # L_t(0): the loss at the task's first step (the first step at all, or, for a task whose
    # stored L(0) is still 0 (unset: absent so far, or a zero loss), the current one).
    initial = state.initial_losses.astype(cdt)
    initial = jnp.where((state.count == 0) | (initial == 0), x, initial)
    # Inverse training rates r_t = Ltilde_t / mean(Ltilde), Ltilde_t = L_t / L_t(0).
    ltilde = _mask.entries(safe_div(x, initial, 1.0), mask, 1.0)
    ratio = jnp.maximum(safe_div(ltilde, _mask.mean(ltilde, mask), 1.0), 0.0)

    gw = _mask.entries(w, mask) * norms               # G_W^(t) = ||grad(w_t L_t)|| = w_t ||g_t||
    target = _mask.mean(gw, mask) * ratio ** gamma    # constant in the paper (no gradient)
    gap = _mask.entries(gw - target, mask)
    objective = jnp.sum(jnp.abs(gap))                 # L_grad, Eq. 2
    # d L_grad / d w_t = sign(G_t - target_t) ||g_t||, divided by mean_t ||g_t|| (see docstring).
    grad_w = jnp.sign(gap) * safe_div(norms, mean_norm, 0.0)
    new_w = _mask.entries(jnp.maximum(w - lr * grad_w, 0.0), mask)
    total = jnp.sum(new_w)
    new_w = jnp.where(total > 0, num_present * new_w / jnp.where(total > 0, total, 1.0),
                      jnp.ones_like(new_w))
    new_state = GradNormState(new_w, initial, state.count + 1)
    if task_mask is not None:
        new_state = GradNormState(_mask.keep(new_w, state.weights.astype(cdt), mask),
                                  _mask.keep(initial, state.initial_losses.astype(cdt), mask),
                                  new_state.count)
    new_state = keep_state_if_not_finite(cast_like(new_state, state), state, grads, losses)
    weights = nan_if_not_finite(w if task_mask is None else _mask.entries(w, mask), grads, losses)
    info = {"gradnorm_loss": safe_div(objective, mean_norm, 0.0).astype(grads.dtype)}
    return WeightingOutput(weights.astype(grads.dtype), new_state, info)


def gradnorm_weighting(*, gamma: float = 1.5, lr: float = 0.025) -> Weighting:
    r"""GradNorm as a :class:`~imtl_jax.Weighting` (Chen et al., ICML 2018, Eq. 1-2, Alg. 1).

    Learnable weights ``w`` (state, start at 1, sum T) multiply the task losses. Each step uses
    the current ``w`` and then takes one gradient step on the GradNorm objective (Eq. 2)

        ``L_grad = sum_t | w_t ||g_t|| - mean_s(w_s ||g_s||) * r_t^gamma |``,

    with ``r_t = Ltilde_t / mean_s Ltilde_s``, ``Ltilde_t = L_t / L_t(0)`` (``L(0)``: the losses
    at the first step, stored in the state) and the target term held constant, as in the paper.
    ``||grad_W (w_t L_t)|| = w_t ||g_t||`` makes the objective's gradient closed form from the
    (T, F) matrix: ``d L_grad / d w_t = sign(w_t ||g_t|| - target_t) ||g_t||``. Then ``w`` is
    clipped at 0 and renormalised to ``sum w = T`` (Alg. 1).

    Our choices (documented): the paper's W is the last shared layer; here the gradients are the
    method's level (the shared feature z by default, or the shared parameters). The paper trains
    ``w`` with the network's optimizer; we take a plain gradient step of size ``lr`` on
    ``L_grad / mean_t ||g_t||`` (the objective divided by a per-step positive constant, so the
    step is free of the gradients' scale, as an Adam step would be).

    Args:
      gamma: the asymmetry hyperparameter (the paper's alpha; 1.5 in its experiments, 0 gives
        equal gradient magnitudes).
      lr: step size of the weights.

    ``L_t(0)`` is recorded at the first step, and again at a later step while the stored value
    is 0 (a zero first loss, or a task absent so far under partial labels).

    Partial labels (``task_mask``): the step is that of the T'-task problem of the present
    tasks (their stored weights, means over them, renormalised to ``sum = T'`` over them); the
    absent tasks' weights and initial losses are kept, the counter advances. A task whose label
    first appears after the first step records its ``L_t(0)`` then.

    Cost per step: the per-task gradients (T backward passes through the heads) plus O(T F).
    State: ``(weights (T,), initial_losses (T,), count)``. ``weights_heads=True``: ``w`` weights
    the whole loss, heads included, as in the paper. Through :func:`imtl_jax.aggregate`, pass
    ``losses=`` to ``update`` (otherwise the losses are zeros and every ``r_t = 1``).
    """
    gamma, lr = float(gamma), float(lr)
    if not gamma >= 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    name = "gradnorm" if gamma != 0 else "gradnorm_gamma0"
    return Weighting(name=name, init=_gradnorm_init,
                     weigh=functools.partial(_gradnorm_weigh, gamma=gamma, lr=lr, name=name),
                     needs_grads=True, weights_heads=True, supports_task_mask=True)


GRADNORM = gradnorm_weighting(gamma=1.5)
GRADNORM_GAMMA0 = gradnorm_weighting(gamma=0.0)

register(Method("gradnorm", IDENTITY, GRADNORM))
register(Method("gradnorm_gamma0", IDENTITY, GRADNORM_GAMMA0))
