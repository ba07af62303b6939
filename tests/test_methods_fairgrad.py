"""FairGrad (Ban & Ji, ICML 2024) against the paper's equation ``G G^T w = w^{-1/alpha}`` checked
in numpy float64 on the raw gradients (the solution is unique: the equation is the stationarity
condition of a strictly convex function), an independent numpy/scipy root finder, and the
properties the paper states: alpha = 1 is Nash-MTL's proportional fairness, the alpha -> 0 and
alpha -> inf limits, the closed form for orthogonal rows, the scale law, no task conflicts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)
from marks import slow
from properties import property_tests

import inputs
from imtl_jax.methods.fairgrad import FAIRGRAD, fairgrad_weighting
from imtl_jax.methods.nash_mtl import NASH_MTL

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_JITS = {}


def _weigh(alpha, g):
    if alpha not in _JITS:
        w = fairgrad_weighting(alpha=alpha)
        _JITS[alpha] = jit(lambda g: w.weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None))
    return _JITS[alpha](g)


def fairness_backward_error(grads, w, alpha):
    """numpy float64 on the raw gradients: max_t |(G G^T w)_t - w_t^{-1/alpha}| relative to the
    size of the terms, ((|G G^T| w)_t + w_t^{-1/alpha})."""
    g = np.asarray(grads, np.float64)
    m = g @ g.T
    target = w ** (-1.0 / alpha)
    return np.max(np.abs(m @ w - target) / (np.abs(m) @ w + target))


def fairgrad_root(grads, alpha):
    """An independent solve: scipy's hybrid Powell root finder on ``G G^T e^u = e^{-u/alpha}``
    (u = log w), from the orthogonal-rows start."""
    g = np.asarray(grads, np.float64)
    m = g @ g.T
    u0 = -alpha / (1 + alpha) * np.log(np.diag(m))
    sol = scipy.optimize.root(lambda u: m @ np.exp(u) * np.exp(u / alpha) - 1.0, u0,
                              method="hybr", tol=1e-14)
    w = np.exp(sol.x)
    assert fairness_backward_error(g, w, alpha) < 1e-13, sol.message
    return w


# The default suite runs the definition test at the default alpha; the rest in CI's slow step.
@pytest.mark.parametrize("alpha", [2.0, slow(0.5), slow(1.0), slow(5.0)])
def test_fairgrad_solves_the_paper_equation(fdtype, alpha):
    rng = np.random.default_rng(int(alpha * 10))
    for num_tasks, dim in [(2, 5), (4, 12)]:
        g = rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-1, 1, (num_tasks, 1))
        out = _weigh(alpha, jnp.asarray(g, fdtype))
        assert out.weights.dtype == fdtype and bool(out.info["converged"])
        w = np.asarray(out.weights, np.float64)
        assert np.all(w > 0)
        g_cast = np.asarray(np.asarray(g, fdtype), np.float64)
        tol = 16 * np.finfo(fdtype).eps
        assert float(out.info["certificate"]) <= tol
        # The certificate is computed on the normalised Gramian (plus its eps ridge); numpy's
        # on the raw gradients agrees to the round-off of the products.
        assert fairness_backward_error(g_cast, w, alpha) <= 4 * tol
        cond = np.linalg.cond(g_cast @ g_cast.T)
        np.testing.assert_allclose(w, fairgrad_root(g_cast, alpha), rtol=tol * max(cond, 10.0))


@pytest.mark.slow
@pytest.mark.parametrize("family,num_tasks,dim,decades", [inputs.HARD[1], inputs.HARD[5]])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_on_hard_families(family, num_tasks, dim, decades, alpha):
    """Norms over 1e+-4, T = 10: the weights span decades; the raw equation holds to float64
    round-off (scipy's least_squares, LibMTL's and TorchJD's solver, stops far short here)."""
    g = inputs.draw(family, 3, num_tasks, dim, decades)
    with x64():
        out = _weigh(alpha, jnp.asarray(g))
    assert bool(out.info["converged"]) and float(out.info["certificate"]) <= 16 * np.finfo(np.float64).eps
    w = np.asarray(out.weights)
    assert np.all(w > 0)
    assert fairness_backward_error(g, w, alpha) <= 1e-14


@pytest.mark.slow
def test_fairgrad_alpha_one_is_nash_mtl():
    """alpha = 1 is proportional fairness: G G^T w = 1/w, Nash-MTL's bargaining solution. Our
    Nash-MTL solves it on G G^T / ||G G^T||_F, so its weights are sqrt(||G G^T||_F) times these."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal((5, 9)) * rng.uniform(0.2, 5.0, (5, 1))
    with x64():
        fair = np.asarray(_weigh(1.0, jnp.asarray(g)).weights)
        nash = np.asarray(NASH_MTL.weigh(jnp.asarray(g), jnp.zeros(5), (), None, None).weights)
    fro = np.linalg.norm(g @ g.T)
    np.testing.assert_allclose(nash, np.sqrt(fro) * fair, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fairgrad_orthogonal_rows_and_scale_law(alpha):
    """Orthogonal rows: ||g_t||^2 w_t = w_t^{-1/alpha}, so w_t = ||g_t||^{-2 alpha/(1 + alpha)};
    and G -> c G maps w -> c^{-2 alpha/(1 + alpha)} w (the update scales like
    c^{(1 - alpha)/(1 + alpha)}: invariant only at alpha = 1)."""
    norms = np.array([0.1, 1.0, 30.0])
    g = np.diag(norms) @ np.eye(3, 6)
    p = 2 * alpha / (1 + alpha)
    with x64():
        w = np.asarray(_weigh(alpha, jnp.asarray(g)).weights)
        for c in (1e-6, 1e5):
            wc = np.asarray(_weigh(alpha, jnp.asarray(c * g)).weights)
            np.testing.assert_allclose(wc, c ** -p * w, rtol=1e-12)
    np.testing.assert_allclose(w, norms ** -p, rtol=1e-13)


@pytest.mark.slow
def test_fairgrad_limits_in_alpha():
    """alpha -> 0: w -> 1 (linear scalarisation, the sum); alpha -> inf: w -> (G G^T)^{-1} 1
    (every loss decreases by the same amount), here positive (rows with positive cosines)."""
    rng = np.random.default_rng(8)
    g = (np.eye(4, 10) + 0.1 * rng.random((4, 10))) * np.array([[0.8], [1.0], [1.2], [1.5]])
    m = g @ g.T
    equal_decrease = np.linalg.solve(m, np.ones(4))
    assert np.all(equal_decrease > 0)
    with x64():
        small = [np.asarray(_weigh(a, jnp.asarray(g)).weights) for a in (1e-2, 1e-3)]
        large = [np.asarray(_weigh(a, jnp.asarray(g)).weights) for a in (1e2, 1e4)]
    err_small = [np.max(np.abs(np.log(w))) for w in small]
    err_large = [np.max(np.abs(np.log(w / equal_decrease))) for w in large]
    # The distance shrinks like alpha (resp. 1/alpha): a factor ~10 (resp. ~100).
    assert err_small[1] < err_small[0] / 5 and err_small[1] < 1e-2
    assert err_large[1] < err_large[0] / 50 and err_large[1] < 1e-3


@pytest.mark.slow
def test_fairgrad_degenerate_rows():
    with x64():
        g = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]])
        out = _weigh(2.0, jnp.asarray(g))
        w = np.asarray(out.weights)
        assert np.all(np.isfinite(w)) and np.all(w > 0)
        # The zero row has no finite solution: the ridge bounds its weight; the other rows solve
        # their own equation (the zero row does not enter it).
        rest = np.asarray(_weigh(2.0, jnp.asarray(g[[0, 2]])).weights)
        np.testing.assert_allclose(w[[0, 2]], rest, rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(_weigh(2.0, jnp.zeros((3, 4), jnp.float64)).weights), 1.0)
        one = np.asarray(_weigh(2.0, jnp.asarray([[3.0, 4.0]])).weights)
        np.testing.assert_allclose(one, [5.0 ** (-4.0 / 3.0)], rtol=1e-14)
    bad = _weigh(2.0, jnp.ones((3, 4)).at[0, 0].set(jnp.nan))
    assert np.all(np.isnan(np.asarray(bad.weights)))


def test_fairgrad_arguments_are_validated():
    for kwargs, name in [({"alpha": 0.0}, "equal"), ({"alpha": -1.0}, "alpha"),
                         ({"max_iterations": 0}, "max_iterations"), ({"tol": -1.0}, "tol")]:
        with pytest.raises(ValueError, match=name):
            fairgrad_weighting(**kwargs)


# alpha = 2 gives every task a positive decrease g_t . d = w_t^{-1/alpha} > 0.
TestFairgradProperties = pytest.mark.slow(property_tests(
    "fairgrad", FAIRGRAD, ("permutation_equivariant", "finite_on_degenerate", "nonconflicting",
                           "compiles_once"), rtol=1e-4))
