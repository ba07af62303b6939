"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
Multi-Task Learning", CVPR 2023).

Registered name: ``aligned_mtl``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian)
from imtl_jax.methods.equal import IDENTITY


def _balance_matrix(gram: jax.Array, num_present=None) -> tuple[jax.Array, jax.Array]:
    """``(B, any_kept)``: ``B = sqrt(lambda_min) V Lambda^{-1/2} V^T`` over the kept eigenpairs."""
    num_tasks = gram.shape[0] if num_present is None else num_present
    evals, evecs = jnp.linalg.eigh(gram)
    cutoff = jnp.max(evals) * num_tasks * jnp.finfo(gram.dtype).eps
    keep = evals > cutoff
    any_kept = jnp.any(keep)
    safe = jnp.where(keep, evals, 1.0)
    lam_min = jnp.min(jnp.where(keep, evals, jnp.inf))
    lam_min = jnp.where(any_kept, lam_min, 0.0)
    scale = jnp.where(keep, jnp.sqrt(lam_min) / jnp.sqrt(safe), 0.0)
    balance = jnp.matmul(evecs * scale[None, :], evecs.T, precision=HIGHEST)
    return 0.5 * (balance + balance.T), any_kept


@jax.jit
def aligned_mtl_balance(grads: jax.Array) -> jax.Array:
    """The (T, T) balance matrix ``B`` of Aligned-MTL for the (T, F) ``grads``.

    ``B G`` (rows: the aligned task gradients) has all its nonzero singular values equal to the
    smallest nonzero singular value ``sigma_min`` of ``G``: ``(B G)(B G)^T = sigma_min^2 P`` with
    ``P`` the projector onto the row space of the Gramian. Rank is decided by the authors' cutoff
    ``lambda > lambda_max T eps`` on the Gramian's eigenvalues. All-zero input gives ``B = 0``.
    """
    grads = check_matrix(grads, "aligned_mtl")
    gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))  # B is scale-free
    balance, _ = _balance_matrix(gram)
    return nan_if_not_finite(balance, grads).astype(grads.dtype)


def _aligned_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "aligned_mtl")
    if task_mask is None:
        gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
        balance, any_kept = _balance_matrix(gram)
        weights = jnp.sum(balance, axis=1)            # B^T 1 = B 1 (B symmetric)
        weights = jnp.where(any_kept, weights, jnp.ones_like(weights))
    else:
        # Partial labels: zero rows only add zero eigenvalues, which the cutoff (relative to
        # the largest, with the sub-problem's T') drops, so B is the sub-problem's padded with
        # zero rows and columns; the all-zero fallback is 1 on the present tasks.
        grads = _mask.rows(grads, task_mask)
        gram, _ = normalized_gramian(grads.astype(compute_dtype(grads.dtype)))
        balance, any_kept = _balance_matrix(gram, jnp.sum(task_mask).astype(gram.dtype))
        weights = _mask.entries(jnp.sum(balance, axis=1), task_mask)
        weights = jnp.where(any_kept, weights, _mask.entries(jnp.ones_like(weights), task_mask))
    weights = nan_if_not_finite(weights, grads)
    return WeightingOutput(weights.astype(grads.dtype), state, {})


def aligned_mtl_weighting() -> Weighting:
    r"""Aligned-MTL as a :class:`~imtl_jax.Weighting` (Senushkin et al., CVPR 2023).

    Eigendecomposition of the Gramian ``G G^T = V Lambda V^T`` (eigenpairs above the relative
    cutoff ``T eps lambda_max``, as in the authors' ``ProcrustesSolver``); the balance matrix
    ``B = sqrt(lambda_min) V Lambda^{-1/2} V^T`` aligns the gradients: the rows of ``B G`` are
    orthogonal with equal norms ``sigma_min`` (the condition number of the aligned system is 1,
    the paper's objective), and the update is their sum ``1^T B G``, i.e. weights ``w = B 1`` on
    the original rows (equal task weights; the authors' default ``scale_mode="min"``). See
    :func:`aligned_mtl_balance` for ``B``.

    Degenerate inputs: zero rows and rank deficiency are handled by the eigenvalue cutoff
    (dropped directions get no weight); all-zero gradients give weights 1; T = 1 gives [1].

    Cost per step: the per-task gradients, the Gramian O(T^2 F), one (T, T) eigendecomposition.
    Gradient method: heads get their own loss gradient.
    """
    return Weighting(name="aligned_mtl", init=stateless_init, weigh=_aligned_weigh,
                     needs_grads=True, weights_heads=False, supports_task_mask=True)


ALIGNED_MTL = aligned_mtl_weighting()

register(Method("aligned_mtl", IDENTITY, ALIGNED_MTL))
