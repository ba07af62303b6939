"""ExcessMTL, excess-risk task weighting (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust
Multi-Task Learning with Excess Risks", ICML 2024).

Registered as ``"excess_mtl"`` (representation level; ``level="parameters"`` for the paper's
setting). Its state holds a per-coordinate AdaGrad accumulator of shape (T, F), F the number of
columns of the per-task gradient matrix, so its weighting has ``needs_dim``: the state is made
by ``Weighting.init_state(T, dtype, dim=F)``, which the training step, the aggregator and the
NNX helper call with the F they know (see :meth:`imtl_jax.MTLStep.init`).
:func:`excess_mtl_weighting` builds the same weighting with other settings, or for one fixed F
(``dim=``: then ``init(num_tasks, dtype)`` as any weighting).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput, check_dim
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite)
from imtl_jax.methods.equal import IDENTITY


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl_weighting`.

    Attributes:
      weights: (T,) the task weights ``alpha`` (``1/T`` at first; on the simplex).
      root_sum: (T, F) ``sqrt(sum over steps of g_t^2)`` per coordinate, AdaGrad's diagonal
        (kept as the root, accumulated with ``hypot``: no overflow of the squares).
      baseline: (T,) the excess-risk estimate that normalises later ones (0: not set yet).
      warm_sum: (T,) the sum of the estimates over the warm-up steps.
      count: (T,) int32, the steps each task has taken part in.
    """

    weights: jax.Array
    root_sum: jax.Array
    baseline: jax.Array
    warm_sum: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _init(num_tasks, dtype=None, *, dim=None):
    dim = check_dim(dim, "excess_mtl")
    dtype = compute_dtype(jnp.float32 if dtype is None else dtype)
    return ExcessMTLState(jnp.full((num_tasks,), 1.0 / num_tasks, dtype), jnp.zeros((num_tasks, dim), dtype),
                          jnp.zeros((num_tasks,), dtype), jnp.zeros((num_tasks,), dtype),
                          jnp.zeros((num_tasks,), jnp.int32))


def _weigh(grads, losses, state, key, priorities, *, dim, step_size, warmup_steps, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "excess_mtl")
    num_tasks, size = grads.shape
    if dim is not None and size != dim:
        raise ValueError(
            f"`grads` has F = {size} columns but the excess_mtl weighting was built with dim={dim}: "
            "dim is the size of the shared feature per example (representation level) or the "
            "number of shared parameters (level='parameters', aggregate()).")
    root_shape = jnp.shape(state.root_sum) if isinstance(state, ExcessMTLState) else ()
    if len(root_shape) == 2 and root_shape[1] != size:
        raise ValueError(
            f"`state` of the 'excess_mtl' weighting has an accumulator of {root_shape[1]} columns "
            f"but `grads` has F = {size}: the state was made for another gradient size; make it "
            f"with the weighting's init_state(num_tasks, dtype, dim={size}) (the training step's "
            "init(params, batch) does).")
    check_state(state, _init(num_tasks, grads.dtype, dim=size), "excess_mtl")
    cdt = compute_dtype(grads.dtype)
    mask = task_mask
    g = grads.astype(cdt)
    if mask is not None:
        g = _mask.rows(g, mask)
    old_root = state.root_sum.astype(cdt)
    root = jnp.hypot(old_root, g)                        # sqrt(S + g^2), S = sum of past g^2
    # Eq. 6-7: the excess risk ~ g^T H^{-1} g with H = diag(sqrt(S)) (AdaGrad's diagonal), each
    # term g_j^2 / sqrt(S_j) = |g_j| (|g_j| / sqrt(S_j)) <= |g_j|; 0 where S_j = 0 (then g_j = 0).
    absg = jnp.abs(g)
    excess = jnp.sum(absg * jnp.where(root > 0, absg / jnp.where(root > 0, root, 1.0), 0.0), axis=1)
    count = state.count
    warm = count < warmup_steps
    baseline = state.baseline.astype(cdt)
    warm_sum = state.warm_sum.astype(cdt)
    # The baseline (Sec. 3.2, "scale processing"): the mean estimate of the warm-up steps, set at
    # the first step after them (with no warm-up: that step's estimate, so its normalised excess
    # risk is 1 and the weights do not move). While it is 0 (a zero gradient then), it is set
    # again at the next step, and that task's normalised estimate is 0.
    first = ~warm & (baseline == 0)
    candidate = warm_sum / warmup_steps if warmup_steps else excess
    baseline = jnp.where(first, candidate, baseline)
    normalized = jnp.where(~warm & (baseline > 0), excess / jnp.where(baseline > 0, baseline, 1.0), 0.0)
    # Eq. 9: exponentiated gradient on the simplex, alpha <- alpha exp(eta E) / sum (in log space).
    alpha = state.weights.astype(cdt)
    logits = jnp.log(alpha) + step_size * normalized
    moved = jax.nn.softmax(logits) if mask is None else _mask.softmax(logits, mask)
    weights = jnp.where(jnp.any(~warm if mask is None else ~warm & mask), moved, alpha)
    warm_sum = jnp.where(warm, warm_sum + excess, warm_sum)
    new_state = ExcessMTLState(weights, root, baseline, warm_sum, count + 1)
    if mask is not None:  # an absent task's entries (its row of the accumulator too) are kept
        new_state = ExcessMTLState(_mask.keep(weights, alpha, mask), _mask.keep(root, old_root, mask, axis=0),
                                   _mask.keep(baseline, state.baseline.astype(cdt), mask),
                                   _mask.keep(warm_sum, state.warm_sum.astype(cdt), mask),
                                   _mask.keep(count + 1, count, mask))
        weights = _mask.entries(weights, mask)
        excess, normalized = _mask.entries(excess, mask), _mask.entries(normalized, mask)
    weights = nan_if_not_finite(weights, g)
    new_state = keep_state_if_not_finite(cast_like(new_state, state), state, g)
    info = {"excess_risk": excess.astype(grads.dtype), "normalized_excess_risk": normalized.astype(grads.dtype),
            "warm_up": warm if mask is None else warm & mask}
    return WeightingOutput(weights.astype(grads.dtype), new_state, info)


