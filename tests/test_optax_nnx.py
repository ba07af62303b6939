"""optax aggregator interop, Flax NNX pattern, and IMTL-L scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import imtl_jax
from imtl_jax.nnx import LossScales, make_train_step
from oracles import paper_alpha, x64

J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def stacked_updates(dtype=jnp.float32):
    """Per-task updates of a two-leaf pytree, stacked on axis 0 (T = 2)."""
    return {"a": jnp.asarray(J_BASE[:, :1], dtype), "b": jnp.asarray(J_BASE[:, 1:].reshape(2, 2, 1), dtype)}


def test_aggregator_in_chain_under_jit_exposes_alpha_and_c():
    tx = optax.chain(imtl_jax.imtl_g(num_tasks=2), optax.sgd(1.0))
    params = {"a": jnp.zeros(1), "b": jnp.zeros((2, 1))}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(stacked_updates(), state, params)
    np.testing.assert_allclose(-updates["a"], [0.07669683], rtol=1e-5)
    np.testing.assert_allclose(-updates["b"], [[1.0], [1.0]], rtol=1e-5)
    np.testing.assert_allclose(state[0].weights, [0.59233032, 0.40766968], rtol=1e-6)
    np.testing.assert_allclose(state[0].info["common_projection"], 0.39909406, rtol=1e-6)


def test_aggregator_extra_args_and_single_compile():
    tx = imtl_jax.imtl_g(num_tasks=2)
    state = tx.init({"a": jnp.zeros(1)})
    traces = []

    @jax.jit
    def f(u, s):
        traces.append(1)
        return tx.update(u, s, None, unknown_extra=3.0, another="ignored")

    u = {"a": jnp.asarray(J_BASE)}
    out, state = f(u, state)
    out, state = f({"a": jnp.asarray(J_BASE * 2)}, state)
    assert len(traces) == 1
    np.testing.assert_allclose(out["a"], 2 * (paper_alpha(J_BASE) @ J_BASE), rtol=1e-5)


def test_aggregator_priorities_are_traced():
    tx = imtl_jax.imtl_g(num_tasks=2)
    state = tx.init(None)
    f = jax.jit(lambda u, s, p: tx.update(u, s, priorities=p))
    g = {"a": jnp.asarray(J_BASE)}
    out, st = f(g, state, jnp.array([1.0, 3.0]))
    n = np.linalg.norm(J_BASE, axis=1)
    proj = (J_BASE / n[:, None]) @ np.asarray(out["a"], np.float64)
    np.testing.assert_allclose(proj[1] / proj[0], 3.0, rtol=1e-5)


def test_inject_hyperparams_interop():
    tx = optax.inject_hyperparams(imtl_jax.imtl_g, static_args=("num_tasks", "nonconflicting"))(num_tasks=2)
    state = tx.init({"a": jnp.zeros(3)})
    out, state = jax.jit(tx.update)({"a": jnp.asarray(J_BASE)}, state)
    np.testing.assert_allclose(out["a"], paper_alpha(J_BASE) @ J_BASE, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_aggregator_preserves_dtype(dtype):
    tx = imtl_jax.imtl_g(num_tasks=2)
    out, _ = tx.update(stacked_updates(dtype), tx.init(None))
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(out))
    with x64():
        tx64 = imtl_jax.imtl_g(num_tasks=2, dtype=jnp.float64)
        out, st = tx64.update({"a": jnp.asarray(J_BASE, jnp.float64)}, tx64.init(None))
        assert out["a"].dtype == jnp.float64
        np.testing.assert_allclose(out["a"], paper_alpha(J_BASE) @ J_BASE, rtol=1e-12)


def test_aggregator_bad_inputs():
    tx = imtl_jax.imtl_g(num_tasks=3)
    with pytest.raises(ValueError, match=r"T=3.*\(2, 3\)"):
        tx.update({"a": jnp.asarray(J_BASE)}, tx.init(None))
    with pytest.raises(ValueError, match="num_tasks"):
        imtl_jax.imtl_g(num_tasks=0)
    eq = imtl_jax.aggregate("equal", num_tasks=2)
    with pytest.raises(ValueError, match="losses"):
        eq.update({"a": jnp.asarray(J_BASE)}, eq.init(None))
    with pytest.raises(ValueError, match=r"losses.*\(2,\)"):
        eq.update({"a": jnp.asarray(J_BASE)}, eq.init(None), losses=jnp.ones(3))


def test_nnx_optimizer_with_aggregator():
    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3))

    model = Lin()
    opt = nnx.Optimizer(model, optax.chain(imtl_jax.imtl_g(num_tasks=2), optax.sgd(1.0)), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    grads["w"] = grads["w"].replace(jnp.asarray(J_BASE, jnp.float32))
    opt.update(model, grads)
    np.testing.assert_allclose(model.w[...], -(paper_alpha(J_BASE) @ J_BASE), rtol=1e-5)


class _Heads(nnx.Module):
    def __init__(self, num_tasks, features, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (num_tasks, features)))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.encoder = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.tanh)
        self.heads = _Heads(2, 8, rngs)
        self.loss_scales = LossScales(2)


def _head_loss(head_t, z, batch, t):
    return jnp.mean((z @ head_t["w"][...] - batch["y"][:, t]) ** 2)


def test_nnx_train_step_matches_functional_step_and_trains():
    model = _Model(nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 3)),
             "y": jax.random.normal(jax.random.key(2), (16, 2))}
    # Functional reference on the same parameters, with plain optax.
    lin = model.encoder.layers[0]
    w0, b0 = lin.kernel[...], lin.bias[...]
    heads0 = model.heads.w[...]

    def encoder(p, b):
        return jnp.tanh(b["x"] @ p["k"] + p["b"])

    def head_loss(w_t, z, b, t):
        return jnp.mean((z @ w_t - b["y"][:, t]) ** 2)

    ref_step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    params = imtl_jax.MTLParams({"k": w0, "b": b0}, heads0, jnp.zeros(2))
    grads, _, ref_aux = ref_step(params, (), batch)
    tx = optax.sgd(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    train_step = nnx.jit(make_train_step(_head_loss, "imtl_h"))
    _, aux = train_step(model, optimizer, batch, ())
    np.testing.assert_allclose(aux.weights, ref_aux.weights, rtol=1e-5)
    np.testing.assert_allclose(model.encoder.layers[0].kernel[...], expected.shared["k"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.heads.w[...], expected.heads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.loss_scales.log_scales[...], expected.log_scales, rtol=1e-5, atol=1e-7)

    first = float(jnp.sum(aux.losses))
    for _ in range(60):
        _, aux = train_step(model, optimizer, batch, ())
    assert float(jnp.sum(aux.losses)) < first


# ------------------------------------------------------------------------------------------------
# IMTL-L


def test_scale_losses_gradient_and_optimum(dtype):
    losses = jnp.asarray([0.5, 2.0, 10.0], dtype)
    s = jnp.asarray([0.1, -0.3, 0.7], dtype)
    grad = jax.grad(lambda s_: jnp.sum(imtl_jax.scale_losses(losses, s_)))(s)
    np.testing.assert_allclose(grad, np.exp(np.asarray(s, np.float64)) * np.asarray(losses, np.float64) - 1,
                               rtol=1e-6)
    s_star = -jnp.log(losses)
    grad_star = jax.grad(lambda s_: jnp.sum(imtl_jax.scale_losses(losses, s_)))(s_star)
    np.testing.assert_allclose(grad_star, 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.exp(s_star) * losses, 1.0, rtol=1e-6)
    # L -> k L shifts the optimum by -log k
    k = 7.0
    s_star_k = -jnp.log(k * losses)
    np.testing.assert_allclose(s_star_k - s_star, -np.log(k), rtol=1e-5)
    grad_k = jax.grad(lambda s_: jnp.sum(imtl_jax.scale_losses(k * losses, s_)))(s_star_k)
    np.testing.assert_allclose(grad_k, 0.0, atol=1e-5)


def test_scale_losses_theta_gradient_at_optimum_is_grad_log_loss():
    """At s* the scaled loss's parameter gradient is grad log L (scale free)."""
    theta = jnp.asarray([0.3, -1.2])

    def loss(th):
        return jnp.sum((th - 2.0) ** 2) + 0.5

    s_star = -jnp.log(loss(theta))
    g = jax.grad(lambda th: imtl_jax.scale_losses(loss(th)[None], s_star[None])[0])(theta)
    np.testing.assert_allclose(g, jax.grad(lambda th: jnp.log(loss(th)))(theta), rtol=1e-6)


def test_scale_losses_bad_inputs():
    with pytest.raises(ValueError, match=r"losses.*\(3,\).*log_scales.*\(2,\)"):
        imtl_jax.scale_losses(jnp.ones(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="losses"):
        imtl_jax.scale_losses(jnp.ones((3, 1)), jnp.zeros(3))
    with pytest.raises(TypeError, match="log_scales"):
        imtl_jax.scale_losses(jnp.ones(3), jnp.zeros(3, jnp.int32))
