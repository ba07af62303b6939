"""Partial labels (``task_mask``): a masked step equals the step of the same method built on the
present tasks only (issue 24, deliverable 3).

The oracle is a genuinely smaller problem: a T'-task step (heads, log-scales and method state
restricted to the present tasks, the task losses re-indexed), never the masked code path. The
absent tasks' labels are NaN in every masked call, so the same comparison shows that garbage
labels of an absent task cannot reach the step. Float64 (x64), so agreement is to round-off.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
from imtl_jax import methods
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods._mask import mask_supported_methods
from imtl_jax.methods.moco import MoCoState
from marks import slow_unless_core
from oracles import x64

T = 4
MASKS = [np.array(m, bool) for m in itertools.product([False, True], repeat=T) if any(m)]
SUPPORTED = mask_supported_methods()
RTOL, ATOL = 1e-9, 1e-12


def _encoder(w, batch):
    return jnp.tanh(batch["x"] @ w)


def _head_loss(v_t, z, batch, t):
    # The task's label column comes through batch["task_index"] so that a sub-problem can map
    # its task t' to the full problem's task (the oracle's re-indexing).
    col = batch["task_index"][t]
    return jnp.mean((z @ v_t - batch["y"][:, col]) ** 2) + 0.1


def _problem(seed, num_tasks=T, batch_size=8, dim=5):
    k = jax.random.split(jax.random.key(seed), 5)
    params = imtl_jax.MTLParams(shared=jax.random.normal(k[0], (3, dim)),
                                heads=jax.random.normal(k[1], (num_tasks, dim)),
                                log_scales=0.3 * jax.random.normal(k[2], (num_tasks,)))
    batches = [{"x": jax.random.normal(jax.random.fold_in(k[3], i), (batch_size, 3)),
                "y": jax.random.normal(jax.random.fold_in(k[4], i), (batch_size, num_tasks)),
                "task_index": jnp.arange(num_tasks)} for i in range(3)]
    return params, batches


def _task_axes(weighting):
    """For each state leaf, the axes that are task axes: those whose size changes with T."""
    # (F, the gradient width of a needs_dim weighting's state, is the same in both.)
    full = jax.tree_util.tree_leaves(jax.eval_shape(lambda: weighting.init_state(T, jnp.float64, dim=7)))
    less = jax.tree_util.tree_leaves(jax.eval_shape(lambda: weighting.init_state(T - 1, jnp.float64, dim=7)))
    return [tuple(i for i, (a, b) in enumerate(zip(f.shape, s.shape)) if a != b)
            for f, s in zip(full, less)]


def _take(x, idx, axes):
    x = np.asarray(x)
    for ax in axes:
        x = np.take(x, idx, axis=ax)
    return x


def _restrict_state(state, weighting, idx):
    leaves, tree = jax.tree_util.tree_flatten(state)
    axes = _task_axes(weighting)
    sub = jax.tree_util.tree_unflatten(tree, [jnp.asarray(_take(x, idx, a)) for x, a in zip(leaves, axes)])
    if isinstance(sub, MoCoState):  # MoCo's sub-problem starts from its own simplex (see _assert_state)
        sub = sub._replace(weights=sub.weights / jnp.sum(sub.weights))
    return sub


def _assert_state(new, old, sub_new, weighting, mask):
    """Present entries equal the sub-problem's new state; entries touching an absent task are
    the old state's, bit for bit; shared leaves (counters) equal the sub-problem's."""
    idx = np.flatnonzero(mask)
    axes = _task_axes(weighting)
    if isinstance(sub_new, MoCoState):  # present lambda stored scaled by its previous mass
        sub_new = sub_new._replace(weights=sub_new.weights * np.sum(np.asarray(old.weights)[idx]))
        np.testing.assert_allclose(float(jnp.sum(new.weights)), 1.0, rtol=0, atol=1e-12)
    for n, o, s, a in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old),
                          jax.tree_util.tree_leaves(sub_new), axes):
        np.testing.assert_allclose(_take(n, idx, a), np.asarray(s), rtol=RTOL, atol=ATOL)
        if a:
            touched = np.zeros(np.shape(n), bool)
            for ax in a:
                shape = [1] * np.ndim(n)
                shape[ax] = T
                touched |= ~mask.reshape(shape)
            np.testing.assert_array_equal(np.asarray(n)[touched], np.asarray(o)[touched])


def _sub_step(run, weighting, mask, params, state, batch):
    """The oracle: the same method on the present tasks only (``run``: the jitted step, which
    compiles once per number of present tasks)."""
    idx = np.flatnonzero(mask)
    sub_params = imtl_jax.MTLParams(params.shared, params.heads[idx], params.log_scales[idx])
    sub_batch = dict(batch, task_index=jnp.asarray(idx))
    return run(sub_params, _restrict_state(state, weighting, idx), sub_batch)


def _check_step_property(name, masks, use_jit=True):
    with x64():
        params, batches = _problem(0)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        batches = [jax.tree_util.tree_map(
            lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, b)
            for b in batches]
        step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), name)
        weighting = step.method.weighting
        key = jax.random.key(7)
        plain = jax.jit(lambda p, s, b: step(p, s, b, key=key))
        # Warm the state with two unmasked steps, so stateful methods have non-trivial state.
        state = step.init(params, batches[0])
        for b in batches[:2]:
            _, state, _ = plain(params, state, b)
        traces = []

        def masked(p, s, b, m):
            traces.append(1)
            return step(p, s, b, key=key, task_mask=m)

        run = jax.jit(masked) if use_jit else masked
        batch = batches[2]
        for mask in masks:
            idx = np.flatnonzero(mask)
            garbage = dict(batch, y=jnp.where(jnp.asarray(mask)[None, :], batch["y"], jnp.nan))
            grads, new_state, aux = run(params, state, garbage, jnp.asarray(mask))
            sub_grads, sub_state, sub_aux = _sub_step(plain, weighting, mask, params, state, batch)
            err = f"{name}, mask {mask.astype(int)}"
            assert bool(aux.all_finite), err
            np.testing.assert_allclose(grads.shared, sub_grads.shared, rtol=RTOL, atol=ATOL, err_msg=err)
            for full, sub in ((grads.heads, sub_grads.heads), (grads.log_scales, sub_grads.log_scales),
                              (aux.weights, sub_aux.weights), (aux.losses, sub_aux.losses)):
                np.testing.assert_allclose(np.asarray(full)[idx], sub, rtol=RTOL, atol=ATOL, err_msg=err)
                np.testing.assert_array_equal(np.asarray(full)[~mask], 0.0, err_msg=err)
            _assert_state(new_state, state, sub_state, weighting, mask)
        if use_jit:
            assert len(traces) == 1, f"{name}: {len(traces)} traces for {len(masks)} masks"


# Default suite: IMTL-H (loss scaling + IMTL-G + heads) and FAMO (stateful loss weighting with an
# optimizer state) cover every masked code path of the step; each costs five compiles (the masked
# step and the sub-problems T' = 1..4), so the other methods run in the slow step. PCGrad's
# randomness (the masked draw must be the sub-problem's for the same key) has its own default
# tests below.
DEFAULT = ("imtl_h", "famo")  # PCGrad's masked draws have their own default tests below


@pytest.mark.parametrize("name", slow_unless_core(SUPPORTED, core=DEFAULT))
def test_masked_step_equals_present_task_step(name):
    """All 15 non-empty masks at T = 4, jitted once: grads, alpha, state = the sub-problem's."""
    _check_step_property(name, MASKS)


