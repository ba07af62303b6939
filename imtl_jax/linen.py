"""Flax Linen helper: a stateful encoder function for :func:`imtl_jax.mtl_step`.

A Linen module with ``BatchNorm`` (the ``batch_stats`` collection) and ``Dropout`` is a function
``module.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
-> (z, {"batch_stats": ...})``; :func:`encoder` wraps it into the form that
``mtl_step(..., has_state=True)`` expects, ``(params, state, batch, key) -> (z, new_state)``, where
``state`` holds every non-parameter collection (``{"batch_stats": ...}``).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, imtl_jax, imtl_jax.linen
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x, train: bool = True):
  ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
  ...         return nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
  >>> net = Net()
  >>> variables = net.init(jax.random.key(0), jnp.ones((4, 3)), train=False)
  >>> params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  >>> encoder = imtl_jax.linen.encoder(net, train=True)
  >>> z, new_state = encoder(params, state, {"x": jnp.ones((4, 3))}, jax.random.key(1))
  >>> z.shape, sorted(new_state)
  ((4, 8), ['batch_stats'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = ["encoder"]


def _default_inputs(batch: Any) -> Any:
    if not isinstance(batch, Mapping) or "x" not in batch:
        raise TypeError("imtl_jax.linen.encoder: the batch has no 'x' entry; say which part of the "
                        "batch is the module's input with inputs=, e.g. inputs=lambda b: b['image'].")
    return batch["x"]


def _leaf_text(x: Any) -> str:
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


def _check_nonempty(x: Any) -> None:
    """An empty batch is refused before the module sees it (Flax's initializers divide by the
    zero-size input dimension while checking parameter shapes: a ZeroDivisionError)."""
    for leaf in jax.tree_util.tree_leaves(x):
        if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == 0:
            raise ValueError(f"`batch`: the module's input inputs(batch) has an empty batch axis "
                             f"({_leaf_text(leaf)}); skip empty batches, e.g. drop the last partial "
                             "batch.")


def _check_state(module: Any, state: Any, x: Any, rng_names: tuple, apply_kwargs: dict) -> None:
    """Compares every collection of ``state`` that the module also creates with what
    ``module.init`` gives on this input (abstractly: ``jax.eval_shape``, no computation), and
    raises a ValueError naming ``encoder_state`` and the leaf when a structure, shape or dtype
    differs. Without it a wrong-shaped statistic fails deep inside the module (a broadcasting
    error that names no argument) and a wrong dtype silently changes the carried state's dtype."""
    abstract_x = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)

    def init(xx):
        rngs = {name: jax.random.key(i) for i, name in enumerate(("params",) + rng_names)}
        return module.init(rngs, xx, **apply_kwargs)

    try:
        expected = jax.eval_shape(init, abstract_x)
    except Exception:  # noqa: BLE001 - a module that cannot init here: module.apply reports it next
        return
    fix = ("pass the collections as module.init returns them, e.g. "
           "encoder_state={'batch_stats': variables['batch_stats']}")
    for name, want in expected.items():
        if name == "params" or name not in state:
            continue
        got = state[name]
        want_paths = jax.tree_util.tree_flatten_with_path(want)[0]
        got_paths = jax.tree_util.tree_flatten_with_path(got)[0]
        if [p for p, _ in want_paths] != [p for p, _ in got_paths]:
            raise ValueError(
                f"`encoder_state` collection {name!r} has the leaves "
                f"{[jax.tree_util.keystr(p) for p, _ in got_paths][:6]} but the module creates "
                f"{[jax.tree_util.keystr(p) for p, _ in want_paths][:6]}; {fix}.")
        for (path, g), (_, w) in zip(got_paths, want_paths):
            if jnp.shape(g) != w.shape or jnp.result_type(g) != w.dtype:
                raise ValueError(
                    f"`encoder_state` collection {name!r} leaf {jax.tree_util.keystr(path)} is "
                    f"{_leaf_text(g)} but the module gives {w.dtype}{list(w.shape)} for this input; {fix}.")


