"""Non-finite protection (issue 7): safe_optimizer / skipped_steps / flag_nonfinite under jit
with mtl_step and the optax aggregator, and bit-for-bit determinism of a short training run."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
from imtl_jax._safety import flag_nonfinite, safe_optimizer, skipped_steps
from oracles import paper_alpha
from marks import slow, slow_unless_core

T, B, DIN, F = 2, 8, 3, 4
METHODS = ("imtl_h", "imtl_g", "equal", "imtl_g_exact", "imtl_l")


# --- A tiny two-task model, as in the mtl_step docstring (linear encoder so that a huge input
# --- overflows the gradient before the loss). Per-task multiplier "m" and offset "c".

def encoder(w, batch):
    return batch["x"] @ w


def head_loss(v_t, z, batch, t):
    return batch["m"][t] * jnp.mean((z @ v_t - batch["y"][:, t]) ** 2) + batch["c"][t]


def make_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return imtl_jax.MTLParams(shared=1e-3 * jax.random.normal(k1, (DIN, F)),
                              heads=jax.random.normal(k2, (T, F)), log_scales=jnp.zeros(T))


def make_batch(seed=1, **overrides):
    kx, ky = jax.random.split(jax.random.key(seed))
    batch = {"x": jax.random.normal(kx, (B, DIN)), "y": jax.random.normal(ky, (B, T)),
             "m": jnp.ones(T), "c": jnp.zeros(T)}
    batch.update(overrides)
    return batch


def bad_batch(kind: str):
    """Batches that make the step non-finite in different ways."""
    good = make_batch()
    if kind == "nan_loss_multiplier":  # task 1's loss (and its gradients) is NaN
        return {**good, "m": jnp.array([1.0, jnp.nan])}
    if kind == "inf_loss_multiplier":
        return {**good, "m": jnp.array([jnp.inf, 1.0])}
    if kind == "nan_batch_element":  # one target of one example of task 0
        return {**good, "y": good["y"].at[3, 0].set(jnp.nan)}
    if kind == "huge_input":  # finite losses (~1e37), an inf in the shared gradient
        return {**good, "x": good["x"] * 1e21}
    raise ValueError(kind)


BAD_KINDS = ("nan_loss_multiplier", "inf_loss_multiplier", "nan_batch_element", "huge_input")


@functools.lru_cache(maxsize=None)
def make_train(method: str, flag: bool = False):
    """A jitted step + safe adam, compiled once per method (all batches share shapes).

    The small learning rate keeps the shared weights near 1e-3, where the huge input overflows
    the shared gradient (~x^2 |v|^2) but not the losses (~x^2 |w|^2 |v|^2)."""
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    opt = safe_optimizer(optax.adam(1e-4), max_consecutive_errors=3)

    @jax.jit
    def train(params, opt_state, state, batch):
        grads, state, aux = step(params, state, batch)
        if flag:
            grads = flag_nonfinite(grads, aux.all_finite)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, aux, grads

    return step, opt, train


def assert_bitwise_equal(a, b):
    """Same structure, dtypes, shapes and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), (x, y)


def counters(opt_state):
    return {k: v.item() for k, v in skipped_steps(opt_state).items()}


def warm_start(method, flag=False, steps=2):
    """Params and optimizer state after a few finite steps (non-trivial adam moments)."""
    step, opt, train = make_train(method, flag)
    params = make_params()
    opt_state, state = opt.init(params), step.init(params)
    for i in range(steps):
        params, opt_state, state, aux, _ = train(params, opt_state, state, make_batch(seed=10 + i))
        assert bool(aux.all_finite)
    return params, opt_state, state


# --- mtl_step + safe_optimizer ---------------------------------------------------------------

