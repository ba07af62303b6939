"""A Flax NNX model as pure functions of parameter pytrees: what :func:`imtl_jax.mtl_step` takes.

``nnx.split`` turns the model's ``encoder`` and ``heads`` into graph definitions and pure dicts
of arrays; the encoder and the per-task losses are then plain functions of those dicts, so the
step, the optimizer and ``jax.vmap`` over seeds see only pytrees. Two constructors, chosen by
the benchmark:

* :func:`stacked`: homogeneous heads stacked on a leading task axis (MultiMNIST, QM9, CelebA);
  task t's loss merges its slice back as a one-task stack and applies ``apply_task(z, 0)``.
* :func:`per_task`: one head module per task (the dense benchmarks); a tuple of T losses.

Task ``t``'s training loss is multiplied by ``loss_factors[t]`` (the robustness study's ×k);
evaluation losses are never scaled.

An encoder with non-parameter state (BatchNorm running statistics) becomes a stateful encoder
``encoder(shared, encoder_state, batch, key) -> (z, new_encoder_state)`` in training mode (batch
statistics, running averages updated once per step) for ``imtl_jax.mtl_step(...,
has_state=True)``; ``predict`` runs it in evaluation mode (running averages). ``encoder_state0``
is its initial state (None for a parameter-only encoder). Heads must be parameter-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from experiments.errors import ExperimentError

__all__ = ["PureModel", "stacked", "per_task"]


@dataclasses.dataclass
class PureModel:
    """``params0`` (:class:`imtl_jax.MTLParams`), ``encoder(shared, batch) -> z``,
    ``task_losses`` (for :func:`imtl_jax.mtl_step`), ``predict(params, batch)`` and
    ``eval_losses(preds, batch) -> (T,)`` (unscaled)."""

    params0: Any
    encoder: Callable
    task_losses: Any
    predict: Callable
    eval_losses: Callable
    encoder_state0: Any = None

    @property
    def has_state(self) -> bool:
        return self.encoder_state0 is not None


def _split_params(module, what: str):
    import jax
    from flax import nnx
    _, _, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise ExperimentError(
            f"{what} holds non-parameter state (e.g. BatchNorm statistics); the functional training "
            "path needs parameter-only modules: build it with norm='group'")
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def _factors(num_tasks: int, loss_factors: Optional[Sequence[float]]):
    f = np.ones(num_tasks, np.float32) if loss_factors is None else np.asarray(loss_factors, np.float32)
    return f, bool(np.any(f != 1.0))


def _encoder(model, input_key: str, name: str):
    """(train-mode encoder for the step, eval-mode ``forward(shared, state, batch)``, shared0, state0)."""
    import jax
    from flax import nnx
    graphdef, params, rest = nnx.split(model.encoder, nnx.Param, ...)
    if not jax.tree_util.tree_leaves(rest):
        enc_def, shared0 = _split_params(model.encoder, f"{name} encoder")

        def encoder(shared, batch):
            return nnx.merge(enc_def, shared)(batch[input_key])

        return encoder, (lambda shared, state, batch: encoder(shared, batch)), shared0, None

    shared0, state0 = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def run(shared, state, batch, train):
        module = nnx.merge(graphdef, shared, state)
        module.train() if train else module.eval()
        z = module(batch[input_key])
        return z, nnx.to_pure_dict(nnx.split(module, nnx.Param, ...)[2])

    def encoder(shared, state, batch, key):
        del key  # the experiments' encoders have no dropout
        return run(shared, state, batch, True)

    return encoder, (lambda shared, state, batch: run(shared, state, batch, False)[0]), shared0, state0


def stacked(model, *, name: str, num_tasks: int, input_key: str, target_key: str, loss: Callable,
            loss_factors: Optional[Sequence[float]] = None) -> PureModel:
    """Stacked heads: ``loss(preds (T, B, o), targets (B, T)) -> (T,)``; targets ``batch[target_key]``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    import imtl_jax

    encoder, forward, shared0, state0 = _encoder(model, input_key, name)
    heads_def, heads0 = _split_params(model.heads, f"{name} heads")
    factors, scaled = _factors(num_tasks, loss_factors)

    def head_loss(head_t, z, batch, t):
        head = nnx.merge(heads_def, jax.tree_util.tree_map(lambda x: x[None], head_t))
        pred = head.apply_task(z, 0)
        target = jnp.take(batch[target_key], t, axis=1)[:, None]
        out = loss(pred[None], target)[0]
        return out * jnp.asarray(factors)[t] if scaled else out

    def predict(params, batch, encoder_state=None):
        return nnx.merge(heads_def, params.heads)(forward(params.shared, encoder_state, batch))

    def eval_losses(preds, batch):
        return loss(preds, batch[target_key])

    params0 = imtl_jax.MTLParams(shared0, heads0, jnp.zeros((num_tasks,), jnp.float32))
    return PureModel(params0, encoder, imtl_jax.stacked_task_losses(head_loss), predict, eval_losses, state0)


def per_task(model, heads: Sequence[Any], *, name: str, task_names: Sequence[str], input_key: str,
             loss: Callable, loss_factors: Optional[Sequence[float]] = None) -> PureModel:
    """One head module per task (``heads[t]``); ``loss(preds {task: pred}, batch, tasks) -> (T,)``."""
    import jax.numpy as jnp
    from flax import nnx
    import imtl_jax

    encoder, forward, shared0, state0 = _encoder(model, input_key, name)
    names = tuple(task_names)
    defs, heads0 = [], []
    for n, h in zip(names, heads):
        d, p = _split_params(h, f"{name} head {n!r}")
        defs.append(d)
        heads0.append(p)
    factors, scaled = _factors(len(names), loss_factors)

    def make_loss(t):
        def loss_t(head_t, z, batch):
            out = loss({names[t]: nnx.merge(defs[t], head_t)(z)}, batch, (names[t],))[0]
            return out * float(factors[t]) if scaled else out
        return loss_t

    def predict(params, batch, encoder_state=None):
        z = forward(params.shared, encoder_state, batch)
        return {n: nnx.merge(d, h)(z) for n, d, h in zip(names, defs, params.heads)}

    def eval_losses(preds, batch):
        return loss(preds, batch, names)

    params0 = imtl_jax.MTLParams(shared0, tuple(heads0), jnp.zeros((len(names),), jnp.float32))
    return PureModel(params0, encoder, tuple(make_loss(t) for t in range(len(names))), predict, eval_losses,
                     state0)
