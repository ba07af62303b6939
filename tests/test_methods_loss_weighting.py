"""Loss-weighting baselines (uncertainty, GLS, DWA, FAMO, single task) against numpy float64
oracles written from the papers' equations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)
from hypothesis import given, settings, strategies as st
from scipy.optimize import minimize_scalar

import imtl_jax
from imtl_jax.methods import get_method
from imtl_jax.methods.loss_weighting import (dwa_weighting, famo_weighting, gls_weighting,
                                             single_task, uncertainty_scale)


# Many small test programs: skip LLVM's expensive optimisations (same numerics).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def tol(dtype):
    return 1e-12 if dtype == np.float64 else 2e-6


# ---------------------------------------------------------------------------------------------
# Uncertainty weighting


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
       st.lists(st.floats(-5, 5), min_size=3, max_size=3))
def test_uncertainty_is_imtl_l_with_flipped_sign(losses, s):
    losses = np.asarray(losses)
    s = np.asarray(s)
    imtl_l = np.asarray(imtl_jax.scale_losses(jnp.asarray(losses, jnp.float32), jnp.asarray(s, jnp.float32)))
    uw = np.asarray(uncertainty_scale(jnp.asarray(losses, jnp.float32), jnp.asarray(-s, jnp.float32)))
    np.testing.assert_allclose(imtl_l, uw, rtol=1e-5, atol=1e-5)
    # Kendall et al.'s form 1/(2 sigma^2) L + log sigma with s = log sigma^2, in float64 numpy:
    s_uw = -s  # the uncertainty form's log sigma^2
    kendall = 0.5 * np.exp(-s_uw) * losses + 0.5 * s_uw
    np.testing.assert_allclose(imtl_l, 2.0 * kendall, rtol=1e-5, atol=1e-5)


def test_uncertainty_optimum_is_log_loss():
    for loss in [0.01, 1.0, 37.0]:
        res = minimize_scalar(
            lambda s, loss=loss: float(uncertainty_scale(jnp.array([loss]), jnp.array([s], jnp.float32))[0]),
            bracket=(-10.0, 10.0), tol=1e-10)
        assert abs(res.x - np.log(loss)) < 1e-3
    with pytest.raises(ValueError, match="log_scales"):
        uncertainty_scale(jnp.ones(3), jnp.ones(2))


def test_uncertainty_method_trains_log_scales():
    method = get_method("uncertainty")
    assert method.scaling.trainable
    g = jax.grad(lambda s: jnp.sum(method.scaling.scale(jnp.array([2.0, 0.5]), s)))(jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(g), 1.0 - np.array([2.0, 0.5]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# GLS


def test_gls_weights_give_the_gradient_of_the_geometric_mean(fdtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5))
    b = rng.standard_normal((3, 4))

    def task_losses(theta):
        r = jnp.einsum("tij,j->ti", jnp.asarray(a, fdtype), theta) - jnp.asarray(b, fdtype)
        return jnp.sum(r * r, axis=1) + 0.1

    @jit
    def run(theta):
        losses = task_losses(theta)
        out = gls_weighting().weigh(None, losses, (), None, None)
        combined = out.weights @ jax.jacrev(task_losses)(theta)
        direct = jax.grad(lambda th: jnp.prod(task_losses(th)) ** (1.0 / 3.0))(theta)
        return losses, out, combined, direct

    losses, out, combined, direct = run(jnp.asarray(rng.standard_normal(5), fdtype))
    assert out.weights.dtype == fdtype
    np.testing.assert_allclose(np.asarray(combined), np.asarray(direct), rtol=100 * tol(fdtype))
    # The formula itself, in float64 numpy.
    lv = np.asarray(losses, np.float64)
    gls = np.prod(lv) ** (1 / 3)
    np.testing.assert_allclose(np.asarray(out.weights), gls / (3 * lv), rtol=10 * tol(fdtype))
    np.testing.assert_allclose(float(out.info["geometric_mean"]), gls, rtol=10 * tol(fdtype))


def test_gls_is_scale_free_in_direction():
    w1 = np.asarray(gls_weighting().weigh(None, jnp.array([1.0, 4.0]), (), None, None).weights)
    w2 = np.asarray(gls_weighting().weigh(None, jnp.array([10.0, 4.0]), (), None, None).weights)
    # L_1 -> 10 L_1: w_1 L_1 and w_2 L_2 keep their ratio (direction of grad log GLS unchanged).
    np.testing.assert_allclose((w2 * [10.0, 4.0]) / (w2 * [10.0, 4.0]).sum(),
                               (w1 * [1.0, 4.0]) / (w1 * [1.0, 4.0]).sum(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# DWA


def dwa_oracle(loss_seq, temperature, window):
    """Liu et al. 2019 Eq. 7-8 with period averages over `window` steps, numpy float64."""
    loss_seq = np.asarray(loss_seq, np.float64)
    num_tasks = loss_seq.shape[1]
    out = []
    for k in range(len(loss_seq)):
        if k < 2 * window:
            out.append(np.ones(num_tasks))
            continue
        recent = loss_seq[k - window:k].mean(0)
        earlier = loss_seq[k - 2 * window:k - window].mean(0)
        r = recent / earlier
        e = np.exp(r / temperature)
        out.append(num_tasks * e / e.sum())
    return np.array(out)


@pytest.mark.parametrize("window", [1, 3])
def test_dwa_matches_the_paper_formula(fdtype, window):
    rng = np.random.default_rng(window)
    seq = np.exp(rng.standard_normal((12, 3))) * np.array([1.0, 10.0, 0.1])
    wt = dwa_weighting(temperature=2.0, window=window)
    state = wt.init(3, jnp.dtype(fdtype))
    fn = jit(lambda losses, s: wt.weigh(None, losses, s, None, None))
    got = []
    for row in seq:
        out = fn(jnp.asarray(row, fdtype), state)
        state = out.state
        assert out.weights.dtype == fdtype
        got.append(np.asarray(out.weights, np.float64))
    np.testing.assert_allclose(np.array(got), dwa_oracle(seq, 2.0, window), rtol=100 * tol(fdtype))


def test_dwa_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="temperature"):
        dwa_weighting(temperature=0.0)
    with pytest.raises(ValueError, match="window"):
        dwa_weighting(window=0)


# ---------------------------------------------------------------------------------------------
# FAMO


def famo_oracle(loss_seq, lr, gamma, adam=True):
    """FAMO (Liu et al. 2023, Alg. 1) in numpy float64, with the authors' Adam + L2 decay on the
    logits (torch.optim.Adam(weight_decay=gamma) semantics), or a plain step when adam=False."""
    loss_seq = np.asarray(loss_seq, np.float64)
    num_tasks = loss_seq.shape[1]
    xi = np.zeros(num_tasks)
    m = np.zeros(num_tasks)
    v = np.zeros(num_tasks)
    b1, b2, eps = 0.9, 0.999, 1e-8
    n_updates = 0
    out = []
    prev = None
    for losses in loss_seq:
        if prev is not None:
            delta = np.log(prev) - np.log(losses)
            z = np.exp(xi) / np.exp(xi).sum()
            jac = np.diag(z) - np.outer(z, z)          # d softmax / d xi
            grad = jac.T @ delta + gamma * xi
            if adam:
                n_updates += 1
                m = b1 * m + (1 - b1) * grad
                v = b2 * v + (1 - b2) * grad ** 2
                mh = m / (1 - b1 ** n_updates)
                vh = v / (1 - b2 ** n_updates)
                xi = xi - lr * mh / (np.sqrt(vh) + eps)
            else:
                xi = xi - lr * grad
        z = np.exp(xi) / np.exp(xi).sum()
        c = 1.0 / np.sum(z / losses)
        out.append(c * z / losses)
        prev = losses
    return np.array(out)


@pytest.mark.parametrize("adam", [True, False])
def test_famo_matches_algorithm_1(fdtype, adam):
    rng = np.random.default_rng(5)
    seq = np.exp(np.cumsum(0.3 * rng.standard_normal((10, 3)), axis=0)) * np.array([1.0, 20.0, 0.05])
    lr, gamma = 0.1, 0.01
    opt = None if adam else optax.chain(optax.add_decayed_weights(gamma), optax.sgd(lr))
    wt = famo_weighting(lr=lr, gamma=gamma, optimizer=opt)
    state = wt.init(3, jnp.dtype(fdtype))
    fn = jit(lambda losses, s: wt.weigh(None, losses, s, None, None))
    got = []
    for row in seq:
        out = fn(jnp.asarray(row, fdtype), state)
        state = out.state
        got.append(np.asarray(out.weights, np.float64))
    expected = famo_oracle(seq, lr, gamma, adam=adam)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e3 * tol(fdtype), atol=1e3 * tol(fdtype))
    np.testing.assert_allclose(np.array(got).sum(1), 1.0, rtol=10 * tol(fdtype))


def test_famo_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        famo_weighting(lr=0.0)
    with pytest.raises(ValueError, match="gamma"):
        famo_weighting(gamma=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        famo_weighting(optimizer="adam")


# ---------------------------------------------------------------------------------------------
# Single task


def test_single_task_trains_only_its_task():
    def encoder(w, batch):
        return jnp.tanh(batch["x"] @ w)

    def head_loss(v_t, z, batch, t):
        return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = imtl_jax.MTLParams(shared=jax.random.normal(k1, (3, 4)),
                                heads=jax.random.normal(k2, (2, 4)), log_scales=jnp.zeros(2))
    batch = {"x": jax.random.normal(k3, (8, 3)), "y": jnp.ones((8, 2))}
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), single_task(1))

    @jit
    def run(params):
        grads, _, aux = step(params, step.init(params), batch)
        only_1 = jax.grad(lambda sh: head_loss(params.heads[1], encoder(sh, batch), batch, 1))(params.shared)
        return grads, aux, only_1

    grads, aux, only_1 = run(params)
    np.testing.assert_array_equal(np.asarray(aux.weights), [0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(grads.heads[0]), 0.0)
    np.testing.assert_allclose(np.asarray(grads.shared), np.asarray(only_1), rtol=1e-5, atol=1e-7)
