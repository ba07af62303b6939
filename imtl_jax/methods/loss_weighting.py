"""Loss-weighting baselines: weights from the task losses alone (no per-task gradients).

Registered names:

* ``uncertainty`` — Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
  Losses for Scene Geometry and Semantics", CVPR 2018: trainable log-variances ``s`` and the
  scaled loss ``e^{-s} L + s`` (:func:`uncertainty_scale`), equal weights on the scaled losses.
* ``gls`` — geometric loss strategy (Chennupati et al., "MultiNet++", CVPRW 2019; a baseline of
  the IMTL paper): the gradient of ``(prod_t L_t)^{1/T}`` (:func:`gls_weighting`).
* ``dwa`` — dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
  Attention", CVPR 2019, the DWA rule) (:func:`dwa_weighting`).
* ``famo`` — fast adaptive multitask optimisation (Liu, Feng, Stone & Liu, NeurIPS 2023,
  Algorithm 1) (:func:`famo_weighting`).

Not registered (a factory): :func:`single_task` ``(t)`` trains task t alone (one-hot weights).

All of these have ``needs_grads=False``: the training step then costs what equal weighting
costs (one backward). All have ``weights_heads=True`` (the weights multiply the whole loss, so
head t receives ``w_t grad L_t``), as in the papers. Losses are expected to be positive; the
guards below keep the weights finite otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput, stateless_init
from imtl_jax._validation import check_float_array
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_losses, check_state, compute_dtype,
                                      keep_state_if_not_finite)
from imtl_jax.methods.equal import EQUAL, IDENTITY


def _positive(x: jax.Array) -> jax.Array:
    """``max(x, tiny)`` (NaN passes through): logs and ratios of losses stay finite."""
    return jnp.maximum(x, jnp.finfo(x.dtype).tiny)


# ----------------------------------------------------------------------------------------------
# Uncertainty weighting (Kendall et al., CVPR 2018)


def uncertainty_scale(losses: jax.Array, log_scales: jax.Array) -> jax.Array:
    r"""Uncertainty-weighted losses ``e^{-s_t} L_t + s_t`` (Kendall et al., CVPR 2018).

    ``s_t = log sigma_t^2`` is a trainable log-variance. Kendall et al.'s Eq. 7 (regression) is
    ``1/(2 sigma^2) L + log sigma = (e^{-s} L + s) / 2``; like most public implementations we drop
    the common factor 1/2 (it only rescales the learning rate). ``d/ds = 1 - e^{-s} L``, so at the
    optimum ``s* = log L`` and ``e^{-s*} L = 1``.

    Relation to IMTL-L (Liu et al., ICLR 2021): with this convention
    ``IMTL-L(s) = e^{s} L - s = UW(-s)`` exactly, i.e. ``IMTL-L(s) = 2 UW_Kendall(-s)`` in the
    paper's 1/2 convention: the two are the same method up to the sign of s and a factor 2
    (the factor that makes UW under-weight classification losses, Eq. 10 of Kendall et al.).

    Args:
      losses: (T,) raw task losses.
      log_scales: (T,) log-variances ``s`` (start at 0).

    Returns:
      (T,) scaled losses.

    Raises:
      TypeError: non-float inputs.  ValueError: ranks or task counts differ.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> from imtl_jax.methods.loss_weighting import uncertainty_scale
      >>> [round(v, 4) for v in uncertainty_scale(jnp.array([2.0, 0.5]), jnp.array([0.0, 1.0])).tolist()]
      [2.0, 1.1839]
    """
    losses = check_float_array(losses, "losses", ndim=1)
    log_scales = check_float_array(log_scales, "log_scales", ndim=1)
    if losses.shape != log_scales.shape:
        raise ValueError(f"`losses` has shape {losses.shape} but `log_scales` has shape "
                         f"{log_scales.shape}; both must be (T,) with the same T.")
    return jnp.exp(-log_scales) * losses + log_scales


UNCERTAINTY = LossScaling(name="uncertainty", scale=uncertainty_scale, trainable=True)


# ----------------------------------------------------------------------------------------------
# GLS: geometric mean of the losses


def _gls_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del grads, key
    losses = check_losses(losses, priorities, "gls")
    dtype = losses.dtype
    x = losses.astype(compute_dtype(dtype))
    num_tasks = x.shape[0]
    if task_mask is not None:
        return _gls_masked(x, task_mask, state, dtype)
    # Clamp relative to the largest loss: a zero loss gets a large but finite weight (the true
    # derivative of the geometric mean is infinite there); all-zero losses give 1/T each.
    floor = jnp.finfo(x.dtype).eps * jnp.max(x)
    safe = jnp.maximum(_positive(x), floor)
    log_l = jnp.log(safe)
    # w_t = GLS / (T L_t) = exp(mean(log L) - log L_t) / T.
    weights = jnp.exp(jnp.mean(log_l) - log_l) / num_tasks
    gls = jnp.exp(jnp.mean(log_l))
    return WeightingOutput(weights.astype(dtype), state, {"geometric_mean": gls.astype(dtype)})


def _gls_masked(x, mask, state, dtype):
    """GLS of the present losses: the max, the mean of the logs and T' run over them."""
    x = _mask.entries(x, mask, 1.0)
    num_present = _mask.count(mask, x.dtype)
    floor = jnp.finfo(x.dtype).eps * _mask.maximum(x, mask)
    log_l = jnp.log(jnp.maximum(_positive(x), floor))
    mean_log = jnp.sum(_mask.entries(log_l, mask)) / num_present
    weights = _mask.entries(jnp.exp(mean_log - log_l) / num_present, mask)
    return WeightingOutput(weights.astype(dtype), state,
                           {"geometric_mean": jnp.exp(mean_log).astype(dtype)})


