"""The shared Gramian helper at extreme scales (issue 26, part 2).

``normalized_gramian`` rescales the rows by an exact power of two before dividing by the largest
entry, so every method that uses it gives the same weights for a gradient matrix at scale 1 and
at 1e-30, at float32 subnormals (which XLA's CPU backend reads as zero in arithmetic) and with
entries up to 3e38. Each method is compared with itself at scale 1 (its own answer is the
oracle: every one of them is invariant to a uniform positive scale of the gradients), and the
helper itself against a NumPy float64 Gramian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imtl_jax.methods import get_method
from imtl_jax.methods._common import normalized_gramian
from marks import slow_unless_core

# Every registered method whose weighting calls normalized_gramian (grep the helper), and DB-MTL,
# which normalises each row by its own power of two and keeps its norm EMA as mantissas and an
# exponent (its exact-oracle tests at these scales: test_methods_db_mtl_stch.py).
METHODS = ("aligned_mtl", "cagrad", "config", "db_mtl", "dualproj", "gradvac", "mgda",
           "nash_mtl", "pcgrad", "upgrad")

# Integer entries: exact at every power-of-two scale; rows conflict (negative cosines). The
# largest row norm is 3.2 times the largest entry's 3, so 3e38 keeps every row norm finite.
BASE = np.array([[3.0, 0.5, -0.5], [-1.0, 2.5, 0.5], [0.5, -1.0, -2.0]], np.float32)
SUBNORMAL = 2.0 ** -140          # 3 * 2^-140 ~ 4e-42 < float32 tiny (1.2e-38): every entry subnormal
SCALES = {"1e-30": 1e-30 / 3.0, "subnormal": SUBNORMAL, "3e38": 3e38 / 3.0}


def _weights(name, grads):
    weighting = get_method(name).weighting
    state = weighting.init(grads.shape[0], grads.dtype)
    key = jax.random.PRNGKey(0)
    out = weighting.weigh(grads, jnp.ones(grads.shape[:1], grads.dtype), state, key, None)
    return np.asarray(out.weights, np.float64)


@pytest.mark.parametrize("scale", list(SCALES))
def test_helper_matches_numpy(scale):
    g = (BASE.astype(np.float64) * SCALES[scale]).astype(np.float32)
    assert np.all(np.isfinite(g)) and np.all(np.abs(g[BASE != 0]) > 0)
    if scale == "subnormal":
        assert np.all(np.abs(g) < np.finfo(np.float32).tiny)
    m, s = normalized_gramian(jnp.asarray(g))
    ref = BASE.astype(np.float64) / 3.0
    np.testing.assert_allclose(np.asarray(m, np.float64), ref @ ref.T, rtol=1e-6, atol=1e-7)
    if scale != "subnormal":   # a subnormal scale may read as 0 where denormals are flushed
        np.testing.assert_allclose(float(s), float(np.max(np.abs(g))), rtol=1e-7)


def test_helper_zero_and_nonfinite():
    m, s = normalized_gramian(jnp.zeros((2, 3), jnp.float32))
    assert float(s) == 1.0 and np.all(np.asarray(m) == 0)
    m, _ = normalized_gramian(jnp.asarray(BASE).at[1, 1].set(jnp.inf))
    assert not np.all(np.isfinite(np.asarray(m)))


@pytest.mark.parametrize("name", slow_unless_core(METHODS, core=("mgda", "pcgrad", "config")))
def test_methods_scale_free_at_extreme_scales(name):
    ref = _weights(name, jnp.asarray(BASE))
    assert np.all(np.isfinite(ref)), (name, ref)
    for label, scale in SCALES.items():
        g = jnp.asarray((BASE.astype(np.float64) * scale).astype(np.float32))
        got = _weights(name, g)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6 * np.max(np.abs(ref)),
                                   err_msg=f"{name} at {label}")
