"""IMTL-G weights: properties from the paper, against numpy float64 oracles."""

from __future__ import annotations

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import imtl_jax
from oracles import paper_alpha, paper_alpha_error_bound, projections, random_directions, relative_spread, x64
from marks import slow

solve = jax.jit(imtl_jax.imtl_g_solve, static_argnames="nonconflicting")

# A handful of shapes keeps the number of compilations (and CI time) small.
SHAPES = [(2, 8), (3, 8), (4, 16), (5, 16), (6, 64), (8, 8), (8, 64)]


def sum_bound(alpha: np.ndarray, dtype) -> float:
    """Round-off bound of sum(alpha) computed in ``dtype``: 10 T eps sum|alpha| (and >= 10 eps)."""
    return float(10 * len(alpha) * np.finfo(dtype).eps * max(np.abs(alpha).sum(), 1.0))


def _random_jacobian(seed: int, num_tasks: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    units = random_directions(rng, num_tasks, dim)
    norms = 10.0 ** rng.uniform(-3, 3, num_tasks)
    return units * norms[:, None]


@pytest.mark.slow  # float64 runs in the default suite through the `dtype` fixture's tests
@settings(max_examples=25, deadline=None, derandomize=True)  # more in tests/test_stress.py
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_random_jacobians_float64(shape, seed):
    with x64():
        grads = _random_jacobian(seed, *shape)
        res = solve(jnp.asarray(grads))
        alpha = np.asarray(res.weights)
        assert res.weights.dtype == jnp.float64
        # Sums of T terms of size up to |alpha|: round-off bound T eps sum|alpha|.
        np.testing.assert_allclose(alpha.sum(), 1.0, rtol=0, atol=sum_bound(alpha, np.float64))
        assert relative_spread(projections(grads, alpha)) <= 1e-12
        np.testing.assert_allclose(alpha, paper_alpha(grads), rtol=1e-12,
                                   atol=paper_alpha_error_bound(grads) + 1e-13)
        np.testing.assert_allclose(np.asarray(res.aggregate), alpha @ grads, rtol=0,
                                   atol=1e-12 * (np.abs(alpha) @ np.abs(grads)).max())
        np.testing.assert_allclose(float(res.common_projection), projections(grads, alpha).mean(),
                                   rtol=1e-10)


@settings(max_examples=25, deadline=None, derandomize=True)  # more in tests/test_stress.py
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_random_jacobians_float32(shape, seed):
    grads = _random_jacobian(seed, *shape).astype(np.float32)
    res = solve(jnp.asarray(grads))
    assert res.weights.dtype == jnp.float32
    alpha = np.asarray(res.weights, np.float64)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=sum_bound(alpha, np.float32))
    # The oracle is the exact solution for the float32-rounded input. The physical floor: the
    # spread of that exact alpha rounded to float32; alpha is formed from compensated pairs and
    # rounded once, so ours stays within 2x of it (measured: equal on every draw of
    # benchmarks.accuracy).
    floor = relative_spread(projections(grads, paper_alpha(grads).astype(np.float32)))
    spread = relative_spread(projections(grads, alpha))
    assert spread <= 2 * floor + 1e-12, (spread, floor)
    assert spread <= 1e-5
    np.testing.assert_allclose(alpha, paper_alpha(grads), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4, 1e6])
def test_float32_norm_ratio_sweep(ratio):
    rng = np.random.default_rng(int(np.log10(ratio)))
    worst = 0.0
    for num_tasks, dim in [(2, 8), (4, 16), (8, 64)]:
        for _ in range(10):
            units = random_directions(rng, num_tasks, dim)
            norms = np.geomspace(1.0, ratio, num_tasks)
            rng.shuffle(norms)
            grads = (units * norms[:, None]).astype(np.float32)
            alpha = np.asarray(solve(jnp.asarray(grads)).weights, np.float64)
            worst = max(worst, relative_spread(projections(grads, alpha)))
    assert worst <= 1e-5, worst


def test_golden_value(dtype):
    grads = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype)
    res = solve(grads)
    # The golden values are given to 8 decimals; float64 is also checked against the oracle.
    tol = 1e-6 if dtype == np.float32 else 5e-9
    np.testing.assert_allclose(res.weights, [0.59233032, 0.40766968], rtol=0, atol=tol)
    np.testing.assert_allclose(res.aggregate, [0.07669683, 1.0, 1.0], rtol=0, atol=tol)
    np.testing.assert_allclose(res.common_projection, 0.39909406, rtol=0, atol=tol)
    if dtype == np.float64:
        np.testing.assert_allclose(res.weights, paper_alpha(np.asarray(grads)), rtol=1e-13)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.sampled_from([2, 8, 64]))