# Eagerly, every solver loop compiles again on every call: the jitted twin above enumerates all
# 15 masks; the eager path (concrete masks, Python-level branches) is checked on one mask of
# each number of present tasks, the first one with the fourth task absent.
EAGER_MASKS = [np.array(m, bool) for m in ((0, 0, 1, 0), (1, 0, 1, 0), (1, 1, 1, 0), (1, 1, 1, 1))]


@pytest.mark.parametrize("name", slow_unless_core(SUPPORTED, core=()))  # the jitted twin runs by default
def test_masked_step_without_jit(name):
    """Eagerly (concrete masks): the same property, one mask per number of present tasks."""
    _check_step_property(name, EAGER_MASKS, use_jit=False)


def test_supported_methods_cover_the_brief():
    """Every registered method supports masks (so the property test above covers them all)."""
    assert set(SUPPORTED) == set(methods.method_names())
    assert len(SUPPORTED) == 35


def test_cr_mogm_supports_masks_when_its_inner_weighting_does():
    from imtl_jax.methods.cr_mogm import cr_mogm_weighting
    assert cr_mogm_weighting("pcgrad").supports_task_mask
    plain = Weighting("plain", stateless_init,
                      lambda g, x, s, k, p: WeightingOutput(jnp.ones_like(x), s, {}), needs_grads=False)
    assert not cr_mogm_weighting(plain).supports_task_mask