@pytest.mark.parametrize("method", slow_unless_core(METHODS, core=("imtl_h", "equal")))
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_non_finite_step_is_skipped_bit_for_bit(method, kind):
    _, _, train = make_train(method)
    params, opt_state, state = warm_start(method)
    assert counters(opt_state) == {"notfinite_count": 0, "last_finite": True, "total_notfinite": 0}

    new_params, new_opt_state, new_state, aux, grads = train(params, opt_state, state, bad_batch(kind))
    assert not bool(aux.all_finite)
    assert not all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    if kind == "huge_input":  # the shared gradient overflowed (inf; NaN after the exact
        assert bool(jnp.all(jnp.isfinite(aux.losses)))  # level's solve), not the losses
        assert not bool(jnp.all(jnp.isfinite(grads.shared)))
        if method != "imtl_g_exact":
            assert bool(jnp.any(jnp.isinf(grads.shared)))
    assert_bitwise_equal(new_params, params)
    assert_bitwise_equal(new_opt_state.inner_state, opt_state.inner_state)
    assert_bitwise_equal(new_state, state)
    assert counters(new_opt_state) == {"notfinite_count": 1, "last_finite": False,
                                       "total_notfinite": 1}

    # A finite batch updates again; the streak resets, the total does not.
    after, after_opt_state, _, aux, _ = train(new_params, new_opt_state, new_state, make_batch(seed=20))
    assert bool(aux.all_finite)
    assert not np.array_equal(np.asarray(after.shared), np.asarray(params.shared))
    assert not np.array_equal(np.asarray(after.heads), np.asarray(params.heads))
    inner_before = jax.tree_util.tree_leaves(opt_state.inner_state)
    inner_after = jax.tree_util.tree_leaves(after_opt_state.inner_state)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(inner_before, inner_after))
    assert counters(after_opt_state) == {"notfinite_count": 0, "last_finite": True,
                                         "total_notfinite": 1}


@pytest.mark.parametrize("method", ["imtl_h", "imtl_g", "equal"])
def test_skipped_step_equals_never_seeing_the_batch(method):
    """good, BAD, good  ==  good, good (bit for bit): a skip leaves no trace but the counters."""
    step, opt, train = make_train(method)

    def run(batches):
        params = make_params()
        opt_state, state = opt.init(params), step.init(params)
        for batch in batches:
            params, opt_state, state, _, _ = train(params, opt_state, state, batch)
        return params, opt_state

    with_bad, bad_state = run([make_batch(seed=30), bad_batch("nan_batch_element"), make_batch(seed=31)])
    without, clean_state = run([make_batch(seed=30), make_batch(seed=31)])
    assert_bitwise_equal(with_bad, without)
    assert_bitwise_equal(bad_state.inner_state, clean_state.inner_state)
    assert counters(bad_state)["total_notfinite"] == 1
    assert counters(clean_state)["total_notfinite"] == 0


def test_counters_count_streaks_and_totals():
    _, _, train = make_train("imtl_h")
    params, opt_state, state = warm_start("imtl_h")
    seen = []
    for batch in [bad_batch("nan_loss_multiplier"), bad_batch("huge_input"), make_batch(seed=40),
                  bad_batch("nan_batch_element")]:
        params, opt_state, state, _, _ = train(params, opt_state, state, batch)
        seen.append(counters(opt_state))
    assert [c["notfinite_count"] for c in seen] == [1, 2, 0, 1]
    assert [c["last_finite"] for c in seen] == [False, False, True, False]
    assert [c["total_notfinite"] for c in seen] == [1, 2, 2, 3]
    assert bool(jnp.all(jnp.isfinite(params.shared)))


def test_gives_up_after_max_consecutive_errors():
    """optax's semantics, documented in safe_optimizer: the (N+1)-th bad update in a row is applied."""
    opt = safe_optimizer(optax.sgd(0.1), max_consecutive_errors=2)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    update = jax.jit(opt.update)
    for expected_count in (1, 2):
        updates, state = update(bad, state, params)
        np.testing.assert_array_equal(updates["w"], 0.0)
        assert counters(state)["notfinite_count"] == expected_count
    updates, state = update(bad, state, params)
    assert bool(jnp.isnan(updates["w"][1]))
    assert counters(state) == {"notfinite_count": 3, "last_finite": False, "total_notfinite": 3}


# --- Non-finite losses with finite gradients: flag_nonfinite ---------------------------------