def test_two_tasks_closed_form(seed, dim):
    with x64():
        rng = np.random.default_rng(seed)
        grads = rng.standard_normal((2, dim)) * (10.0 ** rng.uniform(-3, 3, (2, 1)))
        n1, n2 = np.linalg.norm(grads, axis=1)
        alpha = np.asarray(solve(jnp.asarray(grads)).weights)
        np.testing.assert_allclose(alpha, [n2 / (n1 + n2), n1 / (n1 + n2)], rtol=1e-12)
        assert np.all((alpha >= 0) & (alpha <= 1))


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_theorem_2_per_task_scaling(shape, seed):
    """Scaling row t by k_t > 0: alpha'_t = (alpha_t/k_t)/S, g' = g/S, S = sum alpha_tau/k_tau."""
    with x64():
        rng = np.random.default_rng(seed)
        grads = _random_jacobian(seed, *shape)
        k = 10.0 ** rng.uniform(-2, 2, shape[0])
        res, res_k = solve(jnp.asarray(grads)), solve(jnp.asarray(grads * k[:, None]))
        alpha = np.asarray(res.weights)
        s = np.sum(alpha / k)
        np.testing.assert_allclose(res_k.weights, (alpha / k) / s, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(res_k.aggregate, np.asarray(res.aggregate) / s, rtol=1e-9,
                                   atol=1e-12 * np.abs(res.aggregate).max() / abs(s))
        uniform = solve(jnp.asarray(3.7 * grads))
        np.testing.assert_allclose(uniform.weights, alpha, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(uniform.aggregate, 3.7 * np.asarray(res.aggregate), rtol=1e-10,
                                   atol=1e-12 * np.abs(res.aggregate).max())


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_lemma_3_orthogonal_rows(num_tasks, dtype):
    rng = np.random.default_rng(num_tasks)
    q, _ = np.linalg.qr(rng.standard_normal((16, num_tasks)))
    norms = 10.0 ** rng.uniform(-2, 2, num_tasks)
    grads = (q.T * norms[:, None]).astype(dtype)
    alpha = np.asarray(solve(jnp.asarray(grads)).weights, np.float64)
    expected = (1 / norms) / np.sum(1 / norms)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(alpha, expected, rtol=tol)
    assert np.all(alpha > 0)
    beta = alpha * norms
    np.testing.assert_allclose(beta, beta.mean(), rtol=tol)


def test_lemma_3_equal_cosines():
    """All pairwise cosines equal (0.3), not orthogonal: still alpha_t proportional to 1/|g_t|."""
    with x64():
        num_tasks, c = 4, 0.3
        k = np.full((num_tasks, num_tasks), c) + (1 - c) * np.eye(num_tasks)
        units = np.linalg.cholesky(k)  # rows with Gram matrix k
        norms = np.array([0.1, 1.0, 5.0, 50.0])
        alpha = np.asarray(solve(jnp.asarray(units * norms[:, None])).weights)
        np.testing.assert_allclose(alpha, (1 / norms) / np.sum(1 / norms), rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_permutation_equivariance(shape, seed):
    with x64():
        grads = _random_jacobian(seed, *shape)
        perm = np.random.default_rng(seed).permutation(shape[0])
        alpha = np.asarray(solve(jnp.asarray(grads)).weights)
        alpha_p = np.asarray(solve(jnp.asarray(grads[perm])).weights)
        np.testing.assert_allclose(alpha_p, alpha[perm], rtol=1e-10, atol=1e-13)


ALL_CONFLICTING = np.array([[1.0, 1.0, -1.0], [1.0, 0.0, 0.0], [10.0, 0.0, 10.0]])


def test_all_conflicting_fixture_paper_faithful(dtype):
    res = solve(jnp.asarray(ALL_CONFLICTING, dtype))
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(res.weights, [-2.834, 4.220, -0.386], atol=1e-3)
    np.testing.assert_allclose(res.aggregate, [-2.473, -2.834, -1.024], atol=1e-3)
    np.testing.assert_allclose(ALL_CONFLICTING @ np.asarray(res.aggregate, np.float64),
                               [-4.283, -2.473, -34.968], atol=2e-3)
    assert float(res.common_projection) < 0
    np.testing.assert_allclose(float(jnp.sum(res.weights)), 1.0, atol=tol)
    np.testing.assert_allclose(res.weights, paper_alpha(ALL_CONFLICTING), rtol=10 * tol)


def test_all_conflicting_nonconflicting_flag(dtype):
    res = solve(jnp.asarray(ALL_CONFLICTING, dtype), nonconflicting=True)
    faithful = paper_alpha(ALL_CONFLICTING)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(res.weights, -faithful, rtol=10 * tol)
    assert float(res.common_projection) > 0
    # -g of the paper now descends every task: g' . g_t > 0 for all t.
    assert np.all(ALL_CONFLICTING @ np.asarray(res.aggregate, np.float64) > 0)
    # With a positive C the flag changes nothing.
    grads = jnp.asarray([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype)
    np.testing.assert_array_equal(solve(grads, nonconflicting=True).weights, solve(grads).weights)


def test_negative_weights_occur_and_are_impartial():
    """For T >= 3, alpha may be negative; projections are still equal."""
    rng = np.random.default_rng(0)
    negatives = 0
    with x64():
        for _ in range(50):
            grads = rng.standard_normal((4, 5))
            alpha = np.asarray(solve(jnp.asarray(grads)).weights)
            negatives += np.any(alpha < 0)
            assert relative_spread(projections(grads, alpha)) < 1e-10
    assert negatives > 0


# ---------------------------------------------------------------------------------------------
# Degenerate inputs (notes §1 policy)


def test_single_task(dtype):
    res = solve(jnp.asarray([[3.0, -4.0]], dtype))
    np.testing.assert_array_equal(res.weights, [1.0])
    np.testing.assert_allclose(res.aggregate, [3.0, -4.0])
    np.testing.assert_allclose(res.common_projection, 5.0, rtol=1e-6)


def test_zero_row_gets_zero_weight_others_impartial(dtype):
    rng = np.random.default_rng(1)
    grads = _random_jacobian(3, 3, 8)
    with_zero = np.insert(grads, 1, 0.0, axis=0).astype(dtype)
    res = solve(jnp.asarray(with_zero))
    alpha = np.asarray(res.weights, np.float64)
    assert alpha[1] == 0.0
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(np.delete(alpha, 1), paper_alpha(grads.astype(dtype)), rtol=100 * tol,
                               atol=tol)
    assert np.all(np.isfinite(np.asarray(res.aggregate)))
    del rng


def test_all_zero(dtype):
    res = solve(jnp.zeros((3, 5), dtype))
    np.testing.assert_allclose(res.weights, np.full(3, 1 / 3), rtol=1e-6)
    np.testing.assert_array_equal(res.aggregate, np.zeros(5))
    assert float(res.common_projection) == 0.0


def test_duplicate_rows_split_weight(dtype):
    grads = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]], dtype)
    res = solve(jnp.asarray(grads))
    alpha = np.asarray(res.weights, np.float64)
    # Without the duplicate: T = 2 closed form (2, 1)/3; the duplicate shares its weight.
    np.testing.assert_allclose(alpha, [2 / 3, 1 / 6, 1 / 6], rtol=1e-5)
    p = projections(grads, alpha)
    np.testing.assert_allclose(p, p[0], rtol=1e-5)


def test_parallel_rows_share(dtype):
    grads = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype)
    alpha = np.asarray(solve(jnp.asarray(grads)).weights, np.float64)
    assert np.all(np.isfinite(alpha))
    np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-6)
    p = projections(grads, alpha)
    np.testing.assert_allclose(p, p[0], rtol=1e-5)


