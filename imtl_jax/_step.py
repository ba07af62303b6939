"""The multi-task training step: one encoder forward, per-task feature gradients, one solve,
one encoder backward (Liu et al., ICLR 2021, Algorithm 1), for any registered method.

Data flow (everything below is one pure function, jittable as a whole)::

    batch --encoder(shared)--> z --heads--> L (T,) --scaling(log_scales)--> L~ (T,)
    per-task dL~_t/dz (T, B, ...)  --sum over batch-->  G (T, F)  --weighting--> w (T,)
    encoder VJP of  sum_t w_t dL~_t/dz   (one backward through the encoder)
    heads and log-scales: the gradient of their own scaled loss (times w_t for loss weightings)

Why the batch *sum*: the per-task feature gradient of a batch is the gradient of L_t with respect
to a shift ``delta`` added to every example's z, i.e. ``sum_b dL_t/dz_b``. Averaging instead of
summing multiplies every row of G by the same ``1/B``, which leaves IMTL-G's weights unchanged
(a uniform scale cancels, Theorem 2), so ``reduction="mean"`` gives the same alpha. Flattening
the batch into the vector instead (a (T, B*F) matrix) would be a different problem.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from imtl_jax._exact import parameter_level
from imtl_jax._method import (Method, PyTree, check_dim, check_update_form,
                              coordinate_weights_of)
from imtl_jax._validation import check_array, check_float_array, check_step_task_reads
from imtl_jax.methods import get_method
from imtl_jax.methods import _mask


class MTLParams(NamedTuple):
    """The trainable parameters of a multi-task model, as one optax-ready pytree.

    Attributes:
      shared: the encoder's parameters (any pytree).
      heads: the task heads' parameters: a pytree whose leaves have a leading task axis T (for
        :func:`stacked_task_losses`), a tuple of T pytrees (for a tuple of per-task loss
        functions), or any pytree (for a plain ``task_losses`` function).
      log_scales: (T,) float array of IMTL-L log-scales ``s`` (start at zeros). Always present,
        so that every method has the same parameter structure; methods without loss scaling
        give it an exactly-zero gradient.
    """

    shared: PyTree
    heads: PyTree
    log_scales: jax.Array


def shared_size(shared: PyTree) -> int:
    """The number of entries of a parameter pytree (F of the parameter level)."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(shared))


class StepAux(NamedTuple):
    """Diagnostics returned by the training step (all arrays; safe to log every step).

    Attributes:
      losses: (T,) raw task losses.
      scaled_losses: (T,) the losses after the method's scaling (``e^s L - s`` for IMTL-L/H).
      weights: (T,) the method's weights (alpha for IMTL-G/H), stop-gradient.
      scales: (T,) ``e^s`` (the loss scales of IMTL-L/H; ones otherwise).
      info: method-specific diagnostics, e.g. ``{"common_projection": C}`` for IMTL.
      all_finite: scalar bool, True when every loss and gradient is finite. Wrap the optimizer
        in ``optax.apply_if_finite`` to skip non-finite steps.
    """

    losses: jax.Array
    scaled_losses: jax.Array
    weights: jax.Array
    scales: jax.Array
    info: dict
    all_finite: jax.Array


@dataclasses.dataclass(frozen=True)
class StackedTaskLosses:
    """Task losses computed by one per-task function over heads stacked on a leading task axis.

    ``loss_fn(head_params_t, z, batch, t) -> scalar`` is vmapped over the task axis of the head
    parameters (and ``t = 0..T-1``), so task t's loss only ever touches head t: the training
    step then gets all per-task feature gradients for the cost of one backward through the
    heads, without pushing T cotangents through every head.

    Create with :func:`stacked_task_losses`.
    """

    loss_fn: Callable[..., jax.Array]

    def __call__(self, head_params: PyTree, z: jax.Array, batch: Any) -> jax.Array:
        num_tasks = _stacked_num_tasks(head_params)
        return jax.vmap(self.loss_fn, in_axes=(0, None, None, 0))(
            head_params, z, batch, jnp.arange(num_tasks))


def stacked_task_losses(loss_fn: Callable[..., jax.Array]) -> StackedTaskLosses:
    """Wraps a per-task loss ``loss_fn(head_params_t, z, batch, t) -> scalar`` for stacked heads.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> def head_loss(w_t, z, batch, t):  # a linear head per task, squared error
      ...     return jnp.mean((z @ w_t - batch["y"][:, t]) ** 2)
      >>> losses = imtl_jax.stacked_task_losses(head_loss)
      >>> losses(jnp.ones((2, 3)), jnp.ones((4, 3)), {"y": jnp.zeros((4, 2))})
      Array([9., 9.], dtype=float32)
    """
    return StackedTaskLosses(loss_fn)


TaskLosses = Union[Callable[..., jax.Array], StackedTaskLosses, Sequence[Callable[..., jax.Array]]]


def _check_float_leaves(tree: PyTree, name: str) -> None:
    """Raises TypeError naming ``name`` and the leaf when a parameter is not real floating point
    (the step differentiates every leaf: an integer leaf would get a ``float0`` gradient that
    optax cannot apply, or fail inside ``jax.grad``)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "(root)"
            raise TypeError(
                f"`{name}` leaf {where} has dtype {dtype} (shape {jnp.shape(leaf)}): every parameter "
                "must have a real floating-point dtype (the step differentiates it). Cast it, e.g. "
                "jnp.asarray(x, jnp.float32), or keep integer state out of the parameters "
                "(encoder_state with mtl_step(..., has_state=True), or a closure).")


def _stacked_num_tasks(head_params: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(head_params)
    if not leaves:
        raise ValueError("stacked heads: `head_params` has no array leaves.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "stacked heads: every leaf of `params.heads` must have the same leading task axis T; "
            f"got leading sizes {sorted(str(s) for s in sizes)}.")
    return int(sizes.pop())  # type: ignore[arg-type]  # None was excluded above


def _varying_axes(x) -> frozenset:
    """The mesh axes over which ``x`` varies inside shard_map (empty elsewhere)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))  # jax < 0.10