def test_unsupported_method_raises_naming_the_alternatives():
    w = Weighting("plain", stateless_init,
                  lambda g, losses, s, k, p: WeightingOutput(jnp.ones_like(losses), s, {}), needs_grads=False)
    method = Method("my_method", methods.get_method("equal").scaling, w)
    params, batches = _problem(0)
    step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), method)
    with pytest.raises(ValueError, match=r"'my_method'.*does not support `task_mask`.*imtl_g"):
        step(params, (), batches[0], task_mask=jnp.ones(T, bool))
    with pytest.raises(ValueError, match=r"'plain'.*does not support `task_mask`"):
        tx = imtl_jax.aggregate(w, T)
        tx.update({"w": jnp.ones((T, 3))}, tx.init(None), losses=jnp.ones(T), task_mask=jnp.ones(T))
    # Unmasked, the same method traces as before.
    jax.eval_shape(lambda: step(params, (), batches[0]))


def test_bad_masks_raise():
    params, batches = _problem(0)
    step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "gls")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        step(params, (), batches[0], task_mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="no present task"):
        step(params, (), batches[0], task_mask=jnp.zeros(T, bool))
    with pytest.raises(TypeError, match="bool or numeric"):
        step(params, (), batches[0], task_mask=np.array(["a"] * T))
    # 0/1 numbers (and lists) are accepted and mean the same as bools.
    run = jax.jit(lambda m: step(params, (), batches[0], task_mask=m)[0])
    g_int = run(jnp.array([1, 0, 1, 1]))
    g_bool = run(jnp.array([True, False, True, True]))
    np.testing.assert_array_equal(g_int.shared, g_bool.shared)


def test_all_absent_traced_mask_is_a_no_op():
    params, batches = _problem(0)
    step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "famo")
    state = step.init(params)
    _, state, _ = jax.jit(step)(params, state, batches[0])
    grads, new_state, aux = jax.jit(lambda m: step(params, state, batches[1], task_mask=m))(
        jnp.zeros(T, bool))
    for leaf in jax.tree_util.tree_leaves(grads) + [aux.weights]:
        np.testing.assert_array_equal(leaf, 0.0)
    for new, old in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("name", slow_unless_core(["imtl_l", "imtl_h"], core=("imtl_l",)))
