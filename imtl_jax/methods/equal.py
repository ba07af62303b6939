"""Equal weighting (EW): the gradient of ``sum_t L_t``; and the identity loss scaling."""

from __future__ import annotations

import jax.numpy as jnp

from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import register


def _equal_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del grads, key, priorities
    if task_mask is not None:  # partial labels: weight 1 on the present tasks
        return WeightingOutput(jnp.where(task_mask, 1.0, 0.0).astype(losses.dtype), state, {})
    return WeightingOutput(jnp.ones_like(losses), state, {})


EQUAL: Weighting = Weighting(name="equal", init=stateless_init, weigh=_equal_weigh, needs_grads=False,
                  weights_heads=True, supports_task_mask=True)
IDENTITY: LossScaling = LossScaling(name="identity", scale=lambda losses, log_scales: losses, trainable=False)

register(Method("equal", IDENTITY, EQUAL))
