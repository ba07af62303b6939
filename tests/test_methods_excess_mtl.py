"""ExcessMTL (He et al., ICML 2024; registered as ``excess_mtl``, its state is (T, F):
``needs_dim``) against a NumPy float64 recurrence written from the paper's equations over recorded
sequences, with warm-up, zero gradients, partial labels (the sub-problem with the present tasks'
state), F given by every caller that makes method state, and in the training step at both levels,
accumulation, Linen and the optax aggregator. The registry-wide tests (tests/test_methods_registry.py,
test_task_mask.py, test_skip_step.py, test_step_state.py, test_optax_nnx.py) cover it in the slow
step. TorchJD 0.18 agreement: tests/test_torchjd_agreement.py (slow step)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

import imtl_jax
from imtl_jax import Method
from imtl_jax.methods import get_method
from imtl_jax.methods.excess_mtl import excess_mtl_weighting

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def excess_mtl_numpy(seq, step_size, warmup_steps):
    """The paper's recurrence in float64, T tasks from alpha = 1/T: S += g^2 (Eq. 7);
    E = sum_j g_j^2 / sqrt(S_j) (Eq. 6, 0/0 = 0); during the warm-up alpha stays and E is summed;
    at the first step after it the baseline E^0 is the warm-up mean (or that step's E without
    warm-up); alpha <- alpha exp(eta E / E^0) / sum (Eq. 9). Returns the weights of each step."""
    num_tasks, dim = seq[0].shape
    s = np.zeros((num_tasks, dim))
    alpha = np.full(num_tasks, 1.0 / num_tasks)
    warm_sum = np.zeros(num_tasks)
    base = None
    out = []
    for k, g in enumerate(seq):
        s = s + g * g
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(s > 0, g * g / np.sqrt(s), 0.0)
        e = terms.sum(axis=1)
        if k < warmup_steps:
            warm_sum += e
        else:
            if base is None:
                base = warm_sum / warmup_steps if warmup_steps else e
            a = alpha * np.exp(step_size * e / base)
            alpha = a / a.sum()
        out.append(alpha.copy())
    return out


def _recorded(seed, num_tasks=4, dim=6, steps=6):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-1, 1, (num_tasks, 1))
    # a loss landscape being descended: the gradients shrink at task-dependent rates
    rates = rng.uniform(0.5, 0.95, (num_tasks, 1))
    return [base * rates ** k + 0.2 * np.abs(base) * rng.standard_normal(base.shape) for k in range(steps)]


def _run(weighting, seq, dtype, masks=None):
    weigh = jit(lambda g, s, m: weighting.weigh(g, jnp.zeros(g.shape[0], g.dtype), s, None, None,
                                                **({} if m is None else {"task_mask": m})))
    state = weighting.init_state(seq[0].shape[0], dtype, dim=seq[0].shape[1])
    outs = []
    for i, g in enumerate(seq):
        out = weigh(jnp.asarray(g, dtype), state, None if masks is None else jnp.asarray(masks[i]))
        state = out.state
        outs.append(out)
    return outs


@pytest.mark.parametrize("warmup_steps,step_size,registered", [
    (0, 1.0, True), pytest.param(0, 1.0, False, marks=pytest.mark.slow),
    pytest.param(2, 0.5, False, marks=pytest.mark.slow), pytest.param(0, 3.0, True, marks=pytest.mark.slow)])
def test_excess_mtl_matches_the_paper_over_steps(fdtype, warmup_steps, step_size, registered):
    """The registered weighting (F from init_state's dim) and the factory for one F (dim=6)."""
    seq = [np.asarray(np.asarray(g, fdtype), np.float64) for g in _recorded(warmup_steps)]
    if registered and (warmup_steps, step_size) == (0, 1.0):
        weighting = get_method("excess_mtl").weighting
    elif registered:
        weighting = excess_mtl_weighting(step_size=step_size, warmup_steps=warmup_steps)
    else:
        weighting = excess_mtl_weighting(6, step_size=step_size, warmup_steps=warmup_steps)
    assert weighting.needs_dim == registered
    outs = _run(weighting, seq, fdtype)
    want = excess_mtl_numpy(seq, step_size, warmup_steps)
    tol = 1e-12 if fdtype == np.float64 else 2e-6
    for k, (out, w) in enumerate(zip(outs, want)):
        assert out.weights.dtype == fdtype
        np.testing.assert_allclose(np.asarray(out.weights, np.float64), w, rtol=tol, err_msg=f"step {k}")
        assert bool(np.all(np.asarray(out.info["warm_up"]))) == (k < warmup_steps)
    np.testing.assert_allclose(float(jnp.sum(outs[-1].weights)), 1.0, rtol=tol)
    assert outs[-1].state.root_sum.shape == (4, 6) and np.all(np.asarray(outs[-1].state.count) == 6)


def test_arguments_are_validated():
    for kwargs in ({"dim": 0}, {"dim": 2.5}, {"dim": 3, "step_size": 0.0}, {"dim": 3, "warmup_steps": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs)) if len(kwargs) == 1 else list(kwargs)[1]):
            excess_mtl_weighting(**kwargs)
    w = excess_mtl_weighting(3)
    with pytest.raises(ValueError, match="dim=3"):
        w.weigh(jnp.ones((2, 4)), jnp.zeros(2), w.init(2), None, None)
    with pytest.raises(ValueError, match="state"):
        w.weigh(jnp.ones((2, 3)), jnp.zeros(2), excess_mtl_weighting(4).init(2), None, None)
    with pytest.raises(ValueError, match="priorities"):
        w.weigh(jnp.ones((2, 3)), jnp.zeros(2), w.init(2), None, jnp.ones(2))
    # The registered weighting: F comes from init_state's dim, and must match the gradients'.
    reg = get_method("excess_mtl").weighting
    assert reg.needs_dim and not w.needs_dim
    for bad in (None, 0, 2.5, True):
        with pytest.raises(ValueError, match="dim"):
            reg.init_state(2, jnp.float32, dim=bad)
    with pytest.raises(ValueError, match=r"another gradient size.*dim=4"):
        reg.weigh(jnp.ones((2, 4)), jnp.zeros(2), reg.init_state(2, jnp.float32, dim=3), None, None)
    with pytest.raises(ValueError, match="state"):
        reg.weigh(jnp.ones((2, 3)), jnp.zeros(2), reg.init_state(3, jnp.float32, dim=3), None, None)
    assert w.init_state(2, jnp.float32, dim=99).root_sum.shape == (2, 3)   # a fixed F ignores dim


