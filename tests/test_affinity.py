"""Task affinity (imtl_jax._affinity): the accumulator against a float64 NumPy computation of the
same statistics over a recorded sequence of gradient matrices, the step wrapper against an
independent per-task gradient computation, and the grouping against block-structured affinities
and brute force."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imtl_jax
from oracles import x64


# ------------------------------------------------------------------------------ numpy oracle

def _np_stats(mats, losses=None, lr=None):
    """Per-pair mean / sample std / conflict fraction / count of the cosines, in float64, by
    collecting every defined cosine in a list (no running updates)."""
    t = mats[0].shape[0]
    values = [[[] for _ in range(t)] for _ in range(t)]
    look = []
    for s, g in enumerate(mats):
        g = np.asarray(g, np.float64)
        if not np.all(np.isfinite(g)):
            continue
        norms = np.linalg.norm(g, axis=1)
        for i in range(t):
            for j in range(t):
                if norms[i] > 0 and norms[j] > 0:
                    values[i][j].append(g[i] @ g[j] / (norms[i] * norms[j]))
        if losses is not None:
            look.append(lr * (g @ g.T) / np.asarray(losses[s], np.float64)[None, :])
    mean = np.array([[np.mean(v) if v else np.nan for v in row] for row in values])
    std = np.array([[np.std(v, ddof=1) if len(v) > 1 else np.nan for v in row] for row in values])
    frac = np.array([[np.mean(np.array(v) < 0) if v else np.nan for v in row] for row in values])
    count = np.array([[len(v) for v in row] for row in values])
    lookahead = np.mean(look, axis=0) if look else None
    return mean, std, frac, count, lookahead


def _recorded_sequence(rng, steps=40, t=4, f=7):
    """Gradient matrices with rows at scales 1e-3..1e3, some zero rows and one NaN step."""
    mats, losses = [], []
    base = rng.normal(size=(t, f))
    for s in range(steps):
        g = base + 0.8 * rng.normal(size=(t, f))
        g *= 10.0 ** rng.uniform(-3, 3, size=(t, 1))
        if s % 7 == 3:
            g[s % t] = 0.0
        if s == 11:
            g[1, 2] = np.nan
        mats.append(g)
        losses.append(rng.uniform(0.5, 2.0, size=t))
    return mats, losses


def test_tracker_matches_numpy_statistics(dtype):
    rng = np.random.default_rng(0)
    mats, losses = _recorded_sequence(rng)
    tracker = imtl_jax.affinity_tracker(lookahead_lr=0.05)
    update = jax.jit(tracker.update)
    state = tracker.init(4, dtype)
    for g, loss in zip(mats, losses):
        state = update(jnp.asarray(g, dtype), state, jnp.asarray(loss, dtype))
    stats = imtl_jax.affinity_stats(state)
    mean, std, frac, count, look = _np_stats([np.asarray(g, dtype) for g in mats],
                                             [np.asarray(x, dtype) for x in losses], 0.05)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_array_equal(np.asarray(stats.steps), count)
    assert count.min() < len(mats) - 1  # the zero rows and the NaN step were really skipped
    np.testing.assert_allclose(np.asarray(stats.mean), mean, atol=tol)
    np.testing.assert_allclose(np.asarray(stats.std), std, atol=10 * tol)
    np.testing.assert_allclose(np.asarray(stats.stderr), std / np.sqrt(count), atol=10 * tol)
    np.testing.assert_allclose(np.asarray(stats.conflict_fraction), frac, atol=tol)
    assert int(state.lookahead_count) == len(mats) - 1
    np.testing.assert_allclose(np.asarray(stats.lookahead), look, rtol=10 * tol)
    assert stats.mean.dtype == dtype


def test_update_compiles_once_and_state_shapes_are_stable():
    traces = []
    tracker = imtl_jax.affinity_tracker()

    @jax.jit
    def update(g, state):
        traces.append(1)
        return tracker.update(g, state)

    state = tracker.init(3)
    rng = np.random.default_rng(1)
    for _ in range(5):
        state = update(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), state)
    assert len(traces) == 1
    assert int(state.steps[0, 1]) == 5


def test_cosine_matrix_is_scale_free_and_handles_zero_and_nan_rows():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(4, 6))
    scaled = g * np.array([[1e-30], [1e30], [1.0], [1e-5]])
    got = np.asarray(imtl_jax.cosine_matrix(jnp.asarray(scaled, jnp.float32)))
    n = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(got, n @ n.T, atol=2e-6)
    g[2] = 0.0
    got = np.asarray(imtl_jax.cosine_matrix(jnp.asarray(g, jnp.float32)))
    assert np.all(got[2] == 0) and np.all(got[:, 2] == 0) and got[0, 0] == 1
    g[1, 0] = np.nan
    got = np.asarray(imtl_jax.cosine_matrix(jnp.asarray(g, jnp.float32)))
    assert np.isnan(got[1, 0]) and np.isfinite(got[0, 3])


def test_lookahead_is_first_order_loss_change():
    """Z[i, j] = 1 - L_j(z - lr g_i) / L_j(z) to first order: compare with the actual change of
    quadratic losses for a small step (the error is O(lr^2))."""
    rng = np.random.default_rng(3)
    targets = rng.normal(size=(3, 5))
    z = rng.normal(size=5)

    def loss(zz, j):
        return 0.5 * np.sum((zz - targets[j]) ** 2) + 1.0

    grads = np.stack([z - targets[j] for j in range(3)])
    losses = np.array([loss(z, j) for j in range(3)])
    lr = 1e-4
    with x64():
        z_aff = np.asarray(imtl_jax.lookahead_affinity(jnp.asarray(grads), jnp.asarray(losses), lr))
    actual = np.array([[1 - loss(z - lr * grads[i], j) / losses[j] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(z_aff, actual, atol=lr ** 2 * 100)
    assert not np.allclose(z_aff, z_aff.T)  # directed


# ------------------------------------------------------------------------------ in the step

def _problem(t=3, b=8, d=5, f=6, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = imtl_jax.MTLParams(shared=jax.random.normal(k[0], (d, f)),
                                heads=jax.random.normal(k[1], (t, f)), log_scales=jnp.zeros(t))
    batch = {"x": jax.random.normal(k[2], (b, d)), "y": jax.random.normal(k[3], (b, t))}

    def encoder(w, batch):
        return jnp.tanh(batch["x"] @ w)

    def head_loss(v, z, batch, i):
        return jnp.mean((z @ v - batch["y"][:, i]) ** 2)

    return encoder, head_loss, params, batch


@pytest.mark.parametrize("name", ["imtl_h", "equal", "mgda"])
def test_with_affinity_tracks_the_steps_matrix_and_leaves_training_unchanged(name):
    encoder, head_loss, params, batch = _problem()
    losses = imtl_jax.stacked_task_losses(head_loss)
    plain = imtl_jax.mtl_step(encoder, losses, name)
    tracked = imtl_jax.mtl_step(encoder, losses, imtl_jax.with_affinity(name))
    g0, _, aux0 = jax.jit(plain)(params, plain.init(params), batch)
    g1, state, aux1 = jax.jit(tracked)(params, tracked.init(params), batch)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux0.weights), np.asarray(aux1.weights), rtol=2e-5)
    # oracle: per-task z-gradients summed over the batch, computed independently, float64 cosines
    z = np.asarray(encoder(params.shared, batch), np.float64)
    v = np.asarray(params.heads, np.float64)
    y = np.asarray(batch["y"], np.float64)
    rows = np.stack([(2 / z.shape[0]) * ((z @ v[i] - y[:, i])[:, None] * v[i][None, :]).sum(0)
                     for i in range(3)])
    n = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(aux1.info["cosines"]), n @ n.T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.affinity.mean), n @ n.T, atol=1e-5)
    assert isinstance(state, imtl_jax.TrackedState)


def test_with_affinity_lookahead_needs_raw_losses():
    with pytest.raises(ValueError, match="lookahead_lr"):
        imtl_jax.with_affinity("imtl_h", lookahead_lr=0.1)
    method = imtl_jax.with_affinity("imtl_g", lookahead_lr=0.1)
    encoder, head_loss, params, batch = _problem()
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    _, state, aux = jax.jit(step)(params, step.init(params), batch)
    assert int(state.affinity.lookahead_count) == 1
    assert np.all(np.isfinite(np.asarray(state.affinity.lookahead)))


def test_tracker_errors_name_the_argument():
    tracker = imtl_jax.affinity_tracker(lookahead_lr=0.1)
    with pytest.raises(ValueError, match="losses"):
        tracker.update(jnp.ones((2, 3)), tracker.init(2))
    with pytest.raises(ValueError, match="tracker.init\\(3\\)"):
        tracker.update(jnp.ones((3, 3)), tracker.init(2), jnp.ones(3))
    with pytest.raises(ValueError, match="lookahead_lr"):
        imtl_jax.affinity_tracker(lookahead_lr=-1.0)
    with pytest.raises(ValueError, match="num_tasks"):
        tracker.init(0)


# ------------------------------------------------------------------------------ grouping

def _block_affinity(sizes, rng, within=0.6, between=-0.1, noise=0.1):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    a = np.where(labels[:, None] == labels[None, :], within, between)
    a = a + noise * rng.uniform(-1, 1, size=a.shape)
    np.fill_diagonal(a, 1.0)
    return a, labels


@pytest.mark.parametrize("sizes", [(3, 3), (2, 4, 3), (4, 1, 3, 3), (2, 2, 2, 2, 3)])
def test_propose_groups_recovers_permuted_blocks(sizes):
    rng = np.random.default_rng(sum(sizes))
    a, labels = _block_affinity(sizes, rng)
    perm = rng.permutation(len(labels))
    a, labels = a[np.ix_(perm, perm)], labels[perm]
    want = sorted(tuple(np.flatnonzero(labels == g).tolist()) for g in range(len(sizes)))
    got = imtl_jax.propose_groups(a, len(sizes))
    assert sorted(got) == want
    assert got == tuple(sorted(got, key=lambda g: g[0]))
    # the greedy (agglomerative) path recovers clear blocks too
    assert sorted(imtl_jax.propose_groups(a, len(sizes), exhaustive_max_tasks=0)) == want


def test_propose_groups_agglomerative_for_many_tasks():
    rng = np.random.default_rng(7)
    a, labels = _block_affinity((5, 6, 4), rng)
    perm = rng.permutation(15)
    a, labels = a[np.ix_(perm, perm)], labels[perm]
    want = sorted(tuple(np.flatnonzero(labels == g).tolist()) for g in range(3))
    assert sorted(imtl_jax.propose_groups(a, 3)) == want  # T = 15 > 12: agglomerative


def _brute_force_best(a, k):
    """Every labelling in range(k)^T (not only canonical ones), scored by a plain loop."""
    t = a.shape[0]
    best = -np.inf
    for lab in itertools.product(range(k), repeat=t):
        if len(set(lab)) != k:
            continue
        total = 0.0
        for i in range(t):
            mates = [u for u in range(t) if u != i and lab[u] == lab[i]]
            total += np.mean([a[u, i] for u in mates]) if mates else 0.0
        best = max(best, total / t)
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_propose_groups_is_optimal_against_brute_force(k):
    rng = np.random.default_rng(k)
    a = rng.normal(size=(6, 6))  # directed, asymmetric
    groups = imtl_jax.propose_groups(a, k)
    assert len(groups) == k and sorted(i for g in groups for i in g) == list(range(6))
    np.testing.assert_allclose(imtl_jax.grouping_score(a, groups), _brute_force_best(a, k), atol=1e-12)


def test_propose_groups_ties_are_deterministic():
    a = np.full((4, 4), 0.5)
    assert imtl_jax.propose_groups(a, 2) == ((0, 1), (2, 3))
    assert imtl_jax.propose_groups(a, 2) == imtl_jax.propose_groups(a.copy(), 2)
    assert imtl_jax.propose_groups(a, 4) == ((0,), (1,), (2,), (3,))


def test_grouping_errors():
    with pytest.raises(ValueError, match="`k`"):
        imtl_jax.propose_groups(np.eye(3), 4)
    with pytest.raises(ValueError, match="square"):
        imtl_jax.propose_groups(np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="non-finite"):
        imtl_jax.propose_groups(np.array([[1, np.nan], [0, 1]]), 1)
    with pytest.raises(ValueError, match="partition"):
        imtl_jax.grouping_score(np.eye(3), [(0, 1)])


def test_random_groups_sizes_and_determinism():
    g1 = imtl_jax.random_groups(11, (4, 4, 3), seed=5)
    assert sorted(len(g) for g in g1) == [3, 4, 4]
    assert sorted(i for g in g1 for i in g) == list(range(11))
    assert g1 == imtl_jax.random_groups(11, (4, 4, 3), seed=5)


def test_plot_affinity_orders_by_groups(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from imtl_jax.plotting import plot_affinity
    a = np.array([[1., .1, .8], [.1, 1., 0.], [.8, 0., 1.]])
    ax = plot_affinity(a, task_names=["x", "y", "z"], groups=[(0, 2), (1,)], title="t")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "z", "y"]
    np.testing.assert_allclose(ax.images[0].get_array(), a[np.ix_([0, 2, 1], [0, 2, 1])])
    ax.figure.savefig(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_with_affinity_at_parameter_level_uses_shared_parameter_gradients():
    """A parameter-level method: the cosines are those of the per-task gradients w.r.t. the
    flattened shared parameters (oracle: jax.grad of each task's loss alone, float64 numpy)."""
    encoder, head_loss, params, batch = _problem()
    base = imtl_jax.methods.get_method("equal")._replace(name="equal_parameters", level="parameters")
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), imtl_jax.with_affinity(base))
    _, state, aux = jax.jit(step)(params, step.init(params), batch)
    rows = np.stack([np.asarray(jax.grad(lambda w, t=t: head_loss(params.heads[t], encoder(w, batch), batch, t))(
        params.shared), np.float64).ravel() for t in range(3)])
    n = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(aux.info["cosines"]), n @ n.T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.affinity.mean), n @ n.T, atol=1e-5)
