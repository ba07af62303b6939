"""A bfloat16 model through mtl_step: the per-task z-gradients are summed over the batch and the
weights solved in float32, the update comes back in bfloat16, and training reaches the float32
loss.

Oracles: the per-example z-gradients of the bfloat16 model summed in float64 NumPy and the
paper's IMTL-G (Eq. 2, float64); the float32 model's step; the float32 training run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import imtl_jax
from oracles import paper_alpha

T, B, DIN, F = 3, 64, 8, 16


def encoder(w, batch):
    return jnp.tanh(batch["x"] @ w)


def head_loss(h, z, batch, t):
    r = z @ h - batch["y"][:, t]
    return 0.5 * jnp.sum(r * r) / B


def make(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = imtl_jax.MTLParams(
        shared=jnp.asarray(rng.standard_normal((DIN, F)) / np.sqrt(DIN), dtype),
        heads=jnp.asarray(rng.standard_normal((T, F)) / np.sqrt(F), dtype),
        log_scales=jnp.zeros((T,), jnp.float32))
    x = rng.standard_normal((B, DIN))
    y = np.stack([np.sin(x[:, t]) + 0.1 * rng.standard_normal(B) for t in range(T)], axis=1)
    return params, {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype)}


STEP = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_g")


def test_bfloat16_weights_are_solved_in_float32_from_a_float32_batch_sum():
    params, batch = make(jnp.bfloat16)
    grads, _, aux = jax.jit(STEP)(params, STEP.init(params), batch)
    assert grads.shared.dtype == jnp.bfloat16 and grads.heads.dtype == jnp.bfloat16
    # The oracle: the bfloat16 model's per-example z-gradients (exact bfloat16 values), summed
    # over the batch in float64, and the paper's alpha in float64. A bfloat16 batch sum of 64
    # terms would be off by up to ~64 * 2^-9 relative; the float32 sum and solve leave ~1e-5.
    z = encoder(params.shared, batch)

    per_task = jax.jit(jax.vmap(lambda h, t: jax.grad(lambda z_: head_loss(h, z_, batch, t))(z)))
    per_example = np.asarray(per_task(params.heads, jnp.arange(T)), np.float64)
    expected = paper_alpha(per_example.sum(axis=1))
    np.testing.assert_allclose(np.asarray(aux.weights, np.float64), expected, rtol=0, atol=2e-2)
    # aux.weights are rounded to bfloat16 (8 bits): 2^-8 relative; the float32 weights behind them
    # are checked through the solve on the float32 sum.
    matrix = jnp.asarray(per_example.sum(axis=1), jnp.float32)
    np.testing.assert_allclose(np.asarray(imtl_jax.imtl_g_weights(matrix), np.float64), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux.weights, np.float64),
                               np.asarray(imtl_jax.imtl_g_weights(matrix).astype(jnp.bfloat16), np.float64),
                               rtol=0, atol=0)


def test_bfloat16_alpha_matches_the_float32_step_within_its_conditioning():
    """The bfloat16 model computes other gradients (its forward and backward round at 2^-8), so
    alpha moves by up to ~cond(K) * 2^-8 * |alpha| (first-order perturbation of K beta = 1)."""
    p32, b32 = make(jnp.float32)
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.ndim > 1 else x, p32)
    b16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), b32)
    _, _, a32 = jax.jit(STEP)(p32, STEP.init(p32), b32)
    _, _, a16 = jax.jit(STEP)(p16, STEP.init(p16), b16)
    z = encoder(p32.shared, b32)
    g = np.asarray(jax.jit(jax.vmap(lambda h, t: jax.grad(lambda z_: head_loss(h, z_, b32, t))(z)))(
        p32.heads, jnp.arange(T)), np.float64).sum(axis=1)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    cond = np.linalg.cond(u @ u.T)
    bound = 8 * cond * 2.0 ** -8 * np.abs(np.asarray(a32.weights)).max()
    diff = np.abs(np.asarray(a16.weights, np.float64) - np.asarray(a32.weights, np.float64)).max()
    assert diff <= bound, (diff, bound, cond)


def test_training_in_bfloat16_reaches_the_float32_loss():
    """200 Adam steps of IMTL-H from the same start, parameters kept in bfloat16 (no float32 master
    copy). Rounding the float32 run's final parameters to bfloat16 costs nothing here
    (``rounded`` ~ the float32 loss), but bfloat16 parameters drop every update smaller than
    half their ulp (2^-9 relative), so late, small Adam steps are partly lost: measured 8.4 %
    above the float32 loss on this problem. The stated margin is 10 %; keep float32 master
    weights (cast to bfloat16 inside the encoder) where that matters. Both runs must have fallen
    below half the starting loss."""
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_h")
    _, b32 = make(jnp.float32, seed=1)

    def mean_loss(params):
        p32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
        z = encoder(p32.shared, b32)
        return float(np.mean([head_loss(p32.heads[t], z, b32, t) for t in range(T)]))

    def train(dtype):
        params, batch = make(dtype, seed=1)
        tx = optax.adam(1e-2)

        @jax.jit
        def one(params, opt_state, state):
            grads, state, aux = step(params, state, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, state

        opt_state, state = tx.init(params), step.init(params)
        for _ in range(200):
            params, opt_state, state = one(params, opt_state, state)
        assert params.shared.dtype == dtype
        return params

    start = mean_loss(make(jnp.float32, seed=1)[0])
    p32, p16 = train(jnp.float32), train(jnp.bfloat16)
    final32, final16 = mean_loss(p32), mean_loss(p16)
    rounded = mean_loss(jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16) if x.ndim > 1 else x, p32))
    assert final32 < 0.5 * start and final16 < 0.5 * start
    assert rounded <= 1.01 * final32, (rounded, final32)
    assert final16 <= 1.10 * final32, (final16, final32, rounded)
