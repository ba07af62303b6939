"""CAGrad and UPGrad reach their certificates on the near-simplex T = 20 family in float64
(issue 26, part 2), checked against independent float64 oracles.

Before the active-set finishes, seed 0 of ``simplex`` at T = D = 20 left UPGrad at its 20-round
cap (certificate ~8e-7) and CAGrad at its 20,000-step cap on other draws (gap ~1e-9 .. 2e-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

import inputs
from imtl_jax.methods.cagrad import cagrad_weighting, default_max_iterations
from imtl_jax.methods.dualproj import dualproj_weighting
from imtl_jax.methods.upgrad import upgrad_weighting
from oracles import x64

# (seed, D, decades): the draws that hit the caps; one in the default suite, the rest slow.
CASES = [(0, 20, 2)] + [pytest.param(*c, marks=pytest.mark.slow)
                        for c in [(0, 20, 4), (1, 20, 4), (0, 64, 4)]]


def _info(weighting, g):
    return weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None)


@pytest.mark.parametrize("seed,dim,decades", CASES)
def test_upgrad_dualproj_certificates_and_nnls_oracle(seed, dim, decades):
    with x64():
        g = inputs.draw("simplex", seed, 20, dim, decades)
        out = jax.jit(lambda x: _info(upgrad_weighting(), x))(jnp.asarray(g))
        assert bool(out.info["converged"]), out.info
        assert int(out.info["iterations"]) <= 2
        x = np.asarray(out.weights) @ g            # mean of the T projections
        # Oracle: pi(g_i) = G^T (e_i + v_i), v_i = argmin_{v >= 0} ||G^T (e_i + v)|| (NNLS).
        ref = np.mean([g.T @ (np.eye(20)[i] + nnls(g.T, -g[i], maxiter=2000)[0])
                       for i in range(20)], axis=0)
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-9 * np.linalg.norm(g, axis=1).max())
        assert np.min(g @ x) >= -1e-12 * np.max(np.sum(g * g, axis=1)) * np.linalg.norm(x)
        out = jax.jit(lambda x: _info(dualproj_weighting(), x))(jnp.asarray(g))
        assert bool(out.info["converged"]), out.info


@pytest.mark.parametrize("seed,dim,decades", CASES)
def test_cagrad_certificate_and_duality_gap(seed, dim, decades):
    with x64():
        g = inputs.draw("simplex", seed, 20, dim, decades)
        out = jax.jit(lambda x: _info(cagrad_weighting(rescale=0), x))(jnp.asarray(g))
        assert bool(out.info["converged"]), out.info
        assert int(out.info["iterations"]) < default_max_iterations(20)
        # Independent check: weak duality. d from the dual weights; the primal value
        # min_t g_t . d must equal the dual value F(w) to round-off (relative to max |g_t|^2).
        w = np.asarray(out.info["dual_weights"], np.float64)
        w = w / w.sum()
        g0, gw = g.mean(axis=0), w @ g
        d = g0 + 0.5 * np.linalg.norm(g0) / np.linalg.norm(gw) * gw
        gap = gw @ g0 + 0.5 * np.linalg.norm(g0) * np.linalg.norm(gw) - np.min(g @ d)
        assert abs(gap) <= 16 * np.finfo(np.float64).eps * np.max(np.sum(g * g, axis=1))