@pytest.mark.parametrize("method", ["imtl_g", "equal"])
def test_nan_loss_with_finite_gradients_needs_flag(method):
    """A NaN added to a loss as a constant: its gradients stay finite, so apply_if_finite alone
    applies the step although aux.all_finite is False; flag_nonfinite makes it skip."""
    batch = {**make_batch(), "c": jnp.array([0.0, jnp.nan])}

    _, _, train = make_train(method)
    params, opt_state, state = warm_start(method)
    new_params, new_opt_state, _, aux, grads = train(params, opt_state, state, batch)
    assert not bool(aux.all_finite) and bool(jnp.isnan(aux.losses[1]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert not np.array_equal(np.asarray(new_params.shared), np.asarray(params.shared))
    assert counters(new_opt_state)["total_notfinite"] == 0

    _, _, flagged_train = make_train(method, flag=True)
    params, opt_state, state = warm_start(method, flag=True)
    new_params, new_opt_state, _, aux, _ = flagged_train(params, opt_state, state, batch)
    assert not bool(aux.all_finite)
    assert_bitwise_equal(new_params, params)
    assert_bitwise_equal(new_opt_state.inner_state, opt_state.inner_state)
    assert counters(new_opt_state)["total_notfinite"] == 1


def test_imtl_h_nan_loss_constant_is_caught_without_flag():
    """Under IMTL-L scaling the log-scale gradient e^s L - 1 carries the NaN loss itself."""
    _, _, train = make_train("imtl_h")
    params, opt_state, state = warm_start("imtl_h")
    batch = {**make_batch(), "c": jnp.array([0.0, jnp.nan])}
    new_params, new_opt_state, _, _, grads = train(params, opt_state, state, batch)
    assert bool(jnp.isnan(grads.log_scales[1]))
    assert_bitwise_equal(new_params, params)
    assert counters(new_opt_state)["total_notfinite"] == 1


def test_flag_nonfinite_is_identity_when_finite_and_validates():
    tree = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2), jnp.float16),)}
    assert_bitwise_equal(flag_nonfinite(tree, jnp.array(True)), tree)
    flagged = jax.jit(flag_nonfinite)(tree, jnp.array(False))
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree_util.tree_leaves(flagged))
    assert flagged["b"][0].dtype == jnp.float16
    with pytest.raises(ValueError, match=r"`all_finite`.*scalar.*\(2,\)"):
        flag_nonfinite(tree, jnp.array([True, False]))
    with pytest.raises(TypeError, match=r"`all_finite`.*bool.*float32"):
        flag_nonfinite(tree, jnp.array(1.0))
    with pytest.raises(TypeError, match=r"`updates`.*int32.*\(3,\)"):
        flag_nonfinite({"i": jnp.arange(3)}, jnp.array(True))


# --- The optax aggregator: safe_optimizer(chain(imtl_g(T), adam)) ----------------------------

def test_aggregator_chain_skips_non_finite_per_task_updates():
    num_tasks = 3
    opt = safe_optimizer(optax.chain(imtl_jax.imtl_g(num_tasks), optax.adam(1e-2)),
                         max_consecutive_errors=5)
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    update = jax.jit(opt.update)
    rng = np.random.default_rng(0)

    def per_task():
        return {"w": jnp.asarray(rng.standard_normal((num_tasks, 4, 2)), jnp.float32),
                "b": jnp.asarray(rng.standard_normal((num_tasks, 2)), jnp.float32)}

    state = opt.init(params)
    for _ in range(2):
        updates, state = update(per_task(), state, params)
        params = optax.apply_updates(params, updates)
    weights_before = np.asarray(state.inner_state[0].weights)
    assert np.isclose(weights_before.sum(), 1.0)

    total = 0
    for bad_value, where in ((jnp.nan, ("w", (1, 2, 0))), (jnp.inf, ("b", (2, 1))),
                             (-jnp.inf, ("w", (0, 0, 0)))):
        bad = per_task()
        bad[where[0]] = bad[where[0]].at[where[1]].set(bad_value)
        updates, new_state = update(bad, state, params)
        total += 1
        assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
        assert_bitwise_equal(optax.apply_updates(params, updates), params)
        # chain state: the aggregator's last weights/info and adam's moments are untouched
        assert_bitwise_equal(new_state.inner_state, state.inner_state)
        assert counters(new_state) == {"notfinite_count": 1, "last_finite": False,
                                       "total_notfinite": total}
        state = new_state._replace(notfinite_count=jnp.zeros([], jnp.int32))

    good = per_task()
    updates, state = update(good, state, params)
    new_params = optax.apply_updates(params, updates)
    assert not np.array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))
    expected = paper_alpha(np.concatenate(
        [np.asarray(good["w"]).reshape(num_tasks, -1), np.asarray(good["b"]).reshape(num_tasks, -1)],
        axis=1))
    np.testing.assert_allclose(state.inner_state[0].weights, expected, rtol=1e-4, atol=1e-5)
    assert counters(state)["last_finite"] is True


# --- safe_optimizer / skipped_steps API ------------------------------------------------------

@pytest.mark.parametrize("max_errors", [0, 2])
def test_same_updates_and_state_as_optax_apply_if_finite(max_errors):
    """For a structure-preserving optimizer, bit for bit what optax.apply_if_finite does."""
    ours = safe_optimizer(optax.adam(1e-2), max_consecutive_errors=max_errors)
    theirs = optax.apply_if_finite(optax.adam(1e-2), max_errors)
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert_bitwise_equal(s_ours, s_theirs)
    rng = np.random.default_rng(0)
    for bad in (False, True, True, True, False, True, False):
        grads = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32),
                 "b": jnp.asarray(jnp.nan if bad else 0.5, jnp.float32)}
        u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, params)
        u_theirs, s_theirs = jax.jit(theirs.update)(grads, s_theirs, params)
        assert_bitwise_equal(u_ours, u_theirs)
        assert_bitwise_equal(s_ours, s_theirs)


