"""ConFIG (Liu, Chu, Wang & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
Neural Networks", ICLR 2025).

Registered name: ``config``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imtl_jax._linalg import symmetric_pinv
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import _mask, register
from imtl_jax.methods._common import (HIGHEST, check_grads, check_matrix, compute_dtype,
                                      nan_if_not_finite, normalized_gramian, safe_div)
from imtl_jax.methods.equal import IDENTITY


def _config_weights(grads):
    num_tasks = grads.shape[0]
    cdt = compute_dtype(grads.dtype)
    gram, _ = normalized_gramian(grads.astype(cdt))
    eps = jnp.finfo(cdt).eps
    diag = jnp.diag(gram)
    present = diag > 0
    norms = jnp.sqrt(jnp.where(present, diag, 1.0))        # ||g_t|| / scale (1 where zero)
    both = present[:, None] & present[None, :]
    # The cosine matrix K = U U^T of the unit rows (a zero row has a zero unit row, as TorchJD's
    # nan_to_num): its conditioning is that of the angles, not of the norms.
    cos = jnp.where(both, gram / (norms[:, None] * norms[None, :]), 0.0)
    # pinv(U) 1 = U^T K^+ 1: the best direction is sum_t beta_t u_t with beta = K^+ 1.
    beta = jnp.where(present, jnp.matmul(symmetric_pinv(cos, 10.0 * num_tasks * eps),
                                         jnp.ones((num_tasks,), cdt), precision=HIGHEST), 0.0)
    k_beta = jnp.matmul(cos, beta, precision=HIGHEST)       # u_t . d for every t
    d_sq = jnp.maximum(jnp.dot(beta, k_beta), 0.0)          # ||d||^2
    d_norm = jnp.sqrt(d_sq)
    # update = (sum_t g_t . d / ||d||) d / ||d||, d = sum_t (beta_t / ||g_t||) g_t.
    length = jnp.dot(norms, k_beta)                         # sum_t g_t . d (scale units)
    weights = jnp.where(present, safe_div(length, d_sq, 0.0) * beta / norms, 0.0)
    cosines = safe_div(k_beta, d_norm, 0.0)
    weights = nan_if_not_finite(weights, grads)
    return weights.astype(grads.dtype), {"cosines": cosines.astype(grads.dtype)}


@jax.jit
def config_weights(grads: jax.Array) -> jax.Array:
    """ConFIG weights for the (T, F) ``grads``: the update is ``weights @ grads``
    (see :func:`config_weighting`)."""
    grads = check_matrix(grads, "config")
    return _config_weights(grads)[0]


def _config_weigh(grads, losses, state, key, priorities, *, task_mask=None):
    del key
    grads, losses = check_grads(grads, losses, priorities, "config")
    if task_mask is not None:
        # Partial labels: ConFIG already leaves zero rows out (a zero unit row, beta_t = 0) and
        # the pseudo-inverse's cutoff is relative to the largest eigenvalue, which the zero
        # rows do not change: zeroing the absent rows gives the sub-problem's weights.
        grads = _mask.rows(grads, task_mask)
    weights, info = _config_weights(grads)
    return WeightingOutput(weights, state, info)


def config_weighting() -> Weighting:
    r"""ConFIG as a :class:`~imtl_jax.Weighting` (Liu et al., ICLR 2025, Eq. 2; TorchJD ``ConFIG``).

    With the unit rows ``u_t = g_t / ||g_t||`` stacked in ``U`` (a zero row stays zero), the
    conflict-free direction is ``d = U^+ 1`` (the least-norm ``d`` with ``u_t . d = 1`` for every
    t when the rows are linearly independent), and the update is
    ``(sum_t g_t . d_hat) d_hat`` with ``d_hat = d / ||d||``. Its cosine with every task gradient
    is the same positive number ``1 / ||d||``: no task conflicts with it, and each task's share
    is set by the angles alone (a per-task rescale of the gradients leaves the direction
    unchanged; only the length ``sum_t g_t . d_hat`` changes).

    On the Gramian: ``U^+ 1 = U^T K^+ 1`` with the cosine matrix ``K = U U^T`` (unit diagonal,
    pseudo-inverse with the eigenvalue cutoff ``10 T eps`` relative to the largest, so duplicate
    or parallel rows and T > F give a finite least-squares answer). With ``beta = K^+ 1``,
    ``d = sum_t (beta_t / ||g_t||) g_t`` and the weights are
    ``w_t = (sum_s ||g_s|| (K beta)_s / beta^T K beta) beta_t / ||g_t||``.
    ``info["cosines"]`` holds ``u_t . d_hat`` (T,). The paper's preference vector is 1 (as
    TorchJD's default ``SumWeighting``).

    Cost per step: the per-task gradients, the Gramian O(T^2 F), one (T, T) eigendecomposition.
    Stateless, deterministic. Gradient method: heads get their own loss gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> from imtl_jax.methods.config import config_weights
      >>> g = jnp.array([[1.0, 0.0], [-0.5, 1.0]])
      >>> d = config_weights(g) @ g
      >>> cos = g @ d / (jnp.linalg.norm(g, axis=1) * jnp.linalg.norm(d))
      >>> bool(jnp.allclose(cos[0], cos[1], atol=1e-6)) and bool(cos[0] > 0)
      True
    """
    return Weighting(name="config", init=stateless_init, weigh=_config_weigh, needs_grads=True,
                     weights_heads=False, supports_task_mask=True)


CONFIG = config_weighting()

register(Method("config", IDENTITY, CONFIG))
