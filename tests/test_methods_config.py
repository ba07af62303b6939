"""ConFIG (Liu et al., ICLR 2025) and DualProj (TorchJD; GEM's projection) against independent
float64 oracles: ConFIG from numpy's SVD pseudo-inverse of the unit rows (the paper's Eq. 2 on
the vectors), DualProj from scipy's NNLS on the dual of ``min ||x - g_0||, G x >= 0``; and the
properties each paper states (equal positive cosines; no conflict)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)
from marks import slow
from properties import property_tests

import inputs
from imtl_jax.methods.config import CONFIG
from imtl_jax.methods.dualproj import DUALPROJ, dualproj_weighting

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _weigh(weighting):
    return jit(lambda g: weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None))


CONFIG_JIT = _weigh(CONFIG)
DUALPROJ_JIT = _weigh(DUALPROJ)


def config_numpy(grads):
    """The paper's Eq. 2 on the vectors (float64): d = pinv(U) 1 with the unit rows U,
    update = (sum_t g_t . d_hat) d_hat."""
    g = np.asarray(grads, np.float64)
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    units = np.divide(g, norms, out=np.zeros_like(g), where=norms > 0)
    d = np.linalg.pinv(units) @ np.ones(g.shape[0])
    if np.linalg.norm(d) == 0:
        return np.zeros(g.shape[1])
    d_hat = d / np.linalg.norm(d)
    return np.sum(g @ d_hat) * d_hat


def dualproj_numpy(grads):
    """argmin_x ||x - g_0|| s.t. G x >= 0, g_0 the mean row: x = g_0 + G^T lam with
    lam = argmin_{lam >= 0} ||G^T lam + g_0|| (the Lagrange dual; scipy NNLS, float64)."""
    g = np.asarray(grads, np.float64)
    g0 = g.mean(axis=0)
    lam, _ = scipy.optimize.nnls(g.T, -g0)
    return g0 + g.T @ lam


def _random(rng, num_tasks, dim, decades):
    g = rng.standard_normal((num_tasks, dim))
    return g * 10.0 ** rng.uniform(-decades, decades, (num_tasks, 1))


def _cond_units(g):
    g = g[np.linalg.norm(g, axis=1) > 0]
    return np.linalg.cond(g / np.linalg.norm(g, axis=1, keepdims=True))


# The default suite runs a few of the hard cases; the rest run in CI's slow step.
HARD_FEW = [c if c in (inputs.HARD[1], inputs.HARD[5]) else pytest.param(*c, marks=pytest.mark.slow)
            for c in inputs.HARD]


# ---------------------------------------------------------------------------------------------
# ConFIG


@pytest.mark.parametrize("shape", [(1, 4), (3, 8), slow((10, 32))])
def test_config_matches_the_paper_equation(fdtype, shape):
    rng = np.random.default_rng(shape[0])
    for _ in range(3):
        g = _random(rng, *shape, 2)
        out = CONFIG_JIT(jnp.asarray(g, fdtype))
        assert out.weights.dtype == fdtype
        got = np.asarray(out.weights, np.float64) @ g
        want = config_numpy(g)
        # float32: round-off grows with cond(U)^2 (the cosine matrix); float64 ~1e-12.
        tol = (1e-10 if fdtype == np.float64 else 2e-6) * max(_cond_units(g) ** 2, 1.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.linalg.norm(want))


@pytest.mark.parametrize("family,num_tasks,dim,decades", HARD_FEW)
def test_config_on_the_hard_families(family, num_tasks, dim, decades):
    """Norms spread over 1e+-4, opposed pairs, near-simplex conflicts, T = 10 (float64)."""
    g = inputs.draw(family, 7, num_tasks, dim, decades)
    with x64():
        w = np.asarray(CONFIG_JIT(jnp.asarray(g)).weights)
    want = config_numpy(g)
    tol = 1e-13 * max(_cond_units(g) ** 2, 1.0)
    np.testing.assert_allclose(w @ g, want, rtol=0, atol=max(tol, 1e-12) * np.linalg.norm(want))


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([3, 7]), st.integers(0, 2**31 - 1))
def test_config_update_has_the_same_positive_cosine_with_every_task(num_tasks, seed):
    """The paper's Sec. 3 property: for independent rows, u_t . d = 1 for all t, so the update's
    cosine with every g_t is the same 1/||d|| > 0; its length is sum_t g_t . d_hat."""
    rng = np.random.default_rng(seed)
    g = _random(rng, num_tasks, num_tasks + 3, 3)
    with x64():
        out = CONFIG_JIT(jnp.asarray(g))
    update = np.asarray(out.weights) @ g
    cos = g @ update / (np.linalg.norm(g, axis=1) * np.linalg.norm(update))
    np.testing.assert_allclose(cos, cos[0], rtol=1e-9 * _cond_units(g) ** 2)
    assert cos[0] > 0
    np.testing.assert_allclose(np.asarray(out.info["cosines"]), cos, rtol=1e-9 * _cond_units(g) ** 2)
    d_hat = update / np.linalg.norm(update)
    np.testing.assert_allclose(np.linalg.norm(update), np.sum(g @ d_hat), rtol=1e-10)


def test_config_direction_ignores_per_task_scales():
    """Only the unit rows set the direction: scaling row t by k_t > 0 divides its weight by k_t
    up to one common factor (the length sum_t g_t . d_hat changes)."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal((4, 9))
    k = np.array([1e-3, 1.0, 50.0, 7.0])
    with x64():
        w = np.asarray(CONFIG_JIT(jnp.asarray(g)).weights)
        wk = np.asarray(CONFIG_JIT(jnp.asarray(g * k[:, None])).weights)
    ratio = (wk * k) / w
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)
    np.testing.assert_allclose(ratio[0], np.sum(g * k[:, None] @ (w @ g)) / np.sum(g @ (w @ g)), rtol=1e-10)