def test_every_caller_gives_init_the_gradient_width():
    """F reaches the state wherever method state is made (abstractly: jax.eval_shape, no step):
    mtl_step at both levels (an example batch, encoder_state with has_state, or feature_dim=),
    accumulate_step, safe_step, with_affinity, cr_mogm, aggregate() and the NNX helper; without
    F the error names the fixes."""
    from imtl_jax.methods.cr_mogm import cr_mogm_weighting
    params, batch = _problem()                  # z = tanh(x @ w): F = 4; 12 shared parameters

    def encoder(w, b):
        return jnp.tanh(b["x"] @ w)

    def head_loss(v, z, b, t):
        return jnp.mean((z @ v - b["y"][:, t]) ** 2)

    losses = imtl_jax.stacked_task_losses(head_loss)
    method = get_method("excess_mtl")
    step = imtl_jax.mtl_step(encoder, losses, method)
    with pytest.raises(ValueError, match=r"step\.init\(params, batch\).*feature_dim=F"):
        step.init(params)
    for state in (step.init(params, batch), step.init(params, feature_dim=4),
                  step.init(params, batch, feature_dim=4),
                  imtl_jax.accumulate_step(step, 4).init(params, batch),
                  imtl_jax.safe_step(step).init(params, batch)):
        assert state.root_sum.shape == (2, 4)
    with pytest.raises(ValueError, match="feature_dim=5.*F = 4"):
        step.init(params, batch, feature_dim=5)
    exact = imtl_jax.mtl_step(encoder, losses, method._replace(level="parameters"))
    assert exact.init(params).root_sum.shape == (2, 12)
    with pytest.raises(ValueError, match="parameter level"):
        exact.init(params, feature_dim=4)
    # An encoder with state (has_state=True): the batch and the encoder's state.
    stateful = imtl_jax.mtl_step(lambda w, st, b, k: (encoder(w, b), st), losses, method, has_state=True)
    with pytest.raises(TypeError, match="encoder_state"):
        stateful.init(params, batch)
    assert stateful.init(params, batch, encoder_state=()).root_sum.shape == (2, 4)
    tracked = imtl_jax.mtl_step(encoder, losses, imtl_jax.with_affinity(method))
    assert tracked.init(params, batch).inner.root_sum.shape == (2, 4)
    smoothed = imtl_jax.mtl_step(encoder, losses, Method("cr_excess", method.scaling,
                                                         cr_mogm_weighting("excess_mtl")))
    assert smoothed.init(params, batch).inner.root_sum.shape == (2, 4)
    # Methods without per-coordinate state ignore the batch.
    assert imtl_jax.mtl_step(encoder, losses, "famo").init(params, batch).logits.shape == (2,)
    # aggregate(): F is the parameters' size.
    tx = imtl_jax.aggregate("excess_mtl", 2)
    assert tx.init({"a": jnp.zeros((3, 2)), "b": jnp.zeros(5)}).method_state.root_sum.shape == (2, 11)
    with pytest.raises(ValueError, match=r"tx\.init\(params\)"):
        tx.init(None)
    # NNX: the shared module's output size (representation) or parameter count.
    from flax import nnx
    from imtl_jax.nnx import make_train_step

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Sequential(nnx.Linear(3, 6, rngs=rngs), nnx.Dropout(0.5, rngs=rngs))
            self.heads = nnx.List([nnx.Linear(6, 1, rngs=rngs) for _ in range(2)])

    def loss(head, z, b, t):
        return jnp.mean((head(z)[:, 0] - b["y"][:, t]) ** 2)

    model = Net(nnx.Rngs(0, dropout=1))
    train_step = make_train_step(loss, "excess_mtl", loss_scales=None)
    with pytest.raises(ValueError, match=r"train_step\.init\(model, batch\).*feature_dim=F"):
        train_step.init(model)
    assert train_step.init(model, batch).root_sum.shape == (2, 6)
    assert train_step.init(model, feature_dim=6).root_sum.shape == (2, 6)
    exact_step = make_train_step(loss, method._replace(level="parameters"), loss_scales=None)
    assert exact_step.init(model).root_sum.shape == (2, 3 * 6 + 6)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"F = 6.*train_step\.init\(model, batch\)"):
        jax.eval_shape(lambda: train_step(model, optimizer, batch, train_step.init(model, feature_dim=5)))


