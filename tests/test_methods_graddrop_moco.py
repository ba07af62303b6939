"""GradDrop (Chen et al., NeurIPS 2020; per-coordinate weights) and MoCo (Fernando et al., ICLR
2023; a direction of its own, parameter level only) against NumPy float64 implementations written
from the papers' equations, with the randomness fixed (GradDrop's U drawn from the step's key by
the public ``graddrop_uniforms``), over recorded sequences of Jacobians (MoCo), under partial
labels (the sub-problem of the present tasks, same key), and on every path: ``mtl_step`` at the
representation and parameter levels, ``aggregate``, ``accumulate_step`` and the NNX helper, each
against a hand-built update from per-task gradients computed separately with ``jax.grad``.
The registry-wide tests (test_methods_registry.py, test_task_mask.py, test_skip_step.py,
test_step_state.py, test_optax_nnx.py) cover both in the slow step. TorchJD 0.18 agreement
(GradDrop; TorchJD has no MoCo): tests/test_torchjd_agreement.py (slow step)."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import x64

import imtl_jax
from imtl_jax.methods import get_method
from imtl_jax.methods.graddrop import GRADDROP, graddrop_uniforms, graddrop_weighting
from imtl_jax.methods.moco import MOCO, moco_weighting

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
T = 4
MASKS = [np.array(m, bool) for m in itertools.product([False, True], repeat=T) if any(m)]


# ------------------------------------------------------------------------------ NumPy oracles

def graddrop_numpy(g, u, leak=None, f=None):
    """Alg. 1, lines 10-15, coordinate by coordinate in float64: P_j = (1 + sum g / sum |g|) / 2
    (1/2 for a zero column: every g_tj = 0 there, so no component passes whatever P is),
    M_tj = [f(P_j) > U_j][g_tj > 0] + [f(P_j) < U_j][g_tj < 0], C_t = l_t + (1 - l_t) M_t.
    Returns (C, sum_t C_t * g_t)."""
    g = np.asarray(g, np.float64)
    num_tasks, dim = g.shape
    c = np.zeros((num_tasks, dim))
    for j in range(dim):
        mass = np.abs(g[:, j]).sum()
        p = 0.5 * (1.0 + g[:, j].sum() / mass) if mass > 0 else 0.5
        fp = p if f is None else f(p)
        for t in range(num_tasks):
            m = float(fp > u[j] and g[t, j] > 0) + float(fp < u[j] and g[t, j] < 0)
            lk = 0.0 if leak is None else leak[t]
            c[t, j] = lk + (1.0 - lk) * m
    return c, (c * g).sum(axis=0)


def _simplex_numpy(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ks = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / ks > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def moco_numpy(seq, losses, *, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
               normalize=True, simplex=False, y=None, lam=None, k0=0):
    """MoCo's recursion in float64 (Alg. 1; h_t = L_t g_t / |g_t| with ``normalize``, as the
    authors' code): y_t <- y_t - beta_k (y_t - h_t); lambda <- softmax (or simplex projection)
    of lambda - gamma_k (Y Y^T + rho I) lambda; d = Y^T lambda; beta_k = beta / k^beta_sigma.
    Returns [(lambda, d, Y)] per step."""
    num_tasks, dim = seq[0].shape
    y = np.zeros((num_tasks, dim)) if y is None else np.array(y, np.float64)
    lam = np.full(num_tasks, 1.0 / num_tasks) if lam is None else np.array(lam, np.float64)
    out = []
    for k, (g, loss) in enumerate(zip(seq, losses), start=k0 + 1):
        g = np.asarray(g, np.float64)
        if normalize:
            n = np.linalg.norm(g, axis=1, keepdims=True)
            h = np.where(n > 0, np.asarray(loss, np.float64)[:, None] * g / np.where(n > 0, n, 1), 0.0)
        else:
            h = g
        y = y - beta / k ** beta_sigma * (y - h)
        v = lam - gamma / k ** gamma_sigma * ((y @ y.T + rho * np.eye(num_tasks)) @ lam)
        if simplex:
            lam = _simplex_numpy(v)
        else:
            e = np.exp(v - v.max())
            lam = e / e.sum()
        out.append((lam.copy(), y.T @ lam, y.copy()))
    return out


def _rows(seed, num_tasks=T, dim=9, zero_col=True):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-1, 1, (num_tasks, 1))
    if zero_col:
        g[:, 2] = 0.0                      # a zero column (0/0 purity)
    g[0, 3] = 0.0                          # a zero entry
    g[:, 4] = np.abs(g[:, 4])              # pure positive column: P = 1
    g[:, 5] = -np.abs(g[:, 5])             # pure negative column: P = 0
    return g


# ------------------------------------------------------------------------------ GradDrop, weighting

@pytest.mark.parametrize("case", [(0, 2, 7), (1, 4, 9), (2, 7, 16)])
@pytest.mark.parametrize("variant", ["default", "leak", "purity_fn"])
def test_graddrop_matches_numpy(case, variant):
    seed, num_tasks, dim = case
    with x64():
        g = _rows(seed, num_tasks, dim)
        key = jax.random.key(seed)
        leak = tuple(np.linspace(0.0, 0.6, num_tasks)) if variant == "leak" else None
        f = (lambda p: p ** 2) if variant == "purity_fn" else None
        w = graddrop_weighting(leak=leak, purity_fn=f)
        out = jit(lambda g, k: w.weigh(g, jnp.zeros(num_tasks), w.init(num_tasks), k, None))(
            jnp.asarray(g), key)
        u = np.asarray(graddrop_uniforms(key, dim, jnp.float64))
        c, update = graddrop_numpy(g, u, leak, f)
        np.testing.assert_array_equal(np.asarray(out.coordinate_weights), c)
        np.testing.assert_allclose(np.asarray(out.coordinate_weights * g).sum(0), update, rtol=1e-15)
        np.testing.assert_allclose(out.weights, c.mean(axis=1), rtol=1e-15)
        if variant == "default":
            assert np.all(c[:, 2] == 0.0)                      # the zero column passes nothing
            np.testing.assert_array_equal(c[:, 4], 1.0)        # P = 1 > U: positives kept
            np.testing.assert_array_equal(c[:, 5], 1.0)        # P = 0 < U: negatives kept
        assert int(out.state.count) == 1


def test_graddrop_without_key_draws_from_its_counter():
    g = jnp.asarray(_rows(3), jnp.float32)
    w = GRADDROP
    state = w.init(T)
    out0 = w.weigh(g, jnp.zeros(T), state, None, None)
    out1 = w.weigh(g, jnp.zeros(T), out0.state, None, None)
    for out, count in ((out0, 0), (out1, 1)):
        u = np.asarray(graddrop_uniforms(jax.random.fold_in(jax.random.key(0), count), g.shape[1]))
        np.testing.assert_array_equal(out.coordinate_weights, graddrop_numpy(np.asarray(g), u)[0])


def test_graddrop_non_finite_rows_are_loud_and_keep_the_state():
    g = jnp.asarray(_rows(4), jnp.float32).at[1, 0].set(jnp.nan)
    out = GRADDROP.weigh(g, jnp.zeros(T), GRADDROP.init(T), jax.random.key(0), None)
    assert np.all(np.isnan(out.weights)) and np.all(np.isnan(out.coordinate_weights))
    assert int(out.state.count) == 0


class TestGradDropVariants(chex.TestCase):
    """With and without jit: the same C as NumPy for the key's U; one trace for new values."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        fn = self.variant(lambda g, k: GRADDROP.weigh(g, jnp.zeros(T), GRADDROP.init(T), k, None))
        for seed in range(3):
            g = _rows(10 + seed).astype(np.float32)
            key = jax.random.key(seed)
            out = fn(jnp.asarray(g), key)
            u = np.asarray(graddrop_uniforms(key, g.shape[1]))
            np.testing.assert_array_equal(out.coordinate_weights, graddrop_numpy(g, u)[0])

    def test_compiles_once(self):
        @jax.jit
        @chex.assert_max_traces(n=1)
        def f(g, k):
            return GRADDROP.weigh(g, jnp.zeros(T), GRADDROP.init(T), k, None).coordinate_weights

        chex.clear_trace_counter()
        for seed in range(3):
            f(jnp.asarray(_rows(seed), jnp.float32), jax.random.key(seed))


