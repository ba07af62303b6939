"""STCH, smooth Tchebycheff scalarization (Lin, Zhang, Yang, Zhang & Zhang, "Smooth Tchebycheff
Scalarization for Multi-Objective Optimization", ICML 2024).

Registered name: ``stch``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (cast_like, check_losses, check_state, compute_dtype,
                                      keep_state_if_not_finite)
from imtl_jax.methods.equal import IDENTITY


class STCHState(NamedTuple):
    """State of :func:`stch_weighting`: ``count`` (int32) steps seen and ``loss_sum`` (T,), the sum
    of the losses over the warm-up steps (their mean is the nadir point)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field
    loss_sum: jax.Array


def _stch_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), dtype))


def _task_constant(value, default, num_tasks, name, dtype):
    if value is None:
        return jnp.full((num_tasks,), default, dtype)
    if len(value) != num_tasks:
        raise ValueError(f"`{name}` has {len(value)} entries but `losses` has {num_tasks} tasks.")
    return jnp.asarray(value, dtype)


def stch_objective(losses: jax.Array, *, mu: float, preference: jax.Array,
                   reference: jax.Array) -> jax.Array:
    r"""``mu log sum_t exp(lambda_t (f_t - z_t) / mu)``, the smooth Tchebycheff scalarization
    (computed with the largest exponent shifted to 0, the paper's Appendix B.1)."""
    y = preference * (losses - reference)
    top = jnp.max(y)
    return mu * jnp.log(jnp.sum(jnp.exp((y - top) / mu))) + top


def _masked_objective(f, mask, mu, lam, ref):
    """:func:`stch_objective` over the present tasks only."""
    y = lam * (f - ref)
    top = _mask.maximum(y, mask)
    return mu * jnp.log(jnp.sum(_mask.entries(jnp.exp((y - top) / mu), mask))) + top


def _stch_weigh(grads, losses, state, key, priorities, *, mu, warmup_steps, log_losses,
                preference, reference, task_mask=None):
    del grads, key
    losses = check_losses(losses, priorities, "stch")
    num_tasks = losses.shape[0]
    check_state(state, _stch_init(num_tasks, losses.dtype), "stch")
    cdt = compute_dtype(losses.dtype)
    lam = _task_constant(preference, 1.0, num_tasks, "preference", cdt)
    ref = _task_constant(reference, 0.0, num_tasks, "reference", cdt)
    x = losses.astype(cdt)
    mask = task_mask
    if mask is not None:  # partial labels: max, softmax and T run over the present tasks
        x = _mask.entries(x, mask, 1.0)
    warm = state.count < warmup_steps
    if log_losses:
        # f_t = log(L_t / nadir_t); df/dL = 1/L (clamped at eps * max L as SI: a zero loss gets a
        # large, finite weight; when every loss is <= 0 the weights fall back to equal).
        largest = jnp.max(x) if mask is None else _mask.maximum(x, mask)
        tiny = jnp.finfo(cdt).tiny
        safe = jnp.maximum(x, jnp.maximum(jnp.finfo(cdt).eps * largest, tiny))
        nadir = state.loss_sum.astype(cdt) / max(warmup_steps, 1) if warmup_steps else jnp.ones_like(x)
        nadir = jnp.maximum(nadir, tiny)
        f = jnp.log(safe) - jnp.log(nadir)
        deriv = jnp.where(largest > 0, 1.0 / safe, 1.0)
    else:
        f = x
        deriv = jnp.ones_like(x)
    if mask is None:
        soft = jax.nn.softmax(lam * (f - ref) / mu)
        stch = num_tasks * lam * soft * deriv
    else:
        soft = _mask.softmax(lam * (f - ref) / mu, mask)
        stch = _mask.count(mask, cdt) * lam * soft * deriv
        deriv = _mask.entries(deriv, mask)
    weights = jnp.where(warm, deriv, stch)     # warm-up: the gradient of sum_t f_t
    new_sum = jnp.where(warm, state.loss_sum.astype(cdt) + x, state.loss_sum.astype(cdt))
    if mask is not None:  # an absent task's warm-up sum does not move
        new_sum = _mask.keep(new_sum, state.loss_sum.astype(cdt), mask)
    new_state = cast_like(STCHState(state.count + 1, new_sum), state)
    new_state = keep_state_if_not_finite(new_state, state, x if mask is not None else losses)
    objective = (stch_objective(f, mu=mu, preference=lam, reference=ref) if mask is None
                 else _masked_objective(f, mask, mu, lam, ref))
    info = {"objective": objective.astype(losses.dtype), "warm_up": warm}
    return WeightingOutput(weights.astype(losses.dtype), new_state, info)