def _pcast_varying(x, axis_name):
    if hasattr(lax, "pcast"):
        return lax.pcast(x, axis_name, to="varying")
    return getattr(lax, "pvary")(x, axis_name)  # jax < 0.8.2  # noqa: B009


def _scalar_loss(loss):
    loss = check_float_array(loss, "task loss (one task's loss function output)")
    if loss.ndim != 0:
        raise ValueError("each task loss must be a scalar (rank-0); a task loss function "
                         f"returned shape {loss.shape}. Reduce it over the batch (e.g. mean).")
    return loss


def _scale_one(scaling, loss, log_scale, t=None):
    """Task ``t``'s scaled loss from its own raw loss and log-scale (the per-task passes; the
    scalings are elementwise). A ``scale`` with a ``scale_task(loss, log_scale, t)`` attribute
    (accumulate_step's scaling linearized at the whole batch's losses, which depends on the task
    index) is called through it."""
    loss = _scalar_loss(loss)
    scale_task = getattr(scaling.scale, "scale_task", None)
    if scale_task is not None and t is not None:
        return scale_task(loss, log_scale, t)
    return scaling.scale(loss[None], log_scale[None])[0]


def _gate(present, tree):
    """A masked task's loss inputs: ``where(present, x, stop_gradient(x))``. The values are
    unchanged, but the gradient of anything w.r.t. ``x`` through an absent task is *selected*
    to exactly 0 (select's transpose does not multiply), so a NaN loss or NaN partials of an
    absent task (garbage labels) never reach the shared feature, the heads or the scales."""
    return jax.tree_util.tree_map(lambda x: jnp.where(present, x, lax.stop_gradient(x)), tree)


def _stack_task_outputs(outs, heads):
    """(raw losses, scaled losses, ∂/∂z, head gradients, scale gradients) stacked over tasks from
    T outputs ``((scaled, raw), (gz, g_head, g_scale))`` of ``value_and_grad`` (heterogeneous heads)."""
    return (jnp.stack([o[0][1] for o in outs]), jnp.stack([o[0][0] for o in outs]),
            jnp.stack([o[1][0] for o in outs]), type(heads)(o[1][1] for o in outs),
            jnp.stack([o[1][2] for o in outs]))


def _gated_task(scaling, loss_of, present, t=None):
    """``(z, head_t, s_t) -> (scaled, raw)`` for one task, gated by ``present`` (see
    :func:`_gate`): both are 0 for an absent task, and so is every gradient."""
    def scaled(z_, head_t, s_t):
        z_, head_t, s_t = _gate(present, (z_, head_t, s_t))
        raw = _scalar_loss(loss_of(head_t, z_))
        raw = jnp.where(present, raw, jnp.zeros((), raw.dtype))
        ls = _scale_one(scaling, raw, s_t, t)
        return jnp.where(present, ls, jnp.zeros((), ls.dtype)), raw
    return scaled


def check_method_level(method: Method) -> None:
    """Static checks of a method's update form against its level: a weighting that returns a
    ``direction`` of its own (MoCo) is defined at ``level="parameters"`` (and in
    :func:`imtl_jax.aggregate`) only; a ValueError naming both otherwise."""
    weighting = method.weighting
    check_update_form(weighting, method.name)
    if getattr(weighting, "returns_direction", False) and method.level != "parameters":
        raise ValueError(
            f"method {method.name!r} updates along a direction of its own (returns_direction: "
            "e.g. MoCo's tracked-gradient combination), which exists only where the per-task rows "
            "are the gradients themselves: use it at level=\"parameters\" "
            f"(imtl_jax.methods.get_method({method.name!r})._replace(level=\"parameters\"), the "
            "registered default) or through imtl_jax.aggregate(); the representation level has no "
            "per-example cotangent for it (nor accumulate_step, the NNX/Linen helpers at the "
            "representation).")


def parameter_level_dim(shared: PyTree, feature_dim: Optional[int], name: str,
                        what: str = "the number of shared parameters") -> int:
    """F of a ``needs_dim`` method at ``level="parameters"``: the shared parameters' count;
    a given ``feature_dim`` (already checked to be an int >= 1) must equal it."""
    dim = shared_size(shared)
    if feature_dim is not None and feature_dim != dim:
        raise ValueError(f"`feature_dim={feature_dim}` but method {name!r} works at the parameter "
                         f"level, where F is {what}, {dim}; leave feature_dim out.")
    return dim


class _NoState:
    """Sentinel: no encoder state given (``None`` and ``()`` are valid states)."""

    def __repr__(self) -> str:
        return "<no encoder state>"


_NO_STATE: Any = _NoState()


def _add_note(err: BaseException, text: str) -> None:
    """Adds ``text`` to the exception's notes (shown under the message; Python >= 3.11)."""
    add = getattr(err, "add_note", None)
    if add is not None:
        add(text)


