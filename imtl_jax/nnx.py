"""Flax NNX helpers: learnable loss scales and a train step for shared-encoder + heads models.

:func:`make_train_step` trains an ``nnx.Module`` with :func:`imtl_jax.mtl_step` and an
``nnx.Optimizer``, in place, inside ``nnx.jit``. You say which submodule is shared (``shared=``,
default ``"encoder"``), which are the task heads (``heads=``: one module stacked over a leading
task axis, or a tuple/``nnx.List`` of modules, or a tuple of attribute names) and where the
IMTL-L log-scales live (``loss_scales=``, a :class:`LossScales`). The shared encoder may hold
``nnx.BatchNorm`` and ``nnx.Dropout`` in training mode: it runs once per step (one forward, as in
a plain training step), its batch statistics are updated and its RNG streams advance. The heads
must hold parameters only (put normalization and dropout in the encoder).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import imtl_jax
  >>> from imtl_jax.nnx import LossScales, make_train_step
  >>> class Model(nnx.Module):
  ...     def __init__(self, rngs):
  ...         self.trunk = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
  ...                                     nnx.relu, nnx.Dropout(0.1, rngs=rngs))
  ...         self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)])
  ...         self.loss_scales = LossScales(2)
  >>> def loss(head, z, batch, t):  # head: task t's module; t: a Python int for a list of heads
  ...     out = head(z)
  ...     if t == 0:
  ...         return jnp.mean((out[:, 0] - batch["y"]) ** 2)
  ...     return optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
  >>> model = Model(nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  >>> train_step = make_train_step(loss, "imtl_h", shared="trunk", heads="heads")
  >>> step = nnx.jit(train_step)
  >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4), "label": jnp.arange(4)}
  >>> method_state = train_step.init(model)
  >>> method_state, aux = step(model, optimizer, batch, method_state)
  >>> aux.weights.shape, int(model.trunk.layers[3].rngs.count[...])  # dropout stream advanced
  ((2,), 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from imtl_jax._method import Method, PyTree, check_dim
from imtl_jax._safety import _select, _tree_finite
from imtl_jax._step import (MTLParams, StepAux, _stacked_num_tasks, check_method_level, mtl_step,
                            parameter_level_dim, stacked_task_losses)
from imtl_jax.methods import get_method

Path = tuple


class LossScales(nnx.Module):
    """T learnable IMTL-L log-scales ``s`` (an ``nnx.Param``, zeros at start).

    They are ordinary parameters: the optimizer's weight decay pulls them towards 0 (scale 1);
    give them their own rule with ``optax.partition`` / an ``nnx.Optimizer`` ``wrt`` filter if
    that is not wanted.

    Example:
      >>> from imtl_jax.nnx import LossScales
      >>> LossScales(3)()  # the scales e^s
      Array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, num_tasks: int, *, dtype: Any = jnp.float32):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"`dtype` must be a floating-point dtype (the log-scales are trained), got "
                            f"{jnp.dtype(dtype)}; e.g. LossScales({num_tasks}, dtype=jnp.float32).")
        self.log_scales = nnx.Param(jnp.zeros((num_tasks,), dtype))

    def __call__(self) -> jax.Array:
        """The scales ``e^s``."""
        return jnp.exp(self.log_scales[...])


def _default_inputs(batch: Any) -> Any:
    if not isinstance(batch, Mapping) or "x" not in batch:
        raise TypeError("make_train_step: the batch has no 'x' entry to feed the shared encoder; "
                        "say which part of the batch is the input with inputs=, e.g. "
                        "make_train_step(loss, inputs=lambda batch: batch['image']).")
    return batch["x"]


def _split_spec(spec: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in spec.split("."))


def _resolve(model: nnx.Module, spec: str, arg: str) -> tuple[Path, Any]:
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"`{arg}=` must be an attribute name of the model (a str such as "
                        f"'encoder' or 'backbone.trunk'), got {spec!r}.")
    obj: Any = model
    path = _split_spec(spec)
    for i, part in enumerate(path):
        try:
            obj = obj[part] if isinstance(part, int) else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            have = sorted(k for k in vars(obj) if not k.startswith("_")) if hasattr(obj, "__dict__") else []
            where = ".".join(str(p) for p in path[:i]) or type(model).__name__
            raise ValueError(
                f"`{arg}={spec!r}`: {where} has no attribute {part!r} (it has {have}). Name the "
                f"model's submodule with {arg}=, e.g. make_train_step(loss, {arg}='backbone')."
            ) from None
    return path, obj


