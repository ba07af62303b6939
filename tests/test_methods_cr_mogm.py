"""CR-MOGM (Zhou et al., NeurIPS 2022): the moving average of a wrapped method's weights,
checked against the recurrence in numpy float64 over a recorded sequence (the wrapped MGDA's
weights computed on their own), its alpha = 0 / 1 limits, initial weights, and a stateful,
stochastic wrapped method (PCGrad: the key and the inner state pass through)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64

from imtl_jax.methods.cr_mogm import CR_MOGM, cr_mogm_weighting
from imtl_jax.methods.mgda import mgda_weights
from imtl_jax.methods.pcgrad import PCGRAD

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _run(weighting, seq, keys=None):
    weigh = jit(lambda g, s, k: weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), s, k, None))
    keys = keys or [None] * len(seq)
    with x64():
        state = weighting.init(seq[0].shape[0], jnp.float64)
        outs = []
        for g, k in zip(seq, keys):
            out = weigh(jnp.asarray(g), state, k)
            state = out.state
            outs.append(out)
    return outs


def _sequence(seed, steps=5, num_tasks=4, dim=9):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_tasks, dim))
    return [base + 0.8 * rng.standard_normal(base.shape) for _ in range(steps)]


def test_cr_mogm_is_the_moving_average_of_mgda():
    seq = _sequence(0)
    outs = _run(CR_MOGM, seq)
    with x64():
        hats = [np.asarray(mgda_weights(jnp.asarray(g))) for g in seq]
    lam = hats[0]                                  # lambda_0 = hat lambda_1
    for hat, out in zip(hats, outs):
        lam = 0.9 * lam + 0.1 * hat
        np.testing.assert_allclose(np.asarray(out.weights), lam, rtol=0, atol=1e-14)
        assert bool(out.info["converged"])         # MGDA's certificate passes through
    assert not np.allclose(lam, hats[-1], atol=1e-3)


@pytest.mark.slow
def test_cr_mogm_limits_initial_weights_and_a_stochastic_stateful_inner():
    seq = _sequence(1)
    keys = [jax.random.key(i) for i in range(len(seq))]
    pc = [np.asarray(o.weights) for o in _run(PCGRAD, seq, keys)]
    off = [np.asarray(o.weights) for o in _run(cr_mogm_weighting(PCGRAD, alpha=0.0), seq, keys)]
    np.testing.assert_array_equal(off, pc)         # alpha = 0: the wrapped weights verbatim
    frozen = _run(cr_mogm_weighting(PCGRAD, alpha=1.0, initial_weights=[0.1, 0.2, 0.3, 0.4]), seq, keys)
    for out in frozen:
        np.testing.assert_array_equal(np.asarray(out.weights), [0.1, 0.2, 0.3, 0.4])
    assert int(frozen[-1].state.inner.count) == len(seq)     # the inner state advances
    half = _run(cr_mogm_weighting(PCGRAD, alpha=0.5, initial_weights=[1.0, 1.0, 1.0, 1.0]), seq, keys)
    lam = np.ones(4)
    for hat, out in zip(pc, half):
        lam = 0.5 * lam + 0.5 * hat
        np.testing.assert_allclose(np.asarray(out.weights), lam, rtol=0, atol=1e-14)


def test_cr_mogm_arguments_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        cr_mogm_weighting(alpha=1.5)
    with pytest.raises(ValueError, match="inner"):
        cr_mogm_weighting(3)
    with pytest.raises(ValueError, match="initial_weights"):
        cr_mogm_weighting(initial_weights=[0.5, 0.5]).init(3)
    assert cr_mogm_weighting("pcgrad").name == "cr_mogm_pcgrad"
