"""GradVac, gradient vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

Registered name: ``gradvac``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, cast_like, check_grads, check_state, compute_dtype,
                                      keep_state_if_not_finite, nan_if_not_finite,
                                      normalized_gramian)
from imtl_jax.methods.equal import IDENTITY
from imtl_jax.methods.pcgrad import pcgrad_orders


class GradVacState(NamedTuple):
    """State of :func:`gradvac_weighting`: ``targets`` (T, T), the EMA cosine targets
    ``phi_hat[i, j]`` (start at 0; the diagonal is unused), and ``count`` (int32), the steps seen
    (the task orders' key when ``weigh`` gets ``key=None``)."""

    targets: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _gradvac_init(num_tasks, dtype=None):
    dtype = jnp.float32 if dtype is None else dtype
    return GradVacState(jnp.zeros((num_tasks, num_tasks), dtype), jnp.zeros((), jnp.int32))


def gradvac_coefficients(gram: jax.Array, targets: jax.Array, orders: jax.Array, beta: float):
    """GradVac on the Gramian: ``(C, new_targets)`` with ``g_i^PC = sum_k C[i, k] g_k``.

    Row i starts at ``e_i``; for j in ``orders[i]``: ``phi = cos(g_i^PC, g_j)`` (``(C_i M)_j /
    (sqrt(C_i M C_i) sqrt(M_jj))``, 0 when a norm is 0); if ``phi < phi_hat[i, j]``,
    ``C[i, j] += sqrt(C_i M C_i) (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (sqrt(M_jj) sqrt(1 - phi_hat^2))``; then ``phi_hat[i, j] <- (1 - beta) phi_hat + beta phi``.
    A target of 1 (``1 - phi_hat^2 <= eps``: it asks for exactly parallel gradients, an infinite
    correction) skips the correction. Rows are independent given the targets (vmapped).
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    if num_tasks == 1:
        return jnp.ones((1, 1), dtype), targets
    eps = jnp.finfo(dtype).eps
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))

    def row(i, order, phi_row):
        def body(k, carry):
            c, phi_row = carry
            j = order[k]
            cg = jnp.matmul(c, gram, precision=HIGHEST)
            ni = jnp.sqrt(jnp.maximum(jnp.dot(cg, c), 0.0))
            nj = norms[j]
            den = ni * nj
            phi = jnp.where(den > 0, cg[j] / jnp.where(den > 0, den, 1.0), 0.0)
            phi = jnp.clip(phi, -1.0, 1.0)
            hat = phi_row[j]
            root_hat = jnp.sqrt(jnp.maximum(1.0 - hat * hat, 0.0))
            ok = (phi < hat) & (den > 0) & (root_hat * root_hat > eps)
            num = ni * (hat * jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0)) - phi * root_hat)
            w = jnp.where(ok, num / jnp.where(ok, nj * root_hat, 1.0), 0.0)
            c = c.at[j].add(w)
            phi_row = phi_row.at[j].set((1.0 - beta) * hat + beta * phi)
            return c, phi_row

        c0 = jnp.zeros((num_tasks,), dtype).at[i].set(1.0)
        return lax.fori_loop(0, order.shape[0], body, (c0, phi_row))

    return jax.vmap(row)(jnp.arange(num_tasks), orders, targets)


def _gradvac_weigh(grads, losses, state, key, priorities, *, beta, task_mask=None):
    grads, losses = check_grads(grads, losses, priorities, "gradvac")
    num_tasks = grads.shape[0]
    check_state(state, _gradvac_init(num_tasks, grads.dtype), "gradvac")
    if key is None:
        key = jax.random.fold_in(jax.random.key(0), state.count)
    orders = pcgrad_orders(key, num_tasks, task_mask)
    cdt = compute_dtype(grads.dtype)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(cdt))
        coeffs, targets = gradvac_coefficients(gram, state.targets.astype(cdt), orders, beta)
    else:
        # Partial labels: the present tasks' orders are the sub-problem's (pcgrad_orders, absent
        # tasks last) and the absent rows of the Gramian are 0, so a correction towards an
        # absent task is skipped (its norm is 0); only the present rows are summed, and a
        # target involving an absent task keeps its value.
        gram, _ = _mask.gramian(grads, task_mask)
        coeffs, targets = gradvac_coefficients(gram, state.targets.astype(cdt), orders, beta)
        coeffs = _mask.rows(coeffs, task_mask)
        targets = _mask.keep_pairs(targets, state.targets.astype(cdt), task_mask)
        grads = _mask.rows(grads, task_mask)
    weights = nan_if_not_finite(jnp.sum(coeffs, axis=0), grads)
    new_state = cast_like(GradVacState(targets, state.count + 1), state)
    new_state = keep_state_if_not_finite(new_state, state, grads)
    return WeightingOutput(weights.astype(grads.dtype), new_state, {"order": orders})


def gradvac_weighting(*, beta: float = 0.01) -> Weighting:
    r"""GradVac as a :class:`~imtl_jax.Weighting` (Wang et al., ICLR 2021, Alg. 1; TorchJD
    ``GradVac``, LibMTL ``GradVac``).

    Every pair of tasks has a cosine target ``phi_hat[i, j]``, an exponential moving average of
    the cosines seen (``phi_hat <- (1 - beta) phi_hat + beta phi``, starting at 0, kept in the
    state). For each task i, ``g_i^PC = g_i``; then for ``j != i`` in a random order, with
    ``phi = cos(g_i^PC, g_j)``: if ``phi < phi_hat[i, j]``, add
    ``||g_i^PC|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2))``
    times ``g_j`` to ``g_i^PC`` (which sets its cosine with g_j to exactly ``phi_hat``). The
    update is ``sum_i g_i^PC``. With all targets at 0 this is PCGrad's projection; unlike PCGrad,
    positive targets also pull merely less-aligned-than-usual gradients together. Computed on
    the (T, T) Gramian (:func:`gradvac_coefficients`, as TorchJD) and returned as weights on the
    original rows; the whole shared vector is one group (the paper also applies it per layer).

    Args:
      beta: the EMA rate of the targets (0.01, the paper's; LibMTL and TorchJD default to 0.5).

    Randomness: the orders are drawn as PCGrad's (:func:`imtl_jax.methods.pcgrad.pcgrad_orders`)
    from the step's ``key``, or ``fold_in(key(0), count)`` when ``key=None``; ``info["order"]``
    holds them. Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^3).
    State: the (T, T) targets and a counter. Gradient method: heads get their own loss gradient.

    Partial labels (``task_mask``): the present tasks run the T'-task problem's corrections, in
    its orders for the same key; the targets of pairs of present tasks move as there, those of
    pairs with an absent task are kept; the counter advances.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from imtl_jax.methods.gradvac import gradvac_weighting
      >>> w = gradvac_weighting()
      >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
      >>> out = w.weigh(g, jnp.zeros(2), w.init(2), jax.random.key(0), None)
      >>> d = out.weights @ g                    # targets 0: PCGrad's projections, summed
      >>> [round(v, 4) for v in d.tolist()]
      [0.5, 1.5]
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta!r}.")
    return Weighting(name="gradvac", init=_gradvac_init,
                     weigh=functools.partial(_gradvac_weigh, beta=beta),
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


GRADVAC = gradvac_weighting()

register(Method("gradvac", IDENTITY, GRADVAC))
