"""Flax Linen: a BatchNorm + Dropout encoder trained with mtl_step(has_state=True) + optax.

Oracles: a plain Flax training step (``jax.value_and_grad`` of the summed losses with the same
dropout key and ``mutable=["batch_stats"]``) for ``method="equal"``; an independent per-task
``jax.grad`` loop with the same key (the same dropout mask) and the paper's Eq. 2 in float64 for
IMTL-H.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
import imtl_jax.linen
from oracles import paper_alpha, x64

T = 3


class Encoder(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(12, dtype=self.dtype, param_dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8, dtype=self.dtype,
                         param_dtype=self.dtype)(x)
        return nn.Dropout(0.3, deterministic=not train)(jnp.tanh(x))


def make(seed=0, dtype=jnp.float32, batch_size=16):
    net = Encoder(dtype)
    heads = nn.Dense(1, dtype=dtype, param_dtype=dtype)
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (batch_size, 5), dtype)
    batch = {"x": x, "y": jnp.stack([x[:, 0], x[:, 1] * x[:, 2], jnp.sin(x[:, 3])], axis=1)}
    variables = net.init(k[1], x, train=False)
    head_params = jax.vmap(lambda kk: heads.init(kk, jnp.ones((1, 12), dtype))["params"])(
        jax.random.split(k[2], T))
    params = imtl_jax.MTLParams(variables["params"], head_params,
                                jnp.asarray([0.2, -0.3, 0.5], dtype))
    return net, heads, params, {"batch_stats": variables["batch_stats"]}, batch, k[3]


def head_loss_of(heads):
    def head_loss(p_t, z, batch, t):
        return jnp.mean((heads.apply({"params": p_t}, z)[:, 0] - batch["y"][:, t]) ** 2)
    return head_loss


def _close(a, b, rtol, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def test_equal_reproduces_a_plain_flax_training_step():
    net, heads, params, state, batch, key = make()
    head_loss = head_loss_of(heads)
    # SGD, not Adam: the Dense bias before BatchNorm has an exactly-zero gradient, which Adam
    # would normalize (round-off noise / its own size) into an O(lr) step of either sign.
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def plain_step(params, opt_state, state, key):
        def loss_fn(p):
            z, new_state = net.apply({"params": p.shared, **state}, batch["x"], train=True,
                                     rngs={"dropout": key}, mutable=["batch_stats"])
            losses = jnp.stack([head_loss(jax.tree_util.tree_map(lambda x, t=t: x[t], p.heads), z, batch, t)
                                for t in range(T)])
            return losses.sum(), (losses, new_state)
        (_, (losses, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_state, losses

    step = imtl_jax.mtl_step(imtl_jax.linen.encoder(net, train=True),
                             imtl_jax.stacked_task_losses(head_loss), "equal", has_state=True)

    @jax.jit
    def our_step(params, opt_state, state, key):
        grads, _, state, aux = step(params, (), batch, encoder_state=state, key=key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, aux.losses

    ours = plain = (params, tx.init(params), state)
    for i in range(3):
        k = jax.random.fold_in(key, i)
        *ours, our_losses = our_step(*ours, k)
        *plain, plain_losses = plain_step(*plain, k)
        np.testing.assert_allclose(our_losses, plain_losses, rtol=2e-6, atol=1e-7)
    _close(ours[0].shared, plain[0].shared, 2e-5, 2e-6)   # log_scales: zero gradient in both
    _close(ours[0].heads, plain[0].heads, 2e-5, 2e-6)
    _close(ours[2], plain[2], 2e-6, 1e-7)                 # batch statistics
    assert not np.allclose(ours[2]["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_imtl_h_shared_gradient_is_alpha_weighted_per_task_gradients_same_mask():
    with x64():
        net, heads, params, state, batch, key = make(seed=1, dtype=jnp.float64)
        head_loss = head_loss_of(heads)
        s = np.asarray(params.log_scales)

        def forward(p):
            return net.apply({"params": p, **state}, batch["x"], train=True, rngs={"dropout": key},
                             mutable=["batch_stats"])

        z, new_state = forward(params.shared)
        rows, per_task = [], []
        for t in range(T):
            h_t = jax.tree_util.tree_map(lambda x, t=t: x[t], params.heads)
            gz = jax.grad(lambda z_, t=t, h_t=h_t: np.exp(s[t]) * head_loss(h_t, z_, batch, t))(z)
            rows.append(np.asarray(gz).sum(axis=0))
            per_task.append(jax.grad(
                lambda p, t=t, h_t=h_t: np.exp(s[t]) * head_loss(h_t, forward(p)[0], batch, t) - s[t])(
                    params.shared))
        alpha = paper_alpha(np.stack(rows))
        want = jax.tree_util.tree_map(lambda *g: sum(a * x for a, x in zip(alpha, g)), *per_task)
        step = imtl_jax.mtl_step(imtl_jax.linen.encoder(net, train=True),
                                 imtl_jax.stacked_task_losses(head_loss), "imtl_h", has_state=True)
        grads, _, got_state, aux = jax.jit(step)(params, (), batch, encoder_state=state, key=key)
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9, atol=1e-12)
        _close(grads.shared, want, 1e-9, 1e-12)
        _close(got_state, new_state, 1e-12, 0)


def test_one_compilation_and_training_with_every_stateful_method():
    net, heads, params, state, batch, key = make(seed=2, batch_size=32)
    for method in ("gradnorm", "dwa", "famo", "pcgrad"):
        step = imtl_jax.mtl_step(imtl_jax.linen.encoder(net, train=True),
                                 imtl_jax.stacked_task_losses(head_loss_of(heads)), method, has_state=True)
        tx = optax.adam(1e-2)
        traces = []

        @jax.jit
        def train(p, o, m, s, k):
            traces.append(1)  # noqa: B023 (used within this iteration)
            grads, m, s, aux = step(p, m, batch, encoder_state=s, key=k)  # noqa: B023 (same)
            updates, o = tx.update(grads, o, p)  # noqa: B023 (same)
            return optax.apply_updates(p, updates), o, m, s, aux

        carry = (params, tx.init(params), step.init(params), state)
        first = None
        for i in range(15):
            *carry, aux = train(*carry, jax.random.fold_in(key, i))
            first = float(aux.losses.sum()) if first is None else first
        assert len(traces) == 1, method
        assert float(aux.losses.sum()) < first, method


def test_linen_encoder_errors_name_the_fix():
    net, heads, params, state, batch, key = make(seed=3)
    enc = imtl_jax.linen.encoder(net, train=True)
    with pytest.raises(ValueError, match=r"no collection\(s\) \['batch_stats'\]"):
        enc(params.shared, {}, batch, key)
    with pytest.raises(TypeError, match="inputs="):
        enc(params.shared, state, {"image": batch["x"]}, key)
    with pytest.raises(TypeError, match="flax.linen.Module"):
        imtl_jax.linen.encoder(lambda x: x)
    two = imtl_jax.linen.encoder(net, train=True, rng_names=("dropout", "other"))
    z1, _ = two(params.shared, state, batch, key)
    z2, _ = enc(params.shared, state, batch, jax.random.fold_in(key, 0))
    np.testing.assert_array_equal(z1, z2)  # name i gets fold_in(key, i)
