"""Random loss weighting (RLW): Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.

Registered name: ``rlw``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import cast_like, check_losses, check_state, compute_dtype, keep_state_if_not_finite
from imtl_jax.methods.equal import IDENTITY


class RLWState(NamedTuple):
    """State of :func:`rlw_weighting`: ``count`` (int32), the number of steps seen. Used only to
    draw fresh weights each step when ``weigh`` gets ``key=None``."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _rlw_init(num_tasks, dtype=None):
    del num_tasks, dtype
    return RLWState(jnp.zeros((), jnp.int32))


def _rlw_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del grads
    losses = check_losses(losses, priorities, "rlw")
    check_state(state, _rlw_init(losses.shape[0]), "rlw")
    if key is None:
        key = jax.random.fold_in(jax.random.key(0), state.count)
    cdt = compute_dtype(losses.dtype)
    logits = jax.random.normal(key, losses.shape, cdt)
    if task_mask is None:
        weights = jax.nn.softmax(logits)
    else:
        # Partial labels: the k-th present task takes the k-th draw, so the present tasks get
        # exactly the draws of the T'-task problem (JAX's default partitionable threefry draws
        # entry i from the key and i alone), and the softmax runs over them.
        logits = _mask.entries(logits[_mask.compact_index(task_mask)], task_mask)
        weights = _mask.softmax(logits, task_mask)
        losses = _mask.entries(losses, task_mask)
    new_state = keep_state_if_not_finite(cast_like(RLWState(state.count + 1), state), state, losses)
    return WeightingOutput(weights.astype(losses.dtype), new_state, {"logits": logits.astype(losses.dtype)})


def rlw_weighting() -> Weighting:
    r"""Random loss weighting as a :class:`~imtl_jax.Weighting`.

    Every step draws ``eps ~ N(0, I_T)`` and weighs the losses by ``w = softmax(eps)`` (the
    paper's default distribution, as in LibMTL's ``RLW``); the weights sum to 1 and multiply the
    whole loss (heads receive ``w_t grad L_t``). It is the skeptics' baseline: a method that does
    not beat RLW has not shown that its weights carry information.

    Randomness: the draw comes from the ``key`` given to ``weigh`` (the training step's key);
    with ``key=None`` it comes from ``fold_in(key(0), count)`` with a step counter kept in the
    state, so a run without keys still draws fresh weights each step.

    Cost per step: O(T) on top of equal weighting (no per-task gradients). State: a counter.

    Example:
      >>> import jax, jax.numpy as jnp, imtl_jax
      >>> w = imtl_jax.methods.get_method("rlw").weighting
      >>> out = w.weigh(None, jnp.array([1.0, 2.0, 3.0]), w.init(3), jax.random.key(0), None)
      >>> round(float(out.weights.sum()), 5)
      1.0
    """
    return Weighting(name="rlw", init=_rlw_init, weigh=_rlw_weigh, needs_grads=False, weights_heads=True,
                     supports_task_mask=True)


RLW = rlw_weighting()

register(Method("rlw", IDENTITY, RLW))
