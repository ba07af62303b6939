"""IMTL-L: learnable per-task loss scales (Liu et al., ICLR 2021, Sec. 3.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imtl_jax._validation import check_float_array


def scale_losses(losses: jax.Array, log_scales: jax.Array) -> jax.Array:
    r"""IMTL-L scaled losses ``e^{s_t} L_t - s_t``.

    ``d/ds_t = e^{s_t} L_t - 1``, so at the optimum ``s_t* = -log L_t`` and the scaled loss's
    gradient ``e^{s*} grad L_t = grad log L_t`` is free of the loss's scale. The ``-s_t`` term
    stops ``s_t -> -inf``. Equivalent to uncertainty weighting up to a factor 2 and the sign of s.

    Args:
      losses: (T,) raw task losses (positive).
      log_scales: (T,) learnable log-scales ``s`` (start at 0).

    Returns:
      (T,) scaled losses in the promoted dtype of the inputs.

    Raises:
      TypeError: non-float inputs.  ValueError: ranks or task counts differ.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> scaled = imtl_jax.scale_losses(jnp.array([2.0, 0.5]), jnp.array([0.0, 1.0]))
      >>> [round(v, 4) for v in scaled.tolist()]  # [e^0 * 2 - 0, e^1 * 0.5 - 1]
      [2.0, 0.3591]
    """
    losses = check_float_array(losses, "losses", ndim=1)
    log_scales = check_float_array(log_scales, "log_scales", ndim=1)
    if losses.shape[0] < 1:
        raise ValueError(f"`losses` must have T >= 1 entries, got shape {losses.shape}.")
    if losses.shape != log_scales.shape:
        raise ValueError(
            f"`losses` has shape {losses.shape} but `log_scales` has shape {log_scales.shape}; "
            "both must be (T,) with the same T."
        )
    return jnp.exp(log_scales) * losses - log_scales