def test_safe_optimizer_is_apply_if_finite_and_validates():
    opt = safe_optimizer(optax.sgd(1.0), max_consecutive_errors=4)
    state = opt.init({"w": jnp.zeros(2)})
    assert isinstance(state, optax.ApplyIfFiniteState)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    assert isinstance(safe_optimizer(optax.sgd(1.0)).init(jnp.zeros(1)), optax.ApplyIfFiniteState)
    with pytest.raises(TypeError, match="`tx`.*GradientTransformation"):
        safe_optimizer(lambda g: g)
    with pytest.raises(ValueError, match="`max_consecutive_errors`.*>= 0.*-1"):
        safe_optimizer(optax.sgd(1.0), max_consecutive_errors=-1)
    with pytest.raises(TypeError, match="`max_consecutive_errors`.*int.*2.5"):
        safe_optimizer(optax.sgd(1.0), max_consecutive_errors=2.5)
    with pytest.raises(TypeError, match="`max_consecutive_errors`"):
        safe_optimizer(optax.sgd(1.0), max_consecutive_errors=True)


def test_extra_args_pass_through_to_the_aggregator():
    """losses= reaches a loss-weighting aggregator inside the wrapper."""
    opt = safe_optimizer(optax.chain(imtl_jax.aggregate("equal", 2), optax.sgd(1.0)))
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    updates, state = opt.update({"w": jnp.ones((2, 3))}, state, params, losses=jnp.ones(2))
    np.testing.assert_allclose(updates["w"], -2.0)


def test_skipped_steps_finds_the_state_when_nested():
    params = {"w": jnp.zeros(3)}
    inner = safe_optimizer(optax.adam(1e-3))
    chained = optax.chain(optax.clip_by_global_norm(1.0), inner)
    state = chained.init(params)
    train_state = {"step": jnp.zeros([], jnp.int32), "opt": state, "other": (1, "x")}
    assert counters(train_state) == {"notfinite_count": 0, "last_finite": True, "total_notfinite": 0}
    _, state = chained.update({"w": jnp.array([jnp.nan, 0.0, 0.0])}, state, params)
    assert counters({"opt": state})["total_notfinite"] == 1

    # Inside jit the counters are traced values.
    total = jax.jit(lambda s: skipped_steps(s)["total_notfinite"] + 1)(state)
    assert int(total) == 2

    multi = optax.multi_transform({"a": safe_optimizer(optax.sgd(1.0)),
                                   "b": safe_optimizer(optax.sgd(1.0))},
                                  {"w": "a", "v": "b"})
    with pytest.raises(ValueError, match="2 optax.ApplyIfFiniteState"):
        skipped_steps(multi.init({"w": jnp.zeros(1), "v": jnp.zeros(1)}))
    with pytest.raises(ValueError, match="no optax.ApplyIfFiniteState.*safe_optimizer"):
        skipped_steps(optax.adam(1e-3).init(params))


# --- Determinism -----------------------------------------------------------------------------

def _train_twenty_steps(method: str):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    opt = optax.adam(1e-2)

    @jax.jit
    def train(params, opt_state, state, batch):
        grads, state, aux = step(params, state, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state

    params = make_params(seed=3)
    opt_state, state = opt.init(params), step.init(params)
    keys = jax.random.split(jax.random.key(1234), 20)
    for key in keys:
        kx, ky = jax.random.split(key)
        batch = {"x": jax.random.normal(kx, (B, DIN)), "y": jax.random.normal(ky, (B, T)),
                 "m": jnp.ones(T), "c": jnp.zeros(T)}
        params, opt_state, state = train(params, opt_state, state, batch)
    return params, opt_state


# jax.clear_caches() makes every later test of the worker recompile: the slow step.
@pytest.mark.parametrize("method", [slow("imtl_h"), slow("imtl_g"), slow("equal")])
def test_training_is_bitwise_deterministic(method):
    first_params, first_state = _train_twenty_steps(method)
    jax.clear_caches()  # the second run recompiles: determinism across compilations too
    second_params, second_state = _train_twenty_steps(method)
    assert_bitwise_equal(first_params, second_params)
    assert_bitwise_equal(first_state, second_state)
    assert not np.array_equal(np.asarray(first_params.shared), np.asarray(make_params(seed=3).shared))
