"""GradVac (Wang et al., ICLR 2021) against a numpy float64 implementation of the paper's
Algorithm 1 on the vectors, carried over a sequence of steps (the EMA cosine targets are the
state), and against PCGrad where the paper says they coincide (all targets 0)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

import inputs
from imtl_jax.methods.gradvac import gradvac_weighting
from imtl_jax.methods.pcgrad import PCGRAD

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def gradvac_numpy(grads, targets, orders, beta):
    """Algorithm 1 on the raw vectors (float64): returns (sum_i g_i^PC, new targets)."""
    g = np.asarray(grads, np.float64)
    phi_hat = np.array(targets, np.float64)
    out = []
    for i in range(g.shape[0]):
        gi = g[i].copy()
        for j in orders[i]:
            ni, nj = np.linalg.norm(gi), np.linalg.norm(g[j])
            phi = gi @ g[j] / (ni * nj) if ni * nj > 0 else 0.0
            hat = phi_hat[i, j]
            if phi < hat and ni * nj > 0:
                a = ni * (hat * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - hat ** 2)) / (nj * np.sqrt(1 - hat ** 2))
                gi = gi + a * g[j]
            phi_hat[i, j] = (1 - beta) * hat + beta * phi
        out.append(gi)
    return np.sum(out, axis=0), phi_hat


def _run(weighting, seq, dtype, keys):
    weigh = jit(lambda g, s, k: weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), s, k, None))
    state = weighting.init(seq[0].shape[0], dtype)
    outs = []
    for g, k in zip(seq, keys):
        out = weigh(jnp.asarray(g, dtype), state, k)
        state = out.state
        outs.append(out)
    return outs


@pytest.mark.parametrize("beta", [0.01, 0.5])
@pytest.mark.parametrize("num_tasks", [3, 6])
def test_gradvac_matches_the_algorithm_over_steps(fdtype, beta, num_tasks):
    """Four steps on correlated gradients (a common drift plus noise): the targets grow positive
    and the corrections fire; updates and targets match the vector algorithm step by step."""
    rng = np.random.default_rng(num_tasks)
    base = rng.standard_normal((num_tasks, 12))
    seq = [(base + 0.8 * rng.standard_normal(base.shape)) * rng.uniform(0.3, 3.0, (num_tasks, 1))
           for _ in range(4)]
    keys = [jax.random.key(i) for i in range(4)]
    outs = _run(gradvac_weighting(beta=beta), seq, fdtype, keys)
    targets = np.zeros((num_tasks, num_tasks))
    fired = 0
    tol = 1e-11 if fdtype == np.float64 else 2e-5
    for g, out in zip(seq, outs):
        orders = np.asarray(out.info["order"])
        g_cast = np.asarray(np.asarray(g, fdtype), np.float64)
        want, new_targets = gradvac_numpy(g_cast, targets, orders, beta)
        got = np.asarray(out.weights, np.float64) @ g_cast
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())
        np.testing.assert_allclose(np.asarray(out.state.targets, np.float64), new_targets, atol=tol)
        fired += int(not np.allclose(np.asarray(out.weights), 1.0))
        targets = np.asarray(out.state.targets, np.float64)   # carry our state (float32 round-off)
    assert fired >= 2
    assert int(outs[-1].state.count) == 4


def test_gradvac_with_zero_targets_is_pcgrad():
    """The first step (targets 0) corrects exactly the negative cosines, onto phi = 0: PCGrad's
    projection, with the same orders from the same key."""
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    w = gradvac_weighting(beta=0.3)
    gradvac = jax.jit(lambda key: w.weigh(g, jnp.zeros(5), w.init(5), key, None))   # jitted: eagerly,
    pcgrad = jax.jit(lambda key: PCGRAD.weigh(g, jnp.zeros(5), PCGRAD.init(5), key, None))  # op by op
    for k in range(3):
        key = jax.random.key(k)
        gv, pc = gradvac(key), pcgrad(key)
        np.testing.assert_array_equal(np.asarray(gv.info["order"]), np.asarray(pc.info["order"]))
        np.testing.assert_allclose(np.asarray(gv.weights), np.asarray(pc.weights), rtol=1e-5, atol=1e-6)


def test_gradvac_correction_reaches_the_target_cosine():
    """T = 2: after the correction, cos(g_1^PC, g_2) equals the target exactly."""
    w = gradvac_weighting(beta=0.5)
    with x64():
        state = w.init(2, jnp.float64)._replace(targets=jnp.array([[0.0, 0.6], [0.3, 0.0]]))
        g = np.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.5]])
        out = w.weigh(jnp.asarray(g), jnp.zeros(2), state, jax.random.key(0), None)
        c = np.asarray(out.weights)
    # update = g_1^PC + g_2^PC; both rows had one correction each (cosine 0.28 < 0.6, and the
    # second row's 0.28 < 0.3), so row 1's coefficient on g_2 is c[1] - 1.
    g1 = g[0] + (c[1] - 1.0) * g[1]
    cos = g1 @ g[1] / (np.linalg.norm(g1) * np.linalg.norm(g[1]))
    np.testing.assert_allclose(cos, 0.6, atol=1e-12)
    phi = g[0] @ g[1] / np.prod(np.linalg.norm(g, axis=1))
    np.testing.assert_allclose(np.asarray(out.state.targets)[0, 1], 0.5 * 0.6 + 0.5 * phi, atol=1e-14)


@pytest.mark.parametrize("family,num_tasks,dim,decades", [inputs.HARD[1], inputs.HARD[5]])
def test_gradvac_on_hard_families(family, num_tasks, dim, decades):
    """Norms over 1e+-4 and T = 10, with targets from two earlier steps (float64)."""
    seq = [inputs.draw(family, s, num_tasks, dim, decades) for s in range(3)]
    with x64():
        outs = _run(gradvac_weighting(beta=0.5), seq, np.float64, [jax.random.key(s) for s in range(3)])
        targets = np.zeros((num_tasks, num_tasks))
        for g, out in zip(seq, outs):
            want, targets = gradvac_numpy(g, targets, np.asarray(out.info["order"]), 0.5)
            got = np.asarray(out.weights) @ g
            np.testing.assert_allclose(got, want, atol=1e-9 * np.abs(want).max())
            np.testing.assert_allclose(np.asarray(out.state.targets), targets, atol=1e-9)


def test_gradvac_key_none_uses_the_counter_and_validates_beta():
    w = gradvac_weighting()
    g = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6)), jnp.float32)
    weigh = jit(lambda s: w.weigh(g, jnp.zeros(4), s, None, None))
    state, orders = w.init(4), set()
    for _ in range(5):
        out = weigh(state)
        state = out.state
        orders.add(np.asarray(out.info["order"]).tobytes())
    assert len(orders) > 1 and int(state.count) == 5
    with pytest.raises(ValueError, match="beta"):
        gradvac_weighting(beta=1.5)
