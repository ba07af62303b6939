"""RLW (Lin et al., TMLR 2022) and SI (minimise sum_t log L_t; Navon et al., ICML 2022) against
their definitions: numpy float64 formulas, the distribution of the random weights, autodiff of
the objective, and the scale invariance SI is named for."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

import imtl_jax
from imtl_jax.methods import get_method

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
RLW = get_method("rlw").weighting
SI = get_method("si").weighting


# ---------------------------------------------------------------------------------------------
# RLW


def test_rlw_weights_are_the_softmax_of_the_normal_draw(fdtype):
    losses = jnp.asarray([0.3, 2.0, 7.0, 1.0], fdtype)
    key = jax.random.key(11)
    out = RLW.weigh(None, losses, RLW.init(4), key, None)
    eps = np.asarray(jax.random.normal(key, (4,), fdtype), np.float64)   # the step's draw
    oracle = np.exp(eps - eps.max()) / np.exp(eps - eps.max()).sum()   # softmax, float64
    assert out.weights.dtype == fdtype
    np.testing.assert_allclose(np.asarray(out.weights), oracle, rtol=1e-12 if fdtype == np.float64 else 1e-6)
    np.testing.assert_allclose(np.asarray(out.info["logits"]), eps, rtol=1e-6)
    assert int(out.state.count) == 1
    # The losses do not enter the weights.
    again = RLW.weigh(None, 100.0 * losses, RLW.init(4), key, None)
    np.testing.assert_array_equal(np.asarray(again.weights), np.asarray(out.weights))


def test_rlw_log_weight_differences_are_normal_with_variance_two():
    """log w_i - log w_j = eps_i - eps_j ~ N(0, 2) independently of the softmax; mean weight 1/T."""
    num_tasks, draws = 5, 4000
    weigh = jax.jit(jax.vmap(lambda k: RLW.weigh(None, jnp.ones(num_tasks), RLW.init(num_tasks), k, None).weights))
    w = np.asarray(weigh(jax.random.split(jax.random.key(3), draws)), np.float64)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    diff = np.log(w[:, 0]) - np.log(w[:, 3])
    assert scipy.stats.kstest(diff / np.sqrt(2.0), "norm").pvalue > 1e-3
    # By symmetry every task's mean weight is 1/T (standard error ~ 0.003 at 4000 draws).
    np.testing.assert_allclose(w.mean(axis=0), 1.0 / num_tasks, atol=0.015)


def test_rlw_without_a_key_draws_fresh_weights_each_step():
    state = RLW.init(3)
    seen = []
    for _ in range(3):
        out = jit(lambda s: RLW.weigh(None, jnp.ones(3), s, None, None))(state)
        state = out.state
        seen.append(np.asarray(out.weights))
    assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[1], seen[2])


def test_rlw_in_the_training_step_weighs_heads_and_encoder_alike():
    """Through mtl_step: the gradient is that of sum_t w_t L_t with the weights of the step's draw."""
    k = jax.random.split(jax.random.key(5), 4)
    batch = {"x": jax.random.normal(k[0], (16, 3)), "y": jax.random.normal(k[1], (16, 2))}
    params = imtl_jax.MTLParams(shared=jax.random.normal(k[2], (3, 4)), heads=jax.random.normal(k[3], (2, 4)),
                                log_scales=jnp.zeros(2))

    def encoder(w, b):
        return jnp.tanh(b["x"] @ w)

    def head_loss(v, z, b, t):
        return jnp.mean((z @ v - b["y"][:, t]) ** 2)

    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "rlw")
    grads, _, aux = jit(lambda p, s, key: step(p, s, batch, key=key))(params, step.init(params), jax.random.key(9))
    w = np.asarray(aux.weights)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)

    def weighted(p):
        z = encoder(p.shared, batch)
        return sum(float(w[t]) * head_loss(p.heads[t], z, batch, t) for t in range(2))

    direct = jax.grad(weighted)(params)
    np.testing.assert_allclose(np.asarray(grads.shared), np.asarray(direct.shared), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads.heads), np.asarray(direct.heads), rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# SI


def test_si_weights_give_the_gradient_of_the_sum_of_log_losses(fdtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5))
    b = rng.standard_normal((3, 4))

    def task_losses(theta):
        r = jnp.einsum("tij,j->ti", jnp.asarray(a, fdtype), theta) - jnp.asarray(b, fdtype)
        return jnp.sum(r * r, axis=1) * jnp.asarray([1.0, 1e3, 1e-2], fdtype)

    @jit
    def run(theta):
        losses = task_losses(theta)
        out = SI.weigh(None, losses, (), None, None)
        return losses, out, out.weights @ jax.jacrev(task_losses)(theta), \
            jax.grad(lambda th: jnp.sum(jnp.log(task_losses(th))))(theta)

    theta = rng.standard_normal(5)
    losses, out, combined, direct = run(jnp.asarray(theta, fdtype))
    tol = 1e-12 if fdtype == np.float64 else 2e-5
    assert out.weights.dtype == fdtype
    np.testing.assert_allclose(np.asarray(combined), np.asarray(direct), rtol=10 * tol, atol=tol)
    # The formula, float64 numpy from the same inputs: w_t = 1 / L_t, and the objective's value.
    r = np.einsum("tij,j->ti", a, theta) - b
    lv = np.sum(r * r, axis=1) * np.array([1.0, 1e3, 1e-2])
    np.testing.assert_allclose(np.asarray(out.weights), 1.0 / lv, rtol=10 * tol)
    np.testing.assert_allclose(float(out.info["sum_log_losses"]), np.log(lv).sum(), rtol=10 * tol, atol=tol)


def test_si_update_is_invariant_to_every_task_scale():
    """L_t -> k_t L_t leaves every gradient of the training step unchanged (scale invariance; it
    holds while the losses stay within 1/eps of each other, where the zero-loss clamp is idle)."""
    k = jax.random.split(jax.random.key(2), 4)
    batch = {"x": jax.random.normal(k[0], (16, 3)), "y": jax.random.normal(k[1], (16, 3))}
    params = imtl_jax.MTLParams(shared=jax.random.normal(k[2], (3, 4)), heads=jax.random.normal(k[3], (3, 4)),
                                log_scales=jnp.zeros(3))

    def encoder(w, b):
        return jnp.tanh(b["x"] @ w)

    def make(scales):
        def head_loss(v, z, b, t):
            return jnp.asarray(scales)[t] * jnp.mean((z @ v - b["y"][:, t]) ** 2)
        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "si")
        return jit(lambda p: step(p, (), batch)[0])(params)

    base = make([1.0, 1.0, 1.0])
    scaled = make([1e-2, 10.0, 1e2])
    for got, want in zip(jax.tree_util.tree_leaves(scaled), jax.tree_util.tree_leaves(base)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)


def test_si_zero_losses_stay_finite():
    out = SI.weigh(None, jnp.array([0.0, 2.0]), (), None, None)
    assert np.all(np.isfinite(np.asarray(out.weights))) and float(out.weights[0]) > 1e6
    np.testing.assert_array_equal(np.asarray(SI.weigh(None, jnp.zeros(3), (), None, None).weights), 1.0)
    # SGD on sum log L through the optax aggregator descends both quadratics.
    tx = imtl_jax.aggregate("si", num_tasks=2)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
