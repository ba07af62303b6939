"""optax aggregator interop, Flax NNX pattern, and IMTL-L scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import imtl_jax
from imtl_jax.nnx import LossScales, make_train_step
from oracles import paper_alpha, x64
from marks import slow, slow_unless_core

J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def stacked_updates(dtype=jnp.float32):
    """Per-task updates of a two-leaf pytree, stacked on axis 0 (T = 2)."""
    return {"a": jnp.asarray(J_BASE[:, :1], dtype), "b": jnp.asarray(J_BASE[:, 1:].reshape(2, 2, 1), dtype)}


def test_aggregator_in_chain_under_jit_exposes_alpha_and_c():
    tx = optax.chain(imtl_jax.imtl_g(num_tasks=2), optax.sgd(1.0))
    params = {"a": jnp.zeros(1), "b": jnp.zeros((2, 1))}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(stacked_updates(), state, params)
    np.testing.assert_allclose(-updates["a"], [0.07669683], rtol=1e-5)
    np.testing.assert_allclose(-updates["b"], [[1.0], [1.0]], rtol=1e-5)
    np.testing.assert_allclose(state[0].weights, [0.59233032, 0.40766968], rtol=1e-6)
    np.testing.assert_allclose(state[0].info["common_projection"], 0.39909406, rtol=1e-6)


def test_aggregator_extra_args_and_single_compile():
    tx = imtl_jax.imtl_g(num_tasks=2)
    state = tx.init({"a": jnp.zeros(1)})
    traces = []

    @jax.jit
    def f(u, s):
        traces.append(1)
        return tx.update(u, s, None, unknown_extra=3.0, another="ignored")

    u = {"a": jnp.asarray(J_BASE)}
    out, state = f(u, state)
    out, state = f({"a": jnp.asarray(J_BASE * 2)}, state)
    assert len(traces) == 1
    np.testing.assert_allclose(out["a"], 2 * (paper_alpha(J_BASE) @ J_BASE), rtol=1e-5)


def test_aggregator_priorities_are_traced():
    tx = imtl_jax.imtl_g(num_tasks=2)
    state = tx.init(None)
    f = jax.jit(lambda u, s, p: tx.update(u, s, priorities=p))
    g = {"a": jnp.asarray(J_BASE)}
    out, st = f(g, state, jnp.array([1.0, 3.0]))
    n = np.linalg.norm(J_BASE, axis=1)
    proj = (J_BASE / n[:, None]) @ np.asarray(out["a"], np.float64)
    np.testing.assert_allclose(proj[1] / proj[0], 3.0, rtol=1e-5)


def test_inject_hyperparams_interop():
    tx = optax.inject_hyperparams(imtl_jax.imtl_g, static_args=("num_tasks", "nonconflicting"))(num_tasks=2)
    state = tx.init({"a": jnp.zeros(3)})
    out, state = jax.jit(tx.update)({"a": jnp.asarray(J_BASE)}, state)
    np.testing.assert_allclose(out["a"], paper_alpha(J_BASE) @ J_BASE, rtol=1e-5)


@pytest.mark.parametrize("dtype", [slow(jnp.bfloat16), jnp.float32])
def test_aggregator_preserves_dtype(dtype):
    tx = imtl_jax.imtl_g(num_tasks=2)
    out, _ = jax.jit(tx.update)(stacked_updates(dtype), tx.init(None))
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(out))
    with x64():
        tx64 = imtl_jax.imtl_g(num_tasks=2, dtype=jnp.float64)
        out, st = jax.jit(tx64.update)({"a": jnp.asarray(J_BASE, jnp.float64)}, tx64.init(None))
        assert out["a"].dtype == jnp.float64
        np.testing.assert_allclose(out["a"], paper_alpha(J_BASE) @ J_BASE, rtol=1e-12)


def test_aggregator_bad_inputs():
    tx = imtl_jax.imtl_g(num_tasks=3)
    with pytest.raises(ValueError, match=r"T=3.*\(2, 3\)"):
        tx.update({"a": jnp.asarray(J_BASE)}, tx.init(None))
    with pytest.raises(ValueError, match="num_tasks"):
        imtl_jax.imtl_g(num_tasks=0)
    eq = imtl_jax.aggregate("equal", num_tasks=2)
    with pytest.raises(ValueError, match="losses"):
        eq.update({"a": jnp.asarray(J_BASE)}, eq.init(None))
    with pytest.raises(ValueError, match=r"losses.*\(2,\)"):
        eq.update({"a": jnp.asarray(J_BASE)}, eq.init(None), losses=jnp.ones(3))


def test_nnx_optimizer_with_aggregator():
    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3))

    model = Lin()
    opt = nnx.Optimizer(model, optax.chain(imtl_jax.imtl_g(num_tasks=2), optax.sgd(1.0)), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    grads["w"] = grads["w"].replace(jnp.asarray(J_BASE, jnp.float32))
    opt.update(model, grads)
    np.testing.assert_allclose(model.w[...], -(paper_alpha(J_BASE) @ J_BASE), rtol=1e-5)


class _Heads(nnx.Module):
    def __init__(self, num_tasks, features, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (num_tasks, features)))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.encoder = nnx.Sequential(nnx.Linear(3, 8, rngs=rngs), nnx.tanh)
        self.heads = _Heads(2, 8, rngs)
        self.loss_scales = LossScales(2)


def _head_loss(head_t, z, batch, t):  # head_t: task t's head module (its slice of the stack)
    return jnp.mean((z @ head_t.w[...] - batch["y"][:, t]) ** 2)


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_nnx_train_step_matches_functional_step_and_trains():
    model = _Model(nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 3)),
             "y": jax.random.normal(jax.random.key(2), (16, 2))}
    # Functional reference on the same parameters, with plain optax.
    lin = model.encoder.layers[0]
    w0, b0 = lin.kernel[...], lin.bias[...]
    heads0 = model.heads.w[...]

    def encoder(p, b):
        return jnp.tanh(b["x"] @ p["k"] + p["b"])

    def head_loss(w_t, z, b, t):
        return jnp.mean((z @ w_t - b["y"][:, t]) ** 2)

    ref_step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    params = imtl_jax.MTLParams({"k": w0, "b": b0}, heads0, jnp.zeros(2))
    grads, _, ref_aux = ref_step(params, (), batch)
    tx = optax.sgd(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    train_step = nnx.jit(make_train_step(_head_loss, "imtl_h"))
    _, aux = train_step(model, optimizer, batch, ())  # the default layout: encoder/heads/loss_scales
    np.testing.assert_allclose(aux.weights, ref_aux.weights, rtol=1e-5)
    np.testing.assert_allclose(model.encoder.layers[0].kernel[...], expected.shared["k"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.heads.w[...], expected.heads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.loss_scales.log_scales[...], expected.log_scales, rtol=1e-5, atol=1e-7)

    first = float(jnp.sum(aux.losses))
    for _ in range(60):
        _, aux = train_step(model, optimizer, batch, ())
    assert float(jnp.sum(aux.losses)) < first


# ------------------------------------------------------------------------------------------------
# IMTL-L


def test_scale_losses_gradient_and_optimum(dtype):
    losses = jnp.asarray([0.5, 2.0, 10.0], dtype)
    s = jnp.asarray([0.1, -0.3, 0.7], dtype)
    grad = jax.grad(lambda s_: jnp.sum(imtl_jax.scale_losses(losses, s_)))(s)
    np.testing.assert_allclose(grad, np.exp(np.asarray(s, np.float64)) * np.asarray(losses, np.float64) - 1,
                               rtol=1e-6)
    s_star = -jnp.log(losses)
    grad_star = jax.grad(lambda s_: jnp.sum(imtl_jax.scale_losses(losses, s_)))(s_star)
    np.testing.assert_allclose(grad_star, 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.exp(s_star) * losses, 1.0, rtol=1e-6)
    # L -> k L shifts the optimum by -log k
    k = 7.0
    s_star_k = -jnp.log(k * losses)
    np.testing.assert_allclose(s_star_k - s_star, -np.log(k), rtol=1e-5)
    grad_k = jax.grad(lambda s_: jnp.sum(imtl_jax.scale_losses(k * losses, s_)))(s_star_k)
    np.testing.assert_allclose(grad_k, 0.0, atol=1e-5)


def test_scale_losses_theta_gradient_at_optimum_is_grad_log_loss():
    """At s* the scaled loss's parameter gradient is grad log L (scale free)."""
    theta = jnp.asarray([0.3, -1.2])

    def loss(th):
        return jnp.sum((th - 2.0) ** 2) + 0.5

    s_star = -jnp.log(loss(theta))
    g = jax.grad(lambda th: imtl_jax.scale_losses(loss(th)[None], s_star[None])[0])(theta)
    np.testing.assert_allclose(g, jax.grad(lambda th: jnp.log(loss(th)))(theta), rtol=1e-6)


