"""PCGrad against a direct numpy float64 implementation of Yu et al.'s Algorithm 1."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)
from hypothesis import given, settings, strategies as st

from imtl_jax.methods.pcgrad import pcgrad_orders, pcgrad_weighting

SHAPES = [(2, 5), (3, 8), (5, 16)]
WT = pcgrad_weighting()


# Many small test programs: skip LLVM's expensive optimisations (same numerics).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


_weigh = jit(lambda g, s, k: WT.weigh(g, jnp.zeros(g.shape[:1], g.dtype), s, k, None))
_weigh_nokey = jit(lambda g, s: WT.weigh(g, jnp.zeros(g.shape[:1], g.dtype), s, None, None))


def pcgrad_numpy(grads, orders):
    """Yu et al. 2020, Algorithm 1, on the raw vectors (float64)."""
    g = np.asarray(grads, np.float64)
    out = []
    for i in range(g.shape[0]):
        gi = g[i].copy()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return np.sum(out, axis=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_paper_algorithm_with_the_same_orders(fdtype, shape):
    rng = np.random.default_rng(shape[0])
    for trial in range(5):
        grads = (rng.standard_normal(shape) * rng.uniform(0.2, 3.0, (shape[0], 1))).astype(fdtype)
        out = _weigh(jnp.asarray(grads), WT.init(shape[0], fdtype), jax.random.key(trial))
        assert out.weights.dtype == fdtype
        orders = np.asarray(out.info["order"])
        assert orders.shape == (shape[0], shape[0] - 1)
        for i, row in enumerate(orders):   # a permutation of the other tasks
            assert sorted(row.tolist()) == [t for t in range(shape[0]) if t != i]
        expected = pcgrad_numpy(grads, orders)
        got = np.asarray(out.weights, np.float64) @ grads.astype(np.float64)
        tol = 1e-12 if fdtype == np.float64 else 1e-5
        np.testing.assert_allclose(got, expected, atol=tol * np.abs(expected).max())


def test_orders_are_deterministic_given_the_key_and_vary_with_it():
    a = np.asarray(pcgrad_orders(jax.random.key(3), 5))
    b = np.asarray(pcgrad_orders(jax.random.key(3), 5))
    np.testing.assert_array_equal(a, b)
    others = {np.asarray(pcgrad_orders(jax.random.key(k), 5)).tobytes() for k in range(10)}
    assert len(others) > 5
    # Raw uint32 keys work too.
    assert np.asarray(pcgrad_orders(jax.random.PRNGKey(0), 3)).shape == (3, 2)


def test_orders_are_uniform_and_independent_across_tasks():
    """Over 3000 keys, each of the 3! orders of a task's three others appears ~1/6 of the time
    (within 5 binomial standard deviations), for every task, and the orders of two tasks are
    independent (each of the 36 pairs ~1/36)."""
    keys = jax.random.split(jax.random.key(11), 3000)
    orders = np.asarray(jax.vmap(lambda k: pcgrad_orders(k, 4))(keys))          # (3000, 4, 3)
    n = orders.shape[0]
    codes = np.zeros(orders.shape[:2], int)
    for i in range(4):
        perms = sorted({tuple(r) for r in orders[:, i].tolist()})
        assert len(perms) == 6
        codes[:, i] = [perms.index(tuple(r)) for r in orders[:, i].tolist()]
        counts = np.bincount(codes[:, i], minlength=6)
        assert np.all(np.abs(counts - n / 6) <= 5 * np.sqrt(n * (1 / 6) * (5 / 6))), counts
    pairs = np.bincount(codes[:, 0] * 6 + codes[:, 1], minlength=36)
    assert np.all(np.abs(pairs - n / 36) <= 5 * np.sqrt(n * (1 / 36) * (35 / 36))), pairs


def test_order_matters_and_key_none_uses_the_step_counter():
    # Three gradients where the projection order changes the result.
    g = jnp.array([[1.0, 0.0, 0.0], [-0.9, 1.0, 0.0], [-0.8, -1.0, 0.3]])
    results = {tuple(np.round(np.asarray(_weigh(g, WT.init(3), jax.random.key(k)).weights), 6))
               for k in range(12)}
    assert len(results) > 1
    state = WT.init(3)
    orders = []
    for _ in range(6):
        out = _weigh_nokey(g, state)
        state = out.state
        orders.append(np.asarray(out.info["order"]).tobytes())
    assert int(state.count) == 6
    assert len(set(orders)) > 1


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(0, 2**31 - 1))
def test_non_conflicting_gradients_are_summed(shape, seed):
    rng = np.random.default_rng(seed)
    g = np.abs(rng.standard_normal(shape)).astype(np.float32)   # all pairwise dots >= 0
    w = np.asarray(_weigh(jnp.asarray(g), WT.init(shape[0]), jax.random.key(seed)).weights)
    np.testing.assert_allclose(w, 1.0, atol=1e-6)


def test_projected_rows_do_not_conflict_with_the_row_projected_on_last():
    # After PCGrad, g_i^PC . g_j >= 0 for the last j it was projected on (the paper's guarantee
    # per projection); for T = 2 this is exact for both rows.
    g = np.array([[1.0, 0.2], [-1.0, 0.5]], np.float32)
    w = np.asarray(_weigh(jnp.asarray(g), WT.init(2), jax.random.key(0)).weights, np.float64)
    g1 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
    g2 = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
    np.testing.assert_allclose(w @ g, g1 + g2, atol=1e-6)
    assert (g1 @ g[1]) > -1e-6 and (g2 @ g[0]) > -1e-6
