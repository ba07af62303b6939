"""IMTL-G, IMTL-L and IMTL-H (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

Registered names:

* ``imtl_h`` — the paper's IMTL (Algorithm 1): IMTL-L scaled losses ``e^s L - s``; shared
  parameters get ``sum_t alpha_t grad(e^{s_t} L_t)`` with alpha from IMTL-G on the scaled
  losses' gradients w.r.t. the shared feature z; heads and scales get their own scaled loss.
* ``imtl_g`` — IMTL-G on the raw losses' z-gradients (Sec. 3.2, ``grad_z``).
* ``imtl_g_exact`` — IMTL-G on the raw losses' gradients w.r.t. the shared parameters
  (the paper's "IMTL-G (exact)", T encoder VJPs).
* ``imtl_l`` — IMTL-L alone (Sec. 3.1): equal weights on the scaled losses.
"""

from __future__ import annotations

import functools

from imtl_jax._imtl_g import imtl_g_solve
from imtl_jax._loss_scaling import scale_losses
from imtl_jax._method import LossScaling, Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods import register
from imtl_jax.methods.equal import EQUAL, IDENTITY


def _imtl_g_weigh(grads, losses, state, key, priorities, *, nonconflicting: bool):
    del losses, key
    res = imtl_g_solve(grads, priorities=priorities, nonconflicting=nonconflicting)
    return WeightingOutput(res.weights, state, {"common_projection": res.common_projection})


def imtl_g_weighting(*, nonconflicting: bool = False) -> Weighting:
    """The IMTL-G :class:`~imtl_jax.Weighting` (see :func:`imtl_jax.imtl_g_solve`).

    Args:
      nonconflicting: flip the sign of alpha when the common projection is negative.
    """
    return Weighting(
        name="imtl_g" if not nonconflicting else "imtl_g_nonconflicting",
        init=stateless_init,
        weigh=functools.partial(_imtl_g_weigh, nonconflicting=bool(nonconflicting)),
        needs_grads=True,
        weights_heads=False,
    )


IMTL_G = imtl_g_weighting()
IMTL_L = LossScaling(name="imtl_l", scale=scale_losses, trainable=True)

register(Method("imtl_h", IMTL_L, IMTL_G))
register(Method("imtl_g", IDENTITY, IMTL_G))
register(Method("imtl_g_exact", IDENTITY, IMTL_G, level="parameters"))
register(Method("imtl_l", IMTL_L, EQUAL))
