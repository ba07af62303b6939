"""Preference-vector scalarizations of the task losses: PBI (penalty-based boundary intersection,
Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition", IEEE TEVC
2007) and COSMOS (Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
Multi-Objective Learning", ICDM 2021).

Both are loss-level :class:`~imtl_jax.Weighting` s (``needs_grads=False``, ``weights_heads=True``,
stateless): the weights are the gradient of the scalarization ``S(L)`` with respect to the task
losses, so the training step's update (heads included) is the gradient of ``S(L(params))``.
The preference vector is equal by default; the step's ``priorities`` argument, when given, is
the preference vector (traced: a new preference each step, as in COSMOS's training, does not
recompile).

Registered names: ``pbi``, ``cosmos``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imtl_jax._linalg import ldexp, pow2_normalize
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax._validation import check_float_array, check_task_vector
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import compute_dtype
from imtl_jax.methods.equal import IDENTITY


def _check_losses(losses: Any) -> jax.Array:
    losses = check_float_array(losses, "losses", ndim=1)
    if losses.shape[0] < 1:
        raise ValueError(f"`losses` must be (T,) with T >= 1, got shape {losses.shape}.")
    return losses


def _static_vector(values: Optional[Sequence[float]], name: str, *, nonnegative: bool) -> Optional[tuple]:
    """Validates a constructor vector (``preference`` / ``reference``) on the host."""
    if values is None:
        return None
    host = np.asarray(values, np.float64)
    if host.ndim != 1 or host.size < 1:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence, got shape {host.shape}.")
    if not np.all(np.isfinite(host)):
        raise ValueError(f"`{name}` must be finite, got {host.tolist()!r}.")
    if nonnegative and not (np.all(host >= 0) and np.any(host > 0)):
        raise ValueError(f"`{name}` must be >= 0 with at least one positive entry, got {host.tolist()!r}.")
    return tuple(float(v) for v in host)


def _preference(static, priorities, losses, cdt, mask, method):
    """The preference vector of this call, ``(p, ok)``: ``priorities`` when given (validated:
    its shape at trace time, its values when concrete), else the constructor's ``preference``,
    else ``None`` (the method's equal default). Masked entries are 0. ``ok`` (traced bool) is
    False when a traced preference is not finite, has a negative entry or no positive one among
    the present tasks: the weights are then NaN (loud)."""
    num_tasks = losses.shape[0]
    if priorities is not None:
        if static is not None:
            raise ValueError(f"the {method!r} weighting was built with a `preference`; pass "
                             "priorities=None, or build it without one to take the preference "
                             "from `priorities` each step.")
        p = check_task_vector(priorities, "priorities", num_tasks, "losses", losses.shape)
        if not isinstance(p, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
            host = np.asarray(p, np.float64)
            present = np.ones(num_tasks, bool) if mask is None else np.asarray(mask, bool)
            if not (np.all(np.isfinite(host[present])) and np.all(host[present] >= 0)
                    and np.any(host[present] > 0)):
                raise ValueError(f"`priorities` (the {method!r} preference vector) must be finite "
                                 f"and >= 0 with a positive entry, got {host.tolist()!r}.")
        p = p.astype(cdt)
    elif static is not None:
        if len(static) != num_tasks:
            raise ValueError(f"`preference` has {len(static)} entries but `losses` has {num_tasks} tasks.")
        p = jnp.asarray(static, cdt)
    else:
        return None, jnp.ones((), bool)
    if mask is not None:
        p = _mask.entries(p, mask)
    ok = jnp.all(jnp.isfinite(p)) & jnp.all(p >= 0) & jnp.any(p > 0)
    return p, ok


def _unit(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x / |x|, y, k)`` with ``x = y 2^k`` exactly and ``max|y|`` in [0.5, 1) (0, 0, 0 when x = 0):
    the direction without overflow or underflow at any scale."""
    y, k = pow2_normalize(x)
    n = jnp.linalg.norm(y)
    return jnp.where(n > 0, y / jnp.where(n > 0, n, 1.0), 0.0), y, k


# ------------------------------------------------------------------------------------------- PBI


def _pbi_weigh(grads, losses, state, key, priorities, *, theta, preference, reference, task_mask=None):
    del grads, key
    losses = _check_losses(losses)
    num_tasks = losses.shape[0]
    cdt = compute_dtype(losses.dtype)
    mask = task_mask
    p, ok = _preference(preference, priorities, losses, cdt, mask, "pbi")
    if p is None:  # equal preference (only the direction matters)
        p = jnp.ones((num_tasks,), cdt) if mask is None else _mask.entries(jnp.ones((num_tasks,), cdt), mask)
    if reference is not None and len(reference) != num_tasks:
        raise ValueError(f"`reference` has {len(reference)} entries but `losses` has {num_tasks} tasks.")
    f = losses.astype(cdt) - (0.0 if reference is None else jnp.asarray(reference, cdt))
    if mask is not None:
        f = _mask.entries(f, mask)
    direction, _, _ = _unit(p)                              # the unit preference, lambda / |lambda|
    y, k = pow2_normalize(f)                                # f = y 2^k exactly
    d1y = jnp.dot(y, direction)                             # distance along the preference ray
    perp = y - d1y * direction                              # the component off it
    d2y = jnp.linalg.norm(perp)
    # d2 is not differentiable where f lies on the ray (perp = 0): there we take the subgradient 0
    # (the minimal-norm one). "On the ray" is decided relative to |f| at the round-off of perp's
    # computation (4 T eps |f|), never by an absolute epsilon.
    count = num_tasks if mask is None else _mask.count(mask, cdt)
    on_ray = d2y <= 4 * count * jnp.finfo(cdt).eps * jnp.linalg.norm(y)
    off = jnp.where(on_ray, 0.0, perp / jnp.where(on_ray, 1.0, d2y))
    weights = direction + theta * off
    weights = jnp.where(ok, weights, jnp.nan)
    d1, d2 = ldexp(d1y, k), ldexp(d2y, k)
    info = {"objective": (d1 + theta * d2).astype(losses.dtype), "d1": d1.astype(losses.dtype),
            "d2": d2.astype(losses.dtype)}
    return WeightingOutput(weights.astype(losses.dtype), state, info)


def pbi_weighting(*, theta: float = 5.0, preference: Optional[Sequence[float]] = None,
                  reference: Optional[Sequence[float]] = None) -> Weighting:
    r"""Penalty-based boundary intersection (PBI) as a loss :class:`~imtl_jax.Weighting`.

    MOEA/D's PBI decomposition (Zhang & Li 2007, Sec. II-C) of the losses ``L`` relative to the
    ideal point ``z`` along the preference direction ``lambda_hat = lambda / |lambda|``:

    .. math:: d_1 = (L - z)^\top \hat\lambda, \qquad
              d_2 = \lVert L - z - d_1 \hat\lambda \rVert, \qquad S(L) = d_1 + \theta d_2,

    ``d_1`` the distance along the preference ray, ``d_2`` the distance to it. The weights are
    the gradient ``dS/dL = lambda_hat + theta (L - z - d_1 lambda_hat) / d_2``, so the step's
    update (heads included) is the gradient of ``S(L(params))``: a task whose loss lies below
    the ray gets a *negative* weight (PBI moves the loss vector onto the ray, not only down).
    The weights are invariant to a common rescaling of ``L - z`` (``S`` is positively
    homogeneous) and sum to about ``sqrt(T)`` at an equal preference (not ``T`` as equal
    weighting).

    The paper prints ``d_1 = |(z - F)^T lambda| / |lambda|`` and ``d_2 = |F - (z - d_1 lambda)|``;
    for losses above the ideal point (its assumption: ``z`` is the ideal point) the absolute
    value is a no-op and the geometric reading above (the distance to the ray ``z + t
    lambda_hat``) is what is meant; it is also TorchJD's ``PBI``. Where ``d_2 = 0`` (on the ray,
    e.g. T = 1, decided at round-off relative to ``|L - z|``) the penalty's subgradient 0 is
    taken; TorchJD instead adds ``1e-12`` under its square root (an absolute epsilon: its
    gradient differs from the paper's where ``d_2`` is below ~1e-5).

    Args:
      theta: the penalty ``theta >= 0`` on ``d_2`` (5: the paper's experiments; TorchJD has no
        default). ``theta = 0`` is the projection on the preference direction (fixed weights
        ``lambda_hat``).
      preference: ``lambda`` (T,), ``>= 0`` (only its direction matters); default equal. Leave
        it ``None`` to pass the preference per step as the step's ``priorities`` (traced).
      reference: the ideal point ``z`` (T,), default 0 (non-negative losses).

    Partial labels: ``T`` becomes the present tasks; ``lambda`` (equal, or ``priorities``)
    restricted to them. Cost per step: O(T) on top of equal weighting. ``info``: ``objective``
    (``S``), ``d1``, ``d2``.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.preference import pbi_weighting
      >>> w = pbi_weighting(theta=5.0)
      >>> out = w.weigh(None, jnp.array([1.0, 3.0]), w.init(2), None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]   # pulls L onto the ray L_1 = L_2
      [-2.8284, 4.2426]
      >>> round(float(out.info["d1"]), 4), round(float(out.info["d2"]), 4)
      (2.8284, 1.4142)
    """
    theta = float(theta)
    if not (np.isfinite(theta) and theta >= 0):
        raise ValueError(f"`theta` must be finite and >= 0, got {theta!r}.")
    preference = _static_vector(preference, "preference", nonnegative=True)
    reference = _static_vector(reference, "reference", nonnegative=False)
    return Weighting(name="pbi", init=stateless_init,
                     weigh=functools.partial(_pbi_weigh, theta=theta, preference=preference,
                                             reference=reference),
                     needs_grads=False, weights_heads=True, supports_task_mask=True)


# ---------------------------------------------------------------------------------------- COSMOS


def _cosmos_weigh(grads, losses, state, key, priorities, *, lam, preference, task_mask=None):
    del grads, key
    losses = _check_losses(losses)
    num_tasks = losses.shape[0]
    cdt = compute_dtype(losses.dtype)
    mask = task_mask
    r, ok = _preference(preference, priorities, losses, cdt, mask, "cosmos")
    if r is None:  # equal preference on the simplex, 1/T (1/T' over the present tasks)
        r = jnp.full((num_tasks,), 1.0 / num_tasks, cdt) if mask is None else _mask.uniform(mask, cdt)
    x = losses.astype(cdt)
    if mask is not None:
        x = _mask.entries(x, mask)
    r_hat, _, _ = _unit(r)
    x_hat, y, k = _unit(x)
    cosine = jnp.dot(r_hat, x_hat)
    # d cos(r, L) / dL = (r_hat - cos L_hat) / |L|; at L = 0 the cosine is undefined (it jumps),
    # and its gradient is taken as 0 there (the weights are then r).
    norm_y = jnp.linalg.norm(y)
    inv_norm = jnp.where(norm_y > 0, ldexp(1.0 / jnp.where(norm_y > 0, norm_y, 1.0), -k), 0.0)
    weights = r - lam * (r_hat - cosine * x_hat) * inv_norm
    weights = jnp.where(ok, weights, jnp.nan)
    objective = jnp.dot(r, x) - lam * cosine
    info = {"objective": objective.astype(losses.dtype), "cosine": cosine.astype(losses.dtype)}
    return WeightingOutput(weights.astype(losses.dtype), state, info)


def cosmos_weighting(*, lam: float = 2.0, preference: Optional[Sequence[float]] = None) -> Weighting:
    r"""COSMOS's scalarization as a loss :class:`~imtl_jax.Weighting`.

    Ruchte & Grabocka 2021, Eq. 5: a linear scalarization with the preference ``r`` minus a
    cosine-similarity penalty that pulls the loss vector towards the preference ray,

    .. math:: S(L) = r^\top L - \lambda \frac{r^\top L}{\lVert r \rVert \lVert L \rVert},
       \qquad \frac{\partial S}{\partial L} = r - \frac{\lambda}{\lVert L \rVert}
       \left(\hat r - \cos(r, L)\, \hat L\right).

    The weights are that gradient, so the step's update (heads included) is the gradient of
    ``S(L(params))``. The cosine term's weights are orthogonal to ``L`` and scale as
    ``1/|L|``: with small losses it dominates, and a loss that is small for the preference gets
    a negative weight (it is pushed back onto the ray).

    COSMOS trains one network for every preference: each batch draws ``r ~ Dirichlet(alpha)``
    (the authors' code: ``alpha = 1.2``) and conditions the model on it (concatenated to the
    input). Do that outside the weighting and pass the draw as the step's ``priorities``
    (traced, no recompile)::

        r = jax.random.dirichlet(key, 1.2 * jnp.ones(T))
        grads, state, aux = step(params, state, dict(batch, preference=r), priorities=r)

    Without ``priorities`` (or ``preference``) the preference is equal, ``r = 1/T`` (on the
    simplex, as the paper's draws).

    Args:
      lam: the penalty ``lambda >= 0`` (2: the authors' code's default, Multi-MNIST; the paper
        uses 0.01 to 8 by data set; TorchJD has no default). ``lam = 0`` is the linear
        scalarization ``r^T L``.
      preference: a fixed ``r`` (T,), ``>= 0``; default ``None``: equal, or the step's
        ``priorities``. Not renormalised (the paper's ``r`` is on the simplex).

    At ``L = 0`` the cosine is undefined and its gradient is taken as 0 (weights ``r``);
    TorchJD's ``cosine_similarity`` divides by ``max(|r||L|, 1e-8)`` there instead.

    Partial labels: ``T`` becomes the present tasks (equal preference ``1/T'``; ``priorities``
    restricted to them, not renormalised). Cost per step: O(T) on top of equal weighting.
    ``info``: ``objective`` (``S``), ``cosine``.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.preference import cosmos_weighting
      >>> w = cosmos_weighting(lam=2.0)
      >>> out = w.weigh(None, jnp.array([1.0, 3.0]), w.init(2), None, None)
      >>> [round(v, 4) for v in out.weights.tolist()]
      [0.2317, 0.5894]
      >>> round(float(out.info["cosine"]), 4)
      0.8944
    """
    lam = float(lam)
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"`lam` must be finite and >= 0, got {lam!r}.")
    preference = _static_vector(preference, "preference", nonnegative=True)
    return Weighting(name="cosmos", init=stateless_init,
                     weigh=functools.partial(_cosmos_weigh, lam=lam, preference=preference),
                     needs_grads=False, weights_heads=True, supports_task_mask=True)


PBI = pbi_weighting()
COSMOS = cosmos_weighting()

register(Method("pbi", IDENTITY, PBI))
register(Method("cosmos", IDENTITY, COSMOS))