def stch_weighting(*, mu: float = 1.0, warmup_steps: int = 1, log_losses: bool = True,
                   preference: Optional[Sequence[float]] = None,
                   reference: Optional[Sequence[float]] = None) -> Weighting:
    r"""Smooth Tchebycheff scalarization as a loss :class:`~imtl_jax.Weighting`.

    The paper's scalarization (Eq. 9) of objectives ``f_t``,
    ``g_mu(f) = mu log sum_t exp(lambda_t (f_t - z_t) / mu)``, a smooth upper bound of the
    weighted Tchebycheff ``max_t lambda_t (f_t - z_t)`` (tight as ``mu -> 0``). Its gradient is
    ``sum_t lambda_t softmax(lambda (f - z) / mu)_t grad f_t``; the weights on the losses are that,
    times T (as LibMTL's ``STCH``, so that a large ``mu`` approaches the plain sum), times
    ``df_t/dL_t``. The weights multiply the whole loss (heads included).

    The multi-task recipe of the paper's code (and LibMTL): ``f_t = log(L_t / nadir_t)`` with the
    nadir point ``nadir_t`` the mean loss of the first ``warmup_steps`` steps, during which the
    weights are those of ``sum_t log L_t`` (SI); ``lambda = 1``, ``z = 0``. So
    ``w_t = T softmax(log(L / nadir) / mu)_t / L_t``. LibMTL counts its warm-up in epochs
    (``STCH_warmup_epoch = 4``) and averages over the last one; here it is a number of steps,
    averaged over all of them (default 1: the nadir is the first step's losses). With
    ``log_losses=False`` and ``warmup_steps=0``, ``f_t = L_t``: TorchJD's ``STCH`` scalarizer
    (with ``preference = 1/T`` for its default, up to the factor T).

    Args:
      mu: the smoothing parameter, > 0 (1.0: LibMTL's ``STCH_mu`` default; the paper evaluates
        0.01–1 and finds no single best value).
      warmup_steps: steps of SI weighting that define the nadir point (``log_losses`` only).
      log_losses: the log-nadir-normalised objectives above (True) or the raw losses.
      preference: ``lambda`` (T,), default all ones.
      reference: the ideal point ``z`` (T,), default 0.

    Cost per step: O(T) on top of equal weighting (no per-task gradients). State: a counter
    and the (T,) warm-up loss sum. ``info``: ``objective`` (the scalarization's value) and
    ``warm_up`` (bool).

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.stch import stch_weighting
      >>> w = stch_weighting(mu=0.1, warmup_steps=0, log_losses=False)
      >>> out = w.weigh(None, jnp.array([1.0, 3.0]), w.init(2), None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]   # nearly all weight on the larger loss
      [0.0, 2.0]
    """
    mu = float(mu)
    if not mu > 0:
        raise ValueError(f"`mu` must be > 0, got {mu!r}.")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}.")
    if warmup_steps and not log_losses:
        raise ValueError("`warmup_steps` > 0 defines the nadir point of the log losses; with "
                         "log_losses=False pass warmup_steps=0.")
    preference = None if preference is None else tuple(float(v) for v in preference)
    reference = None if reference is None else tuple(float(v) for v in reference)
    return Weighting(name="stch", init=_stch_init,
                     weigh=functools.partial(_stch_weigh, mu=mu, warmup_steps=warmup_steps,
                                             log_losses=bool(log_losses), preference=preference,
                                             reference=reference),
                     needs_grads=False, weights_heads=True, supports_task_mask=True)


STCH = stch_weighting()

register(Method("stch", IDENTITY, STCH))
