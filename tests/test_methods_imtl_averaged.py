"""IMTL-G with alpha averaged over steps (``imtl_g_averaged``) against a float64 NumPy oracle:
the paper's alpha (Eq. 2) of each step's Jacobian, averaged with the bias-corrected moving
average the docstring defines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import paper_alpha, random_directions, x64

from imtl_jax.methods import get_method
from imtl_jax.methods.imtl import imtl_g_averaged_weighting


def test_matches_the_averaged_paper_alpha_over_a_sequence():
    rng = np.random.default_rng(0)
    decay = 0.8
    jacobians = [random_directions(rng, 3, 8) * 10.0 ** rng.uniform(-2, 2, (3, 1)) for _ in range(6)]
    with x64():
        w = imtl_g_averaged_weighting(decay=decay)
        weigh = jax.jit(lambda g, s: w.weigh(g, jnp.ones(3), s, None, None))
        state = w.init(3, jnp.float64)
        average = np.zeros(3)
        for k, g in enumerate(jacobians, 1):
            out = weigh(jnp.asarray(g), state)
            state = out.state
            average = decay * average + (1 - decay) * paper_alpha(g)
            np.testing.assert_allclose(np.asarray(out.weights), average / (1 - decay ** k), rtol=1e-10)
            np.testing.assert_allclose(np.asarray(out.info["alpha_step"]), paper_alpha(g), rtol=1e-10)
            assert abs(float(out.weights.sum()) - 1.0) < 1e-12
    # decay 0 is IMTL-G itself
    g = jnp.asarray(jacobians[0], jnp.float32)
    plain = get_method("imtl_g").weighting.weigh(g, jnp.ones(3), (), None, None).weights
    zero = imtl_g_averaged_weighting(decay=0.0)
    np.testing.assert_allclose(np.asarray(zero.weigh(g, jnp.ones(3), zero.init(3), None, None).weights),
                               np.asarray(plain), rtol=1e-6)


def test_a_nan_step_is_loud_and_leaves_the_average():
    w = get_method("imtl_g_averaged").weighting
    state = w.init(2)
    good = w.weigh(jnp.array([[1.0, 0.0], [0.0, 3.0]]), jnp.ones(2), state, None, None)
    bad = w.weigh(jnp.array([[np.nan, 0.0], [0.0, 3.0]]), jnp.ones(2), good.state, None, None)
    assert not np.all(np.isfinite(np.asarray(bad.weights)))
    for a, b in zip(jax.tree_util.tree_leaves(bad.state), jax.tree_util.tree_leaves(good.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="decay"):
        imtl_g_averaged_weighting(decay=1.0)
