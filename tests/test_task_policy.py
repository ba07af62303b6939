"""The overfitting policy (imtl_jax._task_policy): the state machine against a plain-Python
reimplementation of its rule, and a synthetic two-task training problem where one task's
validation loss is constructed to rise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imtl_jax


def _python_rule(seq, patience, reduced, min_delta, maximize):
    """The documented rule, written as a plain loop over one task's metrics."""
    best, best_i, since, out = None, -1, 0, []
    for i, m in enumerate(seq):
        better = (m > best + min_delta if maximize else m < best - min_delta) if best is not None else True
        if np.isnan(m):
            better = False
        if better:
            best, best_i, since = m, i, 0
        else:
            since += 1
        out.append((reduced if since >= patience else 1.0, best_i, since))
    return out


@pytest.mark.parametrize("patience,min_delta", [(1, 0.0), (3, 0.0), (2, 0.05)])
def test_policy_matches_the_rule_on_random_walks(patience, min_delta):
    rng = np.random.default_rng(patience)
    n, t = 40, 3
    walks = np.cumsum(rng.normal(scale=0.1, size=(n, t)), axis=0)
    walks[17, 2] = np.nan
    maximize = (False, True, False)
    policy = imtl_jax.plateau_policy(patience, reduced=0.25, min_delta=min_delta, maximize=maximize)
    update = jax.jit(policy.update)
    state = policy.init(t)
    got = []
    for i in range(n):
        state = update(jnp.asarray(walks[i], jnp.float32), state, i)
        got.append((np.asarray(state.priorities), np.asarray(state.best_step), np.asarray(state.since_best)))
    for task in range(t):
        want = _python_rule(walks[:, task].astype(np.float32), patience, 0.25, min_delta, maximize[task])
        for i, (p, b, s) in enumerate(want):
            assert got[i][0][task] == pytest.approx(p), (task, i)
            assert got[i][1][task] == b and got[i][2][task] == s, (task, i)
    # restored after a new best: some task dropped and came back on this walk
    pri = np.stack([g[0] for g in got])
    assert any(np.any((pri[:-1, k] < 1) & (pri[1:, k] == 1)) for k in range(t))


def test_base_priorities_and_gap():
    policy = imtl_jax.plateau_policy(1, reduced=0.5, maximize=True)
    state = policy.init(2, base=jnp.array([2.0, 1.0]))
    for val in ([0.5, 0.5], [0.4, 0.6]):
        state = policy.update(jnp.array(val), state)
    np.testing.assert_allclose(np.asarray(state.priorities), [1.0, 1.0])  # 0.5 * 2, and 1
    np.testing.assert_allclose(np.asarray(imtl_jax.best_final_gap(state)), [0.1, 0.0], atol=1e-7)


def test_policy_errors():
    with pytest.raises(ValueError, match="patience"):
        imtl_jax.plateau_policy(0)
    with pytest.raises(ValueError, match="reduced"):
        imtl_jax.plateau_policy(2, reduced=1.0)
    policy = imtl_jax.plateau_policy(2, maximize=(True, False))
    with pytest.raises(ValueError, match="maximize"):
        policy.init(3)
    with pytest.raises(ValueError, match="metrics"):
        policy.update(jnp.ones(3), policy.init(2))


def test_two_tasks_one_overfits_priority_drops_after_patience_other_unaffected():
    """Task 1's validation targets are the negative of its training relation, so its validation
    loss rises as training fits it. With IMTL-H and the policy, its priority must drop exactly
    `patience` evaluations after its best one (and stay down while it keeps rising); task 0's
    priority stays 1 and task 0 keeps improving on validation after the drop."""
    d, f, n = 6, 8, 64
    k = jax.random.split(jax.random.key(0), 6)
    a = jax.random.normal(k[0], (2, d))
    x_tr, x_va = jax.random.normal(k[1], (n, d)), jax.random.normal(k[2], (n, d))
    train = {"x": x_tr, "y": x_tr @ a.T}
    val = {"x": x_va, "y": jnp.stack([x_va @ a[0], -(x_va @ a[1])], axis=1)}
    params = imtl_jax.MTLParams(shared=0.3 * jax.random.normal(k[3], (d, f)),
                                heads=0.3 * jax.random.normal(k[4], (2, f)), log_scales=jnp.zeros(2))

    def encoder(w, batch):
        return batch["x"] @ w

    def head_loss(v, z, batch, t):
        return jnp.mean((z @ v - batch["y"][:, t]) ** 2)

    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "imtl_h")
    opt = optax.adam(3e-3)
    patience, reduced = 3, 0.1
    policy = imtl_jax.plateau_policy(patience, reduced=reduced)

    @jax.jit
    def train_step(params, opt_state, mstate, priorities):
        grads, mstate, aux = step(params, mstate, train, priorities=priorities)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mstate

    @jax.jit
    def val_losses(params):
        z = encoder(params.shared, val)
        return jax.vmap(lambda v, t: head_loss(v, z, val, t))(params.heads, jnp.arange(2))

    opt_state, mstate, pstate = opt.init(params), step.init(params), policy.init(2)
    history, prios = [], []
    for ev in range(30):
        for _ in range(10):
            params, opt_state, mstate = train_step(params, opt_state, mstate, pstate.priorities)
        v = val_losses(params)
        pstate = policy.update(v, pstate, ev)
        history.append(np.asarray(v))
        prios.append(np.asarray(pstate.priorities))
    history, prios = np.stack(history), np.stack(prios)
    # the construction worked: task 1's validation loss rose from its best to the end
    best1 = int(np.argmin(history[:, 1]))
    assert best1 < 30 - patience and history[-1, 1] > history[best1, 1]
    # its priority dropped exactly `patience` evaluations after its last new best, not before
    drop = int(np.argmax(prios[:, 1] < 1))
    assert prios[drop, 1] == pytest.approx(reduced)
    running_best = np.minimum.accumulate(history[:, 1])
    last_new_best = max(i for i in range(drop + 1) if i == 0 or history[i, 1] < running_best[i - 1])
    assert drop == last_new_best + patience
    assert np.all(prios[:drop, 1] == 1.0)
    # task 0: priority untouched, and its validation loss keeps improving after the drop
    assert np.all(prios[:, 0] == 1.0)
    assert history[-1, 0] < history[drop, 0]
    assert int(pstate.best_step[0]) >= 30 - 2
