"""Flax NNX helpers: learnable loss scales and a train step for encoder + stacked heads models.

The pattern: a model with three attributes — ``encoder`` (an ``nnx.Module`` mapping the batch's
inputs to the shared feature z), ``heads`` (an ``nnx.Module`` whose parameters are stacked on a
leading task axis T) and ``loss_scales`` (a :class:`LossScales`) — trained with
:func:`imtl_jax.mtl_step` on the pure parameter pytrees (``nnx.split``/``nnx.merge``), and
updated with ``nnx.Optimizer``. Non-parameter state of the encoder (e.g. BatchNorm statistics) is
read but not updated by this helper: use norm layers without running statistics, or thread the
statistics yourself.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import imtl_jax
  >>> from imtl_jax.nnx import LossScales, make_train_step
  >>> class Heads(nnx.Module):  # T linear regression heads, stacked
  ...     def __init__(self, num_tasks, features, rngs):
  ...         self.w = nnx.Param(jax.random.normal(rngs.params(), (num_tasks, features)))
  >>> class Model(nnx.Module):
  ...     def __init__(self, rngs):
  ...         self.encoder = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.tanh)
  ...         self.heads = Heads(2, 8, rngs)
  ...         self.loss_scales = LossScales(2)
  >>> def head_loss(head_t, z, batch, t):  # head_t: task t's slice of the heads' parameters
  ...     return jnp.mean((z @ head_t["w"][...] - batch["y"][:, t]) ** 2)
  >>> model = Model(nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  >>> train_step = nnx.jit(make_train_step(head_loss, "imtl_h"))
  >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
  >>> _, aux = train_step(model, optimizer, batch, ())
  >>> aux.weights.shape
  (2,)
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
from flax import nnx

from imtl_jax._method import Method
from imtl_jax._step import MTLParams, mtl_step, stacked_task_losses


class LossScales(nnx.Module):
    """T learnable IMTL-L log-scales ``s`` (an ``nnx.Param``, zeros at start).

    They are ordinary parameters: the optimizer's weight decay pulls them towards 0 (scale 1);
    give them their own rule with ``optax.partition`` / an ``nnx.Optimizer`` ``wrt`` filter if
    that is not wanted.
    """

    def __init__(self, num_tasks: int, *, dtype: Any = jnp.float32):
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
        self.log_scales = nnx.Param(jnp.zeros((num_tasks,), dtype))

    def __call__(self) -> jax.Array:
        """The scales ``e^s``."""
        return jnp.exp(self.log_scales[...])


def make_train_step(head_loss: Callable[..., jax.Array], method: Union[str, Method] = "imtl_h", *,
                    inputs: Callable[[Any], Any] = lambda batch: batch["x"],
                    reduction: str = "sum") -> Callable:
    """A train step ``(model, optimizer, batch, method_state) -> (method_state, aux)``.

    Wrap it in ``nnx.jit``. The model must have ``encoder``, ``heads`` and ``loss_scales``
    attributes and no other parameters; ``optimizer`` is an ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``.

    Args:
      head_loss: ``head_loss(head_params_t, z, batch, t) -> scalar`` where ``head_params_t`` is
        task t's slice of ``nnx.state(model.heads, nnx.Param)`` (read arrays with ``[...]``).
      method: registered method name or :class:`imtl_jax.Method`.
      inputs: picks the encoder's input from the batch.
      reduction: batch reduction of the feature gradients (see :func:`imtl_jax.mtl_step`).

    Returns:
      ``train_step(model, optimizer, batch, method_state)`` returning the new method state (``()``
      for IMTL) and the step's :class:`imtl_jax.StepAux`; the model is updated in place.
    """

    def train_step(model, optimizer, batch, method_state):
        enc_def, enc_params, enc_rest = nnx.split(model.encoder, nnx.Param, ...)

        def encoder(shared, b):
            return nnx.merge(enc_def, shared, enc_rest)(inputs(b))

        step = mtl_step(encoder, stacked_task_losses(head_loss), method, reduction=reduction)
        scales_param = model.loss_scales.log_scales
        params = MTLParams(enc_params, nnx.state(model.heads, nnx.Param), scales_param[...])
        grads, method_state, aux = step(params, method_state, batch)
        grad_state = nnx.state(model, nnx.Param)
        grad_state["encoder"] = grads.shared
        grad_state["heads"] = grads.heads
        grad_state["loss_scales"]["log_scales"] = scales_param.replace(grads.log_scales)
        optimizer.update(model, grad_state)
        return method_state, aux

    return train_step
