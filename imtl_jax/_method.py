"""The two interfaces every balancing method implements.

A *method* is a pair:

* a :class:`LossScaling` — maps raw task losses ``L`` (T,) and trainable per-task log-scales
  ``s`` (T,) to the scaled losses that are differentiated (IMTL-L: ``e^s L - s``; uncertainty:
  ``e^{-s} L + s``; identity);
* a :class:`Weighting` — maps per-task gradients of those scaled losses, stacked as a (T, F)
  matrix (F is a representation or a flattened parameter vector), plus the scaled losses, a
  state and a PRNG key, to weights ``w`` (T,). The shared update is ``sum_t w_t grad_t``.
  A weighting whose state has per-coordinate entries (ExcessMTL's (T, F) accumulator) sets
  ``needs_dim``: its state is made by :meth:`Weighting.init_state` with ``dim=F``, which every
  caller that makes method state passes (see :meth:`imtl_jax.MTLStep.init`).
  Two other update forms, each announced by a static flag so that every caller knows before
  tracing: ``per_coordinate`` (GradDrop: per-coordinate weights ``C`` (T, F), the update
  ``sum_t C_t * grad_t``; every path) and ``returns_direction`` (MoCo: the update is a vector
  ``d`` (F,) of its own, not a combination of the current rows; the parameter level of
  :func:`imtl_jax.mtl_step` and :func:`imtl_jax.aggregate` only).

The same :class:`Weighting` is called by the representation-level training step
(:func:`imtl_jax.mtl_step`) and by the optax aggregator over stacked per-task updates
(:func:`imtl_jax.aggregate`), so a new baseline is one function.
"""

from __future__ import annotations

