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

__all__ = ["encoder"]


def _default_inputs(batch: Any) -> Any:
    if not isinstance(batch, Mapping) or "x" not in batch:
        raise TypeError("imtl_jax.linen.encoder: the batch has no 'x' entry; say which part of the "
                        "batch is the module's input with inputs=, e.g. inputs=lambda b: b['image'].")
    return batch["x"]


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
            raise TypeError("the Linen encoder state must be a dict of collections, e.g. "
                            "{'batch_stats': variables['batch_stats']}; got "
                            f"{type(state).__name__}.")
        missing = [c for c in mutable if c not in state]
        if missing:
            raise ValueError(f"the encoder state has no collection(s) {missing} that the module "
                             f"updates (mutable={list(mutable)}); pass them in encoder_state=, "
                             "e.g. {'batch_stats': variables['batch_stats']}.")
        if key is None or not rng_names:
            rngs = {}
        elif len(rng_names) == 1:
            rngs = {rng_names[0]: key}
        else:
            rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_names)}
        variables = {"params": params, **state}
        if not mutable:
            return module.apply(variables, inputs(batch), rngs=rngs, **apply_kwargs), dict(state)
        z, updated = module.apply(variables, inputs(batch), rngs=rngs, mutable=list(mutable),
                                  **apply_kwargs)
        return z, {**state, **updated}

    return apply
