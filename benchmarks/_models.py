"""Small models shaped like the experiments, in plain JAX, for the benchmarks.

Each factory returns a :class:`Case`: an encoder ``encoder(shared, batch) -> z``, a per-task
head loss ``head_loss(head_t, z, batch, t) -> scalar`` (heads stacked on a leading task axis),
initial parameters and a batch maker. The shapes follow ``experiments/models.py``:

* ``lenet``  -- MultiMNIST LeNet: conv(10, 9x9)-pool-relu-conv(20, 5x5)-pool-relu-fc(50)-relu on
  28x28x1 images, 50-50-10 classification heads (T = 2, or 3 for the 3-head variant).
* ``qm9``    -- QM9-like MLP trunk 64-256-256-256 (ReLU), linear scalar regression heads (T = 11).
* ``celeba`` -- CelebA-like MLP trunk on flattened 32x32x3 images, 3072-512-512-512 (ReLU),
  linear binary (logistic) heads (T = 40; also run at T = 2, 3, 11 for the scaling in T).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import imtl_jax


class Case(NamedTuple):
    name: str
    num_tasks: int
    encoder: Callable[[Any, Any], jax.Array]
    head_loss: Callable[..., jax.Array]  # (head_t, z, batch, t) -> scalar
    params: imtl_jax.MTLParams
    make_batch: Callable[[int], dict]  # seed -> batch (same shapes for every seed)


def _dense(key, fan_in, fan_out, lead=()):
    w = jax.random.normal(key, lead + (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros(lead + (fan_out,), jnp.float32)}


def _conv(key, kh, kw, cin, cout):
    w = jax.random.normal(key, (kh, kw, cin, cout), jnp.float32) / np.sqrt(kh * kw * cin)
    return {"w": w, "b": jnp.zeros((cout,), jnp.float32)}


def _apply_conv(p, x):
    y = lax.conv_general_dilated(x, p["w"], (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def _max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _mlp(ps, x, final_relu=True):
    for i, p in enumerate(ps):
        x = x @ p["w"] + p["b"]
        if final_relu or i < len(ps) - 1:
            x = jax.nn.relu(x)
    return x


# --- MultiMNIST LeNet ---------------------------------------------------------------------------

def lenet(num_tasks: int = 2, batch_size: int = 256) -> Case:
    k = jax.random.split(jax.random.key(0), 5)
    shared = {"c1": _conv(k[0], 9, 9, 1, 10), "c2": _conv(k[1], 5, 5, 10, 20),
              "fc": _dense(k[2], 3 * 3 * 20, 50)}
    heads = [_dense(k[3], 50, 50, (num_tasks,)), _dense(k[4], 50, 10, (num_tasks,))]

    def encoder(p, batch):
        h = jax.nn.relu(_max_pool(_apply_conv(p["c1"], batch["x"])))
        h = jax.nn.relu(_max_pool(_apply_conv(p["c2"], h)))
        return jax.nn.relu(h.reshape(h.shape[0], -1) @ p["fc"]["w"] + p["fc"]["b"])

    def head_loss(head_t, z, batch, t):
        logits = _mlp(head_t, z, final_relu=False)
        logp = jax.nn.log_softmax(logits)
        labels = batch["y"][:, t]
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    def make_batch(seed):
        r = np.random.default_rng(seed)
        return {"x": jnp.asarray(r.random((batch_size, 28, 28, 1), np.float32)),
                "y": jnp.asarray(r.integers(0, 10, (batch_size, num_tasks)), jnp.int32)}

    params = imtl_jax.MTLParams(shared, heads, jnp.zeros((num_tasks,), jnp.float32))
    return Case("lenet (MultiMNIST)", num_tasks, encoder, head_loss, params, make_batch)


# --- QM9-like MLP -------------------------------------------------------------------------------

def qm9(num_tasks: int = 11, batch_size: int = 256, in_features: int = 64) -> Case:
    k = jax.random.split(jax.random.key(1), 4)
    dims = [in_features, 256, 256, 256]
    shared = [_dense(k[i], a, b) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]
    heads = _dense(k[3], 256, 1, (num_tasks,))

    def encoder(p, batch):
        return _mlp(p, batch["x"])

    def head_loss(head_t, z, batch, t):
        pred = (z @ head_t["w"] + head_t["b"])[:, 0]
        return jnp.mean((pred - batch["y"][:, t]) ** 2)

    def make_batch(seed):
        r = np.random.default_rng(seed)
        return {"x": jnp.asarray(r.standard_normal((batch_size, in_features), np.float32)),
                "y": jnp.asarray(r.standard_normal((batch_size, num_tasks), np.float32))}

    params = imtl_jax.MTLParams(shared, heads, jnp.zeros((num_tasks,), jnp.float32))
    return Case("mlp (QM9-like)", num_tasks, encoder, head_loss, params, make_batch)


# --- CelebA-like MLP ----------------------------------------------------------------------------

def celeba(num_tasks: int = 40, batch_size: int = 256, in_features: int = 32 * 32 * 3,
           width: int = 512) -> Case:
    k = jax.random.split(jax.random.key(2), 4)
    dims = [in_features, width, width, width]
    shared = [_dense(k[i], a, b) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]
    heads = _dense(k[3], width, 1, (num_tasks,))

    def encoder(p, batch):
        return _mlp(p, batch["x"])

    def head_loss(head_t, z, batch, t):
        logit = (z @ head_t["w"] + head_t["b"])[:, 0]
        y = batch["y"][:, t]
        return jnp.mean(jax.nn.softplus(logit) - y * logit)  # binary cross-entropy with logits

    def make_batch(seed):
        r = np.random.default_rng(seed)
        return {"x": jnp.asarray(r.random((batch_size, in_features), np.float32)),
                "y": jnp.asarray(r.integers(0, 2, (batch_size, num_tasks)), jnp.float32)}

    params = imtl_jax.MTLParams(shared, heads, jnp.zeros((num_tasks,), jnp.float32))
    return Case("mlp (CelebA-like)", num_tasks, encoder, head_loss, params, make_batch)


# --- precision ----------------------------------------------------------------------------------

def cast(case: Case, dtype) -> Case:
    """The same case with floating parameters and batch arrays in ``dtype`` (e.g. bfloat16):
    encoder and heads then compute in that precision; ``mtl_step`` accumulates the per-task
    z-gradients and solves the weights in float32 and casts the update back."""
    def to(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    def make_batch(seed):
        return jax.tree_util.tree_map(to, case.make_batch(seed))

    name = f"{case.name.split(' ')[0]} {jnp.dtype(dtype).name}"
    return case._replace(name=name, params=jax.tree_util.tree_map(to, case.params), make_batch=make_batch)