def gls_weighting() -> Weighting:
    r"""The geometric loss strategy as a :class:`~imtl_jax.Weighting` (stateless).

    Minimises ``GLS = (prod_t L_t)^{1/T}``. Its gradient is
    ``grad GLS = sum_t (GLS / (T L_t)) grad L_t``, so the weights are ``w_t = GLS / (T L_t)``
    (computed in log space: ``exp(mean_s log L_s - log L_t) / T``). Scale free: multiplying a loss
    by k changes ``GLS`` by ``k^{1/T}`` and leaves the direction unchanged.

    Reference: S. Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric
    Loss Strategy for Multi-Task Learning", CVPR Workshops 2019 (Eq. 2); IMTL paper baseline.
    Cost per step: O(T) on top of equal weighting (no per-task gradients).

    Losses must be positive: they are clamped at ``eps * max_t L_t`` (a zero loss gets a large,
    finite weight; all-zero losses give ``1/T`` each).
    """
    return Weighting(name="gls", init=stateless_init, weigh=_gls_weigh, needs_grads=False,
                     weights_heads=True, supports_task_mask=True)


GLS = gls_weighting()


# ----------------------------------------------------------------------------------------------
# DWA (Liu, Johns & Davison, CVPR 2019)


class DWAState(NamedTuple):
    """State of :func:`dwa_weighting`.

    Attributes:
      history: (2 W, T) the last 2W losses, oldest first (W = ``window``).
      count: int32 number of steps seen.
    """

    history: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _dwa_init(num_tasks, dtype=None, *, window):
    dtype = jnp.float32 if dtype is None else dtype
    return DWAState(jnp.ones((2 * window, num_tasks), dtype), jnp.zeros((), jnp.int32))


