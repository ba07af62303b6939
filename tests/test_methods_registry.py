"""Registry-level tests: every registered method (and the single-task factory) on degenerate
inputs, dtypes, bad inputs, in the jitted training step and in the optax aggregator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

import imtl_jax
from imtl_jax.methods import get_method, method_names
from imtl_jax.methods.loss_weighting import single_task
from marks import CORE_METHODS

NAMES = method_names()
# Every registered method plus the (unregistered) single-task factory.
METHODS = [get_method(n) for n in NAMES] + [single_task(0), single_task(1)]
IDS = [m.name for m in METHODS]
# Every method runs each registry test; by default one per family (tests/marks.py), the rest in
# CI's slow step.
CORE_OR_SLOW = [m if m.name in CORE_METHODS + ("single_task_0",) else pytest.param(m, marks=pytest.mark.slow)
                for m in METHODS]
PREEXISTING = {"equal", "imtl_h", "imtl_g", "imtl_g_exact", "imtl_l"}
TAKE_PRIORITIES = {"pbi", "cosmos"}   # besides IMTL-G/H: the preference vector of the scalarization


_JITTED = {}
# Tests compile ~60 small programs: skip LLVM's expensive optimisations (semantics unchanged).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def weigh_jit(method):
    """One jitted weigh per weighting (methods sharing a weighting share the compilation; jax
    caches one compilation per input shape/dtype)."""
    w = method.weighting
    if w not in _JITTED:
        _JITTED[w] = jit(lambda g, losses, s, k: w.weigh(g if w.needs_grads else None, losses, s, k, None))
    return _JITTED[w]


def run(method, grads, losses, steps=2):
    """Runs ``steps`` weigh calls (so stateful methods use their updated state)."""
    w = method.weighting
    grads = jnp.asarray(grads)
    losses = jnp.asarray(losses, grads.dtype)
    state = w.init_state(grads.shape[0], grads.dtype, dim=grads.shape[1])
    fn = weigh_jit(method)
    outs = []
    for i in range(steps):
        out = fn(grads, losses * (1.0 - 0.1 * i), state, jax.random.key(i))
        state = out.state
        outs.append(out)
    return outs


def _degenerate_cases():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 8))
    zero_row = base.copy()
    zero_row[1] = 0.0
    duplicate = base.copy()
    duplicate[2] = duplicate[0]
    opposite = base.copy()
    opposite[1] = -opposite[0]
    tiny_row = base.copy()
    tiny_row[2] *= 1e-30
    return {
        "zero_row": (zero_row, [1.0, 2.0, 0.5]),
        "duplicate_rows": (duplicate, [1.0, 1.0, 3.0]),
        "opposite_rows": (opposite, [1.0, 2.0, 0.5]),
        "all_zero": (np.zeros((3, 8)), [1.0, 2.0, 0.5]),
        "tiny_row": (tiny_row, [1.0, 2.0, 0.5]),
        "huge_scale": (base * 1e30, [1.0, 2.0, 0.5]),
        "tiny_scale": (base * 1e-30, [1.0, 2.0, 0.5]),
        "zero_loss": (base, [0.0, 2.0, 0.5]),
        "single_task": (rng.standard_normal((1, 8)), [0.7]),
    }


DEGENERATE = _degenerate_cases()


@pytest.mark.parametrize("method", CORE_OR_SLOW, ids=IDS)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_inputs_give_finite_weights(method, case):
    grads, losses = DEGENERATE[case]
    if method.name == "single_task_1" and len(losses) == 1:
        pytest.skip("task 1 does not exist when T = 1")
    for out in run(method, np.asarray(grads, np.float32), losses, steps=3):
        w = np.asarray(out.weights)
        assert w.shape == (len(losses),)
        assert np.all(np.isfinite(w)), (method.name, case, w)
        for leaf in jax.tree_util.tree_leaves(out.state):
            assert np.all(np.isfinite(np.asarray(leaf))), (method.name, case)


@pytest.mark.parametrize("method", CORE_OR_SLOW, ids=IDS)
def test_non_finite_inputs_do_not_poison_the_state(method):
    """A NaN step (skipped by optax.apply_if_finite) leaves a finite state; gradient methods
    answer it with NaN weights (loud), and the next finite step is finite again."""
    w = method.weighting
    rng = np.random.default_rng(2)
    grads = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    losses = jnp.asarray([1.0, 2.0, 0.5], jnp.float32)
    fn = weigh_jit(method)
    state = fn(grads, losses, w.init_state(3, jnp.float32, dim=8), jax.random.key(0)).state
    bad = fn(grads.at[1, 2].set(jnp.nan), losses.at[0].set(jnp.nan), state, jax.random.key(1))
    for leaf in jax.tree_util.tree_leaves(bad.state):
        assert np.all(np.isfinite(np.asarray(leaf))), method.name
    if w.needs_grads and method.name not in PREEXISTING:
        assert np.all(np.isnan(np.asarray(bad.weights))), method.name
    good = fn(grads, losses, bad.state, jax.random.key(2))
    assert np.all(np.isfinite(np.asarray(good.weights))), method.name


@pytest.mark.parametrize("method", CORE_OR_SLOW, ids=IDS)
def test_dtype_in_equals_dtype_out(method, fdtype):
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((3, 8)).astype(fdtype)
    outs = run(method, grads, [1.0, 2.0, 0.5], steps=2)
    for out in outs:
        assert out.weights.dtype == fdtype
        assert np.all(np.isfinite(np.asarray(out.weights)))
    state0 = method.weighting.init_state(3, jnp.dtype(fdtype), dim=8)
    for new, old in zip(jax.tree_util.tree_leaves(outs[-1].state), jax.tree_util.tree_leaves(state0)):
        assert new.dtype == old.dtype and new.shape == old.shape


# The pre-existing families have their own tests (IMTL-G supports priorities; ``equal`` does not
# validate ``losses``); the baselines all follow the same validation contract.
BASELINES = [m for m in METHODS
             if m.name not in PREEXISTING and m.weighting.name != "equal"]


def _core_or_slow(methods, name=lambda m: m.name):
    return [m if name(m) in CORE_METHODS + ("single_task_0",) else pytest.param(m, marks=pytest.mark.slow)
            for m in methods]


@pytest.mark.parametrize("method", _core_or_slow(BASELINES), ids=[m.name for m in BASELINES])
def test_bad_inputs_raise_naming_the_argument(method):
    w = method.weighting
    grads = jnp.ones((3, 4))
    losses = jnp.ones((3,))
    state = w.init_state(3, jnp.float32, dim=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="losses"):
        w.weigh(grads if w.needs_grads else None, jnp.ones((3, 2)), state, key, None)
    # Methods that take priorities (PBI/COSMOS: the preference vector) reject a wrong shape; the
    # others reject any priorities.
    bad_priorities = jnp.ones((4,)) if method.name in TAKE_PRIORITIES else jnp.ones((3,))
    with pytest.raises(ValueError, match="priorities"):
        w.weigh(grads if w.needs_grads else None, losses, state, key, bad_priorities)
    if w.needs_grads:
        with pytest.raises(ValueError, match="grads"):
            w.weigh(jnp.ones((4,)), losses, state, key, None)
        with pytest.raises(ValueError, match="grads"):
            w.weigh(None, losses, state, key, None)
        with pytest.raises(ValueError, match="losses"):
            w.weigh(grads, jnp.ones((2,)), state, key, None)
    if jax.tree_util.tree_leaves(state) and any(jnp.ndim(x) for x in jax.tree_util.tree_leaves(state)):
        wrong = w.init_state(4, jnp.float32, dim=4)
        with pytest.raises(ValueError, match="state"):
            w.weigh(grads if w.needs_grads else None, losses, wrong, key, None)
    # Also under jit (trace-time checks).
    with pytest.raises(ValueError, match="losses"):
        jax.jit(lambda losses_: w.weigh(grads if w.needs_grads else None, losses_, state, key, None))(
            jnp.ones((2, 3)))


def test_single_task_factory_validation():
    with pytest.raises(ValueError, match="task"):
        single_task(-1)
    with pytest.raises(ValueError, match="task"):
        single_task(1.5)
    with pytest.raises(ValueError, match="task"):
        single_task(5).weighting.weigh(None, jnp.ones(2), (), None, None)
    out = single_task(1).weighting.weigh(None, jnp.array([3.0, 4.0, 5.0]), (), None, None)
    np.testing.assert_array_equal(np.asarray(out.weights), [0.0, 1.0, 0.0])
    assert "single_task_0" not in NAMES  # the factory registers nothing


# ----------------------------------------------------------------------------------------------
# The tiny synthetic two-task problem, trained with mtl_step + adam under jit.


def _problem():
    k = jax.random.split(jax.random.key(42), 5)
    x = jax.random.normal(k[0], (32, 3))
    w_true = jax.random.normal(k[1], (3, 4))
    z_true = jnp.tanh(x @ w_true)
    v_true = jax.random.normal(k[2], (2, 4))
    y = z_true @ v_true.T
    y = y * jnp.array([1.0, 10.0])   # task 2 at 10x the scale (100x the loss)
    batch = {"x": x, "y": y}
    params = imtl_jax.MTLParams(shared=0.5 * jax.random.normal(k[3], (3, 4)),
                                heads=0.5 * jax.random.normal(k[4], (2, 4)),
                                log_scales=jnp.zeros(2))
    return params, batch


def encoder(w, batch):
    return jnp.tanh(batch["x"] @ w)


def head_loss(v_t, z, batch, t):
    return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)


def raw_losses(params, batch):
    z = encoder(params.shared, batch)
    return jnp.stack([head_loss(params.heads[t], z, batch, t) for t in range(2)])


@pytest.mark.parametrize("method", CORE_OR_SLOW, ids=IDS)
def test_trains_tiny_problem_with_one_compilation(method):
    params, batch = _problem()
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    opt = optax.adam(2e-2)
    opt_state = opt.init(params)
    state = step.init(params, batch)   # the batch gives F to a method with per-coordinate state
    traces = []

    @jit
    def train(params, opt_state, state, key):
        traces.append(1)
        grads, state, aux = step(params, state, batch, key=key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, aux

    before = np.asarray(raw_losses(params, batch))
    key = jax.random.key(0)
    for i in range(60):
        params, opt_state, state, aux = train(params, opt_state, state, jax.random.fold_in(key, i))
        assert bool(aux.all_finite), (method.name, i)
    after = np.asarray(raw_losses(params, batch))
    assert len(traces) == 1, f"{method.name}: {len(traces)} traces"
    if method.name.startswith("single_task_"):
        t = int(method.name.rsplit("_", 1)[1])
        assert after[t] < 0.8 * before[t], (method.name, before, after)
    else:
        # Task 2 is at 100x the loss of task 1; scale-free methods (GLS, FAMO, GradNorm) reduce
        # the small loss first, so the bar on the *total* is a modest 10%.
        assert after.sum() < 0.9 * before.sum(), (method.name, before, after)


# ----------------------------------------------------------------------------------------------
# The optax aggregator: per-task gradients of two quadratics, stacked on axis 0.


def _quadratics():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((2, 6, 5)), jnp.float32)
    a = a * jnp.array([1.0, 3.0])[:, None, None]   # task 2 at ~10x the loss of task 1
    w_true = jnp.asarray(rng.standard_normal(5), jnp.float32)
    b = jnp.einsum("tij,j->ti", a, w_true) + 0.5   # realizable: both tasks share a minimiser
    return a, b


def _task_losses(params, a, b):
    r = jnp.einsum("tij,j->ti", a, params["w"]) + params["c"] - b
    return 0.5 * jnp.sum(r * r, axis=1)


# The aggregator only sees the weighting: one test per distinct weighting.
AGG_METHODS = list({m.weighting: m for m in reversed(METHODS)}.values())[::-1]


@pytest.mark.parametrize("method", _core_or_slow(AGG_METHODS), ids=[m.weighting.name for m in AGG_METHODS])
def test_works_through_the_optax_aggregator(method):
    a, b = _quadratics()
    params = {"w": jnp.zeros(5), "c": jnp.zeros(())}
    # PBI's weights have norm sqrt(1 + theta^2) = 5.1 off the preference ray (the gradient of
    # d1 + 5 d2): its SGD step is ~5x equal weighting's, so it takes a fifth of the rate.
    lr = 2e-3 if method.weighting.name == "pbi" else 1e-2
    tx = optax.chain(imtl_jax.aggregate(method, num_tasks=2), optax.sgd(lr))
    tx_state = tx.init(params)
    traces = []
    needs_losses = not method.weighting.needs_grads

    @jit
    def update(params, tx_state, key):
        traces.append(1)
        losses = _task_losses(params, a, b)
        per_task = jax.jacrev(_task_losses)(params, a, b)   # leaves (2, ...)
        kwargs = {"losses": losses} if (needs_losses or method.weighting.weights_heads
                                        or method.weighting.returns_direction) else {}
        if method.scaling.trainable:  # a loss scaling needs the losses and its log-scales
            kwargs.update(losses=losses, log_scales=jnp.zeros(2))
        elif method.scaling.name != "identity":
            # A fixed scaling (DB-MTL's log): the aggregator only sees the weighting, so the
            # caller stacks the updates of the scaled losses (chain rule, per task).
            scaled, factor = jax.jvp(lambda losses_: method.scaling.scale(losses_, jnp.zeros(2)), (losses,),
                                     (jnp.ones_like(losses),))
            per_task = jax.tree_util.tree_map(
                lambda x: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)), per_task)
            kwargs = {"losses": scaled} if "losses" in kwargs else kwargs
        updates, tx_state = tx.update(per_task, tx_state, params, key=key, **kwargs)
        return optax.apply_updates(params, updates), tx_state

    before = float(jnp.sum(_task_losses(params, a, b)))
    for i in range(40):
        params, tx_state = update(params, tx_state, jax.random.key(i))
    after = float(jnp.sum(_task_losses(params, a, b)))
    assert len(traces) == 1
    assert np.isfinite(after)
    if method.name.startswith("single_task_"):
        t = int(method.name.rsplit("_", 1)[1])
        assert (float(_task_losses(params, a, b)[t])
                < float(_task_losses({"w": jnp.zeros(5), "c": jnp.zeros(())}, a, b)[t]))
    else:
        assert after < before, (method.name, before, after)
    if needs_losses:
        with pytest.raises(ValueError, match="losses"):
            tx.update(jax.jacrev(_task_losses)(params, a, b), tx_state, params)
