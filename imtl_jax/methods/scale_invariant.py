"""Scale-invariant log-loss weighting (SI): minimise ``sum_t log L_t``.

The scale-invariant baseline of Navon et al., "Multi-Task Learning as a Bargaining Game",
ICML 2022 (Table 6); the same direction as the geometric mean of the losses (GLS), with a
different step length.

Registered name: ``si``.
"""

from __future__ import annotations

import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import check_losses, compute_dtype
from imtl_jax.methods.equal import IDENTITY


def _si_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del grads, key
    losses = check_losses(losses, priorities, "si")
    x = losses.astype(compute_dtype(losses.dtype))
    if task_mask is not None:  # partial labels: the clamp is relative to the largest present loss
        x = _mask.entries(x, task_mask, 1.0)
        largest = _mask.maximum(x, task_mask)
        floor = jnp.maximum(jnp.finfo(x.dtype).eps * largest, jnp.finfo(x.dtype).tiny)
        safe = jnp.maximum(x, floor)
        weights = _mask.entries(jnp.where(largest > 0, 1.0 / safe, jnp.ones_like(x)), task_mask)
        total = jnp.sum(_mask.entries(jnp.log(safe), task_mask))
        return WeightingOutput(weights.astype(losses.dtype), state,
                               {"sum_log_losses": total.astype(losses.dtype)})
    largest = jnp.max(x)
    # Clamp relative to the largest loss (as GLS does): a zero loss gets a large but finite
    # weight instead of 1/0; when every loss is zero (or negative) log L has no gradient to
    # follow and the weights fall back to 1 (equal weighting).
    floor = jnp.maximum(jnp.finfo(x.dtype).eps * largest, jnp.finfo(x.dtype).tiny)
    safe = jnp.maximum(x, floor)
    weights = jnp.where(largest > 0, 1.0 / safe, jnp.ones_like(x))
    return WeightingOutput(weights.astype(losses.dtype), state,
                           {"sum_log_losses": jnp.sum(jnp.log(safe)).astype(losses.dtype)})


def si_weighting() -> Weighting:
    r"""Scale-invariant weighting as a :class:`~imtl_jax.Weighting` (stateless).

    Minimises ``sum_t log L_t``; its gradient is ``sum_t grad L_t / L_t``, so the weights are
    ``w_t = 1 / L_t`` (treated as constants). Multiplying a loss by ``k > 0`` adds ``log k`` to
    the objective and changes nothing in the update: the method is invariant to every per-task
    scale (e.g. a change of units). Heads receive ``grad L_t / L_t = grad log L_t``.

    Losses must be positive: they are clamped at ``eps * max_t L_t`` (a zero loss gets a large,
    finite weight; when every loss is zero the weights are 1). The invariance is therefore exact
    while the losses lie within a factor ``1/eps`` of each other (8e6 in float32).

    Cost per step: O(T) on top of equal weighting (no per-task gradients).

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> w = imtl_jax.methods.get_method("si").weighting
      >>> w.weigh(None, jnp.array([0.5, 4.0]), (), None, None).weights.tolist()
      [2.0, 0.25]
    """
    return Weighting(name="si", init=stateless_init, weigh=_si_weigh, needs_grads=False, weights_heads=True,
                     supports_task_mask=True)


SI = si_weighting()

register(Method("si", IDENTITY, SI))
