"""The skip-step guarantee for the whole step (issue 14), for every registered method.

A non-finite step must leave parameters, optimizer state AND method state (PCGrad's counter,
DWA's loss history, FAMO's logits and moments, GradNorm's weights) exactly as they were, so
that ``good, BAD, good`` ends bit for bit where ``good, good`` ends. Two ways are tested:

* :func:`imtl_jax.skip_nonfinite` around the whole train step (exact, any carry);
* :func:`imtl_jax.safe_step` + :func:`imtl_jax.safe_optimizer` (optax's semantics).

Two kinds of bad batch: a NaN target (the loss is NaN) and a finite loss whose gradient is NaN
(``sqrt(q * mean(z^2))`` at ``q = 0``: value 0, derivative ``0 * inf``). The oracle is the run
that never sees the bad batch, and the unwrapped step shows that each check is not vacuous.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
from marks import slow_unless_core

T, B, DIN, F = 3, 8, 3, 4
METHODS = imtl_jax.methods.method_names()
STATEFUL = tuple(n for n in METHODS if jax.tree_util.tree_leaves(
    imtl_jax.methods.get_method(n).weighting.init_state(T, jnp.float32, dim=F)))


def encoder(w, batch):
    return jnp.tanh(batch["x"] @ w)


def head_loss(v_t, z, batch, t):
    # q_t = 1: a smooth extra term; q_t = 0: the term is 0 but its z-gradient is 0 * inf = NaN.
    return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2) + jnp.sqrt(batch["q"][t] * jnp.mean(z ** 2))


def make_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return imtl_jax.MTLParams(shared=0.5 * jax.random.normal(k1, (DIN, F)),
                              heads=jax.random.normal(k2, (T, F)), log_scales=jnp.zeros(T))


def good_batch(seed):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(kx, (B, DIN)), "y": jax.random.normal(ky, (B, T)),
            "q": jnp.ones(T)}


def bad_batch(kind, seed=99):
    batch = good_batch(seed)
    if kind == "nan_loss":
        return {**batch, "y": batch["y"].at[2, 1].set(jnp.nan)}
    if kind == "finite_loss_nan_grad":
        return {**batch, "q": batch["q"].at[0].set(0.0)}
    raise ValueError(kind)


KINDS = ("nan_loss", "finite_loss_nan_grad")


def bits(tree):
    """Structure plus (dtype, shape, bytes) of every leaf: equality is bitwise equality."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    return (jax.tree_util.tree_structure(tree), [(x.dtype.str, x.shape, x.tobytes()) for x in leaves])


@functools.lru_cache(maxsize=None)
def trainers(method):
    """(plain, wrapped, safe) jitted steps for ``method`` (compiled once each)."""
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    opt = optax.adam(1e-2)

    def train(carry, batch):
        params, opt_state, mstate = carry
        grads, mstate, aux = step(params, mstate, batch)  # key=None: PCGrad uses its counter
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, mstate), aux

    sstep = imtl_jax.safe_step(step)
    sopt = imtl_jax.safe_optimizer(optax.adam(1e-2), max_consecutive_errors=3)

    def safe_train(carry, batch):
        params, opt_state, mstate = carry
        grads, mstate, aux = sstep(params, mstate, batch)
        updates, opt_state = sopt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, mstate), aux

    params = make_params()
    carry0 = (params, opt.init(params), step.init(params, good_batch(0)))
    scarry0 = (params, sopt.init(params), sstep.init(params, good_batch(0)))
    return (jax.jit(train), jax.jit(imtl_jax.skip_nonfinite(train)), jax.jit(safe_train),
            carry0, scarry0)


def run(fn, carry, batches):
    for batch in batches:
        carry = fn(carry, batch)[0]
    return carry


@pytest.mark.parametrize("method", slow_unless_core(METHODS))
def test_skip_nonfinite_whole_step_every_method(method):
    plain, wrapped, _, carry0, _ = trainers(method)
    warm = run(plain, carry0, [good_batch(1)])
    for kind in KINDS:
        bad = bad_batch(kind)
        # Not vacuous: the plain step is non-finite here and changes the carry.
        new, aux = plain(warm, bad)
        assert not bool(aux.all_finite), kind
        if kind == "finite_loss_nan_grad":
            assert bool(jnp.all(jnp.isfinite(aux.losses)))
        assert bits(new) != bits(warm), kind

        out, _, finite = wrapped(warm, bad)
        assert not bool(finite)
        assert bits(out) == bits(warm), f"{method}, {kind}: the skipped step changed the carry"

    # good, BAD, BAD, good == good, good: the skipped batches leave no trace.
    with_bad = run(wrapped, carry0, [good_batch(1), bad_batch("nan_loss"),
                                     bad_batch("finite_loss_nan_grad"), good_batch(2)])
    without = run(plain, carry0, [good_batch(1), good_batch(2)])
    assert bits(with_bad) == bits(without)
    # and a finite step through the wrapper is the plain step, bit for bit
    assert bits(run(wrapped, carry0, [good_batch(1)])) == bits(warm)