def _resolve_heads(model, heads) -> tuple[list[tuple[Path, Any]], bool]:
    """[(path, module)] and whether the heads are stacked (one module over a task axis)."""
    if isinstance(heads, str):
        path, obj = _resolve(model, heads, "heads")
        if isinstance(obj, _SEQUENCES) and len(obj):
            return [(path + (i,), m) for i, m in enumerate(obj)], False
        if isinstance(obj, nnx.Module) and not isinstance(obj, _SEQUENCES):
            return [(path, obj)], True
        raise TypeError(f"`heads={heads!r}` is a {type(obj).__name__}; it must be one nnx.Module "
                        "whose parameters are stacked over the tasks (nnx.vmap), or a non-empty "
                        "tuple / nnx.List of head modules.")
    if isinstance(heads, (tuple, list)) and heads and all(isinstance(h, str) for h in heads):
        return [_resolve(model, h, "heads") for h in heads], False
    raise TypeError("`heads=` must be an attribute name (str) or a tuple of attribute names, got "
                    f"{heads!r}.")


_SEQUENCES = (list, tuple, nnx.List)


def _same_structure(a: Any, b: Any) -> bool:
    tree_a: Any = jax.tree_util.tree_structure(a)  # (a PyTreeDef; Any for the type checkers)
    return bool(tree_a == jax.tree_util.tree_structure(b))


def _is_prefix(prefix: Path, path: Path) -> bool:
    return path[:len(prefix)] == prefix


def _set_at(state: nnx.State, path: Path, value: Any) -> None:
    node = state
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


