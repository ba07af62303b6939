"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020).

Registered name: ``pcgrad``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax.methods import _mask, register
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


def _order_draws(key: jax.Array, num_tasks: int) -> jax.Array:
    """(T, T-1) uint32 sort keys: entry ``[c, j]`` is ``bits(fold_in(fold_in(key, c), j))``, a
    function of ``(key, c, j)`` alone, so the first ``T' - 1`` keys of the first ``T'`` rows are
    the same for every ``T >= T'`` (what makes a masked draw the sub-problem's)."""
    def one(c):
        kc = jax.random.fold_in(key, c)
        return jax.vmap(lambda j: jax.random.bits(jax.random.fold_in(kc, j), (), jnp.uint32))(
            jnp.arange(num_tasks - 1))

    return jax.vmap(one)(jnp.arange(num_tasks))


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def pcgrad_orders(key: jax.Array, num_tasks: int, task_mask: Optional[jax.Array] = None) -> jax.Array:
    """The (T, T-1) int32 task orders: row i is a random permutation of the tasks other than i.

    Task i (the c-th present task) sorts its ``T' - 1`` slots, the other present tasks in index
    order, by the keys ``[c, 0..T'-2]`` of :func:`_order_draws` (stable sort: independent
    uniform 32-bit keys, so a uniformly random permutation up to ties of probability
    ``~T^2 / 2^33``); one independent permutation per task.

    ``task_mask`` (T,) bool (partial labels): the present tasks are ordered as in the T'-task
    problem of the present tasks with the same ``key`` (the order of present task i over the
    present others is, mapped to their indices, exactly the sub-problem's row for i, since the
    keys depend on the positions among the present tasks only), followed by the absent tasks.
    The rows of absent tasks are unused."""
    if num_tasks == 1:
        return jnp.zeros((1, 0), jnp.int32)
    mask = jnp.ones((num_tasks,), bool) if task_mask is None else task_mask
    num_present = jnp.sum(mask.astype(jnp.int32))
    full = _mask.present_first(mask)              # position among the present -> task index
    compact = _mask.compact_index(mask)           # task index -> position among the present
    draws = _order_draws(key, num_tasks)
    slots = jnp.arange(num_tasks - 1, dtype=jnp.int32)

    def one(i):
        c = compact[i]
        extra = (slots >= num_present - 1).astype(jnp.int32)     # slots past the present others
        _, _, order = lax.sort((extra, draws[jnp.maximum(c, 0)], slots), num_keys=2, is_stable=True)
        return full[order + (order >= c).astype(jnp.int32)]       # skip task i itself

    return jax.vmap(one)(jnp.arange(num_tasks, dtype=jnp.int32))


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


def _pcgrad_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    grads, losses = check_grads(grads, losses, priorities, "pcgrad")
    num_tasks = grads.shape[0]
    check_state(state, _pcgrad_init(num_tasks), "pcgrad")
    if key is None:
        key = jax.random.fold_in(jax.random.key(0), state.count)
    orders = pcgrad_orders(key, num_tasks, task_mask)
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
        weights = jnp.sum(pcgrad_coefficients(gram, orders), axis=0)
    else:
        # Partial labels: absent rows are 0 in the Gramian, so a projection on an absent task
        # is skipped (its norm is 0) and the absent tasks at the end of every order are no-ops;
        # the present tasks' orders are the sub-problem's (pcgrad_orders), and only their
        # corrected rows are summed.
        gram, _ = _mask.gramian(grads, task_mask)
        weights = jnp.sum(_mask.rows(pcgrad_coefficients(gram, orders), task_mask), axis=0)
        grads = _mask.rows(grads, task_mask)
    weights = nan_if_not_finite(weights, grads)
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
    ``weigh`` (deterministic given the key; ``info["order"]`` holds the (T, T-1) orders, see
    :func:`pcgrad_orders`). With ``key=None`` the key is ``fold_in(key(0), count)`` with the step
    counter kept in the state, so the order still changes every step.

    Partial labels (``task_mask``): the present tasks are projected on the present others in
    exactly the orders of the T'-task problem with the same key (:func:`pcgrad_orders`), so the
    masked step equals the sub-problem's step, draw for draw; the counter advances.

    Cost per step: the per-task gradients, the Gramian O(T^2 F), then O(T^3) (T sequential
    projections per task, tasks vmapped). Gradient method: heads get their own loss gradient.
    """
    return Weighting(name="pcgrad", init=_pcgrad_init, weigh=_pcgrad_weigh, needs_grads=True,
                     weights_heads=False, supports_task_mask=True)


PCGRAD = pcgrad_weighting()

register(Method("pcgrad", IDENTITY, PCGRAD))