def encoder(module: Any, *, inputs: Callable[[Any], Any] = _default_inputs,
            mutable: Sequence[str] = ("batch_stats",), rng_names: Sequence[str] = ("dropout",),
            **apply_kwargs: Any) -> Callable[..., tuple]:
    """``(params, state, batch, key) -> (z, new_state)`` from a Linen module, for
    ``mtl_step(..., has_state=True)``.

    The returned function calls ``module.apply({"params": params, **state}, inputs(batch),
    rngs=..., mutable=list(mutable), **apply_kwargs)`` once. With one RNG name the step's key is
    passed as is (``rngs={"dropout": key}``, exactly what a plain Flax step passes); with several,
    name ``i`` gets ``jax.random.fold_in(key, i)``; with ``key=None`` no RNGs are passed (a
    deterministic module).

    Args:
      module: a ``flax.linen.Module``.
      inputs: picks the module's input from the batch (default ``batch["x"]``).
      mutable: the collections the forward pass updates (default ``("batch_stats",)``); they
        must all be present in ``state``.
      rng_names: the RNG streams the module draws from (default ``("dropout",)``).
      **apply_kwargs: passed to ``module.apply`` (e.g. ``train=True``).

    Returns:
      The encoder function. Its ``new_state`` has the same collections as ``state``.

    Bad input is refused at trace time with an error that says what to fix: ``state`` not a dict
    of collections (``TypeError``), a collection of ``mutable`` missing, or a collection whose
    leaves differ in structure, shape or dtype from what ``module.init`` gives on this input
    (``ValueError`` naming ``encoder_state`` and the leaf; checked abstractly, no computation);
    an empty batch (``ValueError`` naming ``batch``); the module's own errors for inputs or
    parameters of the wrong shape (Flax names the parameter); :func:`imtl_jax.mtl_step`'s
    checks (T, floating-point parameters, targets for every task). Integer and 16-bit inputs go
    to the module as given (Flax layers promote them to their ``dtype``/``param_dtype``). NaN or
    inf in the batch, the targets or the log-scales is not an error: the step's
    ``aux.all_finite`` is False (it covers the losses, the weights and the gradients; a
    non-finite parameter whose effect saturates, e.g. through ``tanh``, can leave them finite)
    and the new statistics may be non-finite. Wrap the training step in
    :func:`imtl_jax.skip_nonfinite` with the encoder state in the carry: a non-finite step
    (including a non-finite new parameter) then leaves the parameters, the optimizer, the
    method state and the batch statistics exactly as they were.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, imtl_jax, imtl_jax.linen
      >>> net = nn.Dense(4)  # no state: state = {} and mutable=()
      >>> params = net.init(jax.random.key(0), jnp.ones((2, 3)))["params"]
      >>> enc = imtl_jax.linen.encoder(net, mutable=())
      >>> enc(params, {}, {"x": jnp.ones((2, 3))}, None)[0].shape
      (2, 4)
    """
    if not callable(getattr(module, "apply", None)):
        raise TypeError(f"`module` must be a flax.linen.Module, got {type(module).__name__}.")
    if isinstance(mutable, str) or isinstance(rng_names, str):
        raise TypeError("`mutable` and `rng_names` are sequences of names, e.g. ('batch_stats',).")
    mutable, rng_names = tuple(mutable), tuple(rng_names)

    def apply(params: Any, state: Any, batch: Any, key: Any) -> tuple:
        if not isinstance(state, Mapping):
            raise TypeError("`encoder_state` (the Linen encoder state) must be a dict of collections, "
                            "e.g. {'batch_stats': variables['batch_stats']}; got "
                            f"{type(state).__name__}.")
        missing = [c for c in mutable if c not in state]
        if missing:
            raise ValueError(f"`encoder_state` (the encoder state) has no collection(s) {missing} that "
                             f"the module updates (mutable={list(mutable)}); pass them in encoder_state=, "
                             "e.g. {'batch_stats': variables['batch_stats']}.")
        x = inputs(batch)
        _check_nonempty(x)
        _check_state(module, state, x, rng_names, apply_kwargs)
        if key is None or not rng_names:
            rngs = {}
        elif len(rng_names) == 1:
            rngs = {rng_names[0]: key}
        else:
            rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_names)}
        variables = {"params": params, **state}
        if not mutable:
            return module.apply(variables, x, rngs=rngs, **apply_kwargs), dict(state)
        z, updated = module.apply(variables, x, rngs=rngs, mutable=list(mutable), **apply_kwargs)
        return z, {**state, **updated}

    return apply