def _dwa_weigh(grads, losses, state, key, priorities, *, temperature, window, task_mask=None):
    del grads, key
    losses = check_losses(losses, priorities, "dwa")
    num_tasks = losses.shape[0]
    check_state(state, _dwa_init(num_tasks, losses.dtype, window=window), "dwa")
    cdt = compute_dtype(losses.dtype)
    if task_mask is not None:
        return _dwa_masked(losses, state, task_mask, cdt, temperature, window)
    hist = state.history.astype(cdt)
    recent = jnp.mean(hist[window:], axis=0)   # L(t-1): mean of the last W losses
    earlier = jnp.mean(hist[:window], axis=0)  # L(t-2): mean of the W before
    big = 1.0 / jnp.finfo(cdt).eps
    ratio = jnp.where(earlier > 0, recent / jnp.where(earlier > 0, earlier, 1.0),
                      jnp.where(recent > 0, big, 1.0))
    ratio = jnp.clip(ratio, -big, big)
    weights = num_tasks * jax.nn.softmax(ratio / temperature)
    ready = state.count >= 2 * window
    weights = jnp.where(ready, weights, jnp.ones_like(weights))
    new_hist = jnp.concatenate([hist[1:], losses.astype(cdt)[None, :]], axis=0)
    new_state = cast_like(DWAState(new_hist, state.count + 1), state)
    new_state = keep_state_if_not_finite(new_state, state, losses)
    return WeightingOutput(weights.astype(losses.dtype), new_state,
                           {"loss_ratio": ratio.astype(losses.dtype)})


def _dwa_masked(losses, state, mask, cdt, temperature, window):
    """DWA on the present tasks: softmax and T' over them; an absent task's loss history does
    not move (its ratio compares its own last recorded periods)."""
    hist = state.history.astype(cdt)
    recent = jnp.mean(hist[window:], axis=0)
    earlier = jnp.mean(hist[:window], axis=0)
    big = 1.0 / jnp.finfo(cdt).eps
    ratio = jnp.where(earlier > 0, recent / jnp.where(earlier > 0, earlier, 1.0),
                      jnp.where(recent > 0, big, 1.0))
    ratio = jnp.clip(ratio, -big, big)
    weights = _mask.count(mask, cdt) * _mask.softmax(ratio / temperature, mask)
    ready = state.count >= 2 * window
    weights = jnp.where(ready, weights, _mask.entries(jnp.ones_like(weights), mask))
    x = _mask.entries(losses.astype(cdt), mask)
    new_hist = _mask.keep(jnp.concatenate([hist[1:], x[None, :]], axis=0), hist, mask)
    new_state = cast_like(DWAState(new_hist, state.count + 1), state)
    new_state = keep_state_if_not_finite(new_state, state, x)
    return WeightingOutput(weights.astype(losses.dtype), new_state,
                           {"loss_ratio": _mask.entries(ratio, mask).astype(losses.dtype)})


def dwa_weighting(*, temperature: float = 2.0, window: int = 1) -> Weighting:
    r"""Dynamic Weight Average as a :class:`~imtl_jax.Weighting` (Liu, Johns & Davison, CVPR 2019).

    The paper's DWA rule: ``r_t = L_t(k-1) / L_t(k-2)`` and
    ``lambda_t = T exp(r_t / temp) / sum_s exp(r_s / temp)``, with ``lambda = 1`` for the first
    two periods. The paper's ``L(k)`` is the average loss over epoch k. Epochs are unknown to a
    pure step function, so ``L(k-1)`` here is the mean of the last ``window`` step losses and
    ``L(k-2)`` the mean of the ``window`` before them (a sliding window kept in the state;
    ``window=1`` is the per-step rule, ``window = steps per epoch`` reproduces the paper's
    per-epoch averages at every epoch boundary; Nash-MTL's code uses ``window=25``). The current
    step's losses enter the history after the weights are computed, as in the paper.

    Args:
      temperature: the softmax temperature (the paper's T = 2).
      window: W >= 1, the number of steps averaged per period.

    Cost per step: O(W T) (no per-task gradients). State: a (2W, T) loss history and a counter.
    Weights sum to T.
    """
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"`window` must be a positive int, got {window!r}.")
    return Weighting(name="dwa", init=functools.partial(_dwa_init, window=window),
                     weigh=functools.partial(_dwa_weigh, temperature=temperature, window=window),
                     needs_grads=False, weights_heads=True, supports_task_mask=True)


DWA = dwa_weighting()


# ----------------------------------------------------------------------------------------------
# FAMO (Liu, Feng, Stone & Liu, NeurIPS 2023)