def test_more_tasks_than_dimensions(dtype):
    rng = np.random.default_rng(2)
    grads = rng.standard_normal((6, 3)).astype(dtype)
    res = solve(jnp.asarray(grads))
    assert np.all(np.isfinite(np.asarray(res.weights)))
    assert np.all(np.isfinite(np.asarray(res.aggregate)))
    np.testing.assert_allclose(float(jnp.sum(res.weights)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-13, 1e-6, 1e6, 1e13])
def test_scale_behaves_like_one(scale, dtype):
    grads = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.3, 0.1, 0.9]], dtype)
    base = solve(jnp.asarray(grads))
    scaled = solve(jnp.asarray(grads * dtype(scale)))
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(scaled.weights, base.weights, rtol=10 * tol, atol=tol)
    np.testing.assert_allclose(np.asarray(scaled.aggregate, np.float64) / scale,
                               np.asarray(base.aggregate, np.float64), rtol=100 * tol, atol=tol)


def test_relatively_negligible_row_is_masked(dtype):
    eps = np.finfo(dtype).eps
    grads = np.array([[1.0, 0.0], [0.0, 1.0], [0.5 * eps * eps, 0.0]], np.float64).astype(dtype)
    alpha = np.asarray(solve(jnp.asarray(grads)).weights, np.float64)
    np.testing.assert_allclose(alpha, [0.5, 0.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_loud(bad):
    grads = jnp.asarray([[1.0, 2.0], [bad, 0.0]])
    res = solve(grads)
    assert np.all(np.isnan(np.asarray(res.weights)))
    assert np.all(np.isnan(np.asarray(res.aggregate)))


# ---------------------------------------------------------------------------------------------
# API behaviour


def test_dtypes_preserved():
    for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
        out = jax.jit(imtl_jax.imtl_g_weights)(jnp.asarray([[1.0, 0.0], [1.0, 1.0]], dt))
        assert out.dtype == dt
        np.testing.assert_allclose(np.asarray(out, np.float32).sum(), 1.0, atol=1e-2)


@pytest.mark.parametrize("precision", ["float32", slow("float64")])
def test_jit_equals_eager(precision):
    """Eager (op by op, each op compiled alone) and jitted solves agree."""
    with x64() if precision == "float64" else contextlib.nullcontext():
        grads = jnp.asarray(_random_jacobian(5, 4, 16), precision)
        assert grads.dtype == precision
        eager = imtl_jax.imtl_g_solve(grads)
        jitted = solve(grads)
        tol = 1e-5 if precision == "float32" else 1e-12
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_one_compilation_for_two_calls():
    traces = []

    @jax.jit
    def f(g):
        traces.append(1)
        return imtl_jax.imtl_g_weights(g)

    f(jnp.ones((3, 4)) + jnp.eye(3, 4))
    f(jnp.arange(12.0).reshape(3, 4) + 1)
    assert len(traces) == 1


@pytest.mark.parametrize("bad_shape", [(3,), (2, 3, 4), (0, 3), (3, 0)])
def test_bad_rank_raises_at_trace_time(bad_shape):
    with pytest.raises(ValueError, match="grads.*shape"):
        jax.jit(imtl_jax.imtl_g_weights).lower(jnp.ones(bad_shape))


def test_integer_and_complex_rejected():
    with pytest.raises(TypeError, match="grads"):
        imtl_jax.imtl_g_weights(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="grads"):
        imtl_jax.imtl_g_weights(np.ones((2, 3), np.complex64))


def test_priorities_validation():
    grads = jnp.eye(3)
    with pytest.raises(ValueError, match=r"priorities.*\(3,\).*\(2,\)"):
        imtl_jax.imtl_g_weights(grads, priorities=jnp.ones(2))
    with pytest.raises(ValueError, match="priorities.*positive"):
        imtl_jax.imtl_g_weights(grads, priorities=jnp.array([1.0, 0.0, 1.0]))
    # Traced invalid priorities cannot raise: they poison the output instead (loud under jit).
    out = jax.jit(lambda p: imtl_jax.imtl_g_weights(grads, priorities=p))(jnp.array([1.0, -1.0, 1.0]))
    assert np.all(np.isnan(np.asarray(out)))


@pytest.mark.parametrize("num_tasks,dim", [(2, 8), slow(3, 8), slow(5, 16)])
def test_priorities_projections_proportional(num_tasks, dim, dtype):
    rng = np.random.default_rng(num_tasks)
    grads = _random_jacobian(num_tasks, num_tasks, dim).astype(dtype)
    p = rng.uniform(0.2, 5.0, num_tasks).astype(dtype)
    res = solve(jnp.asarray(grads), priorities=jnp.asarray(p))
    proj = projections(grads, np.asarray(res.weights, np.float64))
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(proj / p, np.full(num_tasks, proj[0] / p[0]), rtol=tol)
    np.testing.assert_allclose(float(jnp.sum(res.weights)), 1.0, rtol=tol)
    np.testing.assert_allclose(proj / p, float(res.common_projection), rtol=tol)
    # p = 1 is IMTL-G; scaling p by a constant changes nothing.
    np.testing.assert_allclose(solve(jnp.asarray(grads), priorities=jnp.ones(num_tasks, dtype)).weights,
                               solve(jnp.asarray(grads)).weights, rtol=tol, atol=tol)
    np.testing.assert_allclose(solve(jnp.asarray(grads), priorities=jnp.asarray(7 * p)).weights,
                               res.weights, rtol=tol, atol=tol)


def test_priorities_two_task_closed_form():
    """T = 2: alpha = (p_1 |g_2|, p_2 |g_1|) / (p_1 |g_2| + p_2 |g_1|) when g_1 is orthogonal to g_2,
    and in general the closed form of imtl_g_solve's docstring."""
    with x64():
        rng = np.random.default_rng(3)
        for _ in range(5):
            grads = rng.standard_normal((2, 6))
            p = rng.uniform(0.1, 10, 2)
            n1, n2 = np.linalg.norm(grads, axis=1)
            c = grads[0] @ grads[1] / (n1 * n2)
            # K beta = p with K = [[1, c], [c, 1]] -> beta = (p1 - c p2, p2 - c p1) / (1 - c^2)
            beta = np.array([p[0] - c * p[1], p[1] - c * p[0]])
            alpha = beta / np.array([n1, n2])
            alpha /= alpha.sum()
            np.testing.assert_allclose(solve(jnp.asarray(grads), priorities=jnp.asarray(p)).weights,
                                       alpha, rtol=1e-12)


def test_priorities_do_not_recompile():
    traces = []

    @jax.jit
    def f(g, p):
        traces.append(1)
        return imtl_jax.imtl_g_weights(g, priorities=p)

    g = jnp.eye(3, 5) + 0.1
    for r in (0.5, 1.0, 8.0):
        f(g, jnp.array([1.0, r, 1.0]))
    assert len(traces) == 1


def test_theorem_2_with_priorities():
    with x64():
        grads = _random_jacobian(11, 4, 16)
        p = np.array([1.0, 2.0, 0.5, 4.0])
        k = np.array([0.1, 3.0, 10.0, 1.0])
        g1 = np.asarray(solve(jnp.asarray(grads), priorities=jnp.asarray(p)).aggregate)
        g2 = np.asarray(solve(jnp.asarray(grads * k[:, None]), priorities=jnp.asarray(p)).aggregate)
        cos = g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2)
        np.testing.assert_allclose(cos, 1.0, atol=1e-12)


def test_shapes_cover_all_pairs_once():
    """Guards the shape list above: T <= D everywhere (full row rank is possible)."""
    assert all(t <= d for t, d in SHAPES)
    assert len(set(itertools.chain(SHAPES))) == len(SHAPES)


# Edges of the float range (issue 16): exact power-of-two rescale, honest common projection.


@pytest.mark.parametrize("scale_exp", [127, 100, -100, -140])
def test_extreme_float32_scales_behave_like_one(scale_exp):
    """Inputs at float32's largest exponent and at subnormal scale (2^-140: XLA's CPU backend reads
    subnormals as zero in arithmetic) give the weights of the same rows at scale 1."""
    base = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [0.5, -3.0, 2.0]], np.float32)
    base = base / np.abs(base).max() * np.float32(1.9)        # max entry 1.9: exact power-of-2 scaling
    scaled = (base.astype(np.float64) * 2.0 ** scale_exp).astype(np.float32)
    if scale_exp < -126:
        base = (scaled.astype(np.float64) * 2.0 ** -scale_exp).astype(np.float32)  # subnormal rounding
    assert np.all(np.isfinite(scaled)) and np.abs(scaled).max() > 0
    ref = solve(jnp.asarray(base))
    res = solve(jnp.asarray(scaled))
    np.testing.assert_array_equal(np.asarray(res.weights), np.asarray(ref.weights))
    expected_c = float(ref.common_projection) * 2.0 ** scale_exp
    if abs(expected_c) >= np.finfo(np.float32).tiny:   # a subnormal C (input units) is flushed
        np.testing.assert_allclose(float(res.common_projection), expected_c, rtol=1e-6)


