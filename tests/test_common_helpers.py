"""The shared helpers of the baseline methods (``imtl_jax.methods._common``), issue 25.

* ``normalized_gramian``'s lean route (row maxima and one Gram matmul of the raw rows, the
  division by ``max|G|^2`` on the T x T result) against a NumPy float64 oracle on random and
  hard families, against its exact-scaling route, and its routing (extreme scales, zero and
  non-finite input go to the exact-scaling route); the extreme-scale tests of every method
  using it are in tests/test_gramian_scales.py.
* ``damped_newton`` under a task mask stops where the sub-problem of the present tasks does
  (its round-off threshold is ``T' eps``, not ``T eps``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imtl_jax.methods._common import (_lean_gramian_test, _normalized_gramian_exact,
                                      damped_newton, normalized_gramian)

EPS32 = float(np.finfo(np.float32).eps)


def _oracle(g):
    g = np.asarray(g, np.float64)
    s = np.max(np.abs(g))
    h = g / (s if s > 0 else 1.0)
    return h @ h.T, s


def _family(name, num_tasks, dim, rng):
    g = rng.standard_normal((num_tasks, dim))
    if name == "spread":          # row norms over 1e-4 .. 1e4
        g *= 10.0 ** rng.uniform(-4, 4, (num_tasks, 1))
    elif name == "parallel":      # cosines 1 - O(1e-12)
        g = g[:1] * (1.0 + 1e-6 * rng.standard_normal((num_tasks, 1))) + 1e-7 * g
    elif name == "zero rows":
        g[::3] = 0.0
    elif name == "small":         # a regular matrix at 1e-6 (gradients are often small)
        g *= 1e-6
    return g.astype(np.float32)


def _cos_error(m, ref):
    """max |M - M_ref| relative to sqrt(M_ref_ii M_ref_jj) over the non-zero rows."""
    d = np.diag(ref)
    keep = np.outer(d > 0, d > 0)
    err = np.abs(np.asarray(m, np.float64) - ref)
    return float(np.max(np.where(keep, err / np.where(keep, np.sqrt(np.outer(d, d)), 1.0), 0.0)))


@pytest.mark.parametrize("family", ["random", "spread", "parallel", "zero rows", "small"])
@pytest.mark.parametrize("num_tasks", [2, 10, 40])
def test_gramian_at_the_rounding_floor(family, num_tasks):
    """The lean route's M is as accurate as the exact-scaling route's (both a few eps of the
    float64 oracle, relative to the rows' norms), and zero rows stay exactly zero."""
    rng = np.random.default_rng(num_tasks)
    fast, exact = jax.jit(normalized_gramian), jax.jit(_normalized_gramian_exact)
    for _ in range(3):
        g = _family(family, num_tasks, 512, rng)
        assert bool(_lean_gramian_test(jnp.asarray(g))[0]), family   # all regular input
        ref, s_ref = _oracle(g)
        m, s = fast(jnp.asarray(g))
        m_old, s_old = exact(jnp.asarray(g))
        assert float(s) == float(s_old) == s_ref                      # max|G|, exactly
        assert np.array_equal(np.asarray(m), np.asarray(m).T)
        err, err_old = _cos_error(m, ref), _cos_error(m_old, ref)
        assert err <= 8 * EPS32 and err_old <= 8 * EPS32, (err, err_old)
        zero = np.all(g == 0, axis=1)
        assert np.all(np.asarray(m)[zero] == 0) and np.all(np.asarray(m)[:, zero] == 0)


@pytest.mark.parametrize("case", ["1e-30", "subnormal", "3e38", "tiny row", "zero", "nan", "inf"])
def test_gramian_routes_the_hard_cases_to_exact_scaling(case):
    """Extreme scales, a row far below the largest, zero and non-finite input take the
    exact-scaling route, so the result is that route's, bit for bit."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 64))
    if case == "1e-30":
        g *= 1e-30
    elif case == "subnormal":
        g *= 2.0 ** -140
    elif case == "3e38":
        g *= 3e38 / np.max(np.abs(g))
    elif case == "tiny row":
        g[2] *= 1e-25                      # r_2^2 below D tiny 2^40 (1 + scale)
    elif case == "zero":
        g[:] = 0.0
    elif case == "nan":
        g[1, 3] = np.nan
    elif case == "inf":
        g[4, 0] = -np.inf
    g = jnp.asarray(g.astype(np.float32))
    assert not bool(_lean_gramian_test(g)[0])
    m, s = jax.jit(normalized_gramian)(g)
    m_old, s_old = jax.jit(_normalized_gramian_exact)(g)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m_old))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_old))
    if case in ("nan", "inf"):
        assert not np.all(np.isfinite(np.asarray(m)))
    if case == "zero":
        assert float(s) == 1.0 and np.all(np.asarray(m) == 0)


@pytest.mark.slow  # several compiles; CI's slow step runs it
def test_gramian_vmap_and_float64():
    """Under vmap both routes run and each member gets its own route's answer; float64 input
    takes the lean route with float64's limits (its answer at the float64 oracle)."""
    rng = np.random.default_rng(1)
    batch = np.stack([rng.standard_normal((4, 32)), rng.standard_normal((4, 32)) * 1e-30]).astype(np.float32)
    vm, vs = jax.vmap(normalized_gramian)(jnp.asarray(batch))
    for k in range(2):
        m, s = normalized_gramian(jnp.asarray(batch[k]))
        # a batched matmul may sum in another order: equal up to the rounding of M
        np.testing.assert_allclose(np.asarray(vm[k]), np.asarray(m), rtol=4 * EPS32,
                                   atol=4 * EPS32 * float(np.max(np.abs(np.asarray(m)))))
        assert float(vs[k]) == float(s)
    with jax.enable_x64(True):
        g = rng.standard_normal((6, 100)) * 1e-100
        assert bool(_lean_gramian_test(jnp.asarray(g))[0])
        m, s = normalized_gramian(jnp.asarray(g))
        ref, s_ref = _oracle(g)
        assert float(s) == s_ref
        np.testing.assert_allclose(np.asarray(m), ref, rtol=1e-13, atol=1e-14)


def _newton_problem(num_tasks, present, a):
    """A problem whose Newton decrement squared is ``a^2 w_p^2`` (between T' eps and T eps at
    the start): linear objective ``a w_p``, identity scaled Hessian, a certificate that never
    drops, so only the round-off test stops the loop."""
    coef = jnp.zeros((num_tasks,), jnp.float32).at[present].set(a)
    return dict(objective=lambda ws: ws @ coef, gradient=lambda w: coef,
                scaled_hessian=lambda w: jnp.eye(num_tasks, dtype=jnp.float32),
                certificate=lambda w: jnp.ones((), jnp.float32))


def test_damped_newton_masked_equals_sub_problem():
    a = -float(np.sqrt(2.0 * EPS32))            # decrement^2 = 2 eps at w = 1
    sub = _newton_problem(1, 0, a)
    w_sub, _, it_sub = damped_newton(**sub, w0=jnp.ones((1,), jnp.float32), max_iterations=6, tol=0.0)
    masked = _newton_problem(3, 1, a)         # task 1 present, tasks 0 and 2 absent (fixed at 1)
    w0 = jnp.ones((3,), jnp.float32)
    w_mask, _, it_mask = damped_newton(**masked, w0=w0, max_iterations=6, tol=0.0, size=jnp.int32(1))
    assert int(it_mask) == int(it_sub) == 6   # the sub-problem still sees progress above eps
    assert float(w_mask[1]) == float(w_sub[0]) and float(w_mask[0]) == float(w_mask[2]) == 1.0
    # Without size the threshold would be 3 eps: the masked problem would stop after one step.
    _, _, it_t = damped_newton(**masked, w0=w0, max_iterations=6, tol=0.0)
    assert int(it_t) == 1
    # Jitted, with a traced size (as FairGrad passes the mask's count).
    run = jax.jit(lambda w, n: damped_newton(**masked, w0=w, max_iterations=6, tol=0.0, size=n))
    assert int(run(w0, jnp.sum(jnp.array([False, True, False])))[2]) == 6


@pytest.mark.slow  # several compiles; CI's slow step runs it
def test_gramian_cost_benchmark_runs(capsys):
    """benchmarks/gramian_cost.py at tiny size, without its timing: the lean route makes fewer
    passes over the data (XLA's CPU backend at small shapes writes |G| out: 3), and the method
    pairs really compile the old helper in."""
    from benchmarks import gramian_cost
    assert gramian_cost.main(["--tasks", "2", "10", "--dim", "64", "--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert "lean (new)" in out and "Worst cos-rel" in out
    from benchmarks.solve_cost import hlo_op_counts
    arg = jax.ShapeDtypeStruct((40, 4096), jnp.float32)   # compiled only (2 vs 9 with jax 0.10.2)
    assert hlo_op_counts(normalized_gramian, arg)["data_passes"] <= 3 < hlo_op_counts(
        _normalized_gramian_exact, arg)["data_passes"]
    g = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    new, old = gramian_cost._method_fns("nash_mtl", g)   # raises if the old helper was not traced in
    np.testing.assert_allclose(np.asarray(new(g)), np.asarray(old(g)), rtol=1e-5, atol=1e-6)
