"""The representation-level training step, against an independent per-task jax.grad loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
from oracles import paper_alpha, x64

T, B, DIN, F = 3, 6, 4, 5


def encoder(w, batch):
    return jnp.tanh(batch["x"] @ w["w1"] + w["b1"])


def head_loss(v_t, z, batch, t):
    pred = z @ v_t["w"] + v_t["b"]
    return jnp.mean((pred - batch["y"][:, t]) ** 2) + 0.1 * (t + 1)


def all_losses(heads, z, batch):
    return jnp.stack([head_loss(jax.tree_util.tree_map(lambda x, t=t: x[t], heads), z, batch, t)
                      for t in range(T)])


def make_problem(seed=0, dtype=jnp.float32, batch_size=B):
    k = jax.random.split(jax.random.key(seed), 6)
    shared = {"w1": jax.random.normal(k[0], (DIN, F), dtype), "b1": 0.1 * jax.random.normal(k[1], (F,), dtype)}
    heads = {"w": jax.random.normal(k[2], (T, F), dtype), "b": jax.random.normal(k[3], (T,), dtype)}
    log_scales = jnp.asarray([0.3, -0.5, 1.1], dtype)
    batch = {"x": jax.random.normal(k[4], (batch_size, DIN), dtype),
             "y": jax.random.normal(k[5], (batch_size, T), dtype)}
    return imtl_jax.MTLParams(shared, heads, log_scales), batch


def independent_reference(params, batch, *, scaled: bool):
    """Per-task gradients with plain jax.grad, one task at a time (the oracle)."""
    z = encoder(params.shared, batch)
    s = np.asarray(params.log_scales, np.float64)
    raw, z_grads, shared_grads, head_grads = [], [], [], []
    for t in range(T):
        head_t = jax.tree_util.tree_map(lambda x, t=t: x[t], params.heads)
        raw.append(float(head_loss(head_t, z, batch, t)))
        z_grads.append(np.asarray(jax.grad(lambda z_, h=head_t, t=t: head_loss(h, z_, batch, t))(z), np.float64))
        shared_grads.append(jax.grad(lambda sp, h=head_t, t=t: head_loss(h, encoder(sp, batch), batch, t))(
            params.shared))
        head_grads.append(jax.grad(lambda h, t=t: head_loss(h, z, batch, t))(head_t))
    factor = np.exp(s) if scaled else np.ones(T)
    g = np.stack([factor[t] * z_grads[t].sum(axis=0) for t in range(T)])  # batch-summed
    return dict(raw=np.array(raw), factor=factor, matrix=g, shared=shared_grads, heads=head_grads)


@pytest.mark.parametrize("form", ["stacked", "tuple", "generic"])
def test_imtl_h_wiring(form):
    with x64():
        params, batch = make_problem(dtype=jnp.float64)
        if form == "stacked":
            losses = imtl_jax.stacked_task_losses(head_loss)
        elif form == "tuple":
            losses = tuple((lambda h, z, b, t=t: head_loss(h, z, b, t)) for t in range(T))
            params = params._replace(heads=tuple(jax.tree_util.tree_map(lambda x, t=t: x[t], params.heads)
                                                 for t in range(T)))
        else:
            losses = all_losses
        step = imtl_jax.mtl_step(encoder, losses, "imtl_h")
        grads, _, aux = jax.jit(step)(params, step.init(params), batch)

        ref_params, _ = make_problem(dtype=jnp.float64)
        ref = independent_reference(ref_params, batch, scaled=True)
        alpha = paper_alpha(ref["matrix"])
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9)
        np.testing.assert_allclose(aux.losses, ref["raw"], rtol=1e-12)
        # shared: sum_t alpha_t e^{s_t} grad_theta L_t
        for name in ("w1", "b1"):
            expected = sum(alpha[t] * ref["factor"][t] * np.asarray(ref["shared"][t][name]) for t in range(T))
            np.testing.assert_allclose(grads.shared[name], expected, rtol=1e-9, atol=1e-12)
        # heads: e^{s_t} grad L_t, never alpha
        for t in range(T):
            got = grads.heads[t] if form == "tuple" else jax.tree_util.tree_map(lambda x, t=t: x[t], grads.heads)
            for name in ("w", "b"):
                np.testing.assert_allclose(got[name], ref["factor"][t] * np.asarray(ref["heads"][t][name]),
                                           rtol=1e-12, atol=1e-14)
        # scales: e^{s_t} L_t - 1
        np.testing.assert_allclose(grads.log_scales, ref["factor"] * ref["raw"] - 1, rtol=1e-12)
        np.testing.assert_allclose(aux.scales, ref["factor"], rtol=1e-14)
        assert bool(aux.all_finite)


@pytest.mark.parametrize("method", ["imtl_g", "imtl_l", "equal"])
def test_other_method_wiring(method):
    with x64():
        params, batch = make_problem(seed=1, dtype=jnp.float64)
        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
        grads, _, aux = jax.jit(step)(params, (), batch)
        ref = independent_reference(params, batch, scaled=(method == "imtl_l"))
        if method == "imtl_g":
            w = paper_alpha(ref["matrix"])
            np.testing.assert_allclose(aux.weights, w, rtol=1e-9)
            head_factor = np.ones(T)
        else:
            w = ref["factor"]  # gradient of sum_t (e^{s_t} L_t - s_t) or of sum_t L_t
            np.testing.assert_allclose(aux.weights, np.ones(T))
            head_factor = ref["factor"]
        for name in ("w1", "b1"):
            expected = sum(w[t] * np.asarray(ref["shared"][t][name]) for t in range(T))
            np.testing.assert_allclose(grads.shared[name], expected, rtol=1e-9, atol=1e-12)
        for t in range(T):
            np.testing.assert_allclose(grads.heads["w"][t], head_factor[t] * np.asarray(ref["heads"][t]["w"]),
                                       rtol=1e-12, atol=1e-14)
        if method == "imtl_l":
            np.testing.assert_allclose(grads.log_scales, ref["factor"] * ref["raw"] - 1, rtol=1e-12)
        else:
            np.testing.assert_array_equal(grads.log_scales, np.zeros(T))


def test_exact_level_matches_independent_parameter_gradients():
    with x64():
        params, batch = make_problem(seed=2, dtype=jnp.float64)
        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_g_exact")
        grads, _, aux = jax.jit(step)(params, (), batch)
        ref = independent_reference(params, batch, scaled=False)
        flat = np.stack([np.concatenate([np.ravel(ref["shared"][t][k]) for k in ("b1", "w1")]) for t in range(T)])
        alpha = paper_alpha(flat)
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9)
        expected = sum(alpha[t] * np.asarray(ref["shared"][t]["w1"]) for t in range(T))
        np.testing.assert_allclose(grads.shared["w1"], expected, rtol=1e-9, atol=1e-12)


def test_representation_equals_exact_direction_for_linear_encoder_single_example():
    """z = W x with one example: grad_W L_t = (dL_t/dz) x^T, so the cosines and alpha coincide."""
    with x64():
        def linear_encoder(w, batch):
            return batch["x"] @ w["w1"]

        params, batch = make_problem(seed=3, dtype=jnp.float64, batch_size=1)
        params = params._replace(shared={"w1": params.shared["w1"]})
        rep = imtl_jax.mtl_step(linear_encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_g")
        exact = imtl_jax.mtl_step(linear_encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_g_exact")
        g_rep, _, a_rep = jax.jit(rep)(params, (), batch)
        g_exact, _, a_exact = jax.jit(exact)(params, (), batch)
        np.testing.assert_allclose(a_rep.weights, a_exact.weights, rtol=1e-10)
        u = np.ravel(g_rep.shared["w1"])
        v = np.ravel(g_exact.shared["w1"])
        np.testing.assert_allclose(u @ v / np.linalg.norm(u) / np.linalg.norm(v), 1.0, atol=1e-12)


def test_sum_and_mean_reduction_give_same_alpha():
    params, batch = make_problem(seed=4)
    losses = imtl_jax.stacked_task_losses(head_loss)
    _, _, a_sum = jax.jit(imtl_jax.mtl_step(encoder, losses, reduction="sum"))(params, (), batch)
    _, _, a_mean = jax.jit(imtl_jax.mtl_step(encoder, losses, reduction="mean"))(params, (), batch)
    np.testing.assert_allclose(a_sum.weights, a_mean.weights, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        imtl_jax.mtl_step(encoder, losses, reduction="flatten")


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_forms_agree_and_jit_equals_eager():
    params, batch = make_problem(seed=5)
    stacked = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    generic = imtl_jax.mtl_step(encoder, all_losses)
    g1, _, a1 = stacked(params, (), batch)
    g2, _, a2 = jax.jit(generic)(params, (), batch)
    g3, _, a3 = jax.jit(stacked)(params, (), batch)
    for other, aux in ((g2, a2), (g3, a3)):
        np.testing.assert_allclose(aux.weights, a1.weights, rtol=1e-5, atol=1e-6)
        for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(other)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_one_compilation_for_two_steps_with_optax():
    params, batch = make_problem(seed=6)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    opt = optax.adam(1e-2)
    traces = []

    @jax.jit
    def train(params, opt_state, batch):
        traces.append(1)
        grads, _, aux = step(params, (), batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    opt_state = opt.init(params)
    params, opt_state, aux = train(params, opt_state, batch)
    params, opt_state, aux = train(params, opt_state, batch)
    assert len(traces) == 1


def test_training_lowers_every_loss_and_log_scales_move():
    params, batch = make_problem(seed=7, batch_size=32)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    opt = optax.adam(3e-2)
    opt_state = opt.init(params)

    @jax.jit
    def train(params, opt_state):
        grads, _, aux = step(params, (), batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    _, _, first = train(params, opt_state)
    for _ in range(150):
        params, opt_state, aux = train(params, opt_state)
    assert np.all(np.asarray(aux.losses) < np.asarray(first.losses))


def test_log_scales_reach_the_imtl_l_optimum_with_the_network_frozen():
    """Training only s (network frozen via optax.partition): s* = -log L, e^{s*} L = 1."""
    params, batch = make_problem(seed=9, batch_size=32)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    labels = imtl_jax.MTLParams(jax.tree_util.tree_map(lambda _: "frozen", params.shared),
                                jax.tree_util.tree_map(lambda _: "frozen", params.heads), "scales")
    tx = optax.partition({"frozen": optax.set_to_zero(), "scales": optax.adam(5e-2)}, labels)
    opt_state = tx.init(params)

    @jax.jit
    def train(params, opt_state):
        grads, _, aux = step(params, (), batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    for _ in range(400):
        params, opt_state, aux = train(params, opt_state)
    np.testing.assert_allclose(params.log_scales, -np.log(np.asarray(aux.losses)), atol=1e-3)


def test_partition_gives_log_scales_their_own_rule():
    params, batch = make_problem(seed=8)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
    labels = imtl_jax.MTLParams(
        shared=jax.tree_util.tree_map(lambda _: "net", params.shared),
        heads=jax.tree_util.tree_map(lambda _: "net", params.heads), log_scales="scales")
    tx = optax.partition({"net": optax.adamw(1e-2, weight_decay=1e-4), "scales": optax.sgd(0.5)}, labels)
    grads, _, _ = jax.jit(step)(params, (), batch)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates.log_scales, -0.5 * np.asarray(grads.log_scales), rtol=1e-6)


def test_bad_inputs_raise_at_trace_time_naming_arguments():
    params, batch = make_problem()
    losses = imtl_jax.stacked_task_losses(head_loss)
    step = imtl_jax.mtl_step(encoder, losses)
    bad = params._replace(log_scales=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"params.heads.*3 tasks.*log_scales.*\(2,\)"):
        jax.jit(step).lower(bad, (), batch)
    with pytest.raises(ValueError, match="log_scales"):
        jax.jit(step).lower(params._replace(log_scales=jnp.zeros((3, 1))), (), batch)
    with pytest.raises(TypeError, match="log_scales"):
        step(params._replace(log_scales=jnp.zeros(3, jnp.int32)), (), batch)
    generic = imtl_jax.mtl_step(encoder, lambda h, z, b: all_losses(h, z, b)[:2])
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        jax.jit(generic).lower(params, (), batch)
    tuple_step = imtl_jax.mtl_step(encoder, (lambda h, z, b: 0.0, lambda h, z, b: 0.0))
    with pytest.raises(ValueError, match="2 functions.*heads"):
        tuple_step(params._replace(heads=(1.0, 2.0, 3.0)), (), batch)
    with pytest.raises(ValueError, match="method"):
        imtl_jax.mtl_step(encoder, losses, "no_such_method")
    with pytest.raises(TypeError, match="MTLParams"):
        step((params.shared, params.heads, params.log_scales), (), batch)
    empty = {"x": jnp.zeros((0, DIN)), "y": jnp.zeros((0, T))}
    with pytest.raises(ValueError, match="batch"):
        jax.jit(step).lower(params, (), empty)
