"""CR-MOGM, correlation-reduced multi-objective gradient manipulation (Zhou, Zhang, Zhao, Xiao,
Guo & Chen, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
Beyond", NeurIPS 2022).

Registered name: ``cr_mogm`` (MGDA's weights smoothed with ``alpha = 0.9``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, get_method, register
from imtl_jax.methods._common import all_finite, cast_like, check_state, keep_state_if_not_finite
from imtl_jax.methods.equal import IDENTITY
from imtl_jax.methods.mgda import MGDA


class CRMOGMState(NamedTuple):
    """State of :func:`cr_mogm_weighting`: ``inner`` (the wrapped weighting's state),
    ``weights`` (T,), the previous smoothed weights ``lambda_{k-1}``, and ``started`` (bool),
    False until the first finite step (``lambda_0`` is then that step's weights, or
    ``initial_weights``)."""

    inner: Any
    weights: jax.Array
    started: jax.Array


def _init(inner, initial, num_tasks, dtype=None, dim=None):
    dtype = jnp.float32 if dtype is None else dtype
    if initial is not None and len(initial) != num_tasks:
        raise ValueError(f"`initial_weights` has {len(initial)} entries for {num_tasks} tasks; "
                         "pass one weight per task.")
    weights = jnp.zeros((num_tasks,), dtype) if initial is None else jnp.asarray(initial, dtype)
    return CRMOGMState(inner.init_state(num_tasks, dtype, dim=dim), weights, jnp.asarray(initial is not None))


def _weigh(grads, losses, state, key, priorities, *, inner, alpha, initial, task_mask=None):
    if not isinstance(state, CRMOGMState):
        raise ValueError(f"`state` of the 'cr_mogm' weighting must be a CRMOGMState, got "
                         f"{type(state).__name__}; create it with the weighting's init(num_tasks, dtype).")
    if task_mask is None:
        out = inner.weigh(grads, losses, state.inner, key, priorities)     # validates the inputs
    else:  # the wrapped method's own masked step (its state kept as it keeps it)
        out = inner.weigh(grads, losses, state.inner, key, priorities, task_mask=task_mask)
    hat = out.weights if task_mask is None else _mask.entries(out.weights, task_mask)
    check_state(state, _init(inner, initial, hat.shape[0], hat.dtype,
                             dim=jnp.shape(grads)[1] if inner.needs_dim else None), "cr_mogm")
    prev = jnp.where(state.started, state.weights.astype(hat.dtype), hat)
    weights = alpha * prev + (1.0 - alpha) * hat
    if task_mask is not None:
        # Partial labels: the average moves on the present tasks only (the absent ones keep
        # their previous weights in the state, and weigh 0 in this step).
        weights = _mask.entries(weights, task_mask)
        kept = _mask.keep(weights, state.weights.astype(hat.dtype), task_mask)
        new = cast_like(CRMOGMState(out.state, kept, jnp.ones((), bool)), state)
    else:
        new = cast_like(CRMOGMState(out.state, weights, jnp.ones((), bool)), state)
    # A non-finite step (NaN weights from the inner method) leaves the smoothing state as it was.
    new = keep_state_if_not_finite(new, state, hat)
    weights = jnp.where(all_finite(hat), weights, jnp.full_like(weights, jnp.nan))
    return WeightingOutput(weights, new, dict(out.info))


def cr_mogm_weighting(inner: Union[str, Weighting] = "mgda", *, alpha: float = 0.9,
                      initial_weights: Optional[Sequence[float]] = None) -> Weighting:
    r"""CR-MOGM as a :class:`~imtl_jax.Weighting` wrapping another weighting (Zhou et al.,
    NeurIPS 2022, Alg. 2; TorchJD ``CRMOGMWeighting``).

    The weights ``hat lambda_k`` of the wrapped method (MGDA by default) are smoothed by an
    exponential moving average across steps, ``lambda_k = alpha lambda_{k-1} + (1 - alpha)
    hat lambda_k``, which reduces the correlation between the weights and the stochastic
    gradients they multiply (the bias that stops stochastic MGDA from converging).
    ``lambda_0 = hat lambda_1`` (the first step returns the wrapped weights unchanged) unless
    ``initial_weights`` is given. The wrapped method's state and ``info`` (e.g. MGDA's
    certificate) pass through.

    Args:
      inner: the wrapped weighting, or a registered method name whose weighting is wrapped
        (default ``"mgda"``, the paper's MGDA-based instance).
      alpha: the weight on the previous weights, in [0, 1] (0.9, TorchJD's default; the paper's
        Corollary 1 lets ``alpha_k`` grow towards 1 as the learning rate decays, e.g.
        ``1 - lr_k / lr_0``: build a new weighting per phase, the state carries over).
      initial_weights: ``lambda_0`` (T,), or None.

    Cost per step: the wrapped method's, plus O(T). State: the wrapped state, the previous
    weights (T,) and a flag. Randomness: the wrapped method's (the step's key is passed on).

    Partial labels (``task_mask``, when the wrapped weighting supports it): the wrapped
    method's masked step, and the average of the present tasks' weights as in the T'-task
    problem (their previous weights, which need not sum to 1 there, smoothed with the wrapped
    weights of the present tasks); the absent tasks' previous weights are kept. The flag is
    shared: a task absent at the first step starts its average from 0 (its entry of
    ``initial_weights`` if given) when it first appears.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.cr_mogm import cr_mogm_weighting
      >>> w = cr_mogm_weighting("mgda_closed_form", alpha=0.5)   # = MGDA's weights here
      >>> s = w.init(2)
      >>> out = w.weigh(jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.zeros(2), s, None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]            # the wrapped weights at first
      [0.8, 0.2]
      >>> out = w.weigh(jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.zeros(2), out.state, None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]            # averaged with the new [0.2, 0.8]
      [0.5, 0.5]
    """
    if isinstance(inner, str):
        name = inner
        inner = get_method(inner).weighting
    elif isinstance(inner, Weighting):
        name = inner.name
    else:
        raise ValueError(f"`inner` must be a registered method name or an imtl_jax.Weighting, got {inner!r}.")
    if inner.per_coordinate or inner.returns_direction:
        raise ValueError(f"cr_mogm_weighting smooths task weights (T,) across steps; {name!r} "
                         "updates with per-coordinate weights or a direction of its own, which it "
                         "cannot wrap. Wrap a weighting whose update is weights @ grads.")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
    initial = None if initial_weights is None else tuple(float(x) for x in initial_weights)
    return Weighting(name="cr_mogm" if name == "mgda" else f"cr_mogm_{name}",
                     init=functools.partial(_init, inner, initial),
                     weigh=functools.partial(_weigh, inner=inner, alpha=alpha, initial=initial),
                     needs_grads=inner.needs_grads, weights_heads=inner.weights_heads,
                     supports_task_mask=inner.supports_task_mask, needs_dim=inner.needs_dim)


CR_MOGM = cr_mogm_weighting(MGDA)

register(Method("cr_mogm", IDENTITY, CR_MOGM))