import operator
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
      coordinate_weights: ``None``, or with :attr:`Weighting.per_coordinate` a (T, F) array ``C``
        of per-coordinate weights: the shared update is ``sum_t C_t * grads_t`` (elementwise),
        not ``weights @ grads`` (``weights`` is then for logs, e.g. ``C``'s mean over
        coordinates). At the representation level ``C`` multiplies every example's gradient
        ``dL_t/dz_b``; at the parameter level and in :func:`imtl_jax.aggregate` it is split
        over the parameter leaves as the flattened gradient is.
      direction: ``None``, or with :attr:`Weighting.returns_direction` the (F,) shared update
        itself (``weights`` again for logs). Only defined where the rows are the gradient
        itself: the parameter level and :func:`imtl_jax.aggregate`.
    """

    weights: jax.Array
    state: PyTree
    info: dict
    coordinate_weights: Optional[jax.Array] = None
    direction: Optional[jax.Array] = None


class Weighting(NamedTuple):
    """A rule that turns per-task gradients (and/or losses) into task weights.

    Attributes:
      name: registry name.
      init: ``init(num_tasks: int, dtype) -> state``; return ``()`` when stateless. With
        ``needs_dim``: ``init(num_tasks, dtype, dim=F)``. Callers go through
        :meth:`init_state`, which passes ``dim`` only where it is needed.
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
      needs_dim: True when the state depends on F, the number of columns of ``grads`` (a
        per-coordinate accumulator, as ExcessMTL's (T, F) AdaGrad sums): ``init`` then takes
        ``dim=F`` as a keyword. Every place that makes method state knows F and passes it
        through :meth:`init_state`: :func:`imtl_jax.aggregate` (the parameters' size, from
        ``tx.init(params)``), :meth:`imtl_jax.MTLStep.init` (the shared parameters' size at
        ``level="parameters"``; at the representation level the per-example size of the
        encoder's output, from an example batch, ``step.init(params, batch)``, or given as
        ``feature_dim=``) and the NNX helper's ``train_step.init(model, batch)``. Default False:
        ``init(num_tasks, dtype)`` as before.
      per_coordinate: True when ``weigh`` returns ``coordinate_weights`` (T, F) (GradDrop): the
        shared update is ``sum_t C_t * grad_t``. Works on every path: at the representation
        level the step then forms the per-example per-task z-gradients (T, B, F) and sends
        ``sum_t C_t * dL_t/dz_b`` to the encoder (the weighted path of other methods is
        unchanged); the parameter level and :func:`imtl_jax.aggregate` contract ``C`` with the
        Jacobian leaf by leaf; :func:`imtl_jax.accumulate_step` replays the fixed ``C`` in its
        second pass. Requires ``needs_grads`` and ``weights_heads=False``.
      returns_direction: True when ``weigh`` returns ``direction`` (F,), the shared update
        itself (MoCo: a combination of tracked gradient estimates, not of the current rows).
        Defined at the parameter level of :func:`imtl_jax.mtl_step` (and so the NNX and Linen
        helpers with such a method) and in :func:`imtl_jax.aggregate`; the representation
        level (and so :func:`imtl_jax.accumulate_step`) raises a ``ValueError`` naming
        ``level="parameters"``. Requires ``needs_grads`` and ``weights_heads=False``.
    """

    name: str
    init: Callable[..., PyTree]
    weigh: Callable[..., WeightingOutput]
    needs_grads: bool = True
    weights_heads: bool = False
    supports_task_mask: bool = False
    needs_dim: bool = False
    per_coordinate: bool = False
    returns_direction: bool = False

    def init_state(self, num_tasks: int, dtype: Any = None, *, dim: Optional[int] = None) -> PyTree:
        """The initial state for ``num_tasks`` tasks and gradients of ``dim`` columns.

        ``init(num_tasks, dtype)``, or with ``needs_dim`` ``init(num_tasks, dtype, dim=dim)``
        (``dtype=None``: ``init(num_tasks)``, the weighting's own default); ``dim`` is ignored by
        a weighting that does not need it, so callers that know F pass it for every weighting.

        Raises:
          ValueError: ``needs_dim`` and ``dim`` missing or not a positive int.

        Example:
          >>> import imtl_jax
          >>> w = imtl_jax.methods.get_method("excess_mtl").weighting
          >>> w.needs_dim, w.init_state(2, dim=3).root_sum.shape
          (True, (2, 3))
          >>> imtl_jax.methods.get_method("famo").weighting.init_state(2, dim=3).logits.shape
          (2,)
        """
        args = (num_tasks,) if dtype is None else (num_tasks, dtype)  # None: init's own default
        if not self.needs_dim:
            return self.init(*args)
        return self.init(*args, dim=check_dim(dim, self.name))


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


def check_update_form(weighting: "Weighting", name: str) -> None:
    """Static consistency of the update-form flags (``per_coordinate``/``returns_direction``)."""
    per_coordinate = bool(getattr(weighting, "per_coordinate", False))
    direction = bool(getattr(weighting, "returns_direction", False))
    if not (per_coordinate or direction):
        return
    if per_coordinate and direction:
        raise ValueError(f"weighting {name!r} sets both per_coordinate and returns_direction; "
                         "set one.")
    flag = "per_coordinate" if per_coordinate else "returns_direction"
    if not weighting.needs_grads or weighting.weights_heads:
        raise ValueError(f"weighting {name!r} sets {flag}, which needs needs_grads=True and "
                         "weights_heads=False (its update acts on the shared part only).")


def check_output_form(out: WeightingOutput, weighting: "Weighting", name: str) -> None:
    """A ValueError when ``out`` carries ``coordinate_weights`` or a ``direction`` that the
    weighting's flags do not announce (static: whether a field is None is known at trace time);
    without the flag such an output would be silently used as ``weights @ grads``."""
    for field, flag in (("coordinate_weights", "per_coordinate"), ("direction", "returns_direction")):
        if getattr(out, field, None) is not None and not getattr(weighting, flag, False):
            raise ValueError(f"weighting {name!r} returned `{field}` but does not set {flag}=True: "
                             f"build the Weighting with {flag}=True (the update is then formed from "
                             f"`{field}`), or return {field}=None (the update is `weights @ grads`).")


def check_dim(dim: Any, name: str, arg: str = "dim") -> int:
    """``dim`` (F, the number of gradient columns) as an int >= 1, else a ValueError naming it
    (as ``arg``: ``"feature_dim"`` where the caller's argument has that name)."""
    if dim is None:  # init(num_tasks, dtype), or init_state without dim: name the fix
        raise ValueError(
            f"the {name!r} weighting keeps per-coordinate state of shape (T, F) (needs_dim): pass "
            "dim=F, init_state(num_tasks, dtype, dim=F) (init(num_tasks, dtype) cannot know F); F is the number of "
            "columns of the per-task gradient matrix (the per-example size of the shared feature at "
            "the representation level, the number of shared parameters at level='parameters', the "
            "parameters' size for aggregate()). The training step's init, the NNX train_step.init "
            "and aggregate()'s tx.init(params) pass F themselves.")
    bad = ValueError(f"`{arg}` (F, the number of gradient columns) must be an int >= 1, got {dim!r}.")
    if isinstance(dim, bool) or not hasattr(dim, "__index__"):
        raise bad
    try:
        dim = operator.index(dim)
    except TypeError:  # an array with __index__ but not a scalar
        raise bad from None
    if dim < 1:
        raise bad
    return dim


def stateless_init(num_tasks: int, dtype: Any = None) -> tuple:
    """``init`` for weightings without state."""
    del num_tasks, dtype
    return ()


Priorities = Optional[jax.Array]


def coordinate_weights_of(out: WeightingOutput, shape: tuple, name: str) -> jax.Array:
    """``out.coordinate_weights`` of a ``per_coordinate`` weighting, checked to be ``shape``
    (T, F) (static: a ValueError naming the weighting otherwise)."""
    coords = out.coordinate_weights
    if coords is None or tuple(jax.numpy.shape(coords)) != tuple(shape):
        got = None if coords is None else tuple(jax.numpy.shape(coords))
        raise ValueError(f"weighting {name!r} has per_coordinate=True, so its output needs "
                         f"coordinate_weights of shape {tuple(shape)} (T, F), got {got}.")
    return coords


def direction_of(out: WeightingOutput, size: int, name: str) -> jax.Array:
    """``out.direction`` of a ``returns_direction`` weighting, checked to be (F,) = (size,)."""
    direction = out.direction
    if direction is None or tuple(jax.numpy.shape(direction)) != (size,):
        got = None if direction is None else tuple(jax.numpy.shape(direction))
        raise ValueError(f"weighting {name!r} has returns_direction=True, so its output needs a "
                         f"direction of shape ({size},) (F,), got {got}.")
    return direction


def unflatten_like(flat: jax.Array, tree: PyTree, leading: int = 0) -> PyTree:
    """Splits the last axis of ``flat`` over the leaves of ``tree`` in ``tree_leaves`` order
    (the order in which the (T, P) matrix was concatenated), each piece reshaped to the leaf's
    shape without its first ``leading`` axes (``flat`` keeps its own leading axes)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    pieces, start = [], 0
    head = tuple(jax.numpy.shape(flat)[:-1])
    for leaf in leaves:
        shape = tuple(jax.numpy.shape(leaf))[leading:]
        size = 1
        for n in shape:
            size *= int(n)
        pieces.append(flat[..., start:start + size].reshape(head + shape))
        start += size
    return jax.tree_util.tree_unflatten(treedef, pieces)
