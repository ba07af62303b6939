"""MGDA (Frank-Wolfe) and closed-form MGDA against KKT conditions and scipy float64 oracles."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)
from hypothesis import given, settings, strategies as st
from scipy.optimize import minimize

import inputs
from properties import property_tests

from imtl_jax.methods.mgda import (mgda_closed_form_weighting, mgda_closed_form_weights,
                                   mgda_weighting, mgda_weights)

SHAPES = [(2, 5), (3, 8), (5, 16)]


# The production compilation (default XLA options): the float32 tolerances below are measured
# on the program users run.
jit = jax.jit


_mgda = jit(lambda g: mgda_weighting().weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None))
_mgda_vanilla = jit(lambda g: mgda_weighting(solver="frank_wolfe").weigh(
    g, jnp.zeros(g.shape[:1], g.dtype), (), None, None).weights)
_closed = jit(lambda g: mgda_closed_form_weighting().weigh(
    g, jnp.zeros(g.shape[:1], g.dtype), (), None, None).weights)


def random_grads(rng, shape, conflict=True):
    num_tasks, dim = shape
    g = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, (num_tasks, 1))
    if not conflict:
        g = g + 2.0 * rng.standard_normal(dim)
    return g


def mgda_oracle(grads):
    """min ||w G|| on the simplex: scipy SLSQP in float64, then an exact solve on its support."""
    g = np.asarray(grads, np.float64)
    m = g @ g.T
    num_tasks = m.shape[0]
    res = minimize(lambda w: w @ m @ w, np.full(num_tasks, 1.0 / num_tasks), jac=lambda w: 2 * m @ w,
                   bounds=[(0.0, None)] * num_tasks, method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                 "jac": lambda w: np.ones(num_tasks)}],
                   options={"ftol": 1e-16, "maxiter": 1000})
    w = res.x
    support = w > 1e-6
    sub = np.linalg.lstsq(m[np.ix_(support, support)], np.ones(support.sum()), rcond=None)[0]
    polished = np.zeros(num_tasks)
    polished[support] = sub / sub.sum()
    if np.all(polished >= 0) and polished @ m @ polished <= w @ m @ w * (1 + 1e-12):
        w = polished
    return w


def assert_kkt(w, grads, rtol):
    g = np.asarray(grads, np.float64)
    m = g @ g.T
    w = np.asarray(w, np.float64)
    scale = np.max(np.diag(m))
    assert np.all(w >= 0)
    assert abs(w.sum() - 1) < rtol
    mw = m @ w
    value = w @ mw
    assert np.all(mw >= value - rtol * scale), (mw, value)
    active = w > 1e-3
    np.testing.assert_allclose(mw[active], value, atol=rtol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("conflict", [True, False])
def test_mgda_kkt_and_scipy_oracle(fdtype, shape, conflict):
    rng = np.random.default_rng(shape[0] + 10 * conflict)
    tight = fdtype == np.float64
    for _ in range(4):
        grads = random_grads(rng, shape, conflict).astype(fdtype)
        out = _mgda(jnp.asarray(grads))
        w = np.asarray(out.weights)
        assert w.dtype == fdtype
        assert_kkt(w, grads, 1e-10 if tight else 2e-5)
        w_ref = mgda_oracle(grads)
        agg, agg_ref = w @ grads.astype(np.float64), w_ref @ grads.astype(np.float64)
        np.testing.assert_allclose(agg, agg_ref, atol=(1e-9 if tight else 1e-4) * np.abs(grads).max())
        np.testing.assert_allclose(float(out.info["min_norm"]), np.linalg.norm(agg_ref),
                                   rtol=1e-8 if tight else 1e-4, atol=1e-12)
        if shape[0] <= shape[1]:   # full row rank: the weights are unique
            np.testing.assert_allclose(w, w_ref, atol=1e-7 if tight else 1e-4)


def test_mgda_two_tasks_is_the_segment_closed_form(fdtype):
    rng = np.random.default_rng(7)
    for conflict in (True, False):
        for _ in range(5):
            g = random_grads(rng, (2, 5), conflict).astype(fdtype)
            g1, g2 = g.astype(np.float64)
            # Sener & Koltun, Algorithm 1: min over gamma of ||gamma g1 + (1 - gamma) g2||.
            gamma = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)
            for w in (np.asarray(_mgda(jnp.asarray(g)).weights), np.asarray(_mgda_vanilla(jnp.asarray(g)))):
                np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-12 if fdtype == np.float64 else 1e-5)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(0, 2**31 - 1), st.sampled_from([1e-20, 1e-3, 1e3, 1e20]))
def test_mgda_is_invariant_to_a_uniform_scale(shape, seed, scale):
    g = random_grads(np.random.default_rng(seed), shape).astype(np.float32)
    w1 = np.asarray(_mgda(jnp.asarray(g)).weights)
    w2 = np.asarray(_mgda(jnp.asarray(g * np.float32(scale))).weights)
    np.testing.assert_allclose(w1, w2, atol=1e-5)


def test_mgda_degenerate_cases():
    g = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]], np.float32)
    np.testing.assert_allclose(np.asarray(mgda_weights(jnp.asarray(g))), [0.0, 1.0, 0.0])
    dup = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [3.0, -1.0, 0.0]], np.float32)
    w = np.asarray(mgda_weights(jnp.asarray(dup)))
    assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-6
    assert_kkt(w, dup, 1e-5)
    np.testing.assert_allclose(np.asarray(mgda_weights(jnp.ones((1, 3)))), [1.0])
    np.testing.assert_allclose(np.asarray(mgda_weights(jnp.zeros((3, 3)))), [1 / 3] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="iterations"):
        mgda_weighting(max_iterations=0)


# ---------------------------------------------------------------------------------------------
# Closed form (no w >= 0)


def closed_form_oracle(grads):
    """KKT system [[M, 1], [1^T, 0]] [w; -lambda] = [0; 1] in float64 (least squares)."""
    g = np.asarray(grads, np.float64)
    m = g @ g.T
    num_tasks = m.shape[0]
    kkt = np.block([[m, np.ones((num_tasks, 1))], [np.ones((1, num_tasks)), np.zeros((1, 1))]])
    sol = np.linalg.lstsq(kkt, np.concatenate([np.zeros(num_tasks), [1.0]]), rcond=None)[0]
    return sol[:num_tasks]


@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_against_the_kkt_system(fdtype, shape):
    rng = np.random.default_rng(11 + shape[0])
    tight = fdtype == np.float64
    for conflict in (True, False):
        grads = random_grads(rng, shape, conflict).astype(fdtype)
        w = np.asarray(_closed(jnp.asarray(grads)))
        assert w.dtype == fdtype
        w_ref = closed_form_oracle(grads)
        np.testing.assert_allclose(w, w_ref, atol=(1e-9 if tight else 2e-4) * np.abs(w_ref).max())
        assert abs(w.sum() - 1) < (1e-12 if tight else 1e-5)
        # Equal projections of the aggregate on every g_t (M w = lambda 1).
        mw = grads.astype(np.float64) @ (w.astype(np.float64) @ grads.astype(np.float64))
        np.testing.assert_allclose(mw, mw.mean(), atol=(1e-9 if tight else 1e-3) * np.abs(mw).max())


def test_closed_form_degenerate_cases():
    zero = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]], np.float32)
    np.testing.assert_allclose(np.asarray(mgda_closed_form_weights(jnp.asarray(zero))), [0, 1, 0], atol=1e-6)
    opposite = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(mgda_closed_form_weights(jnp.asarray(opposite))), [0.5, 0.5], atol=1e-6)
    dup = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [3.0, -1.0, 1.0]], np.float32)
    w = np.asarray(mgda_closed_form_weights(jnp.asarray(dup)))
    assert abs(w[0] - w[1]) < 1e-6 and abs(w.sum() - 1) < 1e-6
    # The same aggregate as with the duplicate merged.
    merged = np.asarray(mgda_closed_form_weights(jnp.asarray(dup[1:])))
    np.testing.assert_allclose(w @ dup, merged @ dup[1:], atol=1e-5)
    for scale in (1e-30, 1e30):
        w_s = np.asarray(mgda_closed_form_weights(jnp.asarray(dup * np.float32(scale))))
        np.testing.assert_allclose(w_s, w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mgda_closed_form_weights(jnp.ones((1, 3)))), [1.0])
    with pytest.raises(ValueError, match="grads"):
        mgda_closed_form_weights(jnp.ones(3))


# ---------------------------------------------------------------------------------------------
# Hard families (tests/inputs.py): conflicting rows, norms over 1e+-2 and 1e+-4, T = 5, 10.


def exhaustive_min_norm(grads):
    """The min-norm point of the hull by enumerating supports (float64, independent of Wolfe's
    algorithm): for every subset S the affine min-norm point (bordered KKT system, least
    squares); the optimum is the feasible one that satisfies the KKT conditions."""
    import itertools
    g = np.asarray(grads, np.float64)
    m = g @ g.T
    num_tasks = m.shape[0]
    best, best_value = None, np.inf
    for size in range(1, num_tasks + 1):
        for subset in itertools.combinations(range(num_tasks), size):
            s = list(subset)
            kkt = np.block([[m[np.ix_(s, s)], np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if np.all(sol >= 0) and abs(sol.sum() - 1) < 1e-9:
                w = np.zeros(num_tasks)
                w[s] = sol
                value = w @ m @ w
                if value < best_value:
                    best, best_value = w, value
    return best


@pytest.mark.parametrize("case", [c for c in inputs.HARD if c[1] <= 10])
@pytest.mark.slow  # the hard families at every size: CI's slow step (the random draws stay)
def test_mgda_hard_families(fdtype, case):
    """Certificate <= tol, the true Frank-Wolfe gap (float64, on the rounded data) <= 8 eps, and
    the aggregate within the gap's bound of the exhaustive oracle:
    ||v - v*||^2 <= 2 (||v||^2 - min_t g_t . v)."""
    eps = np.finfo(fdtype).eps
    for seed in range(2 if case[1] == 10 else 3):
        g = inputs.draw(case[0], seed, *case[1:]).astype(fdtype)
        out = _mgda(jnp.asarray(g))
        assert float(out.info["certificate"]) <= 4 * eps
        assert 0 <= int(out.info["iterations"]) <= case[1] + 2   # measured: Wolfe needs <= T + 2
        g64 = g.astype(np.float64)
        scale = np.max(np.sum(g64 * g64, axis=1))
        w = np.asarray(out.weights, np.float64)
        assert np.all(w >= 0) and abs(w.sum() - 1) <= 10 * case[1] * eps
        v = w @ g64
        gap = v @ v - np.min(g64 @ v)
        assert gap <= 8 * eps * scale, gap / scale
        if case[1] <= 5 or fdtype == np.float64:
            v_ref = exhaustive_min_norm(g64) @ g64
            assert np.sum((v - v_ref) ** 2) <= 2 * gap + 16 * np.finfo(np.float64).eps * scale


TestMgdaProperties = property_tests(
    "mgda", mgda_weighting(),
    ("sums_to_one", "scale_invariant", "permutation_equivariant", "finite_on_degenerate",
     "compiles_once"))
