"""IMTL-G, IMTL-L and IMTL-H (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

Registered names:

* ``imtl_h`` — the paper's IMTL (Algorithm 1): IMTL-L scaled losses ``e^s L - s``; shared
  parameters get ``sum_t alpha_t grad(e^{s_t} L_t)`` with alpha from IMTL-G on the scaled
  losses' gradients w.r.t. the shared feature z; heads and scales get their own scaled loss.
* ``imtl_g`` — IMTL-G on the raw losses' z-gradients (Sec. 3.2, ``grad_z``).
* ``imtl_g_exact`` — IMTL-G on the raw losses' gradients w.r.t. the shared parameters
  (the paper's "IMTL-G (exact)", T encoder VJPs).
* ``imtl_l`` — IMTL-L alone (Sec. 3.1): equal weights on the scaled losses.
* ``imtl_g_averaged`` — IMTL-G on z with alpha averaged over steps (an exponential moving
  average, bias-corrected; not in the paper): a remedy tested against the step-to-step jumps of
  alpha at the representation level, at the same cost.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imtl_jax._imtl_g import imtl_g_solve
from imtl_jax._loss_scaling import scale_losses
from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import cast_like, check_grads, check_state, keep_state_if_not_finite
from imtl_jax.methods.equal import EQUAL, IDENTITY


def _imtl_g_weigh(grads, losses, state, key, priorities, *, nonconflicting: bool, task_mask=None):
    del losses, key
    # task_mask: absent rows get identity rows and a zero target in the cosine system (see
    # imtl_g_solve), so alpha is impartial among the present tasks only.
    res = imtl_g_solve(grads, priorities=priorities, nonconflicting=nonconflicting,
                       task_mask=task_mask)
    return WeightingOutput(res.weights, state, {"common_projection": res.common_projection})


def imtl_g_weighting(*, nonconflicting: bool = False) -> Weighting:
    """The IMTL-G :class:`~imtl_jax.Weighting` (see :func:`imtl_jax.imtl_g_solve`).

    Args:
      nonconflicting: flip the sign of alpha when the common projection is negative.
    """
    return Weighting(
        name="imtl_g" if not nonconflicting else "imtl_g_nonconflicting",
        init=stateless_init,
        weigh=functools.partial(_imtl_g_weigh, nonconflicting=bool(nonconflicting)),
        needs_grads=True,
        weights_heads=False,
        supports_task_mask=True,
    )


class AveragedAlphaState(NamedTuple):
    """State of :func:`imtl_g_averaged_weighting`: the moving average of alpha (not yet
    bias-corrected) and the number of steps it holds."""

    average: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _averaged_init(num_tasks, dtype=None):
    return AveragedAlphaState(jnp.zeros((num_tasks,), jnp.float32 if dtype is None else dtype),
                              jnp.zeros((), jnp.int32))


def _averaged_weigh(grads, losses, state, key, priorities, *, decay: float, task_mask=None):
    del key
    grads, _ = check_grads(grads, losses, priorities, "imtl_g_averaged")
    res = imtl_g_solve(grads, task_mask=task_mask)
    check_state(state, _averaged_init(grads.shape[0], state.average.dtype), "imtl_g_averaged")
    alpha = res.weights.astype(state.average.dtype)
    average = decay * state.average + (1.0 - decay) * alpha
    count = state.count + 1
    if task_mask is not None:  # an absent task's average does not move (nor does its weight count)
        average = _mask.keep(average, state.average, task_mask)
    # Bias correction: each alpha sums to 1, so the corrected average sums to 1 as well.
    weights = average / (1.0 - decay ** count.astype(average.dtype))
    if task_mask is not None:
        weights = _mask.entries(weights, task_mask)
    new_state = keep_state_if_not_finite(cast_like(AveragedAlphaState(average, count), state), state, alpha)
    weights = jnp.where(jnp.all(jnp.isfinite(alpha)), weights, alpha)   # a NaN step stays loud
    return WeightingOutput(weights.astype(res.weights.dtype), new_state,
                           {"common_projection": res.common_projection, "alpha_step": res.weights})


def imtl_g_averaged_weighting(*, decay: float = 0.9) -> Weighting:
    r"""IMTL-G with alpha averaged over steps: ``a_k = decay a_{k-1} + (1 - decay) alpha_k``,
    weights ``a_k / (1 - decay^k)`` (bias-corrected, so they sum to 1 like alpha).

    Not a method of the paper: a remedy for the step-to-step jumps of alpha computed from one
    mini-batch's representation-level gradients. The averaged weights are no longer exactly
    impartial on the current batch; they are impartial on average over about
    ``1 / (1 - decay)`` steps. Cost: that of IMTL-G. State: the average and a counter.
    Task priorities are not supported (pass ``priorities=None``).
    """
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"`decay` must be in [0, 1), got {decay!r}.")
    return Weighting(name="imtl_g_averaged", init=_averaged_init,
                     weigh=functools.partial(_averaged_weigh, decay=decay), needs_grads=True, weights_heads=False,
                     supports_task_mask=True)


IMTL_G = imtl_g_weighting()
IMTL_L = LossScaling(name="imtl_l", scale=scale_losses, trainable=True)

register(Method("imtl_h", IMTL_L, IMTL_G))
register(Method("imtl_g", IDENTITY, IMTL_G))
register(Method("imtl_g_exact", IDENTITY, IMTL_G, level="parameters"))
register(Method("imtl_l", IMTL_L, EQUAL))
register(Method("imtl_g_averaged", IDENTITY, imtl_g_averaged_weighting()))
