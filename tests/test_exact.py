"""The exact (parameter-level) step's gramian route (imtl_jax/_exact.py), against float64 oracles.

The oracle: per-task gradients w.r.t. the shared parameters by plain ``jax.grad``, one task at a
time, flattened in float64 numpy; IMTL-G weights by the paper's Eq. 2 (``oracles.paper_alpha``)
or, with priorities, by solving ``K beta = p`` on the unit rows in numpy.
The route is chosen by size; the tests lower the threshold to 0 so that small problems take it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imtl_jax
from imtl_jax import _exact
from oracles import paper_alpha, x64

T, B, DIN, H, F = 3, 8, 5, 6, 4


def encoder(w, batch):
    return jnp.tanh(jnp.tanh(batch["x"] @ w["w1"] + w["b1"]) @ w["w2"])


def make_head_loss(factor=1.0):
    def head_loss(v_t, z, batch, t):
        return factor * (jnp.mean((z @ v_t - batch["y"][:, t]) ** 2) + 0.1 * t)
    return head_loss


def make_problem(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 6)
    shared = {"w1": jax.random.normal(k[0], (DIN, H), dtype), "b1": 0.3 * jax.random.normal(k[1], (H,), dtype),
              "w2": jax.random.normal(k[2], (H, F), dtype) / 2}
    params = imtl_jax.MTLParams(shared, jax.random.normal(k[3], (T, F), dtype), jnp.zeros((T,), dtype))
    batch = {"x": jax.random.normal(k[4], (B, DIN), dtype), "y": jax.random.normal(k[5], (B, T), dtype)}
    return params, batch


def oracle_jacobian(params, batch, head_loss):
    """(T, P) float64 rows, leaves in tree order, by one jax.grad per task."""
    rows = []
    for t in range(T):
        g = jax.grad(lambda sp, t=t: head_loss(params.heads[t], encoder(sp, batch), batch, t))(params.shared)
        rows.append(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(g)]))
    return np.stack(rows)


def oracle_weights(jac, priorities=None):
    """alpha and C by the normalized system K beta = p in float64 (p = 1: the paper's alpha)."""
    n = np.linalg.norm(jac, axis=1)
    u = jac / n[:, None]
    p = np.ones(len(n)) if priorities is None else np.asarray(priorities, np.float64)
    beta = np.linalg.solve(u @ u.T, p)
    raw = beta / n
    return raw / raw.sum(), 1.0 / raw.sum(), np.linalg.cond(u) ** 2


@pytest.fixture
def gramian_route(monkeypatch):
    """Forces the gramian route and counts its solves."""
    calls = []
    original = _exact.imtl_g_from_gramian

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_exact, "_GRAMIAN_MIN_SIZE", 0)
    monkeypatch.setattr(_exact, "imtl_g_from_gramian", counted)
    return calls


def run_step(params, batch, head_loss, method="imtl_g_exact", priorities=None):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    return jax.jit(lambda p, b, pr: step(p, step.init(p), b, priorities=pr))(params, batch, priorities)


def shared_rows(grads):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(grads.shared)])


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_float64_matches_paper_oracle(gramian_route):
    with x64():
        params, batch = make_problem(1, jnp.float64)
        head_loss = make_head_loss()
        grads, _, aux = run_step(params, batch, head_loss)
        assert gramian_route, "the gramian route was not taken"
        jac = oracle_jacobian(params, batch, head_loss)
        alpha = paper_alpha(jac)
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9)
        np.testing.assert_allclose(shared_rows(grads), alpha @ jac, rtol=1e-9, atol=1e-13)
        _, common, _ = oracle_weights(jac)
        np.testing.assert_allclose(aux.info["common_projection"], common, rtol=1e-9)


