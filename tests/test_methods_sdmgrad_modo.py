"""SDMGrad (Xiao et al., NeurIPS 2023) and MoDo (Chen et al., NeurIPS 2023) against numpy float64
implementations of the papers' weight updates (the projection onto the simplex by the
sorted-prefix loop of the authors' MoDo code, not our vectorised one), carried over a recorded
sequence of gradients (the weights are the state), and the properties each has: SDMGrad's
scale invariance and its lam -> inf limit (the mean gradient); MoDo's convergence to MGDA's
min-norm weights on fixed gradients, and its scale law."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64

import inputs
from imtl_jax.methods.mgda import mgda_weights
from imtl_jax.methods.modo import MODO, modo_weighting
from imtl_jax.methods.sdmgrad import SDMGRAD, sdmgrad_weighting

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def simplex_numpy(y):
    """The authors' MoDo loop: the first sorted prefix whose threshold exceeds the next entry."""
    u = np.sort(y)[::-1]
    theta = (np.sum(y) - 1.0) / len(y)
    total = 0.0
    for i in range(len(y) - 1):
        total += u[i]
        t = (total - 1.0) / (i + 1.0)
        if t > u[i + 1]:
            theta = t
            break
    return np.maximum(y - theta, 0.0)


def sdmgrad_numpy(g, w, lam=0.3, lr=10.0, momentum=0.5, iterations=20):
    """Alg. 1 of the paper (inner loop as the authors' code) on A = G G^T: returns (weights of
    the update, new inner w)."""
    a = g @ g.T
    num_tasks = len(w)
    scale = np.mean(np.sqrt(np.maximum(np.diag(a), 0.0)))
    a = a / scale ** 2 if scale > 0 else a
    pref = np.full(num_tasks, 1.0 / num_tasks)
    v = np.zeros(num_tasks)
    for _ in range(iterations):
        v = momentum * v + a @ (w + lam * pref)
        w = simplex_numpy(w - lr * v)
    return (w + lam * pref) / (1 + lam), w


def modo_numpy(g, lam, gamma=0.1, rho=0.1):
    return simplex_numpy(lam - gamma * (g @ (g.T @ lam) + rho * lam))


def _run(weighting, seq):
    weigh = jit(lambda g, s: weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), s, None, None))
    with x64():
        state = weighting.init(seq[0].shape[0], jnp.float64)
        outs = []
        for g in seq:
            out = weigh(jnp.asarray(g), state)
            state = out.state
            outs.append(out)
    return outs


def _sequence(seed, num_tasks, dim, steps, spread=1.0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_tasks, dim))
    return [(base + rng.standard_normal(base.shape)) * 10.0 ** rng.uniform(-spread, spread, (num_tasks, 1))
            for _ in range(steps)]


@pytest.mark.parametrize("lam", [0.3, pytest.param(0.0, marks=pytest.mark.slow)])
def test_sdmgrad_matches_the_algorithm_over_steps(lam):
    seq = _sequence(1, 4, 10, 4)
    outs = _run(sdmgrad_weighting(lam=lam), seq)
    w = np.full(4, 0.25)
    # Each inner step multiplies the round-off of A (ours from the max-normalised rows, numpy's
    # from the raw ones: ~1e-16 apart) by up to lr * lambda_max(A) ~ 10 T before the projection
    # clips it: 1e-10 over 20 steps is that growth, not a looser check of the algorithm.
    for g, out in zip(seq, outs):
        want, w = sdmgrad_numpy(g, w, lam=lam)
        np.testing.assert_allclose(np.asarray(out.weights), want, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(out.state.weights), w, rtol=0, atol=1e-10)
        assert abs(np.sum(want) - 1) < 1e-12 and np.all(want >= lam / 4 / (1 + lam) - 1e-15)


def test_modo_matches_the_algorithm_over_steps():
    seq = _sequence(2, 5, 8, 5, spread=0.5)
    outs = _run(MODO, seq)
    lam = np.full(5, 0.2)
    for g, out in zip(seq, outs):
        lam = modo_numpy(g, lam)
        np.testing.assert_allclose(np.asarray(out.weights), lam, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(out.state.weights), lam, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("family,num_tasks,dim,decades", [inputs.HARD[1], inputs.HARD[5]])
def test_sdmgrad_and_modo_on_hard_families(family, num_tasks, dim, decades):
    seq = [inputs.draw(family, s, num_tasks, dim, decades) for s in range(3)]
    # MoDo's gamma is relative to the squared norms: scale it to the draws (1e+-4 spread).
    gamma = 0.5 / max(np.max(np.sum(g * g, axis=1)) for g in seq)
    w = np.full(num_tasks, 1.0 / num_tasks)
    lam = w.copy()
    for g, s_out, m_out in zip(seq, _run(SDMGRAD, seq), _run(modo_weighting(gamma=gamma), seq)):
        want, w = sdmgrad_numpy(g, w)
        np.testing.assert_allclose(np.asarray(s_out.weights), want, rtol=0, atol=1e-10)
        lam = modo_numpy(g, lam, gamma=gamma)
        np.testing.assert_allclose(np.asarray(m_out.weights), lam, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_sdmgrad_is_scale_invariant_and_tends_to_the_mean():
    seq = _sequence(3, 4, 6, 3)
    base = [np.asarray(o.weights) for o in _run(SDMGRAD, seq)]
    for c in (1e-12, 1e9):
        scaled = [np.asarray(o.weights) for o in _run(SDMGRAD, [c * g for g in seq])]
        np.testing.assert_allclose(scaled, base, rtol=0, atol=1e-12)
    far = [np.asarray(o.weights) for o in _run(sdmgrad_weighting(lam=1e8), seq)]
    np.testing.assert_allclose(far, 0.25, atol=1e-8)


@pytest.mark.slow
def test_modo_tracks_mgda_on_fixed_gradients():
    """rho = 0, the same gradients every step: the projected-gradient fixed point is MGDA's
    min-norm point (gamma below 2 / lambda_max for convergence)."""
    g = inputs.draw("mixed", 4, 5, 12, 0.5)
    gamma = 1.0 / np.linalg.eigvalsh(g @ g.T)[-1]
    outs = _run(modo_weighting(gamma=gamma, rho=0.0), [g] * 400)
    with x64():
        want = np.asarray(mgda_weights(jnp.asarray(g)))
    np.testing.assert_allclose(np.asarray(outs[-1].weights), want, atol=1e-8)
    # Scale law: G -> c G with gamma -> gamma / c^2 gives the same sequence.
    scaled = _run(modo_weighting(gamma=gamma / 1e6, rho=0.0), [1e3 * g] * 3)
    np.testing.assert_allclose([np.asarray(o.weights) for o in scaled],
                               [np.asarray(o.weights) for o in outs[:3]], rtol=1e-12)


def test_sdmgrad_and_modo_arguments_are_validated():
    for kwargs, name in [({"lam": -1.0}, "lam"), ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                         ({"iterations": 0}, "iterations")]:
        with pytest.raises(ValueError, match=name):
            sdmgrad_weighting(**kwargs)
    for kwargs, name in [({"gamma": 0.0}, "gamma"), ({"rho": -0.1}, "rho")]:
        with pytest.raises(ValueError, match=name):
            modo_weighting(**kwargs)
