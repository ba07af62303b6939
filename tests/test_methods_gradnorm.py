"""GradNorm against a numpy float64 implementation of Chen et al.'s Algorithm 1 (the objective's
gradient by finite differences on explicitly weighted gradients)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

from imtl_jax.methods.gradnorm import gradnorm_weighting


# Many small test programs: skip LLVM's expensive optimisations (same numerics).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def gradnorm_oracle(grad_seq, loss_seq, gamma, lr):
    """Returns the weights used at each step (numpy float64)."""
    num_tasks = grad_seq[0].shape[0]
    w = np.ones(num_tasks)
    l0 = None
    used = []
    for g, losses in zip(grad_seq, loss_seq):
        g = np.asarray(g, np.float64)
        losses = np.asarray(losses, np.float64)
        if l0 is None:
            l0 = losses.copy()
        used.append(w.copy())
        norms = np.linalg.norm(g, axis=1)
        ltilde = losses / l0
        r = ltilde / ltilde.mean()

        def objective(wv):
            weighted = np.linalg.norm(wv[:, None] * g, axis=1)       # ||grad(w_t L_t)||  # noqa: B023 (this step's)
            target = np.mean(w * norms) * r ** gamma                 # held constant  # noqa: B023 (this step's)
            return np.sum(np.abs(weighted - target))

        h = 1e-7
        grad_w = np.array([(objective(w + h * e) - objective(w - h * e)) / (2 * h)
                           for e in np.eye(num_tasks)])
        w = np.maximum(w - lr * grad_w / norms.mean(), 0.0)
        w = num_tasks * w / w.sum()
    return np.array(used)


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_gradnorm_matches_algorithm_1(fdtype, gamma):
    rng = np.random.default_rng(int(gamma * 10))
    num_tasks, dim, steps = 3, 8, 8
    grad_seq = [(rng.standard_normal((num_tasks, dim)) * np.array([[1.0], [5.0], [0.2]])).astype(fdtype)
                for _ in range(steps)]
    loss_seq = [(np.array([1.0, 3.0, 0.5]) * np.exp(-0.1 * k * np.array([1.0, 0.3, 2.0]))).astype(fdtype)
                for k in range(steps)]
    lr = 0.05
    wt = gradnorm_weighting(gamma=gamma, lr=lr)
    state = wt.init(num_tasks, jnp.dtype(fdtype))
    fn = jit(lambda g, losses, s: wt.weigh(g, losses, s, None, None))
    got = []
    for g, losses in zip(grad_seq, loss_seq):
        out = fn(jnp.asarray(g), jnp.asarray(losses), state)
        state = out.state
        assert out.weights.dtype == fdtype
        got.append(np.asarray(out.weights, np.float64))
    expected = gradnorm_oracle(grad_seq, loss_seq, gamma, lr)
    np.testing.assert_allclose(np.array(got), expected, atol=1e-6 if fdtype == np.float64 else 1e-4)
    np.testing.assert_allclose(np.array(got).sum(axis=1), num_tasks, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.initial_losses), loss_seq[0], rtol=1e-6)


def test_gradnorm_equalises_weighted_gradient_norms_with_gamma0():
    g = jnp.array([[10.0, 0.0], [0.0, 1.0]])
    wt = gradnorm_weighting(gamma=0.0, lr=0.02)
    state = wt.init(2, jnp.float32)
    fn = jit(lambda s: wt.weigh(g, jnp.array([1.0, 1.0]), s, None, None))
    for _ in range(200):
        out = fn(state)
        state = out.state
    w = np.asarray(state.weights)
    # w_1 * 10 ~ w_2 * 1 with w_1 + w_2 = 2: w ~ (2/11, 20/11), up to the step size.
    np.testing.assert_allclose(w, [2 / 11, 20 / 11], atol=0.05)


def test_gradnorm_validation():
    with pytest.raises(ValueError, match="gamma"):
        gradnorm_weighting(gamma=-1.0)
    with pytest.raises(ValueError, match="lr"):
        gradnorm_weighting(lr=0.0)