def test_tuple_and_generic_task_losses(name):
    """The tuple form (NaN labels of absent tasks included) and the generic form (finite
    absent losses: a joint function cannot separate the tasks) match the stacked form."""
    params, batches = _problem(1)
    batch = batches[0]
    mask = jnp.array([True, False, True, False])
    stacked = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), name)
    ref, _, ref_aux = jax.jit(lambda m: stacked(params, (), batch, task_mask=m))(mask)
    fns = tuple((lambda h, z, b, t=t: _head_loss(h, z, b, t)) for t in range(T))
    tup = imtl_jax.mtl_step(_encoder, fns, name)
    tparams = params._replace(heads=tuple(params.heads))
    garbage = dict(batch, y=jnp.where(mask[None, :], batch["y"], jnp.nan))
    got, _, aux = jax.jit(lambda b, m: tup(tparams, (), b, task_mask=m))(garbage, mask)
    np.testing.assert_allclose(got.shared, ref.shared, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.stack(got.heads), ref.heads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.weights, ref_aux.weights, rtol=1e-5, atol=1e-6)

    def joint(heads, z, b):
        return jax.vmap(lambda h, t: _head_loss(h, z, b, t))(heads, jnp.arange(T))
    gen = imtl_jax.mtl_step(_encoder, joint, name)
    got, _, aux = jax.jit(lambda m: gen(params, (), batch, task_mask=m))(mask)
    np.testing.assert_allclose(got.shared, ref.shared, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.heads, ref.heads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.log_scales, ref.log_scales, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.weights, ref_aux.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", slow_unless_core(
    ["famo", "imtl_g", "gls", "db_mtl", "gradnorm", "gradvac", "sdmgrad", "cr_mogm"], core=("famo",)))
def test_aggregate_masked_equals_present_task_aggregate(name):
    """optax aggregator: per-task updates with NaN rows for absent tasks, one compile."""
    with x64():
        rng = np.random.default_rng(0)
        g = jnp.asarray(rng.standard_normal((3, T, 6)))
        losses = jnp.asarray(rng.uniform(0.5, 2.0, (3, T)))
        tx = imtl_jax.aggregate(name, T, dtype=jnp.float64)
        state = tx.init(None)
        for i in range(2):
            _, state = tx.update({"w": g[i]}, state, losses=losses[i])
        traces = []

        def masked(u, losses_, s, m):
            traces.append(1)
            return tx.update({"w": u}, s, losses=losses_, task_mask=m)

        run = jax.jit(masked)
        weighting = methods.get_method(name).weighting
        subs = {n: imtl_jax.aggregate(name, n, dtype=jnp.float64) for n in range(1, T + 1)}
        sub_runs = {n: jax.jit(lambda u, s, losses_, tx=tx: tx.update({"w": u}, s, losses=losses_))
                    for n, tx in subs.items()}
        for mask in MASKS:
            idx = np.flatnonzero(mask)
            m = jnp.asarray(mask)
            out, new = run(jnp.where(m[:, None], g[2], jnp.nan), jnp.where(m, losses[2], jnp.nan),
                           state, m)
            sub_state = state._replace(weights=state.weights[idx], method_state=_restrict_state(
                state.method_state, weighting, idx), info=subs[len(idx)].init(None).info)
            sub_out, sub_new = sub_runs[len(idx)](g[2][idx], sub_state, losses[2][idx])
            np.testing.assert_allclose(out["w"], sub_out["w"], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(new.weights[idx], sub_new.weights, rtol=RTOL, atol=ATOL)
            np.testing.assert_array_equal(new.weights[~mask], 0.0)
            _assert_state(new.method_state, state.method_state, sub_new.method_state, weighting, mask)
        assert len(traces) == 1


@pytest.mark.slow
def test_imtl_g_gramian_route_masked():
    """The parameter level's Gramian route (large models) excludes absent tasks as well."""
    from imtl_jax._exact import imtl_g_from_gramian
    with x64():
        rng = np.random.default_rng(3)
        J = rng.standard_normal((T, 7))
        masked = jax.jit(lambda g, m: imtl_g_from_gramian(g, jnp.int32(0), task_mask=m))
        plain = jax.jit(lambda g: imtl_g_from_gramian(g, jnp.int32(0)))
        for mask in MASKS:
            idx = np.flatnonzero(mask)
            gram = jnp.asarray(np.where(mask[:, None] & mask[None, :], J @ J.T, np.nan))
            w, c = masked(gram, jnp.asarray(mask))
            sub = J[idx]
            w_sub, c_sub = plain(jnp.asarray(sub @ sub.T))
            np.testing.assert_allclose(np.asarray(w)[idx], w_sub, rtol=RTOL, atol=ATOL)
            np.testing.assert_array_equal(np.asarray(w)[~mask], 0.0)
            np.testing.assert_allclose(c, c_sub, rtol=RTOL)


def test_imtl_g_solve_masked_is_impartial_among_present():
    """Independent check of the IMTL-G mask: equal projections on the present unit gradients
    (NumPy float64), sum alpha = 1 over them, NaN rows of absent tasks ignored."""
    with x64():
        rng = np.random.default_rng(5)
        J = rng.standard_normal((T, 6)) * 10.0 ** rng.uniform(-2, 2, (T, 1))
        mask = np.array([True, False, True, True])
        res = jax.jit(lambda g, m: imtl_jax.imtl_g_solve(g, task_mask=m))(
            jnp.asarray(np.where(mask[:, None], J, np.nan)), jnp.asarray(mask))
        a = np.asarray(res.weights)
        g = a @ np.where(mask[:, None], J, 0.0)
        u = J[mask] / np.linalg.norm(J[mask], axis=1, keepdims=True)
        proj = u @ g
        np.testing.assert_allclose(proj, proj.mean(), rtol=1e-10)
        np.testing.assert_allclose(a[mask].sum(), 1.0, rtol=1e-12)
        assert a[1] == 0.0


def test_nnx_train_step_with_mask():
    """The NNX helper passes the mask through: an absent head is untouched under SGD."""
    from flax import nnx
    from imtl_jax.nnx import LossScales, make_train_step

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(3, 5, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(5, 1, rngs=rngs) for _ in range(3)])
            self.loss_scales = LossScales(3)

    def loss(head, z, batch, t):
        return jnp.mean((head(z)[:, 0] - batch["y"][:, t]) ** 2)

    model = Net(nnx.Rngs(0))
    before = np.asarray(model.heads[1].kernel[...])
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    train_step = make_train_step(loss, "imtl_l")
    state = train_step.init(model)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 3)).at[:, 1].set(jnp.nan)}
    state, aux = nnx.jit(train_step)(model, optimizer, batch, state,
                                     task_mask=jnp.array([True, False, True]))
    assert bool(aux.all_finite)
    assert aux.weights[1] == 0.0
    np.testing.assert_array_equal(model.heads[1].kernel[...], before)
    assert np.all(np.isfinite(model.encoder.kernel[...]))


