"""The two interfaces every balancing method implements.

A *method* is a pair:

* a :class:`LossScaling` — maps raw task losses ``L`` (T,) and trainable per-task log-scales
  ``s`` (T,) to the scaled losses that are differentiated (IMTL-L: ``e^s L - s``; uncertainty:
  ``e^{-s} L + s``; identity);
* a :class:`Weighting` — maps per-task gradients of those scaled losses, stacked as a (T, F)
  matrix (F is a representation or a flattened parameter vector), plus the scaled losses, a
  state and a PRNG key, to weights ``w`` (T,). The shared update is ``sum_t w_t grad_t``.

The same :class:`Weighting` is called by the representation-level training step
(:func:`imtl_jax.mtl_step`) and by the optax aggregator over stacked per-task updates
(:func:`imtl_jax.aggregate`), so a new baseline is one function.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

PyTree = Any


class WeightingOutput(NamedTuple):
    """What a weighting returns.

    Attributes:
      weights: (T,) weights, same dtype as the inputs; the shared update is ``weights @ grads``.
      state: the new method state (same pytree structure and shapes as the input state).
      info: a dict of method-specific diagnostics (e.g. IMTL's common projection ``C``).
        Its structure must not depend on traced values.
    """

    weights: jax.Array
    state: PyTree
    info: dict


class Weighting(NamedTuple):
    """A rule that turns per-task gradients (and/or losses) into task weights.

    Attributes:
      name: registry name.
      init: ``init(num_tasks: int, dtype) -> state``; return ``()`` when stateless.
      weigh: ``weigh(grads, losses, state, key, priorities) -> WeightingOutput`` where
        ``grads`` is (T, F) (or ``None`` when ``needs_grads`` is False), ``losses`` (T,) are the
        scaled losses, ``key`` a PRNG key (or None) and ``priorities`` (T,) or None. Pure and
        jittable: no Python ``if`` on traced values.
      needs_grads: False for methods that weight from losses alone (EW, GLS, DWA, FAMO); the
        training step then skips the per-task gradients and costs what equal weighting costs.
      weights_heads: True when the weights multiply the whole loss (loss-weighting methods:
        heads receive ``w_t grad L_t``); False for gradient methods (IMTL-G, MGDA, PCGrad, ...),
        whose weights act on the shared parameters only while each head gets the gradient of
        its own (scaled) loss.
      supports_task_mask: True when ``weigh`` also accepts a keyword ``task_mask`` ((T,) bool,
        traced) for partial labels (see ``docs/partial_labels.md``). Its contract: the rows of
        ``grads`` and entries of ``losses`` of masked tasks are ignored (any value, NaN
        included), masked tasks get weight exactly 0, the present tasks get the weights of the
        same method on the sub-problem of the present tasks only, and the state's per-task
        entries of masked tasks are returned unchanged (its shared entries, e.g. a step counter,
        advance as in the sub-problem). ``weigh`` is only called with ``task_mask=`` when a mask
        is given, so a weighting without the keyword keeps working (and a mask given to it
        raises a ``ValueError`` naming the methods that support masks).
    """

    name: str
    init: Callable[[int, Any], PyTree]
    weigh: Callable[..., WeightingOutput]
    needs_grads: bool = True
    weights_heads: bool = False
    supports_task_mask: bool = False


class LossScaling(NamedTuple):
    """Per-task loss scaling with trainable log-scales ``s`` (T,).

    Attributes:
      name: registry name.
      scale: ``scale(losses, log_scales) -> scaled_losses`` (all (T,)).
      trainable: whether ``log_scales`` get a gradient (False for the identity scaling, whose
        log-scale gradient is exactly zero).
    """

    name: str
    scale: Callable[[jax.Array, jax.Array], jax.Array]
    trainable: bool = True


class Method(NamedTuple):
    """A named balancing method: a loss scaling composed with a weighting.

    Attributes:
      name: registry name, e.g. ``"imtl_h"``.
      scaling: the :class:`LossScaling` applied to raw losses first.
      weighting: the :class:`Weighting` applied to the scaled losses' gradients.
      level: ``"representation"`` (gradients w.r.t. the shared feature z, batch-summed) or
        ``"parameters"`` (gradients w.r.t. the flattened shared parameters: exact, T encoder
        VJPs).
    """

    name: str
    scaling: LossScaling
    weighting: Weighting
    level: str = "representation"


def stateless_init(num_tasks: int, dtype: Any = None) -> tuple:
    """``init`` for weightings without state."""
    del num_tasks, dtype
    return ()


Priorities = Optional[jax.Array]
