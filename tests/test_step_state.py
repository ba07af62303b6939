"""The functional step with encoder state and a PRNG key (``mtl_step(..., has_state=True)``).

Oracles, written without the library: a hand-written BatchNorm + dropout encoder in plain JAX;
``jax.value_and_grad`` of the summed losses (equal weighting), and an independent per-task
``jax.grad`` loop with the same dropout mask plus the paper's Eq. 2 in float64 (IMTL-H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
from imtl_jax.methods import get_method, method_names
from oracles import paper_alpha, x64
from marks import CORE_METHODS, slow

T, B, DIN, F = 3, 8, 4, 6
RATE = 0.25


def encoder(p, stats, batch, key):
    """Dense -> BatchNorm (batch statistics, running averages) -> tanh -> dropout."""
    h = batch["x"] @ p["w"] + p["b"]
    mean, var = h.mean(axis=0), h.var(axis=0)
    h = jnp.tanh((h - mean) / jnp.sqrt(var + 1e-5) * p["gamma"] + p["beta"])
    keep = jax.random.bernoulli(key, 1.0 - RATE, h.shape)
    h = jnp.where(keep, h / (1.0 - RATE), 0.0)
    new_stats = {"mean": 0.9 * stats["mean"] + 0.1 * mean, "var": 0.9 * stats["var"] + 0.1 * var,
                 "count": stats["count"] + 1}
    return h, new_stats


def head_loss(v_t, z, batch, t):
    return jnp.mean((z @ v_t["w"] + v_t["b"] - batch["y"][:, t]) ** 2) + 0.1 * (t + 1)


def all_losses(heads, z, batch):
    return jnp.stack([head_loss(jax.tree_util.tree_map(lambda x, t=t: x[t], heads), z, batch, t)
                      for t in range(T)])


def make_problem(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 6)
    shared = {"w": jax.random.normal(k[0], (DIN, F), dtype), "b": jnp.zeros(F, dtype),
              "gamma": jnp.ones(F, dtype), "beta": 0.1 * jax.random.normal(k[1], (F,), dtype)}
    heads = {"w": jax.random.normal(k[2], (T, F), dtype), "b": jnp.zeros(T, dtype)}
    params = imtl_jax.MTLParams(shared, heads, jnp.asarray([0.3, -0.5, 1.1], dtype))
    batch = {"x": jax.random.normal(k[3], (B, DIN), dtype), "y": jax.random.normal(k[4], (B, T), dtype)}
    stats = {"mean": jnp.zeros(F, dtype), "var": jnp.ones(F, dtype), "count": jnp.zeros((), jnp.int32)}
    return params, batch, stats, k[5]


def _close(a, b, rtol, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_equal_reproduces_a_plain_training_step():
    params, batch, stats, key = make_problem()

    def plain_loss(shared, heads):  # the user's usual step: value_and_grad of the summed losses
        z, new_stats = encoder(shared, stats, batch, key)
        losses = all_losses(heads, z, batch)
        return losses.sum(), (losses, new_stats)

    (_, (losses, new_stats)), (g_shared, g_heads) = jax.value_and_grad(
        plain_loss, argnums=(0, 1), has_aux=True)(params.shared, params.heads)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "equal", has_state=True)
    grads, _, got_stats, aux = jax.jit(step)(params, (), batch, encoder_state=stats, key=key)
    _close(grads.shared, g_shared, 1e-5, 1e-6)
    _close(grads.heads, g_heads, 1e-5, 1e-6)
    _close(got_stats, new_stats, 1e-6, 1e-7)
    _close(aux.losses, losses, 1e-6, 1e-7)
    assert int(got_stats["count"]) == 1


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_imtl_h_matches_an_independent_per_task_loop_with_the_same_dropout_mask():
    with x64():
        params, batch, stats, key = make_problem(seed=1, dtype=jnp.float64)
        z, new_stats = encoder(params.shared, stats, batch, key)  # the same key: the same mask
        s = np.asarray(params.log_scales)
        rows, shared_grads, head_grads = [], [], []
        for t in range(T):
            head_t = jax.tree_util.tree_map(lambda x, t=t: x[t], params.heads)

            def scaled(shared, head, t=t):  # IMTL-L scaling e^s L - s, one task
                zz, _ = encoder(shared, stats, batch, key)
                return np.exp(s[t]) * head_loss(head, zz, batch, t) - s[t]

            gz = jax.grad(lambda z_, t=t, head_t=head_t: np.exp(s[t]) * head_loss(head_t, z_, batch, t))(z)
            rows.append(np.asarray(gz).sum(axis=0))
            shared_grads.append(jax.grad(scaled, argnums=0)(params.shared, head_t))
            head_grads.append(jax.grad(scaled, argnums=1)(params.shared, head_t))
        alpha = paper_alpha(np.stack(rows))
        want_shared = jax.tree_util.tree_map(lambda *g: sum(a * x for a, x in zip(alpha, g)), *shared_grads)
        want_heads = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *head_grads)

        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_h", has_state=True)
        grads, _, got_stats, aux = jax.jit(step)(params, (), batch, encoder_state=stats, key=key)
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9, atol=1e-12)
        _close(grads.shared, want_shared, 1e-9, 1e-12)
        _close(grads.heads, want_heads, 1e-9, 1e-12)
        _close(got_stats, new_stats, 1e-12, 0)


_FORMS = ([("stacked", m) if m in CORE_METHODS else slow("stacked", m) for m in method_names()]
          + [(f, m) if m == "imtl_h" else slow(f, m)
             for f in ("tuple", "generic") for m in ("equal", "imtl_h", "imtl_g_exact", "pcgrad")])


@pytest.mark.parametrize("form,method", _FORMS)
def test_state_advances_exactly_once_for_every_method_and_form(method, form):
    params, batch, stats, key = make_problem(seed=2)
    if form == "stacked":
        losses = imtl_jax.stacked_task_losses(head_loss)
    elif form == "tuple":
        losses = tuple((lambda h, z, b, t=t: head_loss(h, z, b, t)) for t in range(T))
        params = params._replace(heads=tuple(jax.tree_util.tree_map(lambda x, t=t: x[t], params.heads)
                                             for t in range(T)))
    else:
        losses = all_losses
    step = imtl_jax.mtl_step(encoder, losses, method, has_state=True)
    stats = dict(stats, count=jnp.asarray(41, jnp.int32))
    _, want = encoder(params.shared, stats, batch, key)
    state0 = step.init(params, batch, encoder_state=stats)   # the batch: F for excess_mtl
    grads, method_state, got, aux = jax.jit(step)(params, state0, batch, encoder_state=stats, key=key)
    assert int(got["count"]) == 42, "the encoder ran more than once (or not at all)"
    _close(got, want, 1e-6, 1e-7)
    assert bool(aux.all_finite)
    assert jax.tree_util.tree_structure(method_state) == jax.tree_util.tree_structure(state0)
    assert get_method(method).level in ("representation", "parameters")


@pytest.mark.slow  # heavy oracle: CI's slow step
def test_exact_level_with_state_matches_per_task_parameter_gradients():
    with x64():
        params, batch, stats, key = make_problem(seed=3, dtype=jnp.float64)
        rows, per_task = [], []
        for t in range(T):
            head_t = jax.tree_util.tree_map(lambda x, t=t: x[t], params.heads)
            g = jax.grad(lambda sp, t=t, h=head_t: head_loss(h, encoder(sp, stats, batch, key)[0], batch, t))(
                params.shared)
            per_task.append(g)
            rows.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
        alpha = paper_alpha(np.stack(rows))
        want = jax.tree_util.tree_map(lambda *g: sum(a * x for a, x in zip(alpha, g)), *per_task)
        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_g_exact",
                                 has_state=True)
        grads, _, got_stats, aux = step(params, (), batch, encoder_state=stats, key=key)
        np.testing.assert_allclose(aux.weights, alpha, rtol=1e-9, atol=1e-12)
        _close(grads.shared, want, 1e-9, 1e-12)
        assert int(got_stats["count"]) == 1


def test_method_key_is_derived_from_the_step_key():
    params, batch, stats, key = make_problem(seed=4)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "pcgrad", has_state=True)
    plain = imtl_jax.mtl_step(lambda sp, b: encoder(sp, stats, b, key)[0],
                              imtl_jax.stacked_task_losses(head_loss), "pcgrad")
    # jitted: eagerly, every op of PCGrad's projection loop would dispatch (and compile) alone
    g1, *_ = jax.jit(step)(params, step.init(params), batch, encoder_state=stats, key=key)
    g2, *_ = jax.jit(plain)(params, plain.init(params), batch, key=jax.random.fold_in(key, 1))
    _close(g1, g2, 1e-6, 1e-7)


def test_one_compilation_across_calls_with_optax():
    params, batch, stats, key = make_problem(seed=5)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_h", has_state=True)
    opt = optax.adam(1e-2)
    traces = []

    @jax.jit
    def train(params, opt_state, stats, batch, key):
        traces.append(1)
        grads, _, stats, aux = step(params, (), batch, encoder_state=stats, key=key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats, aux

    opt_state = opt.init(params)
    first = None
    for i in range(4):
        params, opt_state, stats, aux = train(params, opt_state, stats, batch, jax.random.fold_in(key, i))
        first = aux.losses if first is None else first
    assert len(traces) == 1
    assert int(stats["count"]) == 4
    assert float(aux.losses.sum()) < float(first.sum())


def test_stateful_form_errors_name_the_fix():
    params, batch, stats, key = make_problem(seed=6)
    losses = imtl_jax.stacked_task_losses(head_loss)
    step = imtl_jax.mtl_step(encoder, losses, has_state=True)
    with pytest.raises(TypeError, match="encoder_state="):
        step(params, (), batch, key=key)
    plain = imtl_jax.mtl_step(lambda sp, b: encoder(sp, stats, b, key)[0], losses)
    with pytest.raises(TypeError, match="has_state=True"):
        plain(params, (), batch, encoder_state=stats)
    bad = imtl_jax.mtl_step(lambda sp, st, b, k: encoder(sp, st, b, k)[0], losses, has_state=True)
    with pytest.raises(TypeError, match=r"pair \(z, new_encoder_state\)"):
        bad(params, (), batch, encoder_state=stats, key=key)
    with pytest.raises(TypeError, match="has_state"):
        imtl_jax.mtl_step(encoder, losses, has_state="yes")