def _stateful_output(out):
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("with has_state=True the encoder must return a pair (z, new_encoder_state), "
                        f"got {type(out).__name__}; e.g. for Flax Linen return "
                        "model.apply(variables, x, mutable=['batch_stats'], rngs=...).")
    return out


class MTLStep:
    """A jittable multi-task training step for one method. Create with :func:`mtl_step`.

    ``step.init(params)`` returns the method state (``step.init(params, batch)`` for a method
    with per-coordinate state, ``"excess_mtl"``); ``step(params, state, batch, key=...,
    priorities=...)`` returns ``(grads, new_state, aux)`` where ``grads`` has the structure of
    ``params`` (feed it to any optax optimizer) and ``aux`` is a :class:`StepAux`.
    """

    def __init__(self, encoder: Callable[..., Any], task_losses: TaskLosses,
                 method: Union[str, Method] = "imtl_h", *, reduction: str = "sum",
                 axis_name: Optional[str] = None, has_state: bool = False):
        if not isinstance(has_state, bool):
            raise TypeError(f"`has_state` must be a bool, got {has_state!r}.")
        if not callable(encoder):
            form = ("(shared_params, encoder_state, batch, key) -> (z, new_encoder_state)"
                    if has_state else "(shared_params, batch) -> z")
            raise TypeError(f"`encoder` must be callable {form}, got {encoder!r}.")
        if isinstance(task_losses, (list, tuple)):
            if not task_losses or not all(callable(f) for f in task_losses):
                raise TypeError("`task_losses` given as a sequence must hold T >= 1 callables "
                                "(head_params_t, z, batch) -> scalar.")
            task_losses = tuple(task_losses)
        elif not callable(task_losses):
            raise TypeError("`task_losses` must be a callable (head_params, z, batch) -> (T,) "
                            f"losses, a stacked_task_losses(...), or a tuple of callables; got {task_losses!r}.")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
        self.encoder = encoder
        self.task_losses = task_losses
        self.method = get_method(method)
        if self.method.level not in ("representation", "parameters"):
            raise ValueError(f"method {self.method.name!r} has unknown level {self.method.level!r}.")
        check_method_level(self.method)
        self.reduction = reduction
        self.axis_name = axis_name
        self.has_state = has_state

    def _pmean(self, tree):
        """Mean over the data-parallel axis (inside ``shard_map``/``pmap``); identity otherwise."""
        return tree if self.axis_name is None else lax.pmean(tree, self.axis_name)

    def _varying(self, tree):
        """Marks values as device-varying over ``axis_name`` (shard_map's ``check_vma`` typing).

        Replicated parameters are device-invariant; differentiating through them would make
        JAX sum their gradients over devices implicitly (the transpose of the implicit cast),
        and the explicit mean below would then reduce twice. Casting first keeps one reduction.
        """
        if self.axis_name is None:
            return tree

        def cast(x):
            if self.axis_name in _varying_axes(x):
                return x
            return _pcast_varying(x, self.axis_name)

        return jax.tree_util.tree_map(cast, tree)

    def __repr__(self) -> str:
        state = ", has_state=True" if self.has_state else ""
        return f"MTLStep(method={self.method.name!r}, reduction={self.reduction!r}{state})"

    # ----------------------------------------------------------------------------------------
    def init(self, params: MTLParams, batch: Any = None, *, encoder_state: Any = _NO_STATE,
             feature_dim: Optional[int] = None) -> PyTree:
        """The method's initial state for ``params`` (``()`` for stateless methods).

        A method whose state is per coordinate (``weighting.needs_dim``: ExcessMTL's (T, F)
        accumulator) needs F, the number of columns of the per-task gradient matrix. At
        ``level="parameters"`` that is the number of shared parameters (from ``params``); at
        the representation level it is the per-example size of the encoder's output,
        ``prod(z.shape[1:])``, which ``params`` alone does not tell: give an example ``batch``
        (the encoder is traced abstractly on it, ``jax.eval_shape``: no computation, nothing
        changed, no encoder state or key consumed; with ``has_state=True`` also
        ``encoder_state=``) or the size as ``feature_dim=``. F excludes the batch axis, so one
        device's batch, the global batch or a micro-batch give the same F; with ``axis_name``
        the encoder's collectives are bound for the trace (call ``init`` outside ``shard_map``).
        Other methods ignore ``batch`` and ``encoder_state`` (a ``feature_dim`` given is
        checked all the same).

        Raises:
          ValueError: a ``needs_dim`` method at the representation level without ``batch`` or
            ``feature_dim``; a ``feature_dim`` that is not an int >= 1 or disagrees with
            ``batch`` or ``params``.
          TypeError: with ``has_state=True``, a ``batch`` without ``encoder_state=`` (as
            ``step(...)`` itself).
        """
        log_scales = self._check_params(params)
        weighting = self.method.weighting
        if feature_dim is not None:  # checked for every method: a bad value is a bug either way
            feature_dim = check_dim(feature_dim, self.method.name, "feature_dim")
        if not weighting.needs_dim:
            return weighting.init(log_scales.shape[0], log_scales.dtype)
        return weighting.init_state(log_scales.shape[0], log_scales.dtype,
                                    dim=self._feature_dim(params, batch, encoder_state, feature_dim))

    def _feature_dim(self, params: MTLParams, batch: Any, encoder_state: Any,
                     feature_dim: Optional[int]) -> int:
        """F for :meth:`init` (``feature_dim`` already checked): see there."""
        name = self.method.name
        if self.method.level == "parameters":
            return parameter_level_dim(params.shared, feature_dim, name)
        if batch is None:
            if feature_dim is None:
                raise ValueError(
                    f"method {name!r} keeps per-coordinate state of the shared feature's size F "
                    "(prod(z.shape[1:]), the encoder's output per example), which step.init(params) "
                    "cannot know: pass an example batch, step.init(params, batch)"
                    + (" with encoder_state=" if self.has_state else "")
                    + ", or the size, step.init(params, feature_dim=F).")
            return feature_dim
        if self.has_state:
            if encoder_state is _NO_STATE:
                raise TypeError("this step was built with has_state=True: pass the encoder's state "
                                "too, step.init(params, batch, encoder_state=...) (or feature_dim=F "
                                "instead of the batch).")

            def forward():
                return _stateful_output(self.encoder(params.shared, encoder_state, batch,
                                                     jax.random.key(0)))[0]
        else:
            if encoder_state is not _NO_STATE:
                raise TypeError("`encoder_state=` was given but the step was built without state "
                                "(mtl_step(..., has_state=True)).")

            def forward():
                return self.encoder(params.shared, batch)
        # init runs outside shard_map/pmap, but an encoder built for the data-parallel step may
        # use collectives over axis_name (a synchronized BatchNorm): bind the name(s) with a
        # size-1 vmap so the abstract trace sees the per-example shape it will see per device.
        names = () if self.axis_name is None else (
            (self.axis_name,) if isinstance(self.axis_name, str) else tuple(self.axis_name))
        for axis in names:
            forward = jax.vmap(forward, axis_name=axis, axis_size=1)
        try:
            z = jax.eval_shape(forward)
        except Exception as err:
            _add_note(err, "imtl_jax: raised by the encoder, traced abstractly on the example batch "
                           f"to find F for method {name!r}'s state in step.init(params, batch); "
                           "give the size instead, step.init(params, feature_dim=F), F = "
                           "prod(z.shape[1:]).")
            raise
        shape = tuple(jnp.shape(z))[len(names):]
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"`encoder` output must have a non-empty leading batch axis, got shape "
                             f"{shape}; give init a non-empty example batch.")
        dim = math.prod(shape[1:])
        if feature_dim is not None and feature_dim != dim:
            raise ValueError(f"`feature_dim={feature_dim}` but the encoder's output on `batch` has "
                             f"shape {shape}, F = {dim} per example; give one of the two.")
        return dim

    def _check_params(self, params) -> jax.Array:
        if not isinstance(params, MTLParams):
            raise TypeError("`params` must be an imtl_jax.MTLParams(shared, heads, log_scales), "
                            f"got {type(params).__name__}.")
        check_array(params.log_scales, "params.log_scales")
        log_scales = check_float_array(params.log_scales, "params.log_scales", ndim=1)
        _check_float_leaves(params.shared, "params.shared")
        _check_float_leaves(params.heads, "params.heads")
        num_tasks = log_scales.shape[0]
        if num_tasks < 1:
            raise ValueError(f"`params.log_scales` must have T >= 1 entries, got shape {log_scales.shape}.")
        if isinstance(self.task_losses, StackedTaskLosses):
            heads_t = _stacked_num_tasks(params.heads)
            if heads_t != num_tasks:
                raise ValueError(f"`params.heads` is stacked over {heads_t} tasks but "
                                 f"`params.log_scales` has shape {log_scales.shape}.")
        elif isinstance(self.task_losses, tuple):
            if not isinstance(params.heads, (tuple, list)) or len(params.heads) != len(self.task_losses):
                n = (f"{len(params.heads)} entries" if isinstance(params.heads, (tuple, list))
                     else f"a {type(params.heads).__name__ if not hasattr(params.heads, 'shape') else 'single array'}"
                          f" of shape {jnp.shape(params.heads)}")
                raise ValueError(f"`task_losses` has {len(self.task_losses)} functions but "
                                 f"`params.heads` has {n}; give a tuple of one head pytree per task.")
            if len(self.task_losses) != num_tasks:
                raise ValueError(f"`task_losses` has {len(self.task_losses)} functions but "
                                 f"`params.log_scales` has shape {log_scales.shape}.")
        return log_scales

    # ----------------------------------------------------------------------------------------
    def _per_task_pass(self, heads, z, batch, log_scales, mask=None):
        """Per-task scaled-loss gradients w.r.t. z (per example), heads and log-scales.

        Returns raw losses (T,), scaled losses (T,), z-grads (T, *z.shape), head grads (own
        scaled loss, unweighted; structure of ``heads``), log-scale grads (T,). With a task
        mask, every output of an absent task is exactly 0.
        """
        if mask is not None:
            return self._masked_per_task_pass(heads, z, batch, log_scales, mask)
        scaling = self.method.scaling
        tl = self.task_losses

        def one_task(loss_of, t):  # loss_of(head_t, z) -> raw scalar loss
            def scaled(z_, head_t, s_t):
                raw = loss_of(head_t, z_)
                return _scale_one(scaling, raw, s_t, t), raw
            return scaled

        if isinstance(tl, StackedTaskLosses):
            def per_task(head_t, s_t, t):
                f = one_task(lambda h, z_: tl.loss_fn(h, z_, batch, t), t)
                (ls, raw), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(z, head_t, s_t)
                return raw, ls, grads
            num_tasks = log_scales.shape[0]
            raw, ls, (gz, gh, gs) = jax.vmap(per_task)(heads, log_scales, jnp.arange(num_tasks))
            return raw, ls, gz, gh, gs

        if isinstance(tl, tuple):
            outs = []
            for t, loss_fn in enumerate(tl):  # heterogeneous heads: unrolled at trace time
                f = one_task(lambda h, z_, fn=loss_fn: fn(h, z_, batch), t)
                outs.append(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
                    z, heads[t], log_scales[t]))
            return _stack_task_outputs(outs, heads)

        # A plain function of all heads: T reverse passes through the heads (vmapped), the
        # generic fallback. Head and scale gradients come from one more VJP with ones.
        def scaled_all(z_, heads_, s_):
            raw_ = self._call_losses(heads_, z_, batch, s_.shape[0])
            return scaling.scale(raw_, s_), raw_

        ls, vjp, raw = jax.vjp(scaled_all, z, heads, log_scales, has_aux=True)
        gz = jax.vmap(lambda c: vjp(c)[0])(self._varying(jnp.eye(ls.shape[0], dtype=ls.dtype)))
        return raw, ls, gz, vjp, None

    def _masked_per_task_pass(self, heads, z, batch, log_scales, mask):
        """:meth:`_per_task_pass` for partial labels: each task's loss is gated (:func:`_gate`)."""
        scaling = self.method.scaling
        tl = self.task_losses
        if isinstance(tl, StackedTaskLosses):
            def per_task(head_t, s_t, t, present):
                f = _gated_task(scaling, lambda h, z_: tl.loss_fn(h, z_, batch, t), present, t)
                (ls, raw), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(z, head_t, s_t)
                return raw, ls, grads
            num_tasks = log_scales.shape[0]
            raw, ls, (gz, gh, gs) = jax.vmap(per_task)(heads, log_scales, jnp.arange(num_tasks), mask)
            return raw, ls, gz, gh, gs
        if isinstance(tl, tuple):
            outs = []
            for t, loss_fn in enumerate(tl):
                f = _gated_task(scaling, lambda h, z_, fn=loss_fn: fn(h, z_, batch), mask[t], t)
                outs.append(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
                    z, heads[t], log_scales[t]))
            return _stack_task_outputs(outs, heads)
        ls, vjp, raw = jax.vjp(lambda z_, h_, s_: self._gated_scaled_losses(h_, z_, batch, s_, mask),
                               z, heads, log_scales, has_aux=True)
        gz = jax.vmap(lambda c: vjp(c)[0])(self._varying(jnp.eye(ls.shape[0], dtype=ls.dtype)))
        gz = jnp.where(mask.reshape((-1,) + (1,) * (gz.ndim - 1)), gz, jnp.zeros((), gz.dtype))
        return raw, ls, gz, vjp, None

    def _gated_scaled_losses(self, heads, z, batch, log_scales, mask):
        """``(scaled (T,), raw (T,))`` with absent tasks gated (:func:`_gate`): 0 and no gradient.

        For a generic ``task_losses`` function of all heads the tasks cannot be separated: an
        absent task's entries are selected to 0, so its gradient is 0 as long as its loss is
        finite (use ``stacked_task_losses`` or a tuple when absent labels may give NaN).
        """
        scaling = self.method.scaling
        tl = self.task_losses
        num_tasks = log_scales.shape[0]
        if isinstance(tl, StackedTaskLosses):
            def per_task(head_t, s_t, t, present):
                return _gated_task(scaling, lambda h, z_: tl.loss_fn(h, z_, batch, t), present,
                                   t)(z, head_t, s_t)
            return jax.vmap(per_task)(heads, log_scales, jnp.arange(num_tasks), mask)
        if isinstance(tl, tuple):
            outs = [_gated_task(scaling, lambda h, z_, fn=fn: fn(h, z_, batch), mask[t], t)(
                        z, heads[t], log_scales[t])
                    for t, fn in enumerate(tl)]
            return jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])
        raw = self._call_losses(heads, z, batch, num_tasks)
        raw = jnp.where(mask, raw, jnp.zeros((), raw.dtype))
        scaled = scaling.scale(raw, _gate(mask, log_scales))
        return jnp.where(mask, scaled, jnp.zeros((), scaled.dtype)), raw

    def _weighted_z_cotangent(self, heads, z, batch, log_scales, w, gh, mask=None):
        """``d/dz sum_t w_t L~_t(z)``, the encoder's cotangent: one more backward through the heads.

        Recomputing it, instead of contracting ``w`` with the per-task z-gradients of
        :meth:`_per_task_pass`, leaves those (T, B, F) gradients with a single consumer, their
        batch sum, so XLA fuses the two and never materializes the (T, B, F) tensor
        (measured, CelebA-like MLP, T = 40, batch 256, F = 512: step 1.95x -> 1.10x EW, peak
        memory 2.10x -> 1.01x EW; the extra pass costs what the heads' backward costs).
        """
        if not isinstance(self.task_losses, (StackedTaskLosses, tuple)):
            return gh(self._varying(w))[0]  # generic: reuse the forward's VJP
        if mask is not None:
            return jax.grad(lambda z_: jnp.sum(
                w * self._gated_scaled_losses(heads, z_, batch, log_scales, mask)[0]))(z)
        scaling = self.method.scaling
        tl = self.task_losses

        def weighted(z_):
            if isinstance(tl, StackedTaskLosses):
                raw_ = tl(heads, z_, batch)
            else:
                raw_ = jnp.stack([f(h, z_, batch) for f, h in zip(tl, heads)])
            return jnp.sum(w * scaling.scale(raw_, log_scales))

        return jax.grad(weighted)(z)

    def _call_losses(self, heads, z, batch, num_tasks):
        losses_fn: Callable[..., jax.Array] = self.task_losses  # type: ignore[assignment]  # generic form
        raw = losses_fn(heads, z, batch)
        raw = check_float_array(raw, "task_losses(...) output", ndim=1)
        if raw.shape != (num_tasks,):
            raise ValueError(f"`task_losses` returned shape {raw.shape} but `params.log_scales` "
                             f"has shape ({num_tasks},); return one loss per task.")
        return raw

    # ----------------------------------------------------------------------------------------
    def __call__(self, params: MTLParams, state: PyTree, batch: Any, *,
                 key: Optional[jax.Array] = None, priorities: Optional[jax.Array] = None,
                 encoder_state: Any = _NO_STATE, task_mask: Optional[jax.Array] = None) -> tuple:
        """One step: ``(grads, method_state, aux)``, or with ``has_state=True``
        ``(grads, method_state, new_encoder_state, aux)``.

        Args:
          params: the :class:`MTLParams`.
          state: the method state (``step.init(params)``).
          batch: any pytree; passed to the encoder and the task losses as is.
          key: a PRNG key. With ``has_state=True`` the encoder receives it unchanged (dropout)
            and a randomized method (PCGrad) receives ``jax.random.fold_in(key, 1)``;
            otherwise the method receives it.
          priorities: (T,) task priorities for the methods that take them (IMTL).
          encoder_state: the encoder's non-trainable state (``has_state=True`` only).
          task_mask: (T,) bool or 0/1, traced (partial labels): which tasks have labels in
            this batch. An absent task gets no gradient (shared, head, log-scale: exactly 0,
            even when its loss is NaN), weight 0, is left out of the method's solve and does
            not advance its per-task method state; its entries of ``aux.losses`` and
            ``aux.scaled_losses`` are 0. The present tasks get what the same method gives on
            the sub-problem of the present tasks only. One compile serves every mask. Only
            the methods with ``weighting.supports_task_mask`` accept it (a ``ValueError``
            lists them); ``None`` (default) traces the unmasked step unchanged. See
            ``docs/partial_labels.md``.
        """
        log_scales = self._check_params(params)
        params = self._varying(params)
        num_tasks = log_scales.shape[0]
        method = self.method
        weighting = method.weighting
        mask = None
        if task_mask is not None:
            _mask.require_mask_support(weighting, method.name)
            mask = _mask.check_task_mask(task_mask, num_tasks)
        if self.has_state:
            if encoder_state is _NO_STATE:
                raise TypeError("this step was built with has_state=True: pass the encoder's state, "
                                "step(params, state, batch, encoder_state=...), e.g. the "
                                "'batch_stats' collection (use () for an encoder without state).")
            encoder_key = key
            key = None if key is None else jax.random.fold_in(key, 1)
            z, encoder_vjp, new_encoder_state = jax.vjp(
                lambda sp: _stateful_output(self.encoder(sp, encoder_state, batch, encoder_key)),
                params.shared, has_aux=True)
            new_encoder_state = self._sync_state(lax.stop_gradient(new_encoder_state))
        else:
            if encoder_state is not _NO_STATE:
                raise TypeError("`encoder_state=` was given but the step was built without state: "
                                "build it with mtl_step(..., has_state=True) and an encoder "
                                "(shared_params, encoder_state, batch, key) -> (z, new_encoder_state).")
            z, encoder_vjp = jax.vjp(lambda sp: self.encoder(sp, batch), params.shared)
            new_encoder_state = _NO_STATE
        z = check_float_array(z, "encoder(...) output")
        if z.ndim < 1 or z.shape[0] < 1:
            raise ValueError(f"`encoder` output must have a non-empty leading batch axis, got shape {z.shape}"
                             " (an empty batch, or an encoder that drops the batch axis); skip empty "
                             "batches, e.g. drop the last partial batch.")
        check_step_task_reads(self.task_losses, params.heads, z, batch, num_tasks)

        if not weighting.needs_grads and method.level == "representation":
            grads, new_state, aux = self._loss_weighted(params, state, batch, z, encoder_vjp, key,
                                                        priorities, mask)
            return self._outputs(grads, new_state, new_encoder_state, aux)

        raw, scaled, gz, gh, gs = self._per_task_pass(params.heads, z, batch, params.log_scales, mask)
        if raw.shape != (num_tasks,):
            raise ValueError(f"task losses have shape {raw.shape} but `params.log_scales` has "
                             f"shape ({num_tasks},).")
        if method.level == "parameters":  # exact: T encoder VJPs, Gramian, see _exact.py
            raw, scaled = self._pmean((raw, scaled))
            shared_grads, out = parameter_level(encoder_vjp, gz, weighting, lax.stop_gradient(scaled),
                                                state, key, priorities, self._pmean,
                                                task_mask=mask, name=method.name)
            w = lax.stop_gradient(out.weights).astype(scaled.dtype)
        else:
            per_example = gz.reshape(num_tasks, z.shape[0], -1)
            # A bfloat16/float16 model: the batch sum accumulates in float32 and the weights are
            # solved in float32 (they are cast back to the model's dtype below).
            acc = jnp.promote_types(per_example.dtype, jnp.float32)
            matrix = (jnp.sum(per_example, axis=1, dtype=acc) if self.reduction == "sum"
                      else jnp.mean(per_example, axis=1, dtype=acc))
            if self.axis_name is not None:
                # One all-reduce carries the (T, F) matrix and the (T,) losses together.
                packed = self._pmean(jnp.concatenate(
                    [matrix, raw[:, None].astype(acc), scaled[:, None].astype(acc)], axis=1))
                matrix = packed[:, :-2]
                raw, scaled = packed[:, -2].astype(raw.dtype), packed[:, -1].astype(scaled.dtype)
            out = _mask.weigh(weighting, lax.stop_gradient(matrix), lax.stop_gradient(scaled), state,
                              key, priorities, mask, method.name)
            w = lax.stop_gradient(out.weights).astype(scaled.dtype)
            if weighting.per_coordinate:
                # Per-coordinate weights C (T, F): every example's cotangent is
                # sum_t C_t * dL~_t/dz_b, from the per-example per-task gradients (formed only
                # for these methods; the weighted path below never materializes them).
                coords = lax.stop_gradient(coordinate_weights_of(out, matrix.shape, method.name))
                cotangent = jnp.sum(per_example.astype(acc) * coords.astype(acc)[:, None, :], axis=0)
                cotangent = cotangent.reshape(z.shape)
            else:
                cotangent = self._weighted_z_cotangent(params.heads, z, batch, params.log_scales, w,
                                                       gh, mask)
            (shared_grads,) = encoder_vjp(self._varying(cotangent.astype(z.dtype)))

        head_w = w if weighting.weights_heads else jnp.ones_like(w)
        if mask is not None:
            head_w = jnp.where(mask, head_w, jnp.zeros((), head_w.dtype))
        if gs is None:  # generic heads: one more VJP with the head cotangent
            _, head_grads, scale_grads = gh(self._varying(head_w))
        else:
            head_grads = jax.tree_util.tree_map(
                lambda x: x * head_w.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), gh) \
                if isinstance(self.task_losses, StackedTaskLosses) else type(gh)(
                    jax.tree_util.tree_map(lambda x, wt=head_w[t]: x * wt.astype(x.dtype), g)
                    for t, g in enumerate(gh))
            scale_grads = head_w * gs
        if not method.scaling.trainable:
            scale_grads = jnp.zeros_like(log_scales)
        grads = self._pmean(MTLParams(shared_grads, head_grads, scale_grads.astype(log_scales.dtype)))
        return self._outputs(grads, out.state, new_encoder_state,
                             self._aux(raw, scaled, w, log_scales, out.info, grads))

    @staticmethod
    def _outputs(grads, method_state, new_encoder_state, aux) -> tuple:
        if new_encoder_state is _NO_STATE:
            return grads, method_state, aux
        return grads, method_state, new_encoder_state, aux

    def _sync_state(self, tree):
        """Inside ``shard_map``: averages the device-varying floating leaves of the new encoder
        state over ``axis_name`` (per-device BatchNorm statistics become their mean, so the
        replicas stay identical); leaves that are already device-invariant (statistics of a
        BatchNorm synchronized with its own ``axis_name``, counters) are returned as they are."""
        if self.axis_name is None:
            return tree

        def sync(x):
            if (jnp.issubdtype(jnp.result_type(x), jnp.inexact)
                    and self.axis_name in _varying_axes(x)):
                return lax.pmean(x, self.axis_name)
            return x

        return jax.tree_util.tree_map(sync, tree)

    def _loss_weighted(self, params, state, batch, z, encoder_vjp, key, priorities, mask=None):
        """Methods whose weights depend on the losses only: a single VJP, the cost of EW."""
        scaling = self.method.scaling
        num_tasks = params.log_scales.shape[0]

        def scaled_all(z_, heads_, s_):
            if mask is not None:  # partial labels: absent tasks gated (0, no gradient)
                return self._gated_scaled_losses(heads_, z_, batch, s_, mask)
            if isinstance(self.task_losses, tuple):
                raw_ = jnp.stack([_scalar_loss(f(h, z_, batch)) for f, h in zip(self.task_losses, heads_)])
            elif isinstance(self.task_losses, StackedTaskLosses):
                tl = self.task_losses
                raw_ = jax.vmap(lambda h, t: _scalar_loss(tl.loss_fn(h, z_, batch, t)))(
                    heads_, jnp.arange(num_tasks))
            else:
                raw_ = self.task_losses(heads_, z_, batch)
            raw_ = check_float_array(raw_, "task losses", ndim=1)
            if raw_.shape != (num_tasks,):
                raise ValueError(f"task losses have shape {raw_.shape} but `params.log_scales` "
                                 f"has shape ({num_tasks},).")
            return scaling.scale(raw_, s_), raw_

        scaled, vjp, raw = jax.vjp(scaled_all, z, params.heads, params.log_scales, has_aux=True)
        global_scaled, raw = self._pmean((scaled, raw))
        out = _mask.weigh(self.method.weighting, None, lax.stop_gradient(global_scaled), state, key,
                          priorities, mask, self.method.name)
        w = lax.stop_gradient(out.weights).astype(scaled.dtype)
        gz, head_grads, scale_grads = vjp(self._varying(w))
        if not self.method.weighting.weights_heads:
            ones = jnp.ones_like(w) if mask is None else jnp.where(mask, 1.0, 0.0).astype(w.dtype)
            _, head_grads, scale_grads = vjp(self._varying(ones))
        (shared_grads,) = encoder_vjp(gz)
        if not scaling.trainable:
            scale_grads = jnp.zeros_like(params.log_scales)
        grads = self._pmean(MTLParams(shared_grads, head_grads, scale_grads))
        return grads, out.state, self._aux(raw, global_scaled, w, params.log_scales, out.info, grads)

    @staticmethod
    def _aux(raw, scaled, w, log_scales, info, grads) -> StepAux:
        finite = jnp.all(jnp.isfinite(raw)) & jnp.all(jnp.isfinite(w))
        for leaf in jax.tree_util.tree_leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        return StepAux(losses=raw, scaled_losses=scaled, weights=w, scales=jnp.exp(log_scales),
                       info=info, all_finite=finite)