def test_float32_within_conditioning_bound(gramian_route):
    params, batch = make_problem(2, jnp.float32)
    head_loss = make_head_loss()
    _, _, aux = run_step(params, batch, head_loss)
    assert gramian_route
    with x64():
        jac = oracle_jacobian(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params),
                              jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), batch), head_loss)
    alpha, _, cond_k = oracle_weights(jac)
    # Forming K = D^-1 J J^T D^-1 in float32 perturbs it by ~eps; the solve amplifies by cond(K).
    bound = 10 * T * np.finfo(np.float32).eps * cond_k
    err = np.max(np.abs(np.asarray(aux.weights, np.float64) - alpha)) / np.max(np.abs(alpha))
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("factor", [1e-30, 1e25])
def test_extreme_scales_take_the_rescaled_gramian(gramian_route, factor):
    """Jacobian entries near 1e-30 (J J^T underflows in float32) or 1e25 (overflows): the weights
    are those of the unscaled problem (IMTL-G is invariant to a uniform scale, Theorem 2)."""
    params, batch = make_problem(3, jnp.float32)
    _, _, aux = run_step(params, batch, make_head_loss(factor))
    _, _, ref = run_step(params, batch, make_head_loss(1.0))
    with x64():
        jac = oracle_jacobian(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params),
                              jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), batch), make_head_loss())
    alpha, common, cond_k = oracle_weights(jac)
    bound = 10 * T * np.finfo(np.float32).eps * cond_k
    assert np.all(np.isfinite(np.asarray(aux.weights)))
    np.testing.assert_allclose(aux.weights, alpha, rtol=0, atol=bound * np.max(np.abs(alpha)))
    np.testing.assert_allclose(aux.weights, ref.weights, rtol=0, atol=bound * np.max(np.abs(alpha)))
    np.testing.assert_allclose(aux.info["common_projection"], factor * common, rtol=bound)


def test_priorities_and_nonconflicting(gramian_route):
    with x64():
        params, batch = make_problem(4, jnp.float64)
        head_loss = make_head_loss()
        jac = oracle_jacobian(params, batch, head_loss)
        prio = jnp.array([1.0, 2.0, 0.5])
        _, _, aux = run_step(params, batch, head_loss, priorities=prio)
        alpha, common, _ = oracle_weights(jac, prio)
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9)
        np.testing.assert_allclose(aux.info["common_projection"], common, rtol=1e-9)


def test_nonconflicting_flips_a_negative_common_projection():
    """Rows whose equal-projection point has C < 0 (found by a seeded search in float64 numpy):
    nonconflicting returns -alpha and -C, the plain solve alpha and C."""
    with x64():
        rng = np.random.default_rng(0)
        while True:
            jac = rng.standard_normal((3, 4)) * np.array([[1.0], [3.0], [0.2]])
            alpha, common, _ = oracle_weights(jac)
            if common < 0:
                break
        gram = jnp.asarray(jac @ jac.T)
        for flag, sign in ((False, 1.0), (True, -1.0)):
            w, c = _exact.imtl_g_from_gramian(gram, jnp.int32(0), nonconflicting=flag)
            np.testing.assert_allclose(w, sign * alpha, rtol=1e-9)
            np.testing.assert_allclose(c, sign * common, rtol=1e-9)
        # in input units: J J^T = (gram / 4) * 2^2, so C is unchanged
        w, c = _exact.imtl_g_from_gramian(gram / 4, jnp.int32(2))
        np.testing.assert_allclose(c, common, rtol=1e-12)


def test_zero_row_and_nonfinite_gramian():
    with x64():
        rng = np.random.default_rng(5)
        jac = rng.standard_normal((4, 7))
        jac[2] = 0.0
        w, common = _exact.imtl_g_from_gramian(jnp.asarray(jac @ jac.T), jnp.int32(0))
        rest = np.delete(jac, 2, axis=0)
        expected = np.insert(paper_alpha(rest), 2, 0.0)
        np.testing.assert_allclose(w, expected, rtol=1e-9, atol=1e-15)
        gram = jnp.asarray(jac @ jac.T).at[0, 1].set(jnp.nan)
        w, common = _exact.imtl_g_from_gramian(gram, jnp.int32(0))
        assert np.all(np.isnan(np.asarray(w))) and np.isnan(float(common))


def test_gramian_leaf_by_leaf_equals_flattened_product():
    with x64():
        rng = np.random.default_rng(6)
        tree = {"a": rng.standard_normal((3, 4, 5)), "b": rng.standard_normal((3, 2)),
                "c": rng.standard_normal((3,))}
        flat = np.concatenate([np.reshape(tree[k], (3, -1)) for k in ("a", "b", "c")], axis=1)
        got = _exact.gramian(jax.tree_util.tree_map(jnp.asarray, tree), 3, jnp.float64)
        np.testing.assert_allclose(got, flat @ flat.T, rtol=1e-13)


def test_compiled_once(gramian_route):
    params, _ = make_problem(7)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(make_head_loss()), "imtl_g_exact")
    traces = []

    @jax.jit
    def train(p, b):
        traces.append(1)
        return step(p, (), b)[0]

    for seed in range(3):
        _, batch = make_problem(10 + seed)
        jax.block_until_ready(train(params, batch))
    assert len(traces) == 1
