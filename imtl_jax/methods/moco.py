"""MoCo, tracking-corrected stochastic MGDA (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen,
"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR 2023).

Registered name: ``moco``, **at the parameter level only** (``level="parameters"``; the
experiment runner's ``moco@params``). Its update ``Y^T lambda`` combines tracked gradient
estimates ``Y`` (a (T, F) state), not the current rows, so its weighting returns a
``direction`` (``returns_direction``): defined where the rows are the gradients themselves, at
the parameter level of :func:`imtl_jax.mtl_step` (and so the NNX/Linen helpers with this
method) and in :func:`imtl_jax.aggregate`. The representation level, and so
:func:`imtl_jax.accumulate_step`, raise a ``ValueError`` naming ``level="parameters"``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput, check_dim
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite, project_simplex)
from imtl_jax.methods.equal import IDENTITY


class MoCoState(NamedTuple):
    """State of :func:`moco_weighting`.

    Attributes:
      tracked: (T, F) the tracked gradient estimates ``Y`` (zeros at first).
      weights: (T,) ``lambda`` (``1/T`` at first; on the simplex).
      count: int32, the steps taken (k of the step sizes ``beta / k^beta_sigma``).
    """

    tracked: jax.Array
    weights: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _init(num_tasks, dtype=None, *, dim=None):
    dim = check_dim(dim, "moco")
    dtype = compute_dtype(jnp.float32 if dtype is None else dtype)
    return MoCoState(jnp.zeros((num_tasks, dim), dtype), jnp.full((num_tasks,), 1.0 / num_tasks, dtype),
                     jnp.zeros((), jnp.int32))


def moco_targets(grads: jax.Array, losses: jax.Array, normalize: bool) -> jax.Array:
    """What ``Y`` tracks: the rows ``g_t`` (the paper), or with ``normalize`` ``L_t g_t / |g_t|``
    (the authors' code, LibMTL; 0 for a zero row, no epsilon; the norm is taken on the row
    divided by its largest entry, so 1e30 or 1e-30 rows do not over/underflow)."""
    if not normalize:
        return grads
    top = jnp.max(jnp.abs(grads), axis=1, keepdims=True)
    nonzero = top > 0
    unit = grads / jnp.where(nonzero, top, 1.0)
    norm = jnp.sqrt(jnp.sum(unit * unit, axis=1, keepdims=True))
    unit = jnp.where(nonzero, unit / jnp.where(nonzero, norm, 1.0), 0.0)
    return losses[:, None] * unit


def _weigh(grads, losses, state, key, priorities, *, beta, beta_sigma, gamma, gamma_sigma, rho,
           normalize, simplex, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "moco")
    num_tasks, size = grads.shape
    shape = jnp.shape(state.tracked) if isinstance(state, MoCoState) else ()
    if len(shape) == 2 and shape[0] == num_tasks and shape[1] != size:
        raise ValueError(
            f"`state` of the 'moco' weighting tracks {shape[1]} columns but `grads` has F = {size}: "
            f"make it with the weighting's init_state(num_tasks, dtype, dim={size}) (the training "
            "step's init(params) does).")
    check_state(state, jax.eval_shape(lambda: _init(num_tasks, grads.dtype, dim=size)), "moco")
    cdt = compute_dtype(grads.dtype)
    mask = task_mask
    g = grads.astype(cdt)
    loss = losses.astype(cdt)
    if mask is not None:
        g, loss = _mask.rows(g, mask), _mask.entries(loss, mask)
    k = (state.count + 1).astype(cdt)
    beta_k = beta / k ** beta_sigma
    gamma_k = gamma / k ** gamma_sigma
    old_y = state.tracked.astype(cdt)
    old_lam = state.weights.astype(cdt)
    y = old_y - beta_k * (old_y - moco_targets(g, loss, normalize))
    lam = old_lam
    mass = jnp.ones((), cdt)  # the present tasks' lambda mass (all of it without a mask)
    if mask is not None:  # the sub-problem: present rows of Y and entries of lambda only
        y = _mask.keep(y, old_y, mask, axis=0)
        # The sub-problem's lambda is on its own simplex: the present entries renormalized
        # (uniform over them if their mass is 0); the update is stored scaled back by that mass.
        mass = jnp.sum(_mask.entries(lam, mask))
        count = jnp.maximum(jnp.sum(mask.astype(cdt)), 1.0)
        lam = jnp.where(mass > 0, _mask.entries(lam, mask) / jnp.where(mass > 0, mass, 1.0),
                        _mask.entries(jnp.ones_like(lam), mask) / count)
    y_used = y if mask is None else _mask.rows(y, mask)
    gram = jnp.matmul(y_used, y_used.T, precision=HIGHEST)
    logits = lam - gamma_k * (jnp.matmul(gram, lam, precision=HIGHEST) + rho * lam)
    if simplex:
        new_lam = project_simplex(logits) if mask is None else _mask.project_simplex(logits, mask)
    else:
        new_lam = jax.nn.softmax(logits) if mask is None else _mask.softmax(logits, mask)
    direction = jnp.matmul(new_lam, y_used, precision=HIGHEST)
    new_state = MoCoState(y, new_lam if mask is None else _mask.keep(mass * new_lam, old_lam, mask),
                          state.count + 1)
    check = (g, loss) if normalize else (g,)
    weights = nan_if_not_finite(new_lam, *check)
    direction = nan_if_not_finite(direction, *check)
    new_state = keep_state_if_not_finite(cast_like(new_state, state), state, *check)
    return WeightingOutput(weights.astype(grads.dtype), new_state,
                           {"step_size_tracking": beta_k.astype(grads.dtype),
                            "step_size_weights": gamma_k.astype(grads.dtype)},
                           None, direction.astype(grads.dtype))


def moco_weighting(*, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                   gamma_sigma: float = 0.5, rho: float = 0.0, normalize: bool = True,
                   simplex: bool = False) -> Weighting:
    r"""MoCo (Fernando et al., ICLR 2023) as a stateful :class:`~imtl_jax.Weighting` that returns a
    direction (the registered ``"moco"`` is ``moco_weighting()`` at ``level="parameters"``).

    Step k = 1, 2, ... with rows ``g_t`` (per-task gradients of the shared parameters):

    1. tracking (Alg. 1): ``y_t <- y_t - beta_k (y_t - h_t)``, ``beta_k = beta / k^beta_sigma``,
       ``h_t = L_t g_t / |g_t|`` (``normalize=True``, the authors' code and LibMTL; the paper's
       algorithm tracks ``h_t = g_t``: ``normalize=False``);
    2. the weights: ``lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda)``,
       ``gamma_k = gamma / k^gamma_sigma`` (the authors' code, LibMTL; the paper projects onto
       the simplex: ``simplex=True``);
    3. the update ``d = Y^T lambda`` (the output's ``direction``; ``weights`` is lambda).

    ``Y`` starts at 0 and ``lambda`` at ``1/T`` (LibMTL). Defaults are LibMTL's (from the
    authors' code): beta = 0.5, beta_sigma = 0.5, gamma = 0.1, gamma_sigma = 0.5, rho = 0;
    TorchJD 0.18 has no MoCo. No ``1e-8`` beside the norm (LibMTL's): a zero gradient is tracked
    as 0. The paper's projection of ``y`` onto a bounded set is omitted, as in LibMTL. **A
    negative loss** (e.g. a Gaussian negative log-likelihood) makes the default tracking ``L_t
    g_t / |g_t|`` point against ``g_t``: that task's gradient is tracked reversed and ascended;
    ``normalize=False`` (track ``g_t``) avoids it. The state is (T, F) floats (``needs_dim``: T
    copies of the shared parameters at the parameter level), made by ``init_state(T, dtype,
    dim=F)``, which the step, the aggregator and the NNX helper call.

    **Parameter level only**: ``d`` is not a combination of the current rows, so it exists where
    the rows are the update's own space (the shared parameters; :func:`imtl_jax.aggregate`'s
    stacked updates), not at the representation (a batch-summed feature gradient has no
    per-example cotangent): there, and in :func:`imtl_jax.accumulate_step`, a ``ValueError``
    names ``level="parameters"``. Heads get the gradient of their own loss.

    Partial labels (``task_mask``): the absent tasks' rows of ``Y`` and entries of lambda are
    kept, the present tasks run the sub-problem's update (step counter shared) from their lambda
    renormalized to sum 1 (the sub-problem's own simplex; uniform if their mass ``m`` is 0), the
    output's ``weights`` are the sub-problem's new lambda and ``d`` combines the present rows
    with them; the state stores ``m`` times that new lambda for the present tasks, so the full
    lambda stays on the simplex (absent entries unchanged, the sum still 1). Non-finite rows (or
    losses, with ``normalize``): NaN weights and direction, state unchanged. Cost per step:
    per-task gradients + O(T^2 F).
    ``info``: ``step_size_tracking`` (beta_k), ``step_size_weights`` (gamma_k).

    Example:
      >>> import jax.numpy as jnp
      >>> w = moco_weighting()
      >>> s = w.init_state(2, dim=2)
      >>> out = w.weigh(jnp.array([[3.0, 0.0], [0.0, 1.0]]), jnp.array([1.0, 2.0]), s, None, None)
      >>> out.state.tracked.tolist()      # y = 0.5 L_t g_t / |g_t|
      [[0.5, 0.0], [0.0, 1.0]]
      >>> [round(v, 4) for v in out.weights.tolist()]
      [0.5094, 0.4906]
    """
    values = {"beta": beta, "beta_sigma": beta_sigma, "gamma": gamma, "gamma_sigma": gamma_sigma,
              "rho": rho}
    for name, value in values.items():
        value = float(value)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")
        values[name] = value
    if not 0 < values["beta"] <= 1:
        raise ValueError(f"`beta` must be in (0, 1], got {beta!r}.")
    weigh = functools.partial(_weigh, normalize=bool(normalize), simplex=bool(simplex), **values)
    weigh.reads_losses = bool(normalize)  # type: ignore[attr-defined]  # aggregate(): losses= needed?
    return Weighting(name="moco", init=_init, weigh=weigh,
                     needs_grads=True, weights_heads=False, supports_task_mask=True, needs_dim=True,
                     returns_direction=True)


MOCO = moco_weighting()

register(Method("moco", IDENTITY, MOCO, level="parameters"))