def test_graddrop_mask_equals_the_present_tasks_with_the_same_key():
    """Every mask at T = 4 (one compile): the masked C equals C of the present rows only for the
    same key (absent rows NaN, ignored), absent rows exactly 0; the counter advances."""
    with x64():
        g = _rows(5)
        key = jax.random.key(11)
        masked = jit(lambda g, m: GRADDROP.weigh(g, jnp.zeros(T), GRADDROP.init(T), key, None, task_mask=m))
        for mask in MASKS:
            bad = np.where(mask[:, None], g, np.nan)
            out = masked(jnp.asarray(bad), jnp.asarray(mask))
            sub = GRADDROP.weigh(jnp.asarray(g[mask]), jnp.zeros(int(mask.sum())),
                                 GRADDROP.init(int(mask.sum())), key, None)
            c = np.asarray(out.coordinate_weights)
            np.testing.assert_array_equal(c[mask], sub.coordinate_weights)
            np.testing.assert_array_equal(c[~mask], 0.0)
            np.testing.assert_array_equal(np.asarray(out.weights)[mask], sub.weights)
            np.testing.assert_array_equal(np.asarray(out.weights)[~mask], 0.0)
            assert int(out.state.count) == 1


# ------------------------------------------------------------------------------ MoCo, weighting