def mtl_step(encoder: Callable[..., Any], task_losses: TaskLosses,
             method: Union[str, Method] = "imtl_h", *, reduction: str = "sum",
             axis_name: Optional[str] = None, has_state: bool = False) -> MTLStep:
    """Builds the multi-task training step for ``method`` (default: the paper's IMTL-H).

    Args:
      encoder: ``encoder(shared_params, batch) -> z``, the shared representation with a leading
        batch axis (any trailing shape). With ``has_state=True``:
        ``encoder(shared_params, encoder_state, batch, key) -> (z, new_encoder_state)``.
      task_losses: the task losses, in one of three forms:
        ``stacked_task_losses(loss_fn)`` with ``loss_fn(head_params_t, z, batch, t) -> scalar``
        and heads stacked on a leading task axis (fastest: each task touches only its head);
        a tuple of T functions ``(head_params_t, z, batch) -> scalar`` with ``params.heads`` a
        tuple of T pytrees (heterogeneous heads); or one function
        ``(head_params, z, batch) -> (T,)`` (generic; T backward passes through the heads).
      method: a registered name (see :func:`imtl_jax.methods.method_names`) or a
        :class:`imtl_jax.Method`. ``"imtl_h"`` (IMTL), ``"imtl_g"``, ``"imtl_g_exact"``,
        ``"imtl_l"``, ``"equal"``, and the baselines.
      reduction: ``"sum"`` (default) or ``"mean"`` over the batch of the per-example feature
        gradients; both give the same IMTL-G weights (see the module docstring).
      axis_name: the mapped data-parallel axis when the step runs inside ``jax.shard_map`` (or
        ``pmap``) over a batch shard per device: the (T, F) feature gradients and losses are
        averaged across devices in one all-reduce before the solve, and the gradients after.
        Leave ``None`` under plain ``jax.jit`` with a sharded batch (``NamedSharding``): XLA
        then inserts the same all-reduce itself. With ``has_state=True`` the new encoder state's
        device-varying floating leaves (per-device BatchNorm statistics) are averaged over
        ``axis_name``; a BatchNorm given the same ``axis_name`` (synchronized statistics)
        already returns identical statistics on every device.
      has_state: the encoder carries non-trainable state (BatchNorm running statistics, any
        mutable collection) and/or takes a PRNG key (dropout). The encoder is then
        ``encoder(shared_params, encoder_state, batch, key) -> (z, new_encoder_state)``, run
        once per step (one forward, for every method and both levels, so the state advances
        exactly as in a plain training step); ``key`` is the step's ``key=`` argument (None when
        not given). Flax Linen: ``model.apply({"params": p, **state}, x, train=True,
        rngs={"dropout": key}, mutable=["batch_stats"])`` is such a pair.

    Returns:
      An :class:`MTLStep`: ``state = step.init(params)`` (``step.init(params, batch)`` for
      ``"excess_mtl"``, whose state has the shared feature's size, see :meth:`MTLStep.init`);
      ``grads, state, aux = step(params, state, batch, key=None, priorities=None,
      task_mask=None)`` (``task_mask``: partial labels, see :meth:`MTLStep.__call__`), or with
      ``has_state=True``
      ``grads, state, encoder_state, aux = step(params, state, batch, encoder_state=...,
      key=None, priorities=None)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, imtl_jax
      >>> def encoder(w, batch): return jnp.tanh(batch["x"] @ w)
      >>> def head_loss(v_t, z, batch, t): return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)
      >>> step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params = imtl_jax.MTLParams(shared=jax.random.normal(k1, (3, 4)),
      ...                             heads=jax.random.normal(k2, (2, 4)), log_scales=jnp.zeros(2))
      >>> batch = {"x": jax.random.normal(k3, (8, 3)), "y": jnp.ones((8, 2))}
      >>> opt = optax.adam(1e-2); opt_state = opt.init(params); state = step.init(params)
      >>> @jax.jit
      ... def train(params, opt_state, state, batch):
      ...     grads, state, aux = step(params, state, batch)
      ...     updates, opt_state = opt.update(grads, opt_state, params)
      ...     return optax.apply_updates(params, updates), opt_state, state, aux
      >>> params, opt_state, state, aux = train(params, opt_state, state, batch)
      >>> float(aux.weights.sum())  # IMTL-G weights sum to one
      1.0

      An encoder with state and randomness (here a running mean and dropout):

      >>> def encoder(w, stats, batch, key):
      ...     h = jnp.tanh(batch["x"] @ w)
      ...     keep = jax.random.bernoulli(key, 0.9, h.shape)
      ...     return jnp.where(keep, h / 0.9, 0.0), 0.9 * stats + 0.1 * h.mean(0)
      >>> step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), has_state=True)
      >>> grads, state, stats, aux = step(params, step.init(params), batch,
      ...                                 encoder_state=jnp.zeros(4), key=jax.random.key(1))
      >>> stats.shape
      (4,)
    """
    return MTLStep(encoder, task_losses, method, reduction=reduction, axis_name=axis_name,
                   has_state=has_state)
