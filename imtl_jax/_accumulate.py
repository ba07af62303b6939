"""Gradient accumulation over micro-batches, with the weights of the whole batch.

* :func:`accumulate_step` runs a representation-level :class:`~imtl_jax.MTLStep` over K
  micro-batches and returns the update of the whole batch: the (T, F) feature-gradient matrix
  and the losses are accumulated over the micro-batches first (pass 1), the method weighs
  them once, and a second pass pushes the fixed weights through the encoder, micro-batch by
  micro-batch. The weights come from the whole batch's matrix, not from averages of
  per-micro-batch weights (which would be a different, biased method).
* :func:`multi_steps` is the same for the optax aggregator path (``optax.MultiSteps`` for
  per-task updates, which ``optax.MultiSteps`` itself cannot hold: its accumulators have the
  parameters' shapes).

Why it is exact: with task losses that are means over the examples and K equal micro-batches,
``L_t = (1/K) sum_k L_t^k``, so every per-task gradient (of z or of the parameters) of the
whole batch is the mean of the micro-batches' ones, and so is the matrix the weights are
computed from. A loss scaling that is not linear in the losses (DB-MTL's ``log L_t``) is
applied to the whole batch's mean losses by the chain rule (its Jacobian times the raw
gradients, and in the second pass the scaling linearized there), never per micro-batch:
``mean_k grad log L^k`` is not ``grad log L``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from imtl_jax._method import (LossScaling, Method, PyTree, Weighting, WeightingOutput,
                              check_output_form, coordinate_weights_of)
from imtl_jax._step import MTLParams, MTLStep, _NO_STATE

#: Pass 1's scaling: the raw losses (their gradients are scaled once, on the whole batch).
_RAW = LossScaling(name="raw", scale=lambda losses, log_scales: losses, trainable=False)


def _split_batch(batch: Any, k: int) -> Any:
    """Every leaf's leading axis split into ``k`` micro-batches, after static checks: every leaf
    has a leading batch axis, the same size for all leaves (a leaf of another size would be cut
    into micro-batches that do not line up with the inputs' -- e.g. one target row per micro-batch,
    broadcast silently by the loss), non-empty and divisible by ``k``."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError("accumulate_step: `batch` has no array leaves to split into micro-batches.")
    sizes: dict = {}
    for path, x in leaves:
        where = f"batch{jax.tree_util.keystr(path)}"
        shape = jnp.shape(x)
        if len(shape) < 1:
            raise ValueError(f"accumulate_step: {where} has shape {shape}: every `batch` leaf must have "
                             f"a leading batch axis, which is split into num_micro_batches={k} parts. "
                             "Pass per-batch constants through a closure instead of the batch.")
        sizes.setdefault(shape[0], []).append(f"{where} {shape}")
    if len(sizes) > 1:
        listed = "; ".join(", ".join(v[:2]) + (" ..." if len(v) > 2 else "") for v in sizes.values())
        raise ValueError(f"accumulate_step: the `batch` leaves have different leading (batch) sizes "
                         f"{sorted(sizes)} ({listed}); every leaf is split along its leading axis, so "
                         "all must hold the same examples. Pass per-batch constants through a closure.")
    (size,) = sizes
    if size == 0 or size % k:
        raise ValueError(f"accumulate_step: every batch leaf must have a leading batch axis divisible "
                         f"by num_micro_batches={k} and non-empty; got batch size {size}. Use a batch "
                         "size that is a positive multiple of num_micro_batches.")
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x).reshape((k, size // k) + jnp.shape(x)[1:]), batch)


class _Linearized:
    """A scaling linearized at the whole batch's mean losses ``raw`` (T,): ``scale(raw, s) + J (L -
    raw)`` on the (T,) losses, and, for the step's per-task passes (a per-coordinate weighting's
    pass 2 scales one task at a time, as the plain step does), ``scale_task(L_t, s_t, t)``: the
    same for task ``t`` alone, linearized at ``raw[t]`` (``t`` an int or a traced index)."""

    def __init__(self, scale, raw):
        self.scale, self.raw = scale, raw

    def __call__(self, losses, log_scales):
        raw = self.raw
        base, tangent = jax.jvp(lambda x: self.scale(x, log_scales), (raw,),
                                (losses.astype(raw.dtype) - raw,))
        return base + tangent

    def scale_task(self, loss, log_scale, t):
        raw_t = self.raw[t]
        base, tangent = jax.jvp(lambda x: self.scale(x[None], log_scale[None])[0], (raw_t,),
                                (loss.astype(raw_t.dtype) - raw_t,))
        return base + tangent


class AccumulatedStep:
    """An :class:`~imtl_jax.MTLStep` over K micro-batches; create with :func:`accumulate_step`.

    ``init`` and the call have the step's signature and outputs; ``batch`` is the whole batch
    (every leaf's leading axis is split into K micro-batches).
    """

    def __init__(self, step: MTLStep, num_micro_batches: int):
        if not isinstance(step, MTLStep):
            raise TypeError(f"`step` must be an imtl_jax.MTLStep (from mtl_step), got {type(step).__name__}.")
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) \
                or num_micro_batches < 1:
            raise ValueError(f"`num_micro_batches` must be a positive int, got {num_micro_batches!r}.")
        if step.method.level != "representation":
            raise ValueError(
                f"accumulate_step: method {step.method.name!r} works at the parameter level; "
                "accumulate its per-task parameter gradients with imtl_jax.multi_steps("
                "optax.chain(imtl_jax.aggregate(...), ...), k, num_tasks=T) instead.")
        self.step = step
        self.num_micro_batches = num_micro_batches
        method = step.method
        weighting = method.weighting

        def record(grads, losses, state, key, priorities):  # pass 1: keep the matrix
            del key, priorities
            info = {} if grads is None else {"matrix": grads}
            return WeightingOutput(jnp.zeros_like(losses), state, info)

        # Pass 1 records the gradients of the *raw* losses: the loss scaling is applied to the
        # whole batch's mean losses afterwards (chain rule), so a scaling that is not linear in
        # the losses (DB-MTL's log) is exact too.
        self._record = MTLStep(step.encoder, step.task_losses, Method(
            method.name, _RAW, Weighting("record", weighting.init, record,
                                         weighting.needs_grads, weighting.weights_heads,
                                         needs_dim=weighting.needs_dim)),
            reduction=step.reduction, axis_name=step.axis_name, has_state=step.has_state)

    def __repr__(self) -> str:
        return f"AccumulatedStep({self.step!r}, num_micro_batches={self.num_micro_batches})"

    def init(self, params: MTLParams, batch: Any = None, **kwargs: Any) -> PyTree:
        """The method's initial state (as :meth:`imtl_jax.MTLStep.init`; ``batch``, whole or
        one micro-batch, and ``encoder_state``/``feature_dim`` for a method with per-coordinate
        state, ``"excess_mtl"``)."""
        return self.step.init(params, batch, **kwargs)

    def _fixed(self, w, raw, coords=None):
        """Pass 2's step: fixed weights ``w`` and the loss scaling linearized at the whole
        batch's mean losses ``raw`` (``scale(raw) + J (L - raw)``): it is affine in the
        micro-batch losses, so the micro-batches' gradients average to the whole batch's
        gradient of ``sum_t w_t scale(L)_t``, log-scales included, for any scaling (the same
        scaling when it is linear, as IMTL-L's). With per-coordinate weights ``coords`` (T, F)
        (GradDrop) the fixed ``C`` is replayed instead: the encoder's cotangent
        ``sum_t C_t * dL~_t/dz_b`` is linear in the micro-batch gradients, so exact too; the step
        then scales one task at a time, through :class:`_Linearized`'s per-task form."""
        method = self.step.method
        scaling = method.scaling
        raw = lax.stop_gradient(raw)
        per_coordinate = coords is not None

        def weigh(grads, losses, state, key, priorities):
            del grads, losses, key, priorities
            return WeightingOutput(w.astype(w.dtype), state, {}, coords)

        fixed = Method(method.name, LossScaling(scaling.name, _Linearized(scaling.scale, raw),
                                                scaling.trainable),
                       Weighting("fixed", method.weighting.init, weigh, per_coordinate,
                                 method.weighting.weights_heads,
                                 needs_dim=method.weighting.needs_dim,
                                 per_coordinate=per_coordinate))
        return MTLStep(self.step.encoder, self.step.task_losses, fixed, reduction=self.step.reduction,
                       axis_name=self.step.axis_name, has_state=self.step.has_state)

    def __call__(self, params: MTLParams, state: PyTree, batch: Any, *,
                 key: Optional[jax.Array] = None, priorities: Optional[jax.Array] = None,
                 encoder_state: Any = _NO_STATE) -> tuple:
        """Same arguments and outputs as :meth:`imtl_jax.MTLStep.__call__` (no ``task_mask``);
        micro-batch ``i``'s encoder gets ``jax.random.fold_in(key, i)`` and the encoder state is
        threaded through the K micro-batches in order (as a plain accumulation loop would)."""
        step, k = self.step, self.num_micro_batches
        stateful = step.has_state
        if stateful and encoder_state is _NO_STATE:
            raise TypeError("this step was built with has_state=True: pass encoder_state=.")
        if not stateful and encoder_state is not _NO_STATE:
            raise TypeError("`encoder_state=` was given but the step was built without state "
                            "(mtl_step(..., has_state=True)).")
        micro = _split_batch(batch, k)
        num_tasks = step._check_params(params).shape[0]
        base_key = jax.random.key(0) if key is None else key

        def run(s, p, mstate, b, i, enc_state):
            kw: dict = {}
            if stateful:
                kw = {"encoder_state": enc_state, "key": None if key is None else jax.random.fold_in(base_key, i)}
            out = s(p, mstate, b, **kw)
            if stateful:
                grads, _, enc_state, aux = out
            else:
                (grads, _, aux), enc_state = out, None
            return grads, aux, enc_state

        enc0 = encoder_state if stateful else None

        # Pass 1: the losses and the (T, F) matrix, summed over the micro-batches.
        def pass1(carry, xs):
            enc_state, raw_sum, matrix_sum = carry
            b, i = xs
            _, aux, enc_state = run(self._record, params, state, b, i, enc_state)
            matrix = aux.info.get("matrix")
            if matrix is not None:
                matrix_sum = matrix_sum + matrix
            return (enc_state, raw_sum + aux.losses, matrix_sum), None

        # The accumulators take the dtypes of one micro-batch's outputs (the losses may differ
        # from the log-scales' dtype, e.g. float16 log-scales on a float32 model).
        first = jax.eval_shape(lambda: run(self._record, params, state,
                                           jax.tree_util.tree_map(lambda x: x[0], micro), 0, enc0)[1])
        matrix0 = jnp.zeros((), params.log_scales.dtype)
        if step.method.weighting.needs_grads:
            matrix0 = jnp.zeros(first.info["matrix"].shape, first.info["matrix"].dtype)
        (enc_final, raw_sum, matrix_sum), _ = lax.scan(
            pass1, (enc0, jnp.zeros((num_tasks,), first.losses.dtype), matrix0),
            (micro, jnp.arange(k)))
        raw = raw_sum / k
        # Per-task gradients of the mean loss: the mean of the micro-batches' (sum reduction);
        # "mean" also averages over K times more examples, 1/K once more.
        matrix = matrix_sum / k if step.reduction == "sum" else matrix_sum / (k * k)
        scaled = step.method.scaling.scale(raw, params.log_scales)
        if step.method.weighting.needs_grads:
            # The gradients of the scaled losses: J (T, T) = d scale / d L at the whole batch's
            # losses (diagonal for the built-in scalings) times the raw gradients.
            jac = jax.jacfwd(lambda x: step.method.scaling.scale(x, params.log_scales))(raw)
            matrix = jnp.matmul(jac.astype(matrix.dtype), matrix, precision=lax.Precision.HIGHEST)
        method_key = key if not (stateful and key is not None) else jax.random.fold_in(key, 1)
        out = step.method.weighting.weigh(
            lax.stop_gradient(matrix) if step.method.weighting.needs_grads else None,
            lax.stop_gradient(scaled), state, method_key, priorities)
        check_output_form(out, step.method.weighting, step.method.name)
        w = lax.stop_gradient(out.weights).astype(scaled.dtype)
        coords = None
        if step.method.weighting.per_coordinate:  # GradDrop: C of the whole batch, replayed
            coords = lax.stop_gradient(coordinate_weights_of(out, matrix.shape, step.method.name))

        # Pass 2: the gradients of sum_t w_t L~_t, micro-batch by micro-batch.
        fixed = self._fixed(w, raw, coords)

        def pass2(carry, xs):
            enc_state, acc = carry
            b, i = xs
            grads, aux, enc_state = run(fixed, params, state, b, i, enc_state)
            acc = jax.tree_util.tree_map(jnp.add, acc, grads)
            return (enc_state, acc), aux

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (_, acc), auxs = lax.scan(pass2, (enc0, zeros), (micro, jnp.arange(k)))
        grads = jax.tree_util.tree_map(lambda g: (g / k).astype(g.dtype), acc)
        finite = jnp.all(jnp.isfinite(raw)) & jnp.all(jnp.isfinite(w))
        for leaf in jax.tree_util.tree_leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        last = jax.tree_util.tree_map(lambda x: x[-1], auxs)
        aux = last._replace(losses=raw, scaled_losses=scaled, weights=w, info=out.info,
                            all_finite=finite)
        if stateful:
            return grads, out.state, enc_final, aux
        return grads, out.state, aux


def accumulate_step(step: MTLStep, num_micro_batches: int) -> AccumulatedStep:
    """Gradient accumulation for a representation-level step: K micro-batches, one update.

    The result equals ``step`` on the whole batch (up to round-off) when the task losses are
    means over the examples, for every loss scaling: pass 1 runs the encoder and the heads'
    per-task backward on each micro-batch and sums the raw losses and the (T, F) matrix of
    their gradients; the scaling's Jacobian at the whole batch's mean losses turns it into the
    scaled losses' matrix, which the method weighs once (and its state advances once); pass 2
    runs the encoder again on each micro-batch and backpropagates ``sum_t w_t L~_t`` with the
    fixed weights and the scaling linearized at the mean losses. Memory is that
    of one micro-batch; the cost is one more encoder forward per micro-batch than plain
    accumulation. Both passes are ``lax.scan`` loops, so it compiles once.

    With ``has_state=True`` the encoder state is threaded through the micro-batches (BatchNorm
    sees micro-batch statistics, as in any accumulation loop), micro-batch ``i`` draws its
    dropout from ``jax.random.fold_in(key, i)``, and both passes see the same states and keys.

    Bad input is refused at trace time, naming what to fix: ``num_micro_batches`` not a positive
    int (``ValueError``); a ``batch`` leaf without a leading axis, leaves of different leading
    sizes (each is cut into K micro-batches, so a per-batch constant -- or a target array of
    another length, which the loss would broadcast silently -- cannot be split with the inputs),
    an empty batch or a size not divisible by K (``ValueError`` naming the leaf and the sizes);
    and the step's own checks on every micro-batch (T of heads / log-scales / targets,
    floating-point parameters, ``priorities``). ``task_mask`` is not supported. Inputs of any
    float or integer dtype go to the encoder as given; float16/bfloat16 log-scales on a float32
    model are fine (the accumulators take the losses' dtype). NaN or inf in the batch or the
    log-scales (of a method that reads them) is not an error: ``aux.all_finite`` is False (the
    weights of a gradient method are NaN) and the gradients are returned as computed, exactly as
    by ``step`` on the whole batch. ``all_finite`` covers the losses, the weights and the
    gradients: a non-finite parameter whose effect saturates (e.g. through ``tanh``) can leave
    them finite. Wrap the training step in :func:`imtl_jax.skip_nonfinite` (it also checks the
    new parameters; the parameters, optimizer and method state are then left as they were) or
    the optimizer in :func:`imtl_jax.safe_optimizer` to skip such a step.

    Args:
      step: an :class:`~imtl_jax.MTLStep` of a representation-level method.
      num_micro_batches: K; every batch leaf's leading axis must be the same size, divisible
        by K.

    Returns:
      An :class:`AccumulatedStep` with the step's ``init`` and call signature.

    Example:
      >>> import jax, jax.numpy as jnp, imtl_jax
      >>> def encoder(w, batch): return jnp.tanh(batch["x"] @ w)
      >>> def head_loss(v_t, z, batch, t): return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)
      >>> step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params = imtl_jax.MTLParams(jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (2, 4)),
      ...                             jnp.zeros(2))
      >>> batch = {"x": jax.random.normal(k3, (32, 3)), "y": jnp.ones((32, 2))}
      >>> _, _, whole = step(params, (), batch)
      >>> _, _, micro = jax.jit(imtl_jax.accumulate_step(step, 4))(params, (), batch)
      >>> bool(jnp.allclose(whole.weights, micro.weights, atol=1e-5))
      True
    """
    return AccumulatedStep(step, num_micro_batches)


# ------------------------------------------------------------------------------------------------
class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    Attributes:
      mini_step: micro-steps accumulated since the last update (0..K-1).
      acc_updates: the sum of the per-task updates so far (leaves (T, ...)).
      acc_losses: (T,) the sum of the losses so far (zeros when none are passed).
      inner_state: the wrapped transformation's state (changes only on the K-th micro-step).
    """

    mini_step: jax.Array
    acc_updates: PyTree
    acc_losses: jax.Array
    inner_state: PyTree


def multi_steps(tx: optax.GradientTransformation, every_k_steps: int, *, num_tasks: int,
                losses_dtype: Any = jnp.float32) -> optax.GradientTransformationExtraArgs:
    """``optax.MultiSteps`` for per-task updates: accumulate K micro-batches, then aggregate.

    ``tx`` is a chain that starts with an aggregator (``optax.chain(imtl_jax.aggregate(...),
    optax.adam(...))``). Each call adds the per-task updates (leaves ``(T, *param_shape)``) and
    the ``losses=`` to accumulators; every K-th call passes their means to ``tx`` (so the
    weights come from the whole batch's per-task gradients) and returns its update; the other
    calls return zeros and leave ``tx``'s state untouched. ``key=``/``priorities=`` of the K-th
    call are passed on. ``optax.MultiSteps`` cannot do this: it keeps accumulators shaped like
    the parameters, which the (T, ...) updates do not fit ("cond branches must have equal
    output types").

    Args:
      tx: the transformation applied every K micro-steps (its first element an aggregator).
      every_k_steps: K (a positive int).
      num_tasks: T (fixes the accumulators' shapes).
      losses_dtype: dtype of the accumulated losses.

    Example:
      >>> import jax.numpy as jnp, optax, imtl_jax
      >>> tx = imtl_jax.multi_steps(optax.chain(imtl_jax.imtl_g(2), optax.sgd(1.0)), 2, num_tasks=2)
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> u1, state = tx.update({"w": jnp.array([[-3.0, 1.0, 1.0], [5.0, 1.0, 1.0]])}, state, params)
      >>> u2, state = tx.update({"w": jnp.array([[-5.0, 1.0, 1.0], [7.0, 1.0, 1.0]])}, state, params)
      >>> u1["w"].tolist(), [round(v, 4) for v in (-u2["w"]).tolist()]  # mean: [[-4,1,1],[6,1,1]]
      ([0.0, 0.0, 0.0], [0.0767, 1.0, 1.0])
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`tx` must be an optax transformation, got {type(tx).__name__}.")
    for name, v in (("every_k_steps", every_k_steps), ("num_tasks", num_tasks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}.")

    def init_fn(params):
        acc = jax.tree_util.tree_map(
            lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.result_type(p)), params)
        return MultiStepsState(jnp.zeros((), jnp.int32), acc, jnp.zeros((num_tasks,), losses_dtype),
                               tx.init(params))

    def update_fn(updates, state, params=None, *, losses=None, **extra_args):
        tree: Any = jax.tree_util.tree_structure(updates)  # a PyTreeDef (Any for the type checkers)
        if not bool(tree == jax.tree_util.tree_structure(state.acc_updates)):
            raise ValueError("multi_steps: `updates` must have the parameters' structure with a "
                             "leading task axis T on every leaf (per-task updates).")
        for u, a in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(state.acc_updates)):
            if jnp.shape(u) != jnp.shape(a):
                raise ValueError(f"multi_steps: a per-task update of shape {jnp.shape(u)} does not "
                                 f"match (T, *param_shape) = {jnp.shape(a)}.")
        acc = jax.tree_util.tree_map(lambda a, u: a + u.astype(a.dtype), state.acc_updates, updates)
        acc_losses = state.acc_losses
        if losses is not None:
            acc_losses = acc_losses + jnp.asarray(losses).astype(acc_losses.dtype)
        emit = state.mini_step == every_k_steps - 1

        def apply(_):
            mean = jax.tree_util.tree_map(lambda a: a / every_k_steps, acc)
            kw = dict(extra_args)
            if losses is not None:
                kw["losses"] = acc_losses / every_k_steps
            return tx.update(mean, state.inner_state, params, **kw)

        out_shape = jax.eval_shape(apply, None)

        def skip(_):
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape[0])
            return zeros, state.inner_state

        new_updates, inner = lax.cond(emit, apply, skip, None)
        keep = jnp.logical_not(emit)
        acc = jax.tree_util.tree_map(lambda a: jnp.where(keep, a, jnp.zeros_like(a)), acc)
        acc_losses = jnp.where(keep, acc_losses, jnp.zeros_like(acc_losses))
        mini = jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32)
        return new_updates, MultiStepsState(mini, acc, acc_losses, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