# --- methods with randomness, state or an iterative solver --------------------------------------


def _pcgrad_paper(grads, orders):
    """Yu et al. 2020, Algorithm 1, on the raw vectors (float64): the sum of the corrected rows."""
    out = []
    for i, gi in enumerate(grads):
        gi = gi.copy()
        for j in orders[i]:
            dot = gi @ grads[j]
            if dot < 0:
                gi = gi - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(gi)
    return np.sum(out, axis=0)


def _documented_orders(key, num_present):
    """The draw documented in pcgrad_orders, written out in Python: the c-th task sorts the
    other tasks (in index order) by the 32-bit keys bits(fold_in(fold_in(key, c), j))."""
    orders = []
    for c in range(num_present):
        kc = jax.random.fold_in(key, c)
        bits = [int(jax.random.bits(jax.random.fold_in(kc, j), (), jnp.uint32)) for j in range(num_present - 1)]
        others = [t for t in range(num_present) if t != c]
        orders.append([others[j] for j in np.argsort(bits, kind="stable")])
    return orders


def test_pcgrad_masked_orders_are_the_present_task_draws():
    """The present tasks' orders under a mask are those of the T'-task problem with the same
    key (the documented draw, rebuilt in Python, and pcgrad_orders(key, T')), then the absent
    tasks. So a masked PCGrad/GradVac step equals the sub-problem's step draw for draw."""
    from imtl_jax.methods.pcgrad import pcgrad_orders
    num_tasks = 6
    run = jax.jit(lambda k, m: pcgrad_orders(k, num_tasks, m))
    rng = np.random.default_rng(0)
    for trial in range(6):
        key = jax.random.key(trial)
        mask = rng.random(num_tasks) < 0.6
        mask[trial % num_tasks] = True
        idx = np.flatnonzero(mask)
        got = np.asarray(run(key, jnp.asarray(mask)))
        expected = _documented_orders(key, len(idx))
        sub = np.asarray(pcgrad_orders(key, len(idx))) if len(idx) > 1 else np.zeros((1, 0), int)
        for c, i in enumerate(idx):
            np.testing.assert_array_equal(got[i, :len(idx) - 1], idx[expected[c]])
            np.testing.assert_array_equal(got[i, :len(idx) - 1], idx[sub[c]])
            assert sorted(got[i, len(idx) - 1:].tolist()) == np.flatnonzero(~mask).tolist()


