"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020).

Registered name: ``pcgrad``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import register
from imtl_jax.methods._common import (HIGHEST, cast_like, check_grads, check_state, compute_dtype,
                                      nan_if_not_finite, normalized_gramian)
from imtl_jax.methods.equal import IDENTITY


class PCGradState(NamedTuple):
    """State of the PCGrad weighting: ``count`` (int32), the number of steps seen. Used only to
    draw a fresh task order each step when ``weigh`` gets ``key=None``."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; a public state field


def _pcgrad_init(num_tasks, dtype=None):
    del num_tasks, dtype
    return PCGradState(jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def pcgrad_orders(key: jax.Array, num_tasks: int) -> jax.Array:
    """The (T, T-1) int32 task orders: row i is a random permutation of the tasks other than i
    (one independent permutation per task, drawn from ``jax.random.split(key, T)``)."""
    if num_tasks == 1:
        return jnp.zeros((1, 0), jnp.int32)
    keys = jax.random.split(key, num_tasks)

    def one(k, i):
        perm = jax.random.permutation(k, num_tasks - 1).astype(jnp.int32)
        return perm + (perm >= i).astype(jnp.int32)   # skip i itself

    return jax.vmap(one)(keys, jnp.arange(num_tasks, dtype=jnp.int32))


def pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad on the Gramian: ``C`` (T, T) with ``g_i^PC = sum_k C[i, k] g_k``.

    Row i starts at ``e_i``; for j in ``orders[i]``: if ``g_i^PC . g_j < 0`` (``= (C_i M)_j``),
    ``C_i -= (g_i^PC . g_j / ||g_j||^2) e_j``. Projections use the original ``g_j``, as in the
    paper's Algorithm 1.
    """
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    if num_tasks == 1:
        return jnp.ones((1, 1), dtype)
    diag = jnp.diag(gram)

    def row(i, order):
        def body(k, c):
            j = order[k]
            dot = jnp.dot(c, gram[:, j], precision=HIGHEST)
            ok = (dot < 0) & (diag[j] > 0)
            coef = jnp.where(ok, dot / jnp.where(diag[j] > 0, diag[j], 1.0), 0.0)
            return c.at[j].add(-coef)
        c0 = jnp.zeros((num_tasks,), dtype).at[i].set(1.0)
        return lax.fori_loop(0, order.shape[0], body, c0)

    return jax.vmap(row)(jnp.arange(num_tasks), orders)


def _pcgrad_weigh(grads, losses, state, key, priorities):
    grads, losses = check_grads(grads, losses, priorities, "pcgrad")
    num_tasks = grads.shape[0]
    check_state(state, _pcgrad_init(num_tasks), "pcgrad")
    if key is None:
        key = jax.random.fold_in(jax.random.key(0), state.count)
    orders = pcgrad_orders(key, num_tasks)
    gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
    coeffs = pcgrad_coefficients(gram, orders)
    weights = nan_if_not_finite(jnp.sum(coeffs, axis=0), grads)
    new_state = cast_like(PCGradState(state.count + 1), state)
    return WeightingOutput(weights.astype(grads.dtype), new_state, {"order": orders})


def pcgrad_weighting() -> Weighting:
    r"""PCGrad as a :class:`~imtl_jax.Weighting` (Yu et al., NeurIPS 2020, Algorithm 1).

    For each task i, ``g_i^PC = g_i``; then for ``j != i`` in a random order: if
    ``g_i^PC . g_j < 0``, ``g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j`` (the projection on
    the normal plane of the *original* g_j). The update is
    ``sum_i g_i^PC`` (the paper's sum; the PyTorch port defaults to the mean). Every ``g_i^PC`` is
    a linear combination of the original rows, so it is computed on the (T, T) Gramian and
    returned as weights ``w_k = sum_i C[i, k]`` with ``sum_i g_i^PC = w @ grads``: non-conflicting
    gradients give ``w = 1`` (equal weighting).

    Randomness: one permutation of the other tasks per task i, drawn from the ``key`` given to
    ``weigh`` (deterministic given the key; ``info["order"]`` holds the (T, T-1) orders). With
    ``key=None`` the key is ``fold_in(key(0), count)`` with the step counter kept in the state,
    so the order still changes every step.

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^3) (T sequential
    projections per task, tasks vmapped). Gradient method: heads get their own loss gradient.
    """
    return Weighting(name="pcgrad", init=_pcgrad_init, weigh=_pcgrad_weigh, needs_grads=True,
                     weights_heads=False)


PCGRAD = pcgrad_weighting()

register(Method("pcgrad", IDENTITY, PCGRAD))
