"""Nash-MTL (its defining equation), Aligned-MTL (equal singular values, an SVD oracle) and
UPGrad (scipy NNLS projections onto the dual cone), in float64 and float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)
from hypothesis import given, settings, strategies as st
from scipy.optimize import nnls

import inputs
from properties import property_tests

from imtl_jax.methods.aligned_mtl import aligned_mtl_balance, aligned_mtl_weighting
from imtl_jax.methods.nash_mtl import nash_mtl_weighting, nash_mtl_weights
from imtl_jax.methods.upgrad import upgrad_weighting, upgrad_weights

SHAPES = [(2, 5), (5, 16)]


# The production compilation (default XLA options): the float32 tolerances below are measured
# on the program users run.
jit = jax.jit


def _weights(weighting, g):
    return weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None).weights


def _jit(weighting):
    return jit(functools.partial(_weights, weighting))


_NASH = _jit(nash_mtl_weighting())
_ALIGNED = _jit(aligned_mtl_weighting())
_UPGRAD = _jit(upgrad_weighting())
_BALANCE_AND_WEIGHTS = jit(lambda g: (aligned_mtl_balance(g), _weights(aligned_mtl_weighting(), g)))


def well_conditioned(rng, shape, max_cond=10.0):
    """Rows with spread norms and cond(G) <= max_cond (rejection sampling)."""
    while True:
        g = rng.standard_normal(shape)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        if np.linalg.cond(g) <= max_cond:
            return g * rng.uniform(0.2, 5.0, (shape[0], 1))


# ---------------------------------------------------------------------------------------------
# Nash-MTL


@pytest.mark.parametrize("shape", SHAPES)
def test_nash_solves_the_bargaining_equation(fdtype, shape):
    rng = np.random.default_rng(30 + shape[0])
    for _ in range(4):
        g = well_conditioned(rng, shape).astype(fdtype)
        alpha = np.asarray(_NASH(jnp.asarray(g)))
        assert alpha.dtype == fdtype and np.all(alpha > 0)
        g64 = g.astype(np.float64)
        gram = g64 @ g64.T
        gram /= np.linalg.norm(gram)                     # the authors' Frobenius normalisation
        residual = (gram @ alpha.astype(np.float64)) * alpha - 1.0   # (G G^T alpha) * alpha = 1
        assert np.max(np.abs(residual)) < (1e-10 if fdtype == np.float64 else 1e-4), residual


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(0, 2**31 - 1), st.sampled_from([1e-20, 1e-2, 1e2, 1e20]))
def test_nash_weights_are_invariant_to_a_uniform_scale(shape, seed, scale):
    g = well_conditioned(np.random.default_rng(seed), shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_NASH(jnp.asarray(g * np.float32(scale)))),
                               np.asarray(_NASH(jnp.asarray(g))), rtol=1e-4)


def test_nash_orthogonal_and_duplicate_rows():
    g = jnp.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    alpha = np.asarray(nash_mtl_weights(g))
    # Orthogonal rows: alpha_t ||g_t|| is the same for every task (alpha_t^2 ||g_t||^2 = const).
    np.testing.assert_allclose(alpha * np.array([3.0, 1.0, 0.5]), (alpha * [3.0, 1.0, 0.5]).mean(), rtol=1e-5)
    dup = jnp.array([[1.0, 2.0], [1.0, 2.0]])
    a = np.asarray(nash_mtl_weights(dup))
    np.testing.assert_allclose(a[0], a[1], rtol=1e-6)
    with pytest.raises(ValueError, match="iterations"):
        nash_mtl_weighting(max_iterations=0)


# ---------------------------------------------------------------------------------------------
# Aligned-MTL


def aligned_oracle(g):
    """B = sigma_min U S^-1 U^T from the SVD G = U S V^T (float64), weights B 1."""
    u, s, _ = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    keep = s > s.max() * max(g.shape) * 1e-12
    u, s = u[:, keep], s[keep]
    b = s.min() * (u / s) @ u.T
    return b, b.sum(axis=1)


@pytest.mark.parametrize("shape", SHAPES + [(3, 8), (4, 3)])
def test_aligned_matrix_has_equal_singular_values(fdtype, shape):
    rng = np.random.default_rng(40 + shape[0])
    for _ in range(3):
        g = (rng.standard_normal(shape) * rng.uniform(0.2, 5.0, (shape[0], 1))).astype(fdtype)
        balance, weights = _BALANCE_AND_WEIGHTS(jnp.asarray(g))
        balance, weights = np.asarray(balance, np.float64), np.asarray(weights)
        assert weights.dtype == fdtype
        g64 = g.astype(np.float64)
        sv = np.linalg.svd(g64, compute_uv=False)
        rank = min(shape)
        aligned_sv = np.linalg.svd(balance @ g64, compute_uv=False)[:rank]
        rtol = 1e-9 if fdtype == np.float64 else 5e-3
        np.testing.assert_allclose(aligned_sv, sv[:rank].min(), rtol=rtol)
        b_ref, w_ref = aligned_oracle(g)
        np.testing.assert_allclose(balance, b_ref, atol=rtol * np.abs(b_ref).max())
        np.testing.assert_allclose(weights, w_ref, atol=rtol * np.abs(w_ref).max())


def test_aligned_rank_deficient_and_zero_rows():
    g = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], np.float32)
    b = np.asarray(aligned_mtl_balance(jnp.asarray(g)), np.float64)
    sv = np.linalg.svd(b @ g, compute_uv=False)
    nonzero = sv[sv > 1e-4]
    assert len(nonzero) == 2
    np.testing.assert_allclose(nonzero, np.linalg.svd(g, compute_uv=False)[1], rtol=1e-4)
    _, w_ref = aligned_oracle(g)
    np.testing.assert_allclose(np.asarray(_ALIGNED(jnp.asarray(g))), w_ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# UPGrad


def upgrad_oracle(g):
    """Mean of the projections of the rows onto {x : G x >= 0}, each by exact NNLS on the dual
    min_{v >= 0} ||G^T v + g_i||^2 (x = g_i + G^T v), float64."""
    g = np.asarray(g, np.float64)
    projections = []
    for row in g:
        v, _ = nnls(g.T, -row, maxiter=10000)
        projections.append(row + g.T @ v)
    return np.mean(projections, axis=0)


@pytest.mark.parametrize("shape", SHAPES + [(5, 6)])
def test_upgrad_matches_nnls_and_never_conflicts(fdtype, shape):
    rng = np.random.default_rng(50 + shape[0] + shape[1])
    tight = fdtype == np.float64
    for trial in range(4):
        g = rng.standard_normal(shape) * rng.uniform(0.2, 5.0, (shape[0], 1))
        if trial == 3:
            g = g + rng.standard_normal(shape[1])
        g = g.astype(fdtype)
        w = np.asarray(_UPGRAD(jnp.asarray(g)))
        assert w.dtype == fdtype
        g64 = g.astype(np.float64)
        agg = w.astype(np.float64) @ g64
        ref = upgrad_oracle(g64)
        np.testing.assert_allclose(agg, ref, atol=(1e-10 if tight else 1e-4) * np.abs(g64).max())
        # Dual-cone membership: no task's gradient conflicts with the aggregate.
        assert np.min(g64 @ agg) >= -(1e-10 if tight else 1e-4) * np.abs(g64).max() ** 2


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(0, 2**31 - 1))
def test_upgrad_is_the_mean_when_nothing_conflicts(shape, seed):
    g = np.abs(np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_UPGRAD(jnp.asarray(g))), 1.0 / shape[0], rtol=1e-5)


def test_upgrad_degenerate_and_validation():
    opposite = jnp.array([[1.0, 2.0], [-1.0, -2.0]])
    w = np.asarray(upgrad_weights(opposite))
    np.testing.assert_allclose(w @ np.asarray(opposite), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="max_rounds"):
        upgrad_weighting(max_rounds=0)
    with pytest.raises(ValueError, match="iterations"):
        upgrad_weighting(iterations=-2)


# ---------------------------------------------------------------------------------------------
# Hard families (tests/inputs.py): conflicting rows, norms over 1e+-2 and 1e+-4, T = 5, 10.

_UPGRAD_INFO = jit(lambda g: upgrad_weighting().weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None))
_NASH_INFO = jit(lambda g: nash_mtl_weighting().weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None))


@pytest.mark.parametrize("case", inputs.HARD)
@pytest.mark.slow  # the hard families at every size: CI's slow step (the random draws stay)
def test_upgrad_hard_families_against_nnls(fdtype, case):
    """Certificate <= tol; against scipy's exact NNLS (float64, Lawson-Hanson: not our algorithm)
    through the bound ||x - x*||^2 <= sum_t v_t r_t + sum_t v*_t max(-r_t, 0) (r = G x, x the
    mean projection, v = w - 1/T; the proof is in upgrad.kkt_residual's docstring; evaluated
    for the mean over the T problems by convexity of the bound's terms) and dual-cone membership
    to round-off."""
    eps = np.finfo(fdtype).eps
    g = inputs.draw(case[0], 0, *case[1:]).astype(fdtype)
    out = _UPGRAD_INFO(jnp.asarray(g))
    assert float(out.info["certificate"]) <= 8 * eps
    assert int(out.info["iterations"]) <= 20
    g64 = g.astype(np.float64)
    scale = np.max(np.sum(g64 * g64, axis=1))
    w = np.asarray(out.weights, np.float64)
    x = w @ g64
    x_ref = upgrad_oracle(g64)
    r = g64 @ x
    assert np.min(r) >= -16 * eps * scale
    # Equal within the float round-off of the certificate (relative to max |g_t|, squared).
    assert np.sum((x - x_ref) ** 2) <= 64 * eps * scale * max(1.0, np.abs(w).sum()), (
        np.sum((x - x_ref) ** 2) / scale)


@pytest.mark.parametrize("case", inputs.HARD)
@pytest.mark.slow  # the hard families at every size: CI's slow step (the random draws stay)
def test_nash_hard_families_residual(fdtype, case):
    """The defining equation M a = 1 / a (M: the Frobenius-normalised Gramian plus the eps ridge)
    verified in float64 on the rounded data; certificate <= tol."""
    eps = np.finfo(fdtype).eps
    g = inputs.draw(case[0], 0, *case[1:]).astype(fdtype)
    out = _NASH_INFO(jnp.asarray(g))
    assert int(out.info["iterations"]) <= 50
    alpha = np.asarray(out.weights, np.float64)
    assert np.all(alpha > 0)
    g64 = g.astype(np.float64) / np.abs(g.astype(np.float64)).max()
    m = g64 @ g64.T
    m = m / np.linalg.norm(m) + eps * np.eye(len(alpha))
    residual = np.max(np.abs(alpha * (m @ alpha) - 1.0))
    # Round-off of the Gramian perturbs M by ~eps |M|; alpha's sensitivity is cond(M). The solver
    # stops at its tolerance or once no decrease above round-off is left (the floor).
    floor = 16 * eps * np.linalg.cond(m)
    assert float(out.info["certificate"]) <= max(16 * eps, floor)
    assert residual <= floor, residual


# The three classes run in CI's slow step (MGDA's class is the default suite's solver
# representative); the oracle and certificate tests above run by default.
TestUpgradProperties = pytest.mark.slow(property_tests(
    "upgrad", upgrad_weighting(),
    ("scale_invariant", "permutation_equivariant", "finite_on_degenerate", "nonconflicting",
     "compiles_once")))
TestNashMtlProperties = pytest.mark.slow(property_tests(
    "nash_mtl", nash_mtl_weighting(),
    ("scale_invariant", "permutation_equivariant", "finite_on_degenerate", "compiles_once")))
TestAlignedMtlProperties = pytest.mark.slow(property_tests(
    "aligned_mtl", aligned_mtl_weighting(),
    ("scale_invariant", "permutation_equivariant", "finite_on_degenerate", "compiles_once"),
    cond2=10.0))   # eigh of the Gramian: float32 accuracy ~ eps cond(G)^2
