"""Random bad input over the public API (issue 26, part 4), hypothesis-driven.

Every draw must end in one of: a TypeError/ValueError whose message names the argument (so the
caller knows what to fix), or the documented result — weights of shape (T,) in the input's
dtype summing to 1 for finite input, and all-NaN weights (loud, so ``optax.apply_if_finite`` /
``StepAux.all_finite`` skip the step) when a NaN or inf sits anywhere in the input. Never a
silent wrong answer, never an exception from inside XLA. Bounded examples (derandomized) keep
the default suite's budget; the huge-T profile is ``slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import imtl_jax
from test_bad_inputs import head_loss, params, run_step

SETTINGS = dict(max_examples=8, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = ("float16", "bfloat16", "float32", "int32", "bool")
FLOAT = ("float16", "bfloat16", "float32")


@st.composite
def matrices(draw, max_tasks=6):
    rank = draw(st.sampled_from([0, 1, 2, 2, 2, 3]))
    shape = tuple(draw(st.sampled_from([0, 1, 2, 3, max_tasks])) for _ in range(rank))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, shape)
    bad = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
    if bad is not None and x.size:
        x.flat[int(rng.integers(x.size))] = bad
    return jnp.asarray(x).astype(dtype), bad


def _expect_named_error(fn, arg, exc_types=(TypeError, ValueError)):
    with pytest.raises(exc_types) as err:
        fn()
    assert f"`{arg}`" in str(err.value), str(err.value)


def _check_weights(w, x, bad):
    assert w.shape == x.shape[:1] and w.dtype == x.dtype
    w64 = np.asarray(w, np.float64)
    if bad is not None:
        assert np.all(np.isnan(w64)), w64          # documented: NaN/inf in -> all NaN out
    else:
        assert np.all(np.isfinite(w64)), w64
        tol = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 1e-4}[str(x.dtype)]
        assert abs(w64.sum() - 1.0) <= tol * max(1.0, np.abs(w64).sum()), w64


@settings(**SETTINGS)
@given(case=matrices())
def test_imtl_g_random_bad_grads(case):
    x, bad = case
    for fn in (imtl_jax.imtl_g_weights, lambda g: imtl_jax.imtl_g_solve(g).weights):
        if x.ndim != 2 or 0 in x.shape or not jnp.issubdtype(x.dtype, jnp.floating):
            _expect_named_error(lambda fn=fn: fn(x), "grads")
        else:
            _check_weights(fn(x), x, bad)


@settings(**SETTINGS)
@given(case=matrices(), method=st.sampled_from(["equal", "imtl_g", "mgda", "cagrad", "upgrad",
                                                  "pcgrad", "nash_mtl"]),
       losses_len=st.sampled_from([None, 0, 1, 2, 3]), losses_dtype=st.sampled_from(DTYPES))
def test_aggregate_random_bad_updates(case, method, losses_len, losses_dtype):
    x, bad = case
    num_tasks = 2
    tx = imtl_jax.aggregate(method, num_tasks)
    leaf_shape = x.shape[1:]
    state = tx.init({"w": jnp.zeros(leaf_shape, jnp.float32)})
    losses = None if losses_len is None else jnp.ones((losses_len,), losses_dtype)
    valid_updates = (x.ndim >= 1 and x.shape[0] == num_tasks
                     and jnp.issubdtype(x.dtype, jnp.floating) and x.size > 0)
    valid_losses = losses is None or (losses_len == num_tasks
                                      and jnp.issubdtype(losses.dtype, jnp.floating))

    def call():
        return tx.update({"w": x}, state, None, losses=losses)

    if not valid_updates:
        _expect_named_error(call, "updates")
        return
    if not valid_losses:
        _expect_named_error(call, "losses")
        return
    out, _ = call()
    assert out["w"].shape == leaf_shape and out["w"].dtype == x.dtype
    finite = bool(np.all(np.isfinite(np.asarray(out["w"], np.float64))))
    if bad is not None:
        assert not finite                            # loud, never silently finite
    else:
        assert finite


@settings(**SETTINGS)
@given(batch_size=st.sampled_from([0, 1, 4]), y_tasks=st.sampled_from([1, 2, 3]),
       x_dtype=st.sampled_from(DTYPES), heads_tasks=st.sampled_from([1, 2, 3]),
       method=st.sampled_from(["imtl_h", "imtl_g", "equal"]))
def test_mtl_step_random_shapes(batch_size, y_tasks, x_dtype, heads_tasks, method):
    """Abstract (trace-time) draws: wrong T between heads/log-scales, dtypes, empty batches."""
    S = jax.ShapeDtypeStruct
    step = imtl_jax.mtl_step(encoder=lambda w, b: jnp.tanh(b["x"] @ w),
                             task_losses=imtl_jax.stacked_task_losses(head_loss),
                             method=method)
    p = params(heads=S((heads_tasks, 4), jnp.float32), log_scales=S((2,), jnp.float32))
    batch = {"x": S((batch_size, 3), x_dtype), "y": S((batch_size, y_tasks), jnp.float32)}
    try:
        run_step(step, p, batch)
    except (TypeError, ValueError, IndexError) as err:
        msg = str(err)
        assert isinstance(err, (TypeError, ValueError)) or "`" in msg, msg
        assert "`" in msg, msg                       # names the argument
        return
    # Accepted: the heads/log-scales agree (T = 2), the batch reads the needed columns.
    assert heads_tasks == 2 and y_tasks >= 2


@pytest.mark.slow
@settings(max_examples=5, deadline=None, derandomize=True, database=None)
@given(num_tasks=st.sampled_from([256, 300, 512]), dim=st.sampled_from([1, 8, 64]),
       seed=st.integers(0, 100))
def test_imtl_g_huge_tasks(num_tasks, dim, seed):
    """T >= 256 (mostly T > D): finite weights summing to 1 in float32."""
    g = jnp.asarray(np.random.default_rng(seed).standard_normal((num_tasks, dim)), jnp.float32)
    _check_weights(imtl_jax.imtl_g_weights(g), g, None)


@settings(**SETTINGS)
@given(k=st.sampled_from([-1, 0, 1, 2, 3, 4, True, 1.5, "2"]),
       rows=st.sampled_from([0, 6, 8, 12]),
       dtype=st.sampled_from(["float32", "float16", "int32"]),
       bad=st.sampled_from([None, np.nan, np.inf]))
def test_accumulate_step_random_bad_input(k, rows, dtype, bad):
    """accumulate_step with random micro-batch counts, batch sizes, dtypes and non-finite
    entries: a ValueError/TypeError naming ``num_micro_batches`` (or the divisibility of the
    batch by it), a trace-time error naming the input, or a finite step whose ``all_finite``
    flag reports the non-finite batch."""
    step = imtl_jax.mtl_step(lambda w, b: jnp.tanh(b["x"] @ w), imtl_jax.stacked_task_losses(head_loss), "imtl_h")
    valid_k = isinstance(k, int) and not isinstance(k, bool) and k >= 1
    if not valid_k:
        with pytest.raises((TypeError, ValueError), match="num_micro_batches"):
            imtl_jax.accumulate_step(step, k)
        return
    acc = imtl_jax.accumulate_step(step, k)
    rng = np.random.default_rng(rows + 10 * k)
    x = rng.standard_normal((rows, 3))
    if bad is not None and x.size:
        x.flat[0] = bad
    batch = {"x": jnp.asarray(x).astype(dtype), "y": jnp.asarray(rng.standard_normal((rows, 2)), jnp.float32)}
    p = imtl_jax.MTLParams(jnp.full((3, 4), 0.1), jnp.full((2, 4), 0.2), jnp.zeros(2))
    if rows == 0 or rows % k:
        with pytest.raises((TypeError, ValueError)) as err:
            acc(p, (), batch)
        assert "num_micro_batches" in str(err.value) or "batch" in str(err.value), str(err.value)
        return
    try:
        grads, _, aux = jax.jit(lambda p_, b_: acc(p_, (), b_))(p, batch)
    except (TypeError, ValueError) as err:   # a named trace-time error (e.g. an integer input)
        assert "`" in str(err) or "batch" in str(err) or "dtype" in str(err), str(err)
        return
    finite = bad is None or dtype == "int32"   # NaN/inf cast to an integer input is some finite integer
    assert bool(aux.all_finite) == finite
    if finite:
        for leaf in jax.tree_util.tree_leaves(grads):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