@pytest.mark.slow
def test_zero_gradients_and_non_finite_steps():
    """A task whose first gradient is 0 gets its baseline at its first nonzero step (normalised
    excess 0 until then, finite weights); a coordinate with no history contributes 0; a NaN step
    gives NaN weights and leaves the state as it was."""
    rng = np.random.default_rng(1)
    seq = [rng.standard_normal((3, 5)) for _ in range(4)]
    seq[0][1] = 0.0
    seq[1][1] = 0.0
    with x64():
        outs = _run(excess_mtl_weighting(5), seq, jnp.float64)
    base = [float(o.state.baseline[1]) for o in outs]
    assert base[0] == base[1] == 0.0 and base[2] > 0.0 and base[3] == base[2]
    assert [float(o.info["normalized_excess_risk"][1]) for o in outs[:3]] == [0.0, 0.0, 1.0]
    for o in outs:
        assert np.all(np.isfinite(np.asarray(o.weights)))
    w = excess_mtl_weighting(5)
    state = outs[-1].state
    bad = w.weigh(jnp.asarray(seq[0], jnp.float32).at[0, 0].set(jnp.nan), jnp.zeros(3),
                  jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, state),
                  None, None)
    assert np.all(np.isnan(np.asarray(bad.weights)))
    for new, old in zip(jax.tree_util.tree_leaves(bad.state), jax.tree_util.tree_leaves(state)):
        np.testing.assert_allclose(np.asarray(new, np.float64), np.asarray(old, np.float64), rtol=1e-7)