def test_scale_losses_bad_inputs():
    with pytest.raises(ValueError, match=r"losses.*\(3,\).*log_scales.*\(2,\)"):
        imtl_jax.scale_losses(jnp.ones(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="losses"):
        imtl_jax.scale_losses(jnp.ones((3, 1)), jnp.zeros(3))
    with pytest.raises(TypeError, match="log_scales"):
        imtl_jax.scale_losses(jnp.ones(3), jnp.zeros(3, jnp.int32))


# ------------------------------------------------------------------------------------------------
# NNX: BatchNorm + Dropout in training mode, any layout, heterogeneous heads, every method


class _Trunk(nnx.Module):
    def __init__(self, din, dz, *, rngs, dtype=jnp.float32):
        self.lin = nnx.Linear(din, dz, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.bn = nnx.BatchNorm(dz, momentum=0.8, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return self.drop(jnp.tanh(self.bn(self.lin(x))))


class _HeteroNet(nnx.Module):
    """User-named parts: `backbone` shared, `outs` heads of sizes 1, 3 and 2, `scales`."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.backbone = _Trunk(4, 6, rngs=rngs, dtype=dtype)
        self.outs = nnx.List([nnx.Linear(6, n, rngs=rngs, dtype=dtype, param_dtype=dtype) for n in (1, 3, 2)])
        self.scales = LossScales(3, dtype=dtype)


def _hetero_loss(head, z, batch, t):
    out = head(z)
    if t == 0:
        return jnp.mean((out[:, 0] - batch[1]["y"]) ** 2)
    labels = batch[1]["c3"] if t == 1 else batch[1]["c2"]
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()


def _hetero_batch(n=16, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(k[0], (n, 4), dtype)
    return (x, {"y": jax.random.normal(k[1], (n,), dtype), "c3": jax.random.randint(k[2], (n,), 0, 3),
                "c2": jax.random.randint(k[3], (n,), 0, 2)})


def _make_hetero_step(method, **kw):
    return make_train_step(_hetero_loss, method, shared="backbone", heads="outs", loss_scales="scales",
                           inputs=lambda b: b[0], **kw)


def _rng_count(model):
    return int(model.backbone.drop.rngs.count[...])


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_nnx_equal_reproduces_a_plain_nnx_training_step():
    """method="equal" == nnx.value_and_grad of the summed losses: params, batch stats, RNG, losses."""
    batch = _hetero_batch()
    ours, plain = _HeteroNet(nnx.Rngs(0, dropout=1)), _HeteroNet(nnx.Rngs(0, dropout=1))
    opt_ours = nnx.Optimizer(ours, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    opt_plain = nnx.Optimizer(plain, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    train_step = _make_hetero_step("equal")
    step = nnx.jit(train_step)

    @nnx.jit
    def plain_step(model, optimizer, batch):
        def loss_fn(model):
            z = model.backbone(batch[0])
            losses = jnp.stack([_hetero_loss(h, z, batch, t) for t, h in enumerate(model.outs)])
            return losses.sum(), losses
        (_, losses), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return losses

    state = train_step.init(ours)
    for _ in range(3):
        state, aux = step(ours, opt_ours, batch, state)
        losses = plain_step(plain, opt_plain, batch)
        np.testing.assert_allclose(aux.losses, losses, rtol=2e-6, atol=1e-7)
    assert _rng_count(ours) == _rng_count(plain) == 3
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(ours)), jax.tree_util.tree_leaves(nnx.state(plain)),
                    strict=True):
        if jnp.issubdtype(jnp.result_type(a), jnp.floating):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ours.backbone.bn.mean[...], plain.backbone.bn.mean[...], rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(ours.backbone.bn.mean[...]).max()) > 0  # the statistics did move


# nnx.BatchNorm keeps its statistics in float32 whatever param_dtype; its own in-place update of
# them with float64 batch statistics warns (flax, in the oracle's plain forward).
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.slow  # heavy oracle: CI's slow step
def test_nnx_imtl_h_shared_gradient_is_alpha_weighted_per_task_gradients_same_mask():
    with x64():
        dt = jnp.float64
        batch = _hetero_batch(dtype=dt)
        model = _HeteroNet(nnx.Rngs(3, dropout=4), dtype=dt)
        model.scales.log_scales[...] = jnp.asarray([0.2, -0.4, 0.7], dt)
        before = nnx.clone(model)
        s = np.asarray(model.scales.log_scales[...])
        rows, per_task = [], []
        for t in range(3):
            m = nnx.clone(before)  # the same RNG state: the same dropout mask in every task's pass
            z = m.backbone(batch[0])
            head = before.outs[t]
            gz = jax.grad(lambda z_, t=t, head=head: np.exp(s[t]) * _hetero_loss(head, z_, batch, t))(z)
            rows.append(np.asarray(gz).sum(axis=0))
            m = nnx.clone(before)

            def scaled(trunk, t=t, head=head):
                return np.exp(s[t]) * _hetero_loss(head, trunk(batch[0]), batch, t) - s[t]

            per_task.append(nnx.grad(scaled)(m.backbone))
        alpha = paper_alpha(np.stack(rows))
        want = jax.tree_util.tree_map(lambda *g: sum(a * x for a, x in zip(alpha, g)), *per_task)

        optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        train_step = _make_hetero_step("imtl_h")
        _, aux = nnx.jit(train_step)(model, optimizer, batch, train_step.init(model))
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9, atol=1e-12)
        got = jax.tree_util.tree_map(lambda b, a: b - a, nnx.state(before.backbone, nnx.Param),
                                     nnx.state(model.backbone, nnx.Param))  # sgd(1): -grad
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("method", slow_unless_core(imtl_jax.methods.method_names()))
def test_nnx_every_method_two_steps_one_compilation(method):
    batch = _hetero_batch()
    model = _HeteroNet(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    train_step = _make_hetero_step(method)
    traces = []

    @nnx.jit
    def step(model, optimizer, batch, state, key):
        traces.append(1)
        return train_step(model, optimizer, batch, state, key=key)

    state = train_step.init(model, batch)   # the batch: F for excess_mtl
    structure = jax.tree_util.tree_structure(state)
    for i in range(2):
        state, aux = step(model, optimizer, batch, state, jax.random.key(i))
        assert bool(aux.all_finite)
    assert len(traces) == 1
    assert jax.tree_util.tree_structure(state) == structure
    assert _rng_count(model) == 2
    init_leaves = jax.tree_util.tree_leaves(train_step.init(model, batch))
    if init_leaves:  # a stateful method's state is threaded through and moves
        assert any(not np.array_equal(a, b) for a, b in zip(init_leaves, jax.tree_util.tree_leaves(state)))


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_nnx_stacked_heads_tuple_of_attribute_names_and_priorities():
    class TwoHeads(nnx.Module):
        def __init__(self, rngs):
            self.encoder = _Trunk(4, 6, rngs=rngs)
            self.seg = nnx.Linear(6, 3, rngs=rngs)
            self.depth = nnx.Linear(6, 1, rngs=rngs)
            self.loss_scales = LossScales(2)

    def seg_loss(head, z, batch):
        return optax.softmax_cross_entropy_with_integer_labels(head(z), batch[1]["c3"]).mean()

    def depth_loss(head, z, batch):
        return jnp.mean((head(z)[:, 0] - batch[1]["y"]) ** 2)

    batch = _hetero_batch()
    model = TwoHeads(nnx.Rngs(0, dropout=1))
    reference = nnx.clone(model)
    train_step = make_train_step((seg_loss, depth_loss), "imtl_g", heads=("seg", "depth"),
                                 inputs=lambda b: b[0])
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    priorities = jnp.asarray([0.8, 0.2])
    _, aux = nnx.jit(train_step)(model, optimizer, batch, (), priorities=priorities)
    # The functional step on the same (cloned) model with the same priorities.
    enc_def, enc_p, enc_rest = nnx.split(reference.encoder, nnx.Param, ...)

    def encoder(p, rest, b, key):
        m = nnx.merge(enc_def, p, rest, copy=True)
        return m(b[0]), nnx.split(m, nnx.Param, ...)[2]

    heads = tuple(nnx.split(h, nnx.Param) for h in (reference.seg, reference.depth))
    step = imtl_jax.mtl_step(encoder, (lambda p, z, b: seg_loss(nnx.merge(heads[0][0], p), z, b),
                                       lambda p, z, b: depth_loss(nnx.merge(heads[1][0], p), z, b)),
                             "imtl_g", has_state=True)
    params = imtl_jax.MTLParams(enc_p, (heads[0][1], heads[1][1]), jnp.zeros(2))
    _, _, _, ref = step(params, (), batch, encoder_state=enc_rest, priorities=priorities)
    np.testing.assert_allclose(aux.weights, ref.weights, rtol=1e-5, atol=1e-6)
    _, _, _, no_prio = step(params, (), batch, encoder_state=enc_rest)
    assert not np.allclose(ref.weights, no_prio.weights)


def test_nnx_wrong_layouts_name_the_missing_piece():
    batch = _hetero_batch()
    model = _HeteroNet(nnx.Rngs(0, dropout=1))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"no attribute 'encoder'.*shared="):
        make_train_step(_hetero_loss, heads="outs", loss_scales="scales", inputs=lambda b: b[0]).init(model)
    with pytest.raises(ValueError, match=r"no attribute 'heads'"):
        make_train_step(_hetero_loss, shared="backbone", loss_scales="scales").init(model)
    with pytest.raises(ValueError, match=r"LossScales\(3\)"):
        make_train_step(_hetero_loss, "imtl_h", shared="backbone", heads="outs").init(model)
    with pytest.raises(ValueError, match="outside shared"):
        make_train_step(_hetero_loss, "equal", shared="backbone", heads="outs", loss_scales=None).init(model)
    with pytest.raises(TypeError, match="inputs="):
        make_train_step(_hetero_loss, "imtl_h", shared="backbone", heads="outs",
                        loss_scales="scales")(model, opt, batch, ())
    with pytest.raises(TypeError, match=r"train_step.init\(model\)"):
        _make_hetero_step("dwa")(model, opt, batch, ())

    class BadHeads(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(4, 6, rngs=rngs)
            self.heads = nnx.List([nnx.Sequential(nnx.Linear(6, 1, rngs=rngs), nnx.BatchNorm(1, rngs=rngs))])
    with pytest.raises(ValueError, match="Move BatchNorm/Dropout into"):
        make_train_step(_hetero_loss, "equal", loss_scales=None).init(BadHeads(nnx.Rngs(0)))

    class Unstacked(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(4, 6, rngs=rngs)
            self.heads = nnx.Linear(6, 3, rngs=rngs)  # one module but not stacked over tasks
    with pytest.raises(ValueError, match="tuple or nnx.List of head modules"):
        make_train_step(_hetero_loss, "equal", loss_scales=None).init(Unstacked(nnx.Rngs(0)))


# ------------------------------------------------------------------------------------------------
# aggregate(): loss scaling, chain order, the optax wrappers


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_aggregate_applies_the_loss_scaling_given_losses_and_log_scales():
    with x64():
        s = np.array([0.4, -0.7])
        losses = np.array([0.8, 2.5])
        params = {"a": jnp.zeros((1,)), "b": jnp.zeros((2, 1))}
        j = jnp.asarray(J_BASE)
        per_task = {"a": j[:, :1], "b": j[:, 1:].reshape(2, 2, 1)}
        # IMTL-H: IMTL-G on the gradients of e^s L - s, i.e. e^{s_t} g_t.
        scaled_j = np.exp(s)[:, None] * J_BASE
        want = paper_alpha(scaled_j) @ scaled_j
        tx = imtl_jax.aggregate("imtl_h", 2, dtype=jnp.float64)
        out, state = tx.update(per_task, tx.init(params), params, losses=jnp.asarray(losses),
                               log_scales=jnp.asarray(s))
        got = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
        np.testing.assert_allclose(got, want, rtol=1e-12)
        # Uncertainty weighting: e^{-s} L + s with equal weights: sum_t e^{-s_t} g_t.
        tx = imtl_jax.aggregate("uncertainty", 2, dtype=jnp.float64)
        out, _ = tx.update(per_task, tx.init(params), params, losses=jnp.asarray(losses), log_scales=jnp.asarray(s))
        got = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
        np.testing.assert_allclose(got, np.exp(-s) @ J_BASE, rtol=1e-12)
        for name in ("imtl_h", "imtl_l", "uncertainty"):
            tx = imtl_jax.aggregate(name, 2)
            with pytest.raises(ValueError, match="log_scales="):
                tx.update(per_task, tx.init(params), params, losses=jnp.ones(2))
            with pytest.raises(ValueError, match="losses= and log_scales="):
                tx.update(per_task, tx.init(params), params)


def test_aggregate_rejects_parameter_shaped_updates_and_optax_wrappers_are_replaced():
    params = {"w": jnp.zeros((2,))}  # T = 2 = the parameter's own size: the leading-axis check passes
    tx = optax.chain(optax.sgd(1.0), imtl_jax.aggregate("imtl_g", 2))
    with pytest.raises(ValueError, match="must come first in optax.chain"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    per_task = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}
    multi = optax.MultiSteps(optax.chain(imtl_jax.imtl_g(2), optax.sgd(1.0)), 2)
    with pytest.raises(ValueError, match="use imtl_jax.multi_steps"):  # its accumulators are param-shaped
        multi.update(per_task, multi.init(params), params)
    # What the docs recommend instead runs, under jit, and skips a non-finite step.
    safe = imtl_jax.safe_optimizer(optax.chain(imtl_jax.aggregate("imtl_h", 2), optax.adam(1e-2)))
    state = safe.init(params)
    upd, state = jax.jit(safe.update)(per_task, state, params, losses=jnp.ones(2), log_scales=jnp.zeros(2))
    assert bool(jnp.all(jnp.isfinite(upd["w"])))
    bad = {"w": per_task["w"].at[0, 0].set(jnp.nan)}
    upd, state = jax.jit(safe.update)(bad, state, params, losses=jnp.ones(2), log_scales=jnp.zeros(2))
    assert float(jnp.abs(upd["w"]).max()) == 0.0
    assert int(imtl_jax.skipped_steps(state)["total_notfinite"]) == 1