def test_pcgrad_masked_weights_are_the_paper_algorithm_on_present_tasks():
    """The masked weights (absent rows NaN) give the update of Algorithm 1 run on the present
    rows with the orders reported in info["order"] (independent of the library's Gramian
    code), and equal the T'-task weights for the same key, on gradients where the order
    matters (every pair conflicts: the results vary with the key)."""
    from inputs import draw
    with x64():
        w = methods.get_method("pcgrad").weighting
        run = jax.jit(lambda g, m, k: _mask_weigh(w, g, m, k))
        sub_run = jax.jit(lambda g, k: w.weigh(g, jnp.ones(g.shape[0], g.dtype), w.init(g.shape[0]), k, None))
        num_tasks = 6
        mask = np.array([True, False, True, True, False, True])
        idx = np.flatnonzero(mask)
        grads = draw("simplex", 0, num_tasks, 8, 1.0)
        masked = np.where(mask[:, None], grads, np.nan)
        updates = set()
        for trial in range(8):
            key = jax.random.key(trial)
            out = run(jnp.asarray(masked), jnp.asarray(mask), key)
            position = {t: k for k, t in enumerate(idx)}
            orders = [[position[t] for t in np.asarray(out.info["order"])[i] if mask[t]] for i in idx]
            expected = _pcgrad_paper(grads[idx], orders)
            weights = np.asarray(out.weights)
            assert np.all(weights[~mask] == 0.0)
            np.testing.assert_allclose(weights[idx] @ grads[idx], expected, rtol=1e-12,
                                       atol=1e-12 * np.abs(expected).max())
            np.testing.assert_allclose(weights[idx], sub_run(jnp.asarray(grads[idx]), key).weights,
                                       rtol=1e-12, atol=1e-14)
            updates.add(tuple(np.round(expected, 8)))
        assert len(updates) > 2      # the order matters for these gradients


def _mask_weigh(weighting, grads, mask, key, state=None, losses=None):
    from imtl_jax.methods._mask import weigh
    num_tasks = grads.shape[0]
    state = weighting.init_state(num_tasks, grads.dtype, dim=grads.shape[1]) if state is None else state
    losses = jnp.ones(num_tasks, grads.dtype) if losses is None else losses
    return weigh(weighting, grads, losses, state, key, None, mask, weighting.name)


def test_gradnorm_records_the_initial_loss_of_a_task_absent_at_first():
    """L_t(0) of a task absent at the first step is recorded at its first present step; the
    other tasks' L(0) stay those of the first step."""
    w = methods.get_method("gradnorm").weighting
    from imtl_jax.methods._mask import weigh
    run = jax.jit(lambda g, x, s, m: weigh(w, g, x, s, None, None, m, "gradnorm"))
    g = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), jnp.float32)
    state = w.init(3, jnp.float32)
    out = run(g, jnp.array([1.0, 2.0, jnp.nan]), state, jnp.array([True, True, False]))
    np.testing.assert_array_equal(out.state.initial_losses, [1.0, 2.0, 0.0])
    np.testing.assert_array_equal(out.state.weights[2], 1.0)
    out = run(g, jnp.array([0.5, 1.0, 4.0]), out.state, jnp.ones(3, bool))
    np.testing.assert_array_equal(out.state.initial_losses, [1.0, 2.0, 4.0])
    assert int(out.state.count) == 2