class NNXTrainStep:
    """An NNX train step; create with :func:`make_train_step`.

    ``train_step.init(model)`` returns the method's initial state (``train_step.init(model,
    batch)`` for a method with per-coordinate state, ``"excess_mtl"``); ``train_step(model, optimizer,
    batch, method_state, *, key=None, priorities=None, task_mask=None)`` returns
    ``(method_state, aux)`` and updates the model (parameters, batch statistics, RNG streams)
    and the optimizer in place. Wrap the call in ``nnx.jit``. ``task_mask`` (T,): partial
    labels, as in :meth:`imtl_jax.MTLStep.__call__` (absent heads get a zero gradient; a
    stateful optimizer such as Adam still moves them by its momentum, see
    ``docs/partial_labels.md``).
    """

    def __init__(self, loss: Union[Callable[..., jax.Array], Sequence[Callable[..., jax.Array]]],
                 method: Union[str, Method], *, shared: str, heads: Union[str, Sequence[str]],
                 loss_scales: Optional[str], inputs: Callable[[Any], Any], reduction: str,
                 skip_nonfinite: bool = False):
        if isinstance(loss, (list, tuple)):
            if not loss or not all(callable(f) for f in loss):
                raise TypeError("`loss` given as a sequence must hold one callable "
                                "(head, z, batch) -> scalar per task.")
            loss = tuple(loss)
        elif not callable(loss):
            raise TypeError("`loss` must be a callable (head, z, batch, t) -> scalar or a tuple of "
                            f"callables (head, z, batch) -> scalar, got {loss!r}.")
        if not callable(inputs):
            raise TypeError(f"`inputs` must be a callable batch -> encoder input, got {inputs!r}.")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}.")
        self.skip_nonfinite = skip_nonfinite
        self.loss = loss
        self.method = get_method(method)
        check_method_level(self.method)  # MoCo: level="parameters" only, said before tracing
        self.shared, self.heads, self.loss_scales = shared, heads, loss_scales
        self.inputs, self.reduction = inputs, reduction

    def __repr__(self) -> str:
        return (f"NNXTrainStep(method={self.method.name!r}, shared={self.shared!r}, "
                f"heads={self.heads!r}, loss_scales={self.loss_scales!r})")

    # ------------------------------------------------------------------------------------
    def _layout(self, model):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
        enc_path, encoder = _resolve(model, self.shared, "shared")
        if not isinstance(encoder, nnx.Module):
            raise TypeError(f"`shared={self.shared!r}` is a {type(encoder).__name__}, not an nnx.Module.")
        head_items, stacked = _resolve_heads(model, self.heads)
        for path, head in head_items:
            if not isinstance(head, nnx.Module):
                raise TypeError(f"head {'.'.join(map(str, path))!r} is a {type(head).__name__}, "
                                "not an nnx.Module.")
            other = jax.tree_util.tree_leaves(nnx.state(head, nnx.Not(nnx.Param)))
            if other:
                raise ValueError(
                    f"head {'.'.join(map(str, path))!r} holds state other than nnx.Param (batch "
                    "statistics or dropout RNG streams): the heads are differentiated per task "
                    "and must be pure functions of their parameters. Move BatchNorm/Dropout into "
                    f"the shared module ({self.shared!r}).")
        if stacked:
            try:
                num_tasks = _stacked_num_tasks(nnx.state(head_items[0][1], nnx.Param))
            except ValueError as err:
                raise ValueError(
                    f"`heads={self.heads!r}` is one module, so its parameters must be stacked over a "
                    f"leading task axis (nnx.vmap); {err} For heads of different sizes give a "
                    "tuple or nnx.List of head modules instead.") from None
        else:
            num_tasks = len(head_items)
        if isinstance(self.loss, tuple) and len(self.loss) != num_tasks:
            raise ValueError(f"`loss` has {len(self.loss)} functions but the model has {num_tasks} heads.")
        scales_path, scales = None, None
        if self.loss_scales is not None:
            try:
                scales_path, scales = _resolve(model, self.loss_scales, "loss_scales")
            except ValueError:
                if self.method.scaling.trainable:
                    raise ValueError(
                        f"method {self.method.name!r} trains per-task loss scales but the model has no "
                        f"attribute {self.loss_scales!r}: add `self.{self.loss_scales} = "
                        f"imtl_jax.nnx.LossScales({num_tasks})` to the model, or name yours with "
                        "loss_scales=.") from None
        elif self.method.scaling.trainable:
            raise ValueError(f"method {self.method.name!r} trains per-task loss scales: give the model "
                             f"an imtl_jax.nnx.LossScales({num_tasks}) and name it with loss_scales=.")
        if scales is not None:
            leaves = jax.tree_util.tree_leaves(nnx.state(scales, nnx.Param))
            if len(leaves) != 1 or jnp.shape(leaves[0]) != (num_tasks,):
                raise ValueError(f"`loss_scales={self.loss_scales!r}` must hold one (T,) = ({num_tasks},) "
                                 "nnx.Param (an imtl_jax.nnx.LossScales); got shapes "
                                 f"{[jnp.shape(x) for x in leaves]}.")
            if not jnp.issubdtype(jnp.result_type(leaves[0]), jnp.floating):
                raise TypeError(f"`loss_scales={self.loss_scales!r}` holds a {jnp.result_type(leaves[0])} "
                                f"parameter; it must be floating point, e.g. LossScales({num_tasks}, "
                                "dtype=jnp.float32).")
        covered = [enc_path] + [p for p, _ in head_items] + ([scales_path] if scales_path else [])
        for i, a in enumerate(covered):
            for b in covered[i + 1:]:
                if _is_prefix(a, b) or _is_prefix(b, a):
                    raise ValueError(f"`shared=`, `heads=` and `loss_scales=` overlap at "
                                     f"{'.'.join(map(str, a if len(a) <= len(b) else b))!r}; name disjoint submodules.")
        stray = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if not any(_is_prefix(c, p) for c in covered)]
        if stray:
            names = ", ".join(".".join(map(str, p)) for p in stray[:4])
            raise ValueError(
                f"the model has parameters outside shared={self.shared!r}, heads={self.heads!r} and "
                f"loss_scales={self.loss_scales!r}: {names}{' ...' if len(stray) > 4 else ''}. Put "
                "them inside the shared module or a head (or name those with shared=/heads=).")
        return encoder, head_items, stacked, num_tasks, scales

    def init(self, model: nnx.Module, batch: Any = None, *,
             feature_dim: Optional[int] = None) -> PyTree:
        """The method's initial state for ``model`` (``()`` for stateless methods).

        A method with per-coordinate state (``weighting.needs_dim``: ``"excess_mtl"``) needs F:
        at ``level="parameters"`` the shared module's parameter count (from ``model``); at the
        representation level the per-example size of the shared module's output, from an
        example ``batch`` (the module runs abstractly on ``inputs(batch)``: ``jax.eval_shape``
        on a copy; the model's parameters, batch statistics and RNG streams are not changed) or
        given as ``feature_dim=``. Other methods ignore ``batch`` (a ``feature_dim`` given is
        checked all the same).

        Raises:
          ValueError: a ``needs_dim`` method at the representation level without ``batch`` or
            ``feature_dim``; a ``feature_dim`` that is not an int >= 1 or disagrees with
            ``batch`` or the model.
        """
        _, _, _, num_tasks, scales = self._layout(model)
        dtype = jnp.float32 if scales is None else jax.tree_util.tree_leaves(
            nnx.state(scales, nnx.Param))[0].dtype
        weighting = self.method.weighting
        if feature_dim is not None:  # checked for every method: a bad value is a bug either way
            feature_dim = check_dim(feature_dim, self.method.name, "feature_dim")
        if not weighting.needs_dim:
            return weighting.init(num_tasks, dtype)
        return weighting.init_state(num_tasks, dtype, dim=self._feature_dim(model, batch, feature_dim))

    def _feature_dim(self, model: nnx.Module, batch: Any, feature_dim: Optional[int],
                     in_init: bool = True) -> int:
        """F of a ``needs_dim`` method (see :meth:`init`; ``feature_dim`` already checked);
        ``in_init`` False: the state check of ``__call__`` (its errors say so)."""
        name = self.method.name
        _, encoder = _resolve(model, self.shared, "shared")
        if self.method.level == "parameters":
            return parameter_level_dim(nnx.state(encoder, nnx.Param), feature_dim, name,
                                       "the shared module's parameter count")
        if batch is None:
            if feature_dim is None:
                raise ValueError(
                    f"method {name!r} keeps per-coordinate state of the shared feature's size F (the "
                    f"shared module {self.shared!r}'s output per example), which train_step.init(model) "
                    "cannot know: pass an example batch, train_step.init(model, batch), or the size, "
                    "train_step.init(model, feature_dim=F).")
            return feature_dim
        graphdef, state = nnx.split(encoder)
        try:
            x = self.inputs(batch)
            shape = jax.eval_shape(lambda st: nnx.merge(graphdef, st, copy=True)(x), state).shape
        except Exception as err:
            _note(err, (f"imtl_jax.nnx: raised by the shared module `shared={self.shared!r}`, run "
                        f"abstractly on inputs(batch) to find F for method {name!r}'s state in "
                        "train_step.init(model, batch); give the size instead, "
                        "train_step.init(model, feature_dim=F).") if in_init else
                  (f"imtl_jax.nnx: raised by the shared module `shared={self.shared!r}` on "
                   "inputs(batch); check the batch's input (its shape and dtype) or inputs=."))
            raise
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"the shared module {self.shared!r} returned shape {shape} on inputs(batch); "
                             "it needs a non-empty leading batch axis.")
        dim = math.prod(shape[1:])
        if feature_dim is not None and feature_dim != dim:
            raise ValueError(f"`feature_dim={feature_dim}` but the shared module's output on `batch` has "
                             f"shape {shape}, F = {dim} per example; give one of the two.")
        return dim

    def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: Any,
                 method_state: PyTree, *, key: Optional[jax.Array] = None,
                 priorities: Optional[jax.Array] = None,
                 task_mask: Optional[jax.Array] = None) -> tuple[PyTree, StepAux]:
        encoder, head_items, stacked, num_tasks, scales = self._layout(model)
        if not isinstance(optimizer, nnx.Optimizer):
            raise TypeError("`optimizer` must be an nnx.Optimizer(model, tx, wrt=nnx.Param), got "
                            f"{type(optimizer).__name__}.")
        weighting = self.method.weighting
        dim = self._feature_dim(model, batch, None, in_init=False) if weighting.needs_dim else None
        expected = jax.eval_shape(lambda: weighting.init_state(num_tasks, jnp.float32, dim=dim))
        if not _same_structure(method_state, expected):
            raise TypeError(f"`method_state` does not match method {self.method.name!r}'s state; start "
                            "from train_step.init(model" + (", batch)" if dim is not None else ")")
                            + " and pass back the state each call returns.")
        for got, want in zip(jax.tree_util.tree_leaves(method_state), jax.tree_util.tree_leaves(expected)):
            if jnp.shape(got) != want.shape:
                raise ValueError(
                    f"`method_state` has a leaf of shape {jnp.shape(got)} where {want.shape} is expected "
                    f"for this model's {num_tasks} tasks"
                    + (f" and F = {dim}" if dim is not None else "")
                    + ": it was made for another model; start from train_step.init(model"
                    + (", batch)." if dim is not None else ")."))
        if self.skip_nonfinite:
            before = _snapshot(model, optimizer, method_state)
        inputs = self.inputs
        enc_def, enc_params, enc_rest = nnx.split(encoder, nnx.Param, ...)  # type: ignore[misc]

        def encoder_fn(shared, rest, b, k):
            del k  # NNX modules draw from their own RNG streams
            module = nnx.merge(enc_def, shared, rest, copy=True)
            x = inputs(b)
            for leaf in jax.tree_util.tree_leaves(x):
                if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == 0:
                    raise ValueError(f"`batch`: the shared module's input inputs(batch) = {_describe(x)} "
                                     "has an empty batch axis; skip empty batches, e.g. drop the last "
                                     "partial batch.")
            try:
                z = module(x)
            except Exception as err:
                _note(err, f"imtl_jax.nnx: raised by the shared module `shared={self.shared!r}` on "
                           f"inputs(batch) = {_describe(x)}; check the batch's input (its shape and "
                           "dtype) or inputs=.")
                raise
            new_rest = nnx.split(module, nnx.Param, ...)[-1]
            return z, new_rest

        loss = self.loss
        task_losses: Any
        head_params: Any
        if stacked:
            head_def, head_params = nnx.split(head_items[0][1], nnx.Param)
            if isinstance(loss, tuple):
                raise TypeError("stacked heads share one graph: give one `loss(head, z, batch, t)`, "
                                "not a tuple of functions.")
            task_losses = stacked_task_losses(
                lambda hp, z, b, t: loss(nnx.merge(head_def, hp, copy=True), z, b, t))
        else:
            split_heads = [nnx.split(head, nnx.Param) for _, head in head_items]
            defs = [d for d, _ in split_heads]
            head_params = tuple(p for _, p in split_heads)
            if isinstance(loss, tuple):
                task_losses = tuple(
                    (lambda hp, z, b, d=d, f=f: f(nnx.merge(d, hp, copy=True), z, b))
                    for d, f in zip(defs, loss))
            else:
                task_losses = tuple(
                    (lambda hp, z, b, d=d, t=t: loss(nnx.merge(d, hp, copy=True), z, b, t))
                    for t, d in enumerate(defs))
        if scales is not None:
            scales_state = nnx.state(scales, nnx.Param)
            log_scales = jax.tree_util.tree_leaves(scales_state)[0]
        else:
            log_scales = jnp.zeros((num_tasks,), jnp.float32)
        step = mtl_step(encoder_fn, task_losses, self.method, reduction=self.reduction, has_state=True)
        params = MTLParams(enc_params, head_params, log_scales)
        grads, method_state, new_rest, aux = step(params, method_state, batch, encoder_state=enc_rest,
                                                  key=key, priorities=priorities, task_mask=task_mask)
        nnx.update(encoder, new_rest)

        grad_state = jax.tree_util.tree_map(jnp.zeros_like, nnx.state(model, nnx.Param))
        enc_path = _split_spec(self.shared)
        _set_at(grad_state, enc_path, grads.shared)
        if stacked:
            _set_at(grad_state, head_items[0][0], grads.heads)
        else:
            for (path, _), g in zip(head_items, grads.heads):
                _set_at(grad_state, path, g)
        if scales is not None and self.loss_scales is not None:
            _set_at(grad_state, _split_spec(self.loss_scales),
                    jax.tree_util.tree_map(lambda _: grads.log_scales, scales_state))
        optimizer.update(model, grad_state)
        if self.skip_nonfinite:
            method_state, aux = _keep_if_not_finite(before, model, optimizer, method_state, aux)
        return method_state, aux