def test_config_two_tasks_is_the_angle_bisector():
    g = np.array([[3.0, 0.0, 0.0], [-1.0, 2.0, 0.0]])
    with x64():
        update = np.asarray(CONFIG_JIT(jnp.asarray(g)).weights) @ g
    bisector = g[0] / 3.0 + g[1] / np.sqrt(5.0)
    np.testing.assert_allclose(update / np.linalg.norm(update), bisector / np.linalg.norm(bisector),
                               atol=1e-12)


@pytest.mark.parametrize("case", ["zero_row", "duplicate", "more_tasks_than_dims", "near_parallel"])
def test_config_degenerate_rows_match_the_least_squares_definition(case):
    rng = np.random.default_rng(11)
    g = rng.standard_normal((4, 6))
    if case == "zero_row":
        g[2] = 0.0
    elif case == "duplicate":
        g[3] = 2.5 * g[0]          # parallel: the same unit row twice
    elif case == "more_tasks_than_dims":
        g = rng.standard_normal((6, 3))
    else:
        g[3] = g[0] + 1e-4 * rng.standard_normal(6)
    with x64():
        w = np.asarray(CONFIG_JIT(jnp.asarray(g)).weights)
    want = config_numpy(g)
    tol = max(1e-14 * _cond_units(g) ** 2, 1e-12)     # the cosine matrix squares cond(U)
    np.testing.assert_allclose(w @ g, want, atol=tol * np.linalg.norm(want))
    if case == "zero_row":
        assert w[2] == 0.0


def test_config_all_zero_and_non_finite():
    out = CONFIG_JIT(jnp.zeros((3, 4)))
    np.testing.assert_array_equal(np.asarray(out.weights), 0.0)
    bad = CONFIG_JIT(jnp.ones((3, 4)).at[0, 0].set(jnp.nan))
    assert np.all(np.isnan(np.asarray(bad.weights)))


TestConfigProperties = pytest.mark.slow(property_tests(  # CI's slow step, like DualProj's
    "config", CONFIG, ("scale_invariant", "permutation_equivariant", "finite_on_degenerate",
                       "nonconflicting", "compiles_once"), rtol=1e-4, cond2=10.0))


# ---------------------------------------------------------------------------------------------
# DualProj


@pytest.mark.parametrize("shape", [(3, 8), slow((2, 5)), slow((10, 12))])
def test_dualproj_matches_the_projection(fdtype, shape):
    rng = np.random.default_rng(100 + shape[0])
    for _ in range(3):
        g = _random(rng, *shape, 1)
        out = DUALPROJ_JIT(jnp.asarray(g, fdtype))
        assert bool(out.info["converged"])
        got = np.asarray(out.weights, np.float64) @ g
        want = dualproj_numpy(g)
        scale = np.linalg.norm(g, axis=1).max()
        tol = 1e-9 if fdtype == np.float64 else 1e-4
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale * max(_cond_units(g), 1.0))


@pytest.mark.parametrize("family,num_tasks,dim,decades", HARD_FEW)
def test_dualproj_on_the_hard_families(family, num_tasks, dim, decades):
    """The projection is unique, so the update must match the NNLS oracle; its distance to g_0
    must be no larger than the oracle's (float64)."""
    g = inputs.draw(family, 5, num_tasks, dim, decades)
    with x64():
        out = DUALPROJ_JIT(jnp.asarray(g))
    assert bool(out.info["converged"]), float(out.info["certificate"])
    got = np.asarray(out.weights) @ g
    want = dualproj_numpy(g)
    scale = np.linalg.norm(g, axis=1).max()
    assert np.all(g @ got >= -1e-10 * scale * np.linalg.norm(g, axis=1) * np.linalg.norm(got) / scale)
    g0 = g.mean(axis=0)
    assert np.linalg.norm(got - g0) <= np.linalg.norm(want - g0) * (1 + 1e-8) + 1e-12 * scale
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)


def test_dualproj_is_the_mean_when_nothing_conflicts_with_it():
    rng = np.random.default_rng(4)
    g = np.abs(rng.standard_normal((4, 7)))           # every dot product >= 0
    with x64():
        w = np.asarray(DUALPROJ_JIT(jnp.asarray(g)).weights)
    np.testing.assert_allclose(w, 0.25, atol=1e-14)


def test_dualproj_projects_a_conflicting_mean():
    # g_0 = (0, 0.5) conflicts with nothing... make the mean conflict with task 2:
    g = np.array([[4.0, 1.0], [-1.0, 0.2]])           # g_0 = (1.5, 0.6), g_2 . g_0 = -1.38
    with x64():
        w = np.asarray(DUALPROJ_JIT(jnp.asarray(g)).weights)
    update = w @ g
    np.testing.assert_allclose(update, dualproj_numpy(g), atol=1e-12)
    np.testing.assert_allclose(g[1] @ update, 0.0, atol=1e-12)   # the active constraint
    assert np.all(w >= 0.5 - 1e-15)                                # w >= 1/T


def test_dualproj_arguments_are_validated():
    with pytest.raises(ValueError, match="iterations"):
        dualproj_weighting(iterations=0)
    with pytest.raises(ValueError, match="tol"):
        dualproj_weighting(tol=-1.0)


# The solver is UPGrad's (its properties run in the default suite there): these in the slow step.
TestDualprojProperties = pytest.mark.slow(property_tests(
    "dualproj", DUALPROJ, ("scale_invariant", "permutation_equivariant", "finite_on_degenerate",
                           "nonconflicting", "compiles_once"), rtol=1e-4))