def excess_mtl_weighting(dim: Optional[int] = None, *, step_size: float = 1.0,
                         warmup_steps: int = 0) -> Weighting:
    r"""ExcessMTL (He et al., ICML 2024) as a stateful :class:`~imtl_jax.Weighting` (the
    registered ``"excess_mtl"`` is ``excess_mtl_weighting()``).

    Each step, for each task with gradient ``g_t`` (a row of the (T, F) matrix):

    1. AdaGrad's diagonal Hessian estimate (Eq. 7): ``S_t <- S_t + g_t^2`` (per coordinate);
    2. the excess-risk estimate (Eq. 6): ``E_t = sum_j g_tj^2 / sqrt(S_tj)``;
    3. scale processing (Sec. 3.2): ``E_t / E_t^0``, the baseline ``E_t^0`` being the mean
       estimate over the ``warmup_steps`` first steps (App. C.1), or with no warm-up the first
       step's estimate (the official code, LibMTL);
    4. the exponentiated-gradient update of the weights on the simplex (Eq. 9):
       ``alpha <- alpha exp(eta E / E^0) / sum(...)`` from ``alpha = 1/T``.

    The weights ``alpha`` multiply the whole loss (``weights_heads=True``: the paper's objective
    ``sum_t alpha_t L_t``, as LibMTL; TorchJD's aggregator weights the shared Jacobian only).
    During the warm-up the weights stay at ``1/T``; with ``warmup_steps=0`` the first step sets
    the baseline, its normalised estimate is 1 for every task and the weights do not move (as
    LibMTL, which skips that update; TorchJD 0.18 instead applies the update with the raw,
    unnormalised estimate at that step). Differences from the peers, by design: no ``1e-7``
    under the square root nor beside the baseline (absolute epsilons; here ``0/0 = 0``: a
    coordinate with no gradient history contributes nothing, and a zero baseline is set again
    at the next step), weights on the simplex (TorchJD, the paper; LibMTL scales them to sum to
    T).

    F is the number of columns of the gradient matrix: the size of the shared feature per
    example at the representation level (``prod(z.shape[1:])``), the number of shared
    parameters at ``level="parameters"``, or the size of the stacked updates for
    :func:`imtl_jax.aggregate`. The state is (T, F) floats (as TorchJD's and LibMTL's): at the
    parameter level that is T copies of the shared parameters. With ``dim=None`` (default) the
    weighting has ``needs_dim`` and its state is made for the F of the caller
    (``init_state(T, dtype, dim=F)``; the step, the aggregator and the NNX helper pass it); with
    ``dim`` given it serves that F only and ``init(num_tasks, dtype)`` needs no F.

    Args:
      dim: None, or F, the number of columns of the per-task gradient matrix, fixed.
      step_size: ``eta``, the robust step size (1.0: TorchJD's default; LibMTL's is a required
        argument).
      warmup_steps: steps that only collect the baseline (0: the official code, LibMTL and
        TorchJD; App. C.1 suggests 3 epochs).

    Partial labels: an absent task's weight is 0 and its state entries (its accumulator row,
    baseline, warm-up sum, step count and weight) are kept; the softmax runs over the present
    tasks. Cost per step: per-task gradients + O(T F). ``info``: ``excess_risk`` (E),
    ``normalized_excess_risk`` (E / E^0; 0 during the warm-up), ``warm_up`` (per task).

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.excess_mtl import excess_mtl_weighting
      >>> w = excess_mtl_weighting()
      >>> s = w.init_state(2, dim=2)
      >>> out = w.weigh(jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.zeros(2), s, None, None)
      >>> out.weights.tolist()     # the first step sets the baseline
      [0.5, 0.5]
      >>> out = w.weigh(jnp.array([[1.0, 0.0], [0.0, 0.2]]), jnp.zeros(2), out.state, None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]   # task 0 is further from convergence
      [0.6676, 0.3324]
    """
    if dim is not None:
        dim = check_dim(dim, "excess_mtl")
    step_size = float(step_size)
    if not step_size > 0 or step_size == float("inf"):
        raise ValueError(f"`step_size` must be finite and > 0, got {step_size!r}.")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}.")
    return Weighting(name="excess_mtl", init=_init if dim is None else functools.partial(_init, dim=dim),
                     weigh=functools.partial(_weigh, dim=dim, step_size=step_size,
                                             warmup_steps=warmup_steps),
                     needs_grads=True, weights_heads=True, supports_task_mask=True,
                     needs_dim=dim is None)


EXCESS_MTL = excess_mtl_weighting()

register(Method("excess_mtl", IDENTITY, EXCESS_MTL))