def test_float32_max_entry():
    big = np.finfo(np.float32).max
    g = np.array([[big, 0.0], [0.0, big / 4]], np.float32)
    res = solve(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(res.weights), [0.2, 0.8], rtol=1e-6)   # T = 2: |g_2|, |g_1|
    assert np.isfinite(float(res.common_projection)) and float(res.common_projection) > 0


def test_float64_max_and_subnormal():
    with x64():
        for s in (np.finfo(np.float64).max / 8, 2.0 ** -1060):
            g = np.array([[3.0, 0.0], [0.0, 1.0]]) * s
            np.testing.assert_allclose(np.asarray(solve(jnp.asarray(g)).weights), [0.25, 0.75], rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_nonconflicting_guarantee_when_projections_differ(seed):
    """T > D: equal projections are out of reach; C is then the mean projection and the flag
    makes every projection >= 0 whenever some sign does (here: all rows in one half-plane
    except for the sign pattern the draw gives)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((5, 2))
    if seed % 2:
        g = g * np.sign(g @ rng.standard_normal(2))[:, None]     # every row in one half-plane
    g = g.astype(np.float32)
    res = solve(jnp.asarray(g), nonconflicting=True)
    p = projections(g, np.asarray(res.weights, np.float64))
    np.testing.assert_allclose(float(res.common_projection), p.mean(), rtol=1e-4, atol=1e-6 * np.abs(p).max())
    assert float(res.common_projection) >= 0
    if np.all(p >= -1e-5 * np.abs(p).max()) or np.all(p <= 1e-5 * np.abs(p).max()):
        assert np.all(p >= -1e-5 * np.abs(p).max())


def test_compiles_once_with_chex():
    import chex

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(g):
        return imtl_jax.imtl_g_solve(g)

    chex.clear_trace_counter()
    f(jnp.ones((3, 4)) + jnp.eye(3, 4))
    f(jnp.arange(12.0).reshape(3, 4) + 1)


def _float32_route(route):
    """imtl_g_solve with float32 inputs on the given route, freshly traced (a new function)."""
    from imtl_jax import _imtl_g

    def run(grads, **kwargs):
        old, _imtl_g._FLOAT32_ROUTE = _imtl_g._FLOAT32_ROUTE, route
        try:
            return jax.jit(lambda g: imtl_jax.imtl_g_solve(g, **kwargs))(grads)
        finally:
            _imtl_g._FLOAT32_ROUTE = old
    return run


def _route_cases():
    rng = np.random.default_rng(7)
    cases = [_random_jacobian(s, t, d).astype(np.float32) for s, (t, d) in enumerate(SHAPES * 2)]
    dup = _random_jacobian(1, 3, 8)
    cases.append(np.concatenate([dup, 2.5 * dup[:1]]).astype(np.float32))      # parallel rows
    cases.append(np.concatenate([dup, np.zeros((1, 8))]).astype(np.float32))   # a zero row
    cases.append(rng.standard_normal((6, 4)).astype(np.float32))               # T > D
    for scale in (1e-30, 1e33):  # the rows span 1e-3..1e3 in norm
        cases.append((_random_jacobian(2, 4, 16) * scale).astype(np.float32))
    return cases


@pytest.mark.slow  # ~20 distinct shapes compiled three times; the default suite tests the lean route
@pytest.mark.parametrize("route", ["lean", "wide", "compensated"])
def test_both_float32_routes_reach_the_rounding_floor(route):
    """The float32 routes (the lean route, the default off TPU; the float64 Gram matrix, its
    fallback; the compensated (T, D) route, which TPUs take) each reach the floor: the
    projection spread of the exact alpha rounded to float32, within 2x (on full-rank cases), and
    agree with the exact alpha elsewhere (least squares, zero rows)."""
    solve_route = _float32_route(route)
    for grads in _route_cases():
        alpha = np.asarray(solve_route(jnp.asarray(grads)).weights, np.float64)
        np.testing.assert_allclose(alpha.sum(), 1.0, atol=sum_bound(alpha, np.float32))
        nonzero = np.linalg.norm(grads.astype(np.float64), axis=1) > 0
        full_rank = np.linalg.matrix_rank(grads.astype(np.float64)) == grads.shape[0]
        if full_rank:
            floor = relative_spread(projections(grads, paper_alpha(grads).astype(np.float32)))
            assert relative_spread(projections(grads, alpha)) <= 2 * floor + 1e-12
        elif nonzero.all():
            # Rank-deficient: the least-squares answer of the cosine system (pseudo-inverse).
            g = grads.astype(np.float64)
            units = g / np.linalg.norm(g, axis=1, keepdims=True)
            beta = np.linalg.pinv(units @ units.T, rcond=10 * g.shape[0] * np.finfo(np.float32).eps) @ np.ones(len(g))
            raw = beta / np.linalg.norm(g, axis=1)
            np.testing.assert_allclose(alpha, raw / raw.sum(), rtol=1e-4, atol=1e-6)
        else:  # a zero row gets 0, the others are impartial among themselves
            assert alpha[~nonzero].tolist() == [0.0] * int((~nonzero).sum())
            sub = grads[nonzero]
            np.testing.assert_allclose(alpha[nonzero], paper_alpha(sub), rtol=1e-5)


# The lean float32 route (the default off TPU): a float32 Gram matrix as preconditioner, residuals
# in float64 on the data, the wide route behind lax.cond wherever it cannot vouch for its answer.


def _lean_cases():
    """(name, grads, kwargs, lean expected) for the lean route's routing decisions."""
    rng = np.random.default_rng(25)
    cases = [(f"random {t}x{d}", _random_jacobian(s, t, d).astype(np.float32), {}, True)
             for s, (t, d) in enumerate(SHAPES)]
    wide = (random_directions(rng, 40, 512) * np.geomspace(1e-3, 1e3, 40)[:, None]).astype(np.float32)
    cases.append(("random 40x512", wide, {}, True))
    base = _random_jacobian(3, 4, 16).astype(np.float32)
    cases.append(("zero row", np.concatenate([base, np.zeros((1, 16), np.float32)]), {}, True))
    cases.append(("priorities", base, {"priorities": jnp.array([1.0, 2.0, 0.5, 3.0])}, True))
    masked = base.copy()
    masked[2] = np.nan
    cases.append(("task mask", masked, {"task_mask": jnp.array([True, True, False, True])}, True))
    cases.append(("scale 1e-12", (base.astype(np.float64) * 1e-12).astype(np.float32), {}, True))
    cases.append(("scale 1e15", (base.astype(np.float64) * 1e15).astype(np.float32), {}, True))
    # Inputs it hands to the wide route.
    cases.append(("parallel rows", np.concatenate([base, 2.5 * base[:1]]), {}, False))
    cases.append(("duplicate rows", np.concatenate([base, base[1:2]]), {}, False))
    cases.append(("T > D", rng.standard_normal((6, 4)).astype(np.float32), {}, False))
    cases.append(("all zero", np.zeros((3, 5), np.float32), {}, False))
    cases.append(("NaN", _with(base, (1, 1), np.nan), {}, False))
    cases.append(("inf", _with(base, (0, 3), np.inf), {}, False))
    cases.append(("scale 1e-30", (base.astype(np.float64) * 1e-30).astype(np.float32), {}, False))
    cases.append(("scale 1e33", (base.astype(np.float64) * 1e33).astype(np.float32), {}, False))
    cases.append(("subnormal", (base.astype(np.float64) / np.abs(base).max() * 2.0 ** -140).astype(np.float32),
                  {}, False))
    # A row whose norm is within float64 rounding of the zero-row threshold eps^2 max|g_t|.
    near = base.copy()
    eps = float(np.finfo(np.float32).eps)
    top = np.linalg.norm(base.astype(np.float64), axis=1).max()
    near[2] = (base[2].astype(np.float64) / np.linalg.norm(base[2].astype(np.float64)) * eps * eps * top
               * (1 + 1e-9)).astype(np.float32)
    cases.append(("row at the zero threshold", near, {}, False))
    return cases


def _with(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def _jit_route(route):
    """imtl_g_solve jitted on one float32 route, traced once per shape (and argument structure)."""
    from imtl_jax import _imtl_g

    def traced(grads, priorities, task_mask):
        old, _imtl_g._FLOAT32_ROUTE = _imtl_g._FLOAT32_ROUTE, route
        try:
            return imtl_jax.imtl_g_solve(grads, priorities=priorities, task_mask=task_mask)
        finally:
            _imtl_g._FLOAT32_ROUTE = old
    jitted = jax.jit(traced)
    return lambda grads, priorities=None, task_mask=None: jitted(jnp.asarray(grads), priorities, task_mask)


# The default suite runs these (few shapes, few compilations); the slow step runs every case.
_LEAN_DEFAULT = ("random 8x64", "zero row", "priorities", "task mask", "parallel rows", "T > D", "NaN",
                 "scale 1e33", "subnormal", "row at the zero threshold")


@pytest.mark.parametrize("every_case", [False, slow(True)])
def test_lean_route_vouches_for_regular_inputs_only(monkeypatch, every_case):
    """The lean route answers itself on regular inputs (zero rows, priorities, masks and moderate
    scales included) and hands degenerate ones (parallel or duplicate rows, T > D, all zero,
    NaN/inf, scales where float32 products overflow or subnormals could be flushed, a row at the
    zero-row threshold) to the wide route: seen by replacing the wide route with NaN weights.
    Where it answers, it equals the wide route to float32 rounding and reaches the rounding
    floor; where it does not, its result is the wide route's, bit for bit."""
    from imtl_jax import _imtl_g

    cases = [c for c in _lean_cases() if every_case or c[0] in _LEAN_DEFAULT]
    wide, lean = _jit_route("wide"), _jit_route("lean")
    refs = {name: wide(grads, **kwargs) for name, grads, kwargs, _ in cases}   # before the patch
    for name, grads, kwargs, _ in cases:
        if name in ("parallel rows", "NaN"):
            for x, y in zip(lean(grads, **kwargs), refs[name]):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    real = _imtl_g._wide_parts

    def marked(*args):
        weights, aggregate, common, finite = real(*args)
        return jnp.full_like(weights, jnp.nan), aggregate, common, finite

    monkeypatch.setattr(_imtl_g, "_wide_parts", marked)
    lean_marked = _jit_route("lean")
    for name, grads, kwargs, expect in cases:
        got = lean_marked(grads, **kwargs)
        took_lean = bool(np.all(np.isfinite(np.asarray(got.weights))))
        assert took_lean == expect, name
        if not expect:
            continue
        ref = refs[name]
        a, b = np.asarray(got.weights, np.float64), np.asarray(ref.weights, np.float64)
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=2e-7 * np.abs(b).max(), err_msg=name)
        np.testing.assert_allclose(float(got.common_projection), float(ref.common_projection),
                                   rtol=1e-6, err_msg=name)
        g = grads.astype(np.float64)
        if not kwargs and np.all(np.linalg.norm(g, axis=1) > 0):   # full rank: the rounding floor
            floor = relative_spread(projections(g, paper_alpha(g).astype(np.float32)))
            assert relative_spread(projections(g, a)) <= 2 * floor + 1e-12, name


def test_auto_route_by_number_of_tasks():
    """Off TPU, float32 takes the lean route from 4 tasks on and the float64 Gram route below (its
    2 x 2 or 3 x 3 Gram product costs less than the lean route's extra passes); 16-bit inputs are
    solved in float32, float64 inputs on the compensated route."""
    from imtl_jax import _imtl_g

    if jax.default_backend() == "tpu":
        pytest.skip("TPUs take the compensated route")
    assert [_imtl_g._float32_route(jnp.float32, t) for t in (1, 2, 3, 4, 40)] == ["wide"] * 3 + ["lean"] * 2
    assert _imtl_g._float32_route(jnp.float64, 40) == "compensated"


@pytest.mark.slow  # both routes compiled under vmap
def test_lean_route_under_vmap():
    """Under vmap the cond becomes a select (both routes run): the same weights as one by one,
    for a batch holding an input the lean route answers and one it hands to the wide route."""
    base = _random_jacobian(5, 4, 16).astype(np.float32)
    batch = np.stack([base, np.concatenate([base[:3], 2.0 * base[:1]])])
    lean = _jit_route("lean")
    together = jax.vmap(lambda g: imtl_jax.imtl_g_solve(g))(jnp.asarray(batch))
    for i in range(2):
        one = lean(batch[i])
        # (batched matmuls may sum in another order: the weights agree to float32 rounding)
        np.testing.assert_allclose(np.asarray(together.weights[i]), np.asarray(one.weights), rtol=2e-7, atol=1e-7)
        np.testing.assert_allclose(np.asarray(together.aggregate[i]), np.asarray(one.aggregate), rtol=1e-6,
                                   atol=1e-6 * np.abs(np.asarray(one.aggregate)).max())