def _kkt_error(name, weights, info, grads):
    """The method's optimality condition on the present rows ``grads`` (T', D), in NumPy float64,
    relative to its scale (0 at the exact solution)."""
    m = grads @ grads.T
    top = np.max(np.diag(m))
    n = grads.shape[0]
    if name == "mgda":                       # (M w)_t >= w^T M w, equality on the support
        mw = m @ weights
        return max(np.max(np.abs(mw[weights > 0] - weights @ mw)),
                   np.max(np.maximum(weights @ mw - mw, 0.0)), abs(weights.sum() - 1)) / top
    if name == "cagrad":                     # the dual: grad F equal on the support, >= elsewhere
        w = np.asarray(info["dual_weights"])
        mw = m @ w
        grad = m.mean(axis=1) + 0.5 * np.sqrt(m.mean()) * mw / np.sqrt(w @ mw)
        return (np.max(grad[w > 0]) - np.min(grad)) / top
    if name == "nash_mtl":                   # alpha_t (K alpha)_t = 1, K = M / ||M||_F
        return np.max(np.abs(weights * ((m / np.linalg.norm(m)) @ weights) - 1.0))
    if name == "fairgrad":                   # M w = w^{-1/2} (raw equation, alpha = 2)
        return np.max(np.abs(m @ weights - weights ** -0.5) / weights ** -0.5)
    update = weights @ grads
    conflict = np.max(np.maximum(-(grads @ update), 0.0)) / top
    if name == "dualproj":                   # projection of the mean on {x : G x >= 0}: KKT
        v = weights - 1.0 / n
        return max(conflict, np.max(np.maximum(-v, 0.0)), abs(v @ (grads @ update)) / top)
    assert name == "upgrad"
    return conflict                          # the update conflicts with no present task


SOLVERS = ("mgda", "cagrad", "upgrad", "dualproj", "nash_mtl", "fairgrad")


@pytest.mark.parametrize("name", slow_unless_core(SOLVERS, core=("nash_mtl",)))
def test_masked_solvers_certify_the_present_problem(name):
    """Iterative solvers under a mask: absent rows hold large finite garbage (that would change
    the full problem), yet the solver takes the sub-problem's path (same iterations), reports
    its certificate (converged, the same value) and the weights satisfy the method's optimality
    condition on the present rows (NumPy float64)."""
    from inputs import draw
    with x64():
        weighting = methods.get_method(name).weighting
        num_tasks = 5
        run = jax.jit(lambda g, m: _mask_weigh(weighting, g, m, None))
        sub_run = jax.jit(lambda g: weighting.weigh(g, jnp.ones(g.shape[0], g.dtype),
                                                    weighting.init(g.shape[0], g.dtype), None, None))
        rng = np.random.default_rng(4)
        for trial, family in enumerate(("mixed", "opposed_pairs", "simplex", "mixed")):
            grads = draw(family, trial, num_tasks, 7, 2.0)
            mask = np.zeros(num_tasks, bool)
            mask[rng.choice(num_tasks, 3 + trial % 2, replace=False)] = True
            idx = np.flatnonzero(mask)
            garbage = np.where(mask[:, None], grads, 1e3 * rng.standard_normal(grads.shape))
            out = run(jnp.asarray(garbage), jnp.asarray(mask))
            sub = sub_run(jnp.asarray(grads[idx]))
            err = f"{name}, {family}, mask {mask.astype(int)}"
            assert bool(out.info["converged"]) and bool(sub.info["converged"]), err
            assert int(out.info["iterations"]) == int(sub.info["iterations"]), err
            np.testing.assert_allclose(float(out.info["certificate"]), float(sub.info["certificate"]),
                                       rtol=0, atol=1e-13, err_msg=err)
            weights = np.asarray(out.weights)
            np.testing.assert_array_equal(weights[~mask], 0.0, err_msg=err)
            np.testing.assert_allclose(weights[idx], sub.weights, rtol=1e-9, atol=1e-12, err_msg=err)
            info = {k: np.asarray(v)[idx] if np.ndim(v) == 1 else v for k, v in out.info.items()}
            assert _kkt_error(name, weights[idx], info, grads[idx]) <= 1e-9, err