@pytest.mark.slow
def test_masked_steps_equal_the_present_task_steps():
    """Every mask at T = 4 after two unmasked steps (and a second masked step), jitted once: the
    present tasks' weights and state are the sub-problem's (restricted state; NaN rows of absent
    tasks ignored), the absent tasks' state entries unchanged bit for bit."""
    seq = _recorded(3, steps=4)
    w = excess_mtl_weighting(6, step_size=2.0)
    with x64():
        warm = _run(w, seq[:2], jnp.float64)[-1].state
        traces = []

        def masked(g, s, m):
            traces.append(1)
            return w.weigh(g, jnp.zeros(4), s, None, None, task_mask=m)

        run = jit(masked)
        for mask in itertools.product([False, True], repeat=4):
            mask = np.array(mask)
            if not mask.any():
                continue
            idx = np.flatnonzero(mask)
            state = warm
            sub_state = jax.tree_util.tree_map(lambda x, i=idx: x[i], warm)
            for g in seq[2:]:
                garbage = np.where(mask[:, None], g, np.nan)
                out = run(jnp.asarray(garbage), state, jnp.asarray(mask))
                sub = w.weigh(jnp.asarray(g[idx]), jnp.zeros(len(idx)), sub_state, None, None)
                np.testing.assert_allclose(np.asarray(out.weights)[idx], sub.weights, rtol=1e-12, err_msg=str(mask))
                np.testing.assert_array_equal(np.asarray(out.weights)[~mask], 0.0)
                for new, old, s in zip(jax.tree_util.tree_leaves(out.state), jax.tree_util.tree_leaves(state),
                                       jax.tree_util.tree_leaves(sub.state)):
                    np.testing.assert_allclose(np.asarray(new)[idx], s, rtol=1e-12, atol=1e-300)
                    np.testing.assert_array_equal(np.asarray(new)[~mask], np.asarray(old)[~mask])
                state, sub_state = out.state, sub.state
        assert len(traces) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [False, True])
def test_masked_parameter_level_step_equals_the_present_task_step(fixed):
    """The registry's masked-step property (tests/test_task_mask.py, which runs the registered
    method at the representation level) at the parameter level (F = 15 shared parameters), for
    the registered weighting and the factory built for that F: all 15 masks, jitted once."""
    from test_task_mask import MASKS, _check_step_property
    weighting = excess_mtl_weighting(15) if fixed else get_method("excess_mtl").weighting
    _check_step_property(Method("excess_mtl", get_method("equal").scaling, weighting, level="parameters"), MASKS)


def _problem():
    k = jax.random.split(jax.random.key(42), 5)
    x = jax.random.normal(k[0], (32, 3))
    y = jnp.tanh(x @ jax.random.normal(k[1], (3, 4))) @ jax.random.normal(k[2], (2, 4)).T * jnp.array([1.0, 10.0])
    params = imtl_jax.MTLParams(shared=0.5 * jax.random.normal(k[3], (3, 4)),
                                heads=0.5 * jax.random.normal(k[4], (2, 4)), log_scales=jnp.zeros(2))
    return params, {"x": x, "y": y}


