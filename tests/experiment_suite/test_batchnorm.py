"""BatchNorm in the experiments' conv encoders (issue 13 item 7): one step of the loop equals a
plain Flax NNX training step (``nnx.value_and_grad`` of the summed losses in training mode +
``optax.adam``): parameters and the running statistics, which advance exactly once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import suites
from experiments import losses as L
from experiments.data import BatchIterator
from experiments.options import Options
from experiments.program import Program, stack
from experiments.runs import RunConfig


@pytest.fixture(scope="module")
def bench():
    with suites.build("cityscapes", Options(benchmark="cityscapes", tiny=True)) as b:
        yield b


def test_default_norm_is_batchnorm_and_state_is_threaded(bench):
    pure = bench.pure_model(bench.make_model(0))
    assert bench.fingerprint["norm"] == "batch" and pure.has_state
    assert jax.tree_util.tree_leaves(pure.encoder_state0)


@pytest.mark.slow  # compiles the U-Net twice (loop and NNX): ~10 s on an idle 2-core CPU
def test_one_loop_step_equals_a_plain_nnx_step(bench):
    lr = 1e-2
    prog = Program(bench, "equal", RunConfig(steps=1, batch_size=2, lr=lr), with_priorities=False)
    state0 = prog.init_state(0)
    batch = BatchIterator(bench.train, 2, seed=0).batch_at(0)
    keys = jnp.asarray(np.asarray(jax.random.key_data(jax.random.key(0)))[None])
    new, _, ok = prog.train_step(stack([state0]), stack([batch]), keys, jnp.asarray(0, jnp.uint32),
                                 jnp.asarray([lr], jnp.float32), None, jnp.asarray([True]))
    assert bool(ok[0])

    # the oracle: the NNX model itself, in training mode
    model = bench.make_model(0)
    model.train()
    tasks = bench.task_names

    def loss_fn(m):
        preds = m.heads(m.encoder(jnp.asarray(batch["image"])))
        return jnp.sum(L.dense_losses(preds, {k: jnp.asarray(v) for k, v in batch.items()}, tasks))

    grads = nnx.grad(loss_fn)(model)  # updates the BatchNorm statistics once, in place
    enc_params = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
    enc_grads = nnx.to_pure_dict(grads["encoder"])
    opt = optax.adam(lr)
    upd, _ = opt.update(enc_grads, opt.init(enc_params), enc_params)
    want_params = optax.apply_updates(enc_params, upd)
    want_stats = nnx.to_pure_dict(nnx.split(model.encoder, nnx.Param, ...)[2])

    got_params = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), new["params"].shared)
    got_stats = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), new["encoder_state"])
    for g, w in zip(jax.tree_util.tree_leaves(got_stats), jax.tree_util.tree_leaves(want_stats)):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(want_params)):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-6)
    # the statistics moved (the check is not vacuous) and evaluation uses them
    s0 = jax.tree_util.tree_leaves(state0["encoder_state"])
    assert any(not np.allclose(a, b) for a, b in zip(s0, jax.tree_util.tree_leaves(got_stats)))


def test_excess_mtl_state_gets_F_from_an_example_batch_and_is_stable(bench):
    """The runner makes excess_mtl's (T, F) state from an example training batch (F = the U-Net
    feature's size per example, whatever the batch size) without touching the BatchNorm state, and
    makes the same state every time (the resume template); at the parameter level F is the shared
    parameters' count."""
    import math
    prog = Program(bench, "excess_mtl", RunConfig(steps=1, batch_size=2, lr=1e-2), with_priorities=False)
    first, again = prog.init_state(0), prog.init_state(0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
    pure = bench.pure_model(bench.make_model(0))
    batch = BatchIterator(bench.train, 3, seed=1).batch_at(0)
    z, _ = jax.eval_shape(lambda: pure.encoder(pure.params0.shared, pure.encoder_state0, batch, jax.random.key(0)))
    root = first["method_state"].root_sum
    assert root.shape == (bench.num_tasks, math.prod(z.shape[1:]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
                           first["encoder_state"], pure.encoder_state0)
    exact = Program(bench, "excess_mtl@params", RunConfig(steps=1, batch_size=2, lr=1e-2), with_priorities=False)
    size = sum(x.size for x in jax.tree_util.tree_leaves(pure.params0.shared))
    assert exact.init_state(0)["method_state"].root_sum.shape == (bench.num_tasks, size)