def _describe(x: Any) -> str:
    """``float32[4, 3]`` for an array, the same for each leaf of a pytree."""
    leaves = jax.tree_util.tree_leaves(x)
    text = [f"{jnp.result_type(a)}{list(jnp.shape(a))}" for a in leaves[:4]]
    return text[0] if len(leaves) == 1 else "(" + ", ".join(text) + (", ..." if len(leaves) > 4 else "") + ")"


def _note(err: BaseException, text: str) -> None:
    """Adds ``text`` to the exception's notes (shown under the message; Python >= 3.11)."""
    add = getattr(err, "add_note", None)
    if add is not None:
        add(text)


def _snapshot(model: nnx.Module, optimizer: nnx.Optimizer, method_state: PyTree) -> tuple:
    """The current arrays of the model, the optimizer and the method state (``nnx.state`` holds
    the Variables themselves, which the step updates in place: keep their values)."""
    return (jax.tree_util.tree_leaves(nnx.state(model)), jax.tree_util.tree_leaves(nnx.state(optimizer)),
            method_state)


def _keep_if_not_finite(before: tuple, model: nnx.Module, optimizer: nnx.Optimizer,
                        method_state: PyTree, aux: StepAux) -> tuple[PyTree, StepAux]:
    """:func:`imtl_jax.skip_nonfinite` for the in-place NNX step: when the step is not finite
    (``aux.all_finite`` False, or a non-finite float in the new model, optimizer or method
    state), everything is put back as it was, bit for bit (a select per leaf)."""
    old_model, old_opt, old_method = before
    new_model, new_opt = nnx.state(model), nnx.state(optimizer)
    finite = aux.all_finite & _tree_finite((new_model, new_opt, method_state))
    for obj, new, old in ((model, new_model, old_model), (optimizer, new_opt, old_opt)):
        leaves, treedef = jax.tree_util.tree_flatten(new)
        nnx.update(obj, jax.tree_util.tree_unflatten(
            treedef, [_select(finite, n, o) for n, o in zip(leaves, old)]))
    method_state = jax.tree_util.tree_map(lambda n, o: _select(finite, n, o), method_state, old_method)
    return method_state, aux._replace(all_finite=finite)