@pytest.mark.slow
@pytest.mark.parametrize("level", ["representation", "parameters"])
def test_trains_through_the_step_and_the_aggregator(level):
    """mtl_step at both levels (F = 4 features / 12 shared parameters) with Adam, one compile,
    the losses go down; heads get alpha_t grad L_t; and the optax aggregator over stacked updates."""
    params, batch = _problem()

    def encoder(w, b):
        return jnp.tanh(b["x"] @ w)

    def head_loss(v, z, b, t):
        return jnp.mean((z @ v - b["y"][:, t]) ** 2)

    method = get_method("excess_mtl")._replace(level=level)
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    opt = optax.adam(2e-2)
    traces = []

    @jit
    def train(p, o, s):
        traces.append(1)
        grads, s, aux = step(p, s, batch)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, s, aux, grads

    def losses(p):
        z = encoder(p.shared, batch)
        return jnp.stack([head_loss(p.heads[t], z, batch, t) for t in range(2)])

    before = losses(params)
    p, o, s = params, opt.init(params), step.init(params, batch)
    assert s.root_sum.shape == (2, 4 if level == "representation" else 12)
    for i in range(40):
        p_old = p
        p, o, s, aux, grads = train(p, o, s)
        if i == 3:
            z = encoder(p_old.shared, batch)
            for t in range(2):
                direct = jax.grad(lambda v, z=z, t=t: head_loss(v, z, batch, t))(p_old.heads[t])
                np.testing.assert_allclose(grads.heads[t], aux.weights[t] * direct, rtol=2e-5, atol=1e-7)
    assert len(traces) == 1 and bool(aux.all_finite)
    assert float(jnp.sum(losses(p))) < 0.9 * float(jnp.sum(before))   # the registry's bar
    np.testing.assert_allclose(float(jnp.sum(aux.weights)), 1.0, rtol=1e-6)

    tx = optax.chain(imtl_jax.aggregate("excess_mtl", num_tasks=2), optax.sgd(5e-2))
    flat = {"w": params.shared}

    def task_losses(q):
        z = encoder(q["w"], batch)
        return jnp.stack([head_loss(params.heads[t], z, batch, t) for t in range(2)])

    state = tx.init(flat)
    start = float(jnp.sum(task_losses(flat)))
    update = jit(lambda q, st: tx.update(jax.jacrev(task_losses)(q), st, q, losses=task_losses(q)))
    for _ in range(30):
        updates, state = update(flat, state)
        flat = optax.apply_updates(flat, updates)
    assert float(jnp.sum(task_losses(flat))) < start


@pytest.mark.slow
def test_linen_encoder_with_batch_statistics():
    """A Flax Linen encoder with BatchNorm (imtl_jax.linen.encoder, has_state=True): init gets F
    from the batch and the encoder's state, two jitted steps compile once and move the state."""
    import flax.linen as nn
    import imtl_jax.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x)))

    params, batch = _problem()
    net = Net()
    variables = net.init(jax.random.key(0), batch["x"], train=False)
    enc_state = {"batch_stats": variables["batch_stats"]}
    params = params._replace(shared=variables["params"], heads=0.5 * jax.random.normal(jax.random.key(1), (2, 6)))

    def head_loss(v, z, b, t):
        return jnp.mean((z @ v - b["y"][:, t]) ** 2)

    step = imtl_jax.mtl_step(imtl_jax.linen.encoder(net, train=True), imtl_jax.stacked_task_losses(head_loss),
                             "excess_mtl", has_state=True)
    state = step.init(params, batch, encoder_state=enc_state)
    assert state.root_sum.shape == (2, 6)
    traces = []

    @jit
    def run(s, st, b):
        traces.append(1)
        return step(params, s, b, encoder_state=st)

    for i in range(2):
        _, state, enc_state, aux = run(state, enc_state, jax.tree_util.tree_map(lambda x, i=i: x * (1 + i), batch))
        assert bool(aux.all_finite)
    assert len(traces) == 1 and np.all(np.asarray(state.count) == 2)
    assert np.any(np.asarray(state.root_sum) > 0)


def _step_parts():
    def encoder(w, b):
        return jnp.tanh(b["x"] @ w)

    def head_loss(v, z, b, t):
        return jnp.mean((z @ v - b["y"][:, t]) ** 2)

    return encoder, imtl_jax.stacked_task_losses(head_loss)