class FAMOState(NamedTuple):
    """State of :func:`famo_weighting`.

    Attributes:
      logits: (T,) the task logits ``xi`` (weights ``z = softmax(xi)``).
      prev_log_losses: (T,) ``log L`` of the previous step.
      opt_state: the optax state of the logits' optimizer.
      count: int32 number of steps seen.
    """

    logits: jax.Array
    prev_log_losses: jax.Array
    opt_state: Any
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _famo_init(num_tasks, dtype=None, *, optimizer):
    dtype = jnp.float32 if dtype is None else dtype
    logits = jnp.zeros((num_tasks,), dtype)
    return FAMOState(logits, jnp.zeros((num_tasks,), dtype), optimizer.init(logits),
                     jnp.zeros((), jnp.int32))


def _famo_weigh(grads, losses, state, key, priorities, *, optimizer, task_mask=None):
    del grads, key
    losses = check_losses(losses, priorities, "famo")
    num_tasks = losses.shape[0]
    check_state(state, _famo_init(num_tasks, state.logits.dtype, optimizer=optimizer), "famo")
    cdt = compute_dtype(losses.dtype)
    mask = task_mask
    if mask is not None:
        losses = _mask.entries(losses, mask, 1.0)
    log_l = jnp.log(_positive(losses.astype(cdt)))
    logits = state.logits
    # delta_t = log L_t(previous step) - log L_t(now): how much each task improved.
    delta = state.prev_log_losses.astype(cdt) - log_l
    if mask is None:
        z = jax.nn.softmax(logits.astype(cdt))
        # grad of xi: (d z / d xi)^T delta = z * (delta - z . delta)   (softmax Jacobian).
        logit_grad = z * (delta - jnp.dot(z, delta))
        logit_grad = jnp.where(jnp.isfinite(logit_grad), logit_grad, 0.0).astype(logits.dtype)
        updates, opt_state = optimizer.update(logit_grad, state.opt_state, logits)
    else:
        # Partial labels: the softmax runs over the present logits, an absent logit gets no
        # gradient and is handed to the optimizer as 0 (so weight decay and norm-based
        # transforms see the sub-problem's vector); its entries are restored below.
        z = _mask.softmax(logits.astype(cdt), mask)
        delta = _mask.entries(delta, mask)
        logit_grad = _mask.entries(z * (delta - jnp.dot(z, delta)), mask)
        logit_grad = jnp.where(jnp.isfinite(logit_grad), logit_grad, 0.0).astype(logits.dtype)
        updates, opt_state = optimizer.update(logit_grad, state.opt_state, _mask.entries(logits, mask))
        opt_state = _mask.keep_vectors(opt_state, state.opt_state, mask)
        updates = _mask.entries(updates, mask)
    stepped = optax.apply_updates(logits, updates)
    first = state.count == 0
    new_logits = jnp.where(first, logits, stepped)
    opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(first, old, new), opt_state,
                                       state.opt_state)
    # Weights on grad L_t: c z_t / L_t with c = 1 / sum_s z_s / L_s, i.e. softmax(xi - log L).
    if mask is None:
        weights = jax.nn.softmax(new_logits.astype(cdt) - log_l)
    else:
        weights = _mask.softmax(new_logits.astype(cdt) - log_l, mask)
        log_l = _mask.keep(log_l, state.prev_log_losses.astype(cdt), mask)
    new_state = cast_like(FAMOState(new_logits, log_l, opt_state, state.count + 1), state)
    new_state = keep_state_if_not_finite(new_state, state, losses)
    return WeightingOutput(weights.astype(losses.dtype), new_state,
                           {"task_logits": new_logits.astype(losses.dtype)})