def make_train_step(loss: Union[Callable[..., jax.Array], Sequence[Callable[..., jax.Array]]],
                    method: Union[str, Method] = "imtl_h", *, shared: str = "encoder",
                    heads: Union[str, Sequence[str]] = "heads",
                    loss_scales: Optional[str] = "loss_scales",
                    inputs: Callable[[Any], Any] = _default_inputs,
                    reduction: str = "sum", skip_nonfinite: bool = False) -> NNXTrainStep:
    """A train step ``(model, optimizer, batch, method_state, *, key=None, priorities=None,
    task_mask=None) -> (method_state, aux)`` for an NNX model with a shared module and task
    heads (``task_mask``: partial labels, see ``docs/partial_labels.md``).

    The step splits the model (``nnx.split``) into the shared module's parameters and its other
    state (``nnx.BatchStat``, RNG streams), runs :func:`imtl_jax.mtl_step` with
    ``has_state=True`` (the shared module runs once: statistics updated, dropout streams
    advanced), applies the gradients with ``optimizer`` (an ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``) and writes the shared module's new state back, all in place. Wrap it in
    ``nnx.jit``: it compiles once (the method state has a fixed structure).

    Args:
      loss: ``loss(head, z, batch, t) -> scalar``, task t's loss from its head module ``head``
        (for stacked heads, task t's slice merged into one head; ``t`` is traced there, a Python
        int for a tuple of heads) and the shared feature ``z``. Or a tuple of T functions
        ``(head, z, batch) -> scalar``, one per (heterogeneous) head.
      method: registered method name or :class:`imtl_jax.Method`; stateful methods (GradNorm,
        DWA, FAMO, PCGrad) start from ``train_step.init(model)``; ``"excess_mtl"``, whose state
        is per coordinate of the shared feature, from ``train_step.init(model, batch)``.
      shared: the attribute (dotted path, e.g. ``"backbone.trunk"``) of the shared module.
      heads: the attribute of the heads: one module whose parameters have a leading task axis
        (created with ``nnx.vmap``), or a tuple / ``nnx.List`` of head modules (heterogeneous
        output sizes); or a tuple of attribute names, one per head.
      loss_scales: the attribute of the :class:`LossScales` (needed by methods with a trainable
        loss scaling: IMTL-H, IMTL-L, uncertainty); ``None`` for a model without one.
      inputs: ``inputs(batch)`` is the shared module's input (default ``batch["x"]``).
      reduction: batch reduction of the feature gradients (see :func:`imtl_jax.mtl_step`).
      skip_nonfinite: make every step atomic, as :func:`imtl_jax.skip_nonfinite` does for a
        functional step: when ``aux.all_finite`` is False or a float in the new model,
        optimizer or method state is not finite, the model (parameters, batch statistics, RNG
        streams), the optimizer and the returned method state are exactly those before the
        call, and the returned ``aux.all_finite`` is False. Costs one ``isfinite`` reduction
        and one select per leaf. Default False: the update is applied as computed.

    Returns:
      An :class:`NNXTrainStep`. Every parameter of the model must belong to the shared module,
      a head or the loss scales (else a ``ValueError`` lists the others).

    Bad input is refused with an error that names the argument and the fix, at trace time
    (static shapes and dtypes only): the layout (``shared=``/``heads=``/``loss_scales=``
    missing, overlapping or of another T; heads holding BatchNorm/Dropout; parameters outside
    them), ``loss`` (a tuple of another length than the heads), ``method_state`` (another
    method's, or made for another number of tasks), ``LossScales`` of a non-float dtype, an
    empty batch (``ValueError`` naming ``batch``), and :func:`imtl_jax.mtl_step`'s checks (a
    target array with fewer columns than tasks, ``priorities``/``task_mask`` of another shape).
    Errors of the model's own modules (an input of the wrong feature size) come from Flax and
    name the shapes; a note names ``shared=`` and the input. Integer and 16-bit inputs go to the
    shared module as given (NNX layers promote them to their dtype); bfloat16/float16 models
    train as in :func:`imtl_jax.mtl_step`. The batch's leading axes are not compared: a target
    array of another length than the inputs is broadcast by the loss as in any JAX code. NaN or
    inf in the batch, the targets or the loss scales (of a method that uses them) is not an
    error: ``aux.all_finite`` is False (a gradient method's weights are NaN) and, unless
    ``skip_nonfinite=True``, the non-finite update is applied (the parameters, and with a NaN
    input the batch statistics, become NaN). ``aux.all_finite`` covers the losses, weights and
    gradients; a non-finite parameter whose effect saturates (e.g. through ``tanh``) can leave
    them finite, and ``skip_nonfinite=True`` (which also checks the new parameters) then skips
    the step as well.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from imtl_jax.nnx import make_train_step
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.body = nnx.Linear(3, 8, rngs=rngs)
      ...         self.heads = nnx.List([nnx.Linear(8, 1, rngs=rngs) for _ in range(2)])
      >>> def loss(head, z, batch, t): return jnp.mean((head(z)[:, 0] - batch["y"][:, t]) ** 2)
      >>> model = Net(nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> train_step = make_train_step(loss, "pcgrad", shared="body", loss_scales=None)
      >>> state = train_step.init(model)
      >>> state, aux = nnx.jit(train_step)(model, optimizer, {"x": jnp.ones((4, 3)),
      ...                                  "y": jnp.ones((4, 2))}, state, key=jax.random.key(0))
      >>> aux.losses.shape
      (2,)
    """
    return NNXTrainStep(loss, method, shared=shared, heads=heads, loss_scales=loss_scales,
                        inputs=inputs, reduction=reduction, skip_nonfinite=skip_nonfinite)


__all__ = ["LossScales", "NNXTrainStep", "make_train_step"]