def test_init_traces_the_encoder_abstractly_and_binds_the_data_parallel_axis():
    """step.init(params, batch) runs nothing (a debug callback in the encoder never fires) and
    changes nothing; an encoder with collectives over axis_name (a synchronized BatchNorm) is
    traced with the axis bound; one device's batch, the global batch and a micro-batch give the
    same F (it excludes the batch axis), and the state serves the shard_map step; an error raised
    by the encoder's trace carries a note naming feature_dim=."""
    import flax.linen as nn
    import imtl_jax.linen
    from jax.sharding import Mesh, PartitionSpec as P

    params, batch = _problem()
    encoder, losses = _step_parts()
    calls = []

    def watched(w, b):
        z = encoder(w, b)
        jax.debug.callback(lambda: calls.append(1))
        return z - jax.lax.pmean(jnp.mean(z, axis=0), "data")   # a collective over axis_name

    step = imtl_jax.mtl_step(watched, losses, "excess_mtl", axis_name="data")
    shapes = {step.init(params, jax.tree_util.tree_map(lambda x, n=n: x[:n], batch)).root_sum.shape
              for n in (1, 8, 32)}
    assert shapes == {(2, 4)} and calls == []
    assert imtl_jax.accumulate_step(step, 4).init(params, batch).root_sum.shape == (2, 4)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = jax.jit(jax.shard_map(lambda p, s, b: step(p, s, b)[1], mesh=mesh,
                                    in_specs=(P(), P(), P("data")), out_specs=P()))
    state = sharded(params, step.init(params, batch), batch)
    assert state.root_sum.shape == (2, 4) and np.all(np.asarray(state.count) == 1)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.BatchNorm(use_running_average=not train, axis_name="data")(nn.Dense(6)(x))

    variables = Net().init(jax.random.key(0), batch["x"], train=False)
    enc_state = {"batch_stats": variables["batch_stats"]}
    before = jax.tree_util.tree_map(np.array, enc_state)
    bn_step = imtl_jax.mtl_step(imtl_jax.linen.encoder(Net(), train=True), losses, "excess_mtl",
                                has_state=True, axis_name="data")
    params6 = params._replace(shared=variables["params"], heads=jnp.ones((2, 6)))
    assert bn_step.init(params6, batch, encoder_state=enc_state).root_sum.shape == (2, 6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, enc_state, before)
    # An encoder whose trace fails (here a collective over an axis the step does not bind).
    other = imtl_jax.mtl_step(lambda w, b: jax.lax.pmean(encoder(w, b), "model"), losses, "excess_mtl")
    with pytest.raises(NameError) as info:
        other.init(params, batch)
    if hasattr(info.value, "__notes__"):  # Python >= 3.11
        assert "step.init(params, feature_dim=F)" in "".join(info.value.__notes__)
    assert other.init(params, feature_dim=4).root_sum.shape == (2, 4)


def test_nnx_init_leaves_the_model_as_it_was():
    """train_step.init(model, batch) runs the shared module (BatchNorm in training mode, Dropout)
    abstractly on a copy: parameters, batch statistics and RNG counts stay bit for bit."""
    from flax import nnx
    from imtl_jax.nnx import make_train_step

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Sequential(nnx.Linear(3, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs),
                                          nnx.Dropout(0.5, rngs=rngs))
            self.heads = nnx.List([nnx.Linear(6, 1, rngs=rngs) for _ in range(2)])

    def loss(head, z, b, t):
        return jnp.mean((head(z)[:, 0] - b["y"][:, t]) ** 2)

    def arrays(model):
        return [np.asarray(jax.random.key_data(x)) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                else np.array(x) for x in jax.tree_util.tree_leaves(nnx.state(model))]

    _, batch = _problem()
    batch = {"x": 3.0 * batch["x"] + 1.0, "y": batch["y"]}
    model = Net(nnx.Rngs(0, dropout=1))
    before = arrays(model)
    assert make_train_step(loss, "excess_mtl", loss_scales=None).init(model, batch).root_sum.shape == (2, 6)
    for old, new in zip(before, arrays(model), strict=True):
        np.testing.assert_array_equal(old, new)