def famo_weighting(*, lr: float = 0.025, gamma: float = 0.01,
                   optimizer: Optional[optax.GradientTransformation] = None) -> Weighting:
    r"""FAMO as a :class:`~imtl_jax.Weighting` (Liu, Feng, Stone & Liu, NeurIPS 2023).

    Algorithm 1 of the paper. Task logits ``xi`` (state, start at 0), ``z = softmax(xi)``;
    the update is ``sum_t c z_t grad L_t / L_t`` with ``c = (sum_t z_t / L_t)^{-1}``, i.e. the
    weights on ``grad L_t`` are ``w = softmax(xi - log L)`` (they sum to 1). After each step the
    logits descend ``(d z / d xi)^T delta + gamma xi`` with
    ``delta_t = log L_t(theta_prev) - log L_t(theta_now)``.

    Differences from the paper, all documented choices: the paper (and the authors' code)
    re-evaluates the loss of the *same* batch after the parameter update; a pure step function
    sees each loss once, so ``delta`` here is the change of log-loss between consecutive steps
    (consecutive batches), and the logit update of step k happens at the start of step k+1. As
    in the authors' code, the logits' optimizer is Adam(lr) with L2 decay ``gamma`` added to the
    gradient (``optax.chain(optax.add_decayed_weights(gamma), optax.adam(lr))``; the paper's
    Algorithm 1 writes a plain gradient step: pass ``optimizer=optax.chain(
    optax.add_decayed_weights(gamma), optax.sgd(lr))`` for it). The authors subtract running
    minimum losses (zeros by default) and add 1e-8; here losses are clamped at the smallest
    normal number instead (losses must be positive).

    Args:
      lr: learning rate of the logits (authors' default 0.025).
      gamma: decay of the logits (authors' default 0.01).
      optimizer: an optax transformation for the logits; overrides ``lr`` and ``gamma``.

    Cost per step: O(T) (no per-task gradients). State: logits, previous log-losses, the logits'
    optimizer state (Adam: two (T,) moments) and a counter.

    Partial labels (``task_mask``): the softmax runs over the present logits; an absent task's
    logit, previous log-loss and (T,) optimizer moments stay as they were (so its next
    ``delta`` spans the steps since it was last present). The equality with the sub-problem of
    the present tasks holds for optimizers that act elementwise (SGD, Adam, weight decay): the
    absent entries are handed to it as zeros and their new values are discarded.
    """
    if optimizer is None:
        lr, gamma = float(lr), float(gamma)
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        if not gamma >= 0:
            raise ValueError(f"`gamma` must be >= 0, got {gamma!r}.")
        optimizer = optax.chain(optax.add_decayed_weights(gamma), optax.adam(lr))
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"`optimizer` must be an optax.GradientTransformation, got {optimizer!r}.")
    return Weighting(name="famo", init=functools.partial(_famo_init, optimizer=optimizer),
                     weigh=functools.partial(_famo_weigh, optimizer=optimizer),
                     needs_grads=False, weights_heads=True, supports_task_mask=True)


FAMO = famo_weighting()


# ----------------------------------------------------------------------------------------------
# Single-task training


def _single_task_weigh(grads, losses, state, key, priorities, *, task):
    del grads, key
    losses = check_losses(losses, priorities, f"single_task_{task}")
    num_tasks = losses.shape[0]
    if task >= num_tasks:
        raise ValueError(f"`task` is {task} but there are only {num_tasks} tasks "
                         f"(`losses` has shape {losses.shape}).")
    return WeightingOutput(jax.nn.one_hot(task, num_tasks, dtype=losses.dtype), state, {})


def single_task(task: int) -> Method:
    """A :class:`~imtl_jax.Method` that trains task ``task`` alone: weights ``e_task``.

    The other heads get a zero gradient and the shared encoder only the gradient of
    ``L_task`` (the single-task baseline of every MTL paper, here sharing the multi-task model's
    architecture). Not registered; use ``imtl_jax.mtl_step(encoder, losses, single_task(0))``.
    Cost per step: that of equal weighting.

    Raises:
      ValueError: ``task`` is not a non-negative int (at construction) or ``task >= T`` (at trace
        time).
    """
    if not isinstance(task, int) or isinstance(task, bool) or task < 0:
        raise ValueError(f"`task` must be a non-negative int, got {task!r}.")
    name = f"single_task_{task}"
    weighting = Weighting(name=name, init=stateless_init,
                          weigh=functools.partial(_single_task_weigh, task=task),
                          needs_grads=False, weights_heads=True)
    return Method(name, IDENTITY, weighting)


register(Method("uncertainty", UNCERTAINTY, EQUAL))
register(Method("gls", IDENTITY, GLS))
register(Method("dwa", IDENTITY, DWA))
register(Method("famo", IDENTITY, FAMO))