def _sequence(seed, steps=4, num_tasks=T, dim=6):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-1, 1, (num_tasks, 1))
    seq = [base * rng.uniform(0.5, 1.5, (num_tasks, 1)) + 0.3 * rng.standard_normal((num_tasks, dim))
           for _ in range(steps)]
    if steps > 2:
        seq[2][1] = 0.0                           # a zero gradient at one step
    losses = [rng.uniform(0.2, 3.0, num_tasks) for _ in range(steps)]
    return seq, losses


@pytest.mark.parametrize("settings", [{}, {"normalize": False}, {"simplex": True, "rho": 0.1},
                                      {"beta": 0.9, "beta_sigma": 0.0, "gamma": 2.0, "gamma_sigma": 1.0}],
                         ids=["libmtl", "raw", "simplex_rho", "other_rates"])
def test_moco_matches_numpy_over_a_recorded_sequence(settings):
    with x64():
        seq, losses = _sequence(0)
        w = moco_weighting(**settings)
        fn = jit(lambda g, loss, s: w.weigh(g, loss, s, None, None))
        state = w.init_state(T, jnp.float64, dim=seq[0].shape[1])
        want = moco_numpy(seq, losses, **settings)
        for step, (g, loss) in enumerate(zip(seq, losses)):
            out = fn(jnp.asarray(g), jnp.asarray(loss), state)
            state = out.state
            lam, d, y = want[step]
            np.testing.assert_allclose(out.weights, lam, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(out.direction, d, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(state.tracked, y, rtol=1e-12, atol=1e-14)
            assert out.coordinate_weights is None and int(state.count) == step + 1


def test_moco_mask_equals_the_present_tasks():
    """After two unmasked steps, a masked step equals the step on the present tasks only (their
    rows of Y and entries of lambda): lambda, d, the present state; the absent rows are kept bit
    for bit, the counter advances. One compile for the 15 masks."""
    with x64():
        seq, losses = _sequence(1, steps=3)
        w = MOCO
        state = w.init_state(T, jnp.float64, dim=seq[0].shape[1])
        for g, loss in zip(seq[:2], losses[:2]):
            state = w.weigh(jnp.asarray(g), jnp.asarray(loss), state, None, None).state
        masked = jit(lambda g, loss, m: w.weigh(g, loss, state, None, None, task_mask=m))
        g, loss = seq[2], losses[2]
        for mask in MASKS:
            idx = np.flatnonzero(mask)
            out = masked(jnp.asarray(np.where(mask[:, None], g, np.nan)),
                         jnp.asarray(np.where(mask, loss, np.nan)), jnp.asarray(mask))
            sub_lam = np.asarray(state.weights)[idx]
            mass = sub_lam.sum()
            lam, d, y = moco_numpy([g[idx]], [loss[idx]], y=np.asarray(state.tracked)[idx],
                                   lam=sub_lam / mass, k0=int(state.count))[0]
            np.testing.assert_allclose(np.asarray(out.weights)[idx], lam, rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(np.asarray(out.weights)[~mask], 0.0)
            np.testing.assert_allclose(out.direction, d, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(out.state.tracked)[idx], y, rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(np.asarray(out.state.tracked)[~mask],
                                          np.asarray(state.tracked)[~mask])
            np.testing.assert_array_equal(np.asarray(out.state.weights)[~mask],
                                          np.asarray(state.weights)[~mask])
            # the present entries: the sub-problem's lambda times their previous mass, so the
            # stored lambda stays on the simplex
            np.testing.assert_allclose(np.asarray(out.state.weights)[idx], mass * lam, rtol=1e-12,
                                       atol=1e-15)
            np.testing.assert_allclose(float(jnp.sum(out.state.weights)), 1.0, rtol=0, atol=1e-14)
            assert int(out.state.count) == int(state.count) + 1


class TestMoCoVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        seq, losses = _sequence(2)
        fn = self.variant(lambda g, loss, s: MOCO.weigh(g, loss, s, None, None))
        state = MOCO.init_state(T, jnp.float32, dim=seq[0].shape[1])
        want = moco_numpy(seq, losses)
        for (g, loss), (lam, d, _) in zip(zip(seq, losses), want):
            out = fn(jnp.asarray(g, jnp.float32), jnp.asarray(loss, jnp.float32), state)
            state = out.state
            np.testing.assert_allclose(out.weights, lam, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(out.direction, d, rtol=1e-4, atol=1e-5)

    def test_compiles_once(self):
        seq, losses = _sequence(3)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def f(g, loss, s):
            return MOCO.weigh(g, loss, s, None, None)

        chex.clear_trace_counter()
        state = MOCO.init_state(T, jnp.float32, dim=seq[0].shape[1])
        for g, loss in zip(seq, losses):
            state = f(jnp.asarray(g, jnp.float32), jnp.asarray(loss, jnp.float32), state).state


def test_moco_extreme_scales_and_non_finite():
    seq, losses = _sequence(4, steps=1)
    g = jnp.asarray(seq[0], jnp.float32)
    state = MOCO.init_state(T, jnp.float32, dim=g.shape[1])
    ref = MOCO.weigh(g, jnp.asarray(losses[0], jnp.float32), state, None, None)
    for scale in (1e-30, 1e30):   # normalised tracking: the scale of g drops out
        out = MOCO.weigh(g * scale, jnp.asarray(losses[0], jnp.float32), state, None, None)
        np.testing.assert_allclose(out.direction, ref.direction, rtol=1e-5, atol=1e-7)
    bad = MOCO.weigh(g.at[0, 0].set(jnp.inf), jnp.asarray(losses[0], jnp.float32), state, None, None)
    assert np.all(np.isnan(bad.weights)) and np.all(np.isnan(bad.direction))
    for new, old in zip(jax.tree_util.tree_leaves(bad.state), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(new, old)


# ------------------------------------------------------------------------------ every path

def _encoder(sp, batch):
    return jnp.tanh(batch["x"] @ sp["w"] + sp["b"])


def _head_loss(v_t, z, batch, t):
    return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)


def _problem(seed, num_tasks=3, batch_size=6, dim=5):
    k = jax.random.split(jax.random.key(seed), 6)
    params = imtl_jax.MTLParams(
        shared={"w": jax.random.normal(k[0], (3, dim)), "b": 0.1 * jax.random.normal(k[1], (dim,))},
        heads=jax.random.normal(k[2], (num_tasks, dim)), log_scales=jnp.zeros(num_tasks))
    batches = [{"x": jax.random.normal(jax.random.fold_in(k[3], i), (batch_size, 3)),
                "y": jax.random.normal(jax.random.fold_in(k[4], i), (batch_size, num_tasks))}
               for i in range(3)]
    return params, batches


def _task_loss(params, batch, t):
    return _head_loss(params.heads[t], _encoder(params.shared, batch), batch, t)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _unflat(vec, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(np.reshape(vec[start:start + leaf.size], leaf.shape))
        start += leaf.size
    return jax.tree_util.tree_unflatten(treedef, out)


def _assert_tree_close(got, want, rtol=1e-10, atol=1e-12):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _hand_graddrop_z(params, batch, key):
    """Per task, the per-example z-gradients by jax.grad of that task's loss alone; C from the
    batch-summed rows and the key's U; the encoder's cotangent sum_t C_t * dL_t/dz_b."""
    z, vjp = jax.vjp(lambda sp: _encoder(sp, batch), params.shared)
    num_tasks = params.log_scales.shape[0]
    gz = [np.asarray(jax.grad(lambda z_, t=t: _head_loss(params.heads[t], z_, batch, t))(z))
          for t in range(num_tasks)]
    rows = np.stack([x.sum(axis=0) for x in gz])
    u = np.asarray(graddrop_uniforms(key, rows.shape[1], jnp.float64))
    c, _ = graddrop_numpy(rows, u)
    cot = sum(c[t][None, :] * gz[t] for t in range(num_tasks))
    return vjp(jnp.asarray(cot))[0], c


def test_graddrop_step_representation_level_equals_hand_built():
    with x64():
        params, batches = _problem(0)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        key = jax.random.key(3)
        for reduction in ("sum", "mean"):   # P is scale free: the same C for both
            step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "graddrop",
                                     reduction=reduction)
            grads, state, aux = jit(lambda p, s, b, step=step: step(p, s, b, key=key))(params, step.init(params),
                                                                            batches[0])
            want, c = _hand_graddrop_z(params, batches[0], key)
            _assert_tree_close(grads.shared, want)
            np.testing.assert_allclose(aux.weights, c.mean(axis=1), rtol=1e-12)
            heads = [np.asarray(jax.grad(lambda v, t=t: _head_loss(
                v, _encoder(params.shared, batches[0]), batches[0], t))(params.heads[t])) for t in range(3)]
            np.testing.assert_allclose(grads.heads, np.stack(heads), rtol=1e-10, atol=1e-12)
            np.testing.assert_array_equal(grads.log_scales, 0.0)
            assert int(state.count) == 1


def test_graddrop_step_parameter_level_equals_hand_built():
    with x64():
        params, batches = _problem(1)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        key = jax.random.key(4)
        method = get_method("graddrop")._replace(level="parameters")
        step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), method)
        grads, _, aux = jit(lambda p, s, b: step(p, s, b, key=key))(params, step.init(params), batches[0])
        per_task = np.stack([_flat(jax.grad(lambda sp, t=t: _task_loss(params._replace(shared=sp),
                                                                         batches[0], t))(params.shared))
                             for t in range(3)])
        u = np.asarray(graddrop_uniforms(key, per_task.shape[1], jnp.float64))
        c, update = graddrop_numpy(per_task, u)
        _assert_tree_close(grads.shared, _unflat(update, params.shared))
        np.testing.assert_allclose(aux.weights, c.mean(axis=1), rtol=1e-12)


def test_moco_step_parameter_level_equals_numpy_over_steps():
    """Three steps of the registered ``moco`` (level="parameters") on three batches: the shared
    gradient is d = Y^T lambda of the NumPy recursion fed the per-task gradients (jax.grad per
    task) and losses; heads get their own loss's gradient."""
    with x64():
        params, batches = _problem(2)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "moco")
        assert step.method.level == "parameters"
        run = jit(step)
        state = step.init(params)
        seq = [np.stack([_flat(jax.grad(lambda sp, t=t, b=b: _task_loss(params._replace(shared=sp), b, t))(
            params.shared)) for t in range(3)]) for b in batches]
        losses = [np.array([float(_task_loss(params, b, t)) for t in range(3)]) for b in batches]
        want = moco_numpy(seq, losses)
        for b, (lam, d, _) in zip(batches, want):
            grads, state, aux = run(params, state, b)
            _assert_tree_close(grads.shared, _unflat(d, params.shared))
            np.testing.assert_allclose(aux.weights, lam, rtol=1e-12)
        heads = [np.asarray(jax.grad(lambda v, t=t: _head_loss(
            v, _encoder(params.shared, batches[-1]), batches[-1], t))(params.heads[t])) for t in range(3)]
        np.testing.assert_allclose(grads.heads, np.stack(heads), rtol=1e-10, atol=1e-12)


def test_aggregate_graddrop_and_moco_equal_hand_built():
    with x64():
        rng = np.random.default_rng(5)
        params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
        updates = [{"a": jnp.asarray(rng.standard_normal((3, 2, 3))), "b": jnp.asarray(rng.standard_normal((3, 4)))}
                   for _ in range(3)]
        losses = [jnp.asarray(rng.uniform(0.5, 2.0, 3)) for _ in range(3)]
        key = jax.random.key(9)
        tx = imtl_jax.aggregate("graddrop", 3, dtype=jnp.float64)
        out, _ = jit(lambda u, s: tx.update(u, s, params, key=key))(updates[0], tx.init(params))
        rows = np.stack([_flat(jax.tree_util.tree_map(lambda x, t=t: x[t], updates[0])) for t in range(3)])
        _, update = graddrop_numpy(rows, np.asarray(graddrop_uniforms(key, rows.shape[1], jnp.float64)))
        _assert_tree_close(out, _unflat(update, params))

        tx = imtl_jax.aggregate("moco", 3, dtype=jnp.float64)
        state = tx.init(params)
        with pytest.raises(ValueError, match="losses="):   # it tracks L_t g_t / |g_t|
            tx.update(updates[0], state, params)
        run = jit(lambda u, s, loss: tx.update(u, s, params, losses=loss))
        seq = [np.stack([_flat(jax.tree_util.tree_map(lambda x, t=t: x[t], u)) for t in range(3)])
               for u in updates]
        for u, loss, (lam, d, _) in zip(updates, losses, moco_numpy(seq, [np.asarray(x) for x in losses])):
            out, state = run(u, state, loss)
            _assert_tree_close(out, _unflat(d, params))
            np.testing.assert_allclose(state.weights, lam, rtol=1e-12)


def test_accumulate_step_graddrop_equals_the_whole_batch():
    """Pass 1 sums the (T, F) rows over the micro-batches, C is drawn once from the whole batch's
    rows, pass 2 replays it: the whole batch's update (and the hand-built one), K = 3."""
    with x64():
        params, batches = _problem(6, batch_size=6)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        key = jax.random.key(2)
        step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "graddrop")
        acc = imtl_jax.accumulate_step(step, 3)
        grads, state, aux = jit(lambda p, s, b: acc(p, s, b, key=key))(params, acc.init(params), batches[0])
        whole, _, whole_aux = step(params, step.init(params), batches[0], key=key)
        _assert_tree_close(grads, whole)
        want, c = _hand_graddrop_z(params, batches[0], key)
        _assert_tree_close(grads.shared, want)
        np.testing.assert_allclose(aux.weights, whole_aux.weights, rtol=1e-12)
        assert int(state.count) == 1


# Each scaling and each losses form once by default; the other two pairings in the slow step.
@pytest.mark.parametrize("scaling, losses_form", [
    ("imtl_l", "stacked"), ("uncertainty", "tuple"),
    pytest.param("imtl_l", "tuple", marks=pytest.mark.slow),
    pytest.param("uncertainty", "stacked", marks=pytest.mark.slow)])
def test_accumulate_step_graddrop_with_a_loss_scaling_equals_the_whole_batch(scaling, losses_form):
    """A per-coordinate weighting with a non-identity loss scaling: pass 2 scales one task at a
    time (the per-task pass), linearized at that task's whole-batch loss. The update equals the
    whole-batch step's, and its shared part a hand-built one: rows ``s'(L_t) sum_b dL_t/dz_b``,
    C from them and the key's U, cotangent ``sum_t C_t * s'(L_t) dL_t/dz_b`` (K = 3)."""
    with x64():
        params, batches = _problem(9, batch_size=6)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        params = params._replace(log_scales=jnp.array([0.3, -0.2, 0.1]))
        batch, key = batches[0], jax.random.key(4)
        scale = get_method(scaling).scaling
        method = imtl_jax.Method("graddrop+" + scaling, scale, GRADDROP)
        if losses_form == "stacked":
            losses = imtl_jax.stacked_task_losses(_head_loss)
            run_params = params
        else:
            losses = tuple(functools.partial(lambda v, z, b, t: _head_loss(v, z, b, t), t=t)
                           for t in range(3))
            run_params = params._replace(heads=tuple(params.heads))
        step = imtl_jax.mtl_step(_encoder, losses, method)
        acc = imtl_jax.accumulate_step(step, 3)
        grads, _, aux = jit(lambda p, s, b: acc(p, s, b, key=key))(run_params, acc.init(run_params),
                                                                      batch)
        whole, _, whole_aux = step(run_params, step.init(run_params), batch, key=key)
        _assert_tree_close(grads, whole)
        np.testing.assert_allclose(aux.weights, whole_aux.weights, rtol=1e-12)
        # hand-built shared update
        z, vjp = jax.vjp(lambda sp: _encoder(sp, batch), params.shared)
        gz, slopes = [], []
        for t in range(3):
            loss_t = _head_loss(params.heads[t], z, batch, t)
            slopes.append(float(jax.grad(lambda x, t=t: scale.scale(
                x[None], params.log_scales[t][None])[0])(loss_t)))
            gz.append(slopes[t] * np.asarray(jax.grad(
                lambda z_, t=t: _head_loss(params.heads[t], z_, batch, t))(z)))
        rows = np.stack([x.sum(axis=0) for x in gz])
        c, _ = graddrop_numpy(rows, np.asarray(graddrop_uniforms(key, rows.shape[1], jnp.float64)))
        assert 0 < c.sum() < c.size  # something dropped, something kept
        cot = sum(c[t][None, :] * gz[t] for t in range(3))
        _assert_tree_close(grads.shared, vjp(jnp.asarray(cot))[0])
        # log-scale gradients: d scale(L_t, s_t) / d s_t at the whole batch's losses
        want_s = [float(jax.grad(lambda s_, t=t: scale.scale(
            _head_loss(params.heads[t], z, batch, t)[None], s_[None])[0])(params.log_scales[t]))
            for t in range(3)]
        np.testing.assert_allclose(grads.log_scales, want_s, rtol=1e-10, atol=1e-12)


def _nnx_net(width: int):
    """A Linear(3, width) encoder and two Linear(width, 1) heads (NNX), seed 0."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(3, width, rngs=rngs)
            self.heads = nnx.List([nnx.Linear(width, 1, rngs=rngs) for _ in range(2)])

    return Net(nnx.Rngs(0))


def test_nnx_helper_graddrop_equals_hand_built():
    from flax import nnx
    from imtl_jax.nnx import make_train_step

    def loss(head, z, batch, t):
        return jnp.mean((head(jnp.tanh(z))[:, 0] - batch["y"][:, t]) ** 2)

    with x64():
        model = _nnx_net(5)
        for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)):
            assert leaf.dtype == jnp.float32
        rng = np.random.default_rng(0)
        batch = {"x": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
                 "y": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)}
        kernel, bias = model.encoder.kernel[...], model.encoder.bias[...]
        heads = [(h.kernel[...], h.bias[...]) for h in model.heads]
        optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        train_step = make_train_step(loss, "graddrop", shared="encoder", loss_scales=None)
        key = jax.random.key(5)
        _, aux = nnx.jit(train_step)(model, optimizer, batch, train_step.init(model), key=key)

        def z_of(k, b):
            return batch["x"] @ k + b

        z = z_of(kernel, bias)
        gz = [np.asarray(jax.grad(lambda z_, t=t: jnp.mean(
            ((jnp.tanh(z_) @ heads[t][0] + heads[t][1])[:, 0] - batch["y"][:, t]) ** 2))(z))
            for t in range(2)]
        rows = np.stack([g.sum(0) for g in gz])
        c, _ = graddrop_numpy(rows, np.asarray(graddrop_uniforms(key, 5)))
        cot = jnp.asarray(sum(c[t][None, :] * gz[t] for t in range(2)), jnp.float32)
        _, vjp = jax.vjp(z_of, kernel, bias)
        gk, gb = vjp(cot)
        np.testing.assert_allclose(kernel - model.encoder.kernel[...], gk, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bias - model.encoder.bias[...], gb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux.weights, c.mean(axis=1), rtol=1e-6)


def test_nnx_helper_runs_moco_at_the_parameter_level_and_refuses_the_representation():
    from flax import nnx
    from imtl_jax.nnx import make_train_step

    def loss(head, z, batch, t):
        return jnp.mean((head(z)[:, 0] - batch["y"][:, t]) ** 2)

    model = _nnx_net(4)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    train_step = make_train_step(loss, "moco", shared="encoder", loss_scales=None)
    state = train_step.init(model)
    assert state.tracked.shape == (2, 3 * 4 + 4)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
    state, aux = nnx.jit(train_step)(model, optimizer, batch, state)
    assert bool(aux.all_finite) and int(state.count) == 1
    with pytest.raises(ValueError, match='level="parameters"'):
        make_train_step(loss, get_method("moco")._replace(level="representation"),
                        shared="encoder", loss_scales=None)


def test_direction_methods_refuse_the_representation_level_and_accumulation():
    rep = get_method("moco")._replace(level="representation")
    with pytest.raises(ValueError, match=r'level="parameters".*aggregate\(\)'):
        imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), rep)
    step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "moco")
    with pytest.raises(ValueError, match="parameter level"):
        imtl_jax.accumulate_step(step, 2)
    assert imtl_jax.methods.parameters_only_methods() == ("moco",)
    assert {"graddrop", "moco"} <= set(imtl_jax.methods.method_names())


@pytest.mark.slow  # several compiles; CI's slow step runs it
def test_an_unflagged_coordinate_or_direction_output_is_refused_on_every_path():
    """A weighting returning ``coordinate_weights`` / ``direction`` without its flag would be
    used as ``weights @ grads``: every path raises a ValueError naming the flag."""
    params, batches = _problem(10)
    losses = imtl_jax.stacked_task_losses(_head_loss)
    equal = get_method("equal").scaling
    cases = [(GRADDROP._replace(per_coordinate=False), "per_coordinate=True"),
             (MOCO._replace(returns_direction=False), "returns_direction=True")]
    key = jax.random.key(0)
    for weighting, flag in cases:
        for level in ("representation", "parameters"):
            step = imtl_jax.mtl_step(_encoder, losses, imtl_jax.Method("bad", equal, weighting, level))
            state = step.init(params, batches[0])
            with pytest.raises(ValueError, match=flag):
                step(params, state, batches[0], key=key)
            if level == "representation":
                acc = imtl_jax.accumulate_step(step, 2)
                with pytest.raises(ValueError, match=flag):
                    acc(params, state, batches[0], key=key)
        tx = imtl_jax.aggregate(imtl_jax.Method("bad", equal, weighting), 3)
        shared = params.shared
        per_task = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x, 2 * x]), shared)
        with pytest.raises(ValueError, match=flag):
            tx.update(per_task, tx.init(shared), shared, losses=jnp.ones(3), key=key)


def test_moco_aggregate_needs_losses_only_when_it_reads_them():
    params = {"a": jnp.zeros(3)}
    updates = {"a": jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])}
    tx = imtl_jax.aggregate(moco_weighting(normalize=False), 2)
    out, _ = tx.update(updates, tx.init(params), params)
    want = tx.update(updates, tx.init(params), params, losses=jnp.array([5.0, -7.0]))[0]
    np.testing.assert_array_equal(out["a"], want["a"])  # the losses are not read
    tx = imtl_jax.aggregate(MOCO, 2)
    with pytest.raises(ValueError, match="losses="):
        tx.update(updates, tx.init(params), params)


def test_moco_masked_steps_keep_lambda_on_the_simplex():
    """T = 4, mask [1, 1, 0, 0] then others: sum(lambda) stays 1 (it was 1.5 before the fix)."""
    with x64():
        state = MOCO.init_state(4, jnp.float64, dim=3)
        g = jnp.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
        losses = jnp.array([1.0, 2, 3, 4])
        for m in ([1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]):
            mask = jnp.array(m, bool)
            old = np.asarray(state.weights)
            state = MOCO.weigh(g, losses, state, None, None, task_mask=mask).state
            np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=0, atol=1e-15)
            np.testing.assert_array_equal(np.asarray(state.weights)[~np.asarray(mask)],
                                          old[~np.asarray(mask)])
            assert np.all(np.asarray(state.weights) >= 0)


def test_graddrop_keeps_the_positive_components_with_probability_purity():
    """Over N keys (one vectorized jit), the frequency with which coordinate j keeps its positive
    components is Binomial(N, P_j) / N: within 5 sigma of the purity P_j of Eq. 1."""
    g = jnp.array([[1.0, -3.0, 2.0, 0.5], [-1.0, 1.0, 2.0, -4.0], [2.0, 1.0, -1.0, 0.25]])
    total, mass = np.asarray(g).sum(0), np.abs(np.asarray(g)).sum(0)
    purity = 0.5 * (1.0 + total / mass)  # [2/3, 0.3, 0.8, 0.1] by hand
    num = 20000
    keys = jax.random.split(jax.random.key(11), num)
    coords = jax.jit(jax.vmap(
        lambda k: GRADDROP.weigh(g, jnp.zeros(3), GRADDROP.init(3), k, None).coordinate_weights))(keys)
    positive = np.asarray(g) > 0
    kept_positive = np.asarray(jnp.any((coords > 0) & positive[None], axis=1))  # (N, F)
    kept_negative = np.asarray(jnp.any((coords > 0) & ~positive[None], axis=1))
    np.testing.assert_array_equal(kept_positive, ~kept_negative)  # exactly one sign per draw
    freq = kept_positive.mean(axis=0)
    sigma = np.sqrt(purity * (1 - purity) / num)
    assert np.all(np.abs(freq - purity) <= 5 * sigma), (freq, purity, sigma)


def test_wrappers_keep_or_refuse_the_update_form():
    from imtl_jax.methods.cr_mogm import cr_mogm_weighting
    with pytest.raises(ValueError, match="per-coordinate"):
        cr_mogm_weighting(GRADDROP)
    with pytest.raises(ValueError, match="direction"):
        cr_mogm_weighting(MOCO)
    tracked = imtl_jax.with_affinity("graddrop")
    assert tracked.weighting.per_coordinate
    with x64():
        params, batches = _problem(7)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
        key = jax.random.key(1)
        plain = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), "graddrop")
        wrapped = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), tracked)
        a = plain(params, plain.init(params), batches[0], key=key)[0]
        b = wrapped(params, wrapped.init(params), batches[0], key=key)[0]
        _assert_tree_close(a, b, rtol=1e-14, atol=1e-15)
    bad = GRADDROP._replace(weights_heads=True)
    with pytest.raises(ValueError, match="weights_heads=False"):
        imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss),
                          imtl_jax.Method("bad", get_method("equal").scaling, bad))


@pytest.mark.slow  # the wrappers' generic behaviour is tested for every method in tests/test_skip_step.py
def test_skip_nonfinite_and_safe_step_keep_everything_for_both():
    """A NaN batch: the wrapped training step keeps the parameters, optimizer and method state;
    ``safe_step`` keeps the method state and flags the gradients."""
    params, batches = _problem(8)
    nan_batch = dict(batches[0], y=batches[0]["y"].at[0, 0].set(jnp.nan))
    for name in ("graddrop", "moco"):
        step = imtl_jax.mtl_step(_encoder, imtl_jax.stacked_task_losses(_head_loss), name)
        opt = optax.adam(1e-2)

        def train(carry, b, step=step, opt=opt):
            p, o, s = carry
            grads, s, aux = step(p, s, b, key=jax.random.key(0))
            updates, o = opt.update(grads, o, p)
            return (optax.apply_updates(p, updates), o, s), aux

        safe = jit(imtl_jax.skip_nonfinite(train))
        carry = (params, opt.init(params), step.init(params))
        out, aux, finite = safe(carry, nan_batch)
        assert not bool(finite) and not bool(aux.all_finite), name
        _assert_tree_close(out, carry, rtol=0, atol=0)
        # safe_step (for safe_optimizer): the method state is returned as it was, grads NaN
        safe_step = imtl_jax.safe_step(step)
        grads, state, aux = jit(lambda p, s, b, st=safe_step: st(
            p, s, b, key=jax.random.key(0)))(params, carry[2], nan_batch)
        _assert_tree_close(state, carry[2], rtol=0, atol=0)
        assert np.all(np.isnan(np.asarray(grads.shared["w"]))), name