def test_bad_or_missing_dims_raise_value_errors_that_name_the_fix():
    """Every way to make excess_mtl's state without a usable F, and every bad feature_dim (for
    any method: a bad value is a bug either way), is a ValueError naming the argument or call."""
    from flax import nnx
    from imtl_jax.nnx import make_train_step

    params, batch = _problem()
    encoder, losses = _step_parts()
    reg = get_method("excess_mtl").weighting
    with pytest.raises(ValueError, match=r"init_state\(num_tasks, dtype, dim=F\)"):
        reg.init(2, jnp.float32)                # the old call on the registered weighting
    with pytest.raises(ValueError, match=r"dim=F"):
        imtl_jax.with_affinity("excess_mtl").weighting.init(2)
    for method in ("excess_mtl", "famo", "imtl_h"):
        step = imtl_jax.mtl_step(encoder, losses, method)
        for bad in (0, -1, 2.5, "4", True, np.ones(2, np.int32)):
            with pytest.raises(ValueError, match=r"`feature_dim` \(F.*must be an int >= 1"):
                step.init(params, feature_dim=bad)
    for wrapped in (imtl_jax.accumulate_step(imtl_jax.mtl_step(encoder, losses, "excess_mtl"), 2),
                    imtl_jax.safe_step(imtl_jax.mtl_step(encoder, losses, "excess_mtl"))):
        with pytest.raises(ValueError, match=r"step\.init\(params, batch\).*feature_dim=F"):
            wrapped.init(params)
    assert imtl_jax.mtl_step(encoder, losses, "excess_mtl").init(
        params, feature_dim=np.int64(4)).root_sum.shape == (2, 4)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(3, 6, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(6, 1, rngs=rngs) for _ in range(2)])

    model = Net(nnx.Rngs(0))
    for method in ("excess_mtl", "famo"):
        with pytest.raises(ValueError, match=r"`feature_dim` \(F.*must be an int >= 1"):
            make_train_step(lambda h, z, b, t: jnp.mean(h(z)), method, loss_scales=None).init(
                model, feature_dim=0)
    with pytest.raises(ValueError, match=r"feature_dim=5.*F = 6"):
        make_train_step(lambda h, z, b, t: jnp.mean(h(z)), "excess_mtl", loss_scales=None).init(
            model, batch, feature_dim=5)


def test_weightings_without_needs_dim_keep_the_old_interface():
    """A custom weighting written before needs_dim (positional construction, init(num_tasks, dtype)
    with no keyword, as in docs/custom_method.md) works unchanged wherever state is made, with or
    without the new arguments; init_state(T) without a dtype uses init's own default."""
    from imtl_jax.methods.cr_mogm import cr_mogm_weighting

    seen = []

    def init(num_tasks, dtype=jnp.float16):     # no dim: must never be passed one
        seen.append(dtype)
        return jnp.zeros((num_tasks,), dtype)

    def weigh(grads, losses, state, key, priorities):
        return imtl_jax.WeightingOutput(jnp.full(grads.shape[:1], 0.5, grads.dtype), state + 1, {})

    custom = imtl_jax.Weighting("old_custom", init, weigh, True, False)   # positional, as before
    assert not custom.needs_dim and custom.init_state(2).dtype == jnp.float16
    assert custom.init_state(2, jnp.float32, dim=7).shape == (2,)
    params, batch = _problem()
    encoder, losses = _step_parts()
    identity = get_method("equal").scaling
    for weighting in (custom, imtl_jax.with_affinity(Method("c", identity, custom)).weighting,
                      cr_mogm_weighting(custom)):
        assert not weighting.needs_dim
        step = imtl_jax.mtl_step(encoder, losses, Method("c", identity, weighting))
        states = [step.init(params), step.init(params, batch), step.init(params, feature_dim=3),
                  imtl_jax.accumulate_step(step, 2).init(params), imtl_jax.safe_step(step).init(params),
                  imtl_jax.aggregate(weighting, 2).init({"w": jnp.zeros(3)}).method_state,
                  imtl_jax.aggregate(weighting, 2).init(None).method_state]
        for s in states[1:]:
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), s, states[0])
        _, new, _ = step(params, states[0], batch)
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(states[0])