# By default: IMTL-H (loss scales), FAMO (a stateful loss weighting) and GradVac (a stateful
# gradient method, EMA targets); every other method runs in CI's slow step.
@pytest.mark.parametrize("method", [m if m in ("imtl_h", "famo", "gradvac") else
                                    pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_safe_step_with_safe_optimizer_every_method(method):
    """(For a stateless method this is safe_optimizer + flag_nonfinite, also tested in
    test_safety.py.)"""
    plain, _, safe, _, scarry0 = trainers(method)
    warm = run(safe, scarry0, [good_batch(1)])
    params, opt_state, mstate = warm
    for kind in KINDS:
        (new_params, new_opt, new_mstate), aux = safe(warm, bad_batch(kind))
        assert not bool(aux.all_finite)
        assert bits(new_params) == bits(params)
        assert bits(new_opt.inner_state) == bits(opt_state.inner_state)
        assert bits(new_mstate) == bits(mstate)
        assert int(imtl_jax.skipped_steps(new_opt)["total_notfinite"]) == 1

    with_bad = run(safe, scarry0, [good_batch(1), bad_batch("nan_loss"),
                                   bad_batch("finite_loss_nan_grad"), good_batch(2)])
    without = run(safe, scarry0, [good_batch(1), good_batch(2)])
    assert bits(with_bad[0]) == bits(without[0])
    assert bits(with_bad[1].inner_state) == bits(without[1].inner_state)
    assert bits(with_bad[2]) == bits(without[2])
    assert int(imtl_jax.skipped_steps(with_bad[1])["total_notfinite"]) == 2


def test_the_hole_it_closes():
    """Without a wrapper the method state advances on a skipped step (safe_optimizer protects
    the optimizer state only): PCGrad's counter on a NaN step, DWA's history when the losses are
    finite but a gradient is not."""
    assert {"pcgrad", "dwa", "famo", "gradnorm"} <= set(STATEFUL)
    for method, kind in (("pcgrad", "nan_loss"), ("dwa", "finite_loss_nan_grad")):
        plain, wrapped, _, carry0, _ = trainers(method)
        new, aux = plain(carry0, bad_batch(kind))
        assert not bool(aux.all_finite)
        assert int(new[2].count) == 1 and int(carry0[2].count) == 0
        out, _, _ = wrapped(carry0, bad_batch(kind))
        assert int(out[2].count) == 0


def test_skip_nonfinite_checks_the_new_carry_and_keys():
    """A finite aux but an overflowing update: the new carry is checked too; PRNG keys and
    integer leaves are selected bit for bit; -0.0 survives a skipped step (it would not survive
    a zero update: -0.0 + 0.0 == +0.0)."""

    def train(carry, scale):
        w, key, n = carry
        key, sub = jax.random.split(key)
        return (w * scale + jax.random.normal(sub, w.shape) * 0, key, n + 1), {"all_finite": jnp.array(True)}

    carry = (jnp.array([-0.0, 1.0, 3e38], jnp.float32), jax.random.key(0), jnp.int32(5))
    out, _, finite = jax.jit(imtl_jax.skip_nonfinite(train))(carry, 10.0)
    assert not bool(finite)  # 3e39 overflows float32
    assert bits(jax.random.key_data(out[1])) == bits(jax.random.key_data(carry[1]))
    assert bits((out[0], out[2])) == bits((carry[0], carry[2]))
    assert np.signbit(np.asarray(out[0])[0])
    assert bits(np.asarray(carry[0]) + np.float32(0.0)) != bits(carry[0])  # why a select

    out, _, finite = jax.jit(imtl_jax.skip_nonfinite(train))(carry, 0.5)
    assert bool(finite) and int(out[2]) == 6
    assert bits(jax.random.key_data(out[1])) == bits(jax.random.key_data(jax.random.split(carry[1])[0]))

    unchecked = imtl_jax.skip_nonfinite(train, check_carry=False)
    out, _, finite = unchecked(carry, 10.0)
    assert bool(finite) and bool(jnp.isinf(out[0][2]))


def test_skip_nonfinite_errors():
    with pytest.raises(TypeError, match="`train_fn` must be callable"):
        imtl_jax.skip_nonfinite(3)
    carry = (jnp.zeros(2), jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match=r"carry leaf \[0\] changes from float32\[2\] to float32\[3\]"):
        imtl_jax.skip_nonfinite(lambda c: ((jnp.zeros(3), c[1]), None))(carry)
    with pytest.raises(ValueError, match=r"carry leaf \[1\] changes from int32\[\] to float32\[\]"):
        imtl_jax.skip_nonfinite(lambda c: ((c[0], jnp.zeros(())), None))(carry)
    with pytest.raises(ValueError, match="structure of its input carry"):
        imtl_jax.skip_nonfinite(lambda c: (c[0], None))(carry)
    with pytest.raises(ValueError, match=r"pair \(new_carry, aux\), got tuple of length 3"):
        imtl_jax.skip_nonfinite(lambda c: (c, None, None))(carry)
    with pytest.raises(ValueError, match=r"`aux.all_finite` must be a scalar bool, got float32\[\]"):
        imtl_jax.skip_nonfinite(lambda c: (c, {"all_finite": jnp.float32(1)}))(carry)
    with pytest.raises(TypeError, match="`step` must be a training step"):
        imtl_jax.safe_step(lambda p, s, b: None)


def test_safe_step_passes_through_the_step_interface():
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "pcgrad")
    sstep = imtl_jax.safe_step(step)
    assert sstep.method.name == "pcgrad" and "pcgrad" in repr(sstep)
    params = make_params()
    state = sstep.init(params)
    key = jax.random.key(3)
    g1, s1, a1 = jax.jit(step)(params, state, good_batch(4), key=key)  # jitted: eager PCGrad
    g2, s2, a2 = jax.jit(sstep)(params, state, good_batch(4), key=key)  # dispatches op by op
    assert bits((g1, s1, a1.weights)) == bits((g2, s2, a2.weights))
