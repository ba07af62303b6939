"""DB-MTL (Lin et al. 2023) and STCH (Lin et al., ICML 2024) against numpy float64 formulas
written from the papers, over sequences of steps (both keep state), and through the training
step (DB-MTL's log-loss scaling reaches the heads)."""

from __future__ import annotations

import decimal
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

import imtl_jax
from imtl_jax.methods.db_mtl import db_mtl_weighting, log_scale
from imtl_jax.methods.stch import stch_weighting

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _run(weighting, grads_seq, losses_seq, dtype):
    weigh = jit(lambda g, losses, s: weighting.weigh(g, losses, s, None, None))
    state = weighting.init(len(losses_seq[0]), dtype)
    outs = []
    for g, losses in zip(grads_seq, losses_seq):
        out = weigh(None if g is None else jnp.asarray(g, dtype), jnp.asarray(losses, dtype), state)
        state = out.state
        outs.append(out)
    return outs


# ---------------------------------------------------------------------------------------------
# DB-MTL


def db_mtl_numpy(grads_seq, beta, beta_sigma):
    """Each step: n_t <- b_k n_t + (1 - b_k)||g_t||, b_k = beta / k^sigma; update =
    sum_t (max_s n_s / n_t) g_t (float64)."""
    n = np.zeros(grads_seq[0].shape[0])
    updates = []
    for k, g in enumerate(grads_seq, start=1):
        b = beta / k ** beta_sigma
        n = b * n + (1 - b) * np.linalg.norm(g, axis=1)
        updates.append((n.max() / n) @ g)
    return updates, n


@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_matches_the_norm_ema_over_steps(fdtype, beta, beta_sigma):
    rng = np.random.default_rng(0)
    seq = [rng.standard_normal((4, 10)) * np.array([[1e-2], [1.0], [30.0], [0.5]]) * rng.uniform(0.5, 2)
           for _ in range(4)]
    seq = [np.asarray(np.asarray(g, fdtype), np.float64) for g in seq]
    outs = _run(db_mtl_weighting(beta=beta, beta_sigma=beta_sigma), seq, [np.ones(4)] * 4, fdtype)
    want, n = db_mtl_numpy(seq, beta, beta_sigma)
    tol = 1e-12 if fdtype == np.float64 else 2e-6
    for g, out, w in zip(seq, outs, want):
        assert out.weights.dtype == fdtype
        np.testing.assert_allclose(np.asarray(out.weights, np.float64) @ g, w, rtol=tol, atol=tol * np.abs(w).max())
    np.testing.assert_allclose(np.asarray(outs[-1].state.norms(), np.float64), n, rtol=tol)
    assert int(outs[-1].state.count) == 4


def db_mtl_exact(grads_seq, beta, beta_sigma):
    """The recurrence of :func:`db_mtl_numpy` in exact-to-60-digits decimal arithmetic on the
    floats as given (no underflow or overflow anywhere): the weights max_s n_s / n_t (0 where
    n_t = 0) and the norm EMA n after each step, as Decimal lists."""
    ctx = decimal.Context(prec=60, Emin=-999999, Emax=999999)
    D = decimal.Decimal
    n = [D(0)] * len(grads_seq[0])
    weights = []
    for k, g in enumerate(grads_seq, start=1):
        b = ctx.divide(D(beta), ctx.power(D(k), D(beta_sigma)))
        norms = [ctx.sqrt(sum((ctx.multiply(D(float(x)), D(float(x))) for x in row), D(0)))
                 for row in np.asarray(g)]
        n = [ctx.add(ctx.multiply(b, a), ctx.multiply(1 - b, c)) for a, c in zip(n, norms)]
        top = max(n)
        weights.append([ctx.divide(top, a) if a > 0 else D(0) for a in n])
    return weights, n


def _rel_err(got, want):
    """max_t |got_t - want_t| / max_t |want_t| in Decimal (got: float array, want: Decimals)."""
    D = decimal.Decimal
    ctx = decimal.Context(prec=60, Emin=-999999, Emax=999999)
    scale = max(abs(w) for w in want)
    return float(ctx.divide(max(abs(D(float(a)) - w) for a, w in zip(got, want)), scale))


# Per-row spread as in the over-steps test; every case is a sequence of 4 steps.
_ROWS = np.array([[1e-2], [1.0], [30.0], [0.5]])
DB_SCALES = {
    "float32": {"1e-30": 1e-30, "subnormal 1e-40": 1e-40, "subnormal 2^-140": 2.0 ** -140,
                "3e38": 3e38 / 60},           # entries up to 30 * 2 * 5e36 = 3e38
    "float64": {"1e-300": 1e-300, "subnormal 1e-310": 1e-310, "1.7e308": 1.7e308 / 60},
}


def _scaled_seq(dtype, scale, dim=10, mixed=False):
    rng = np.random.default_rng(7)
    seq = []
    for step in range(4):
        g = rng.uniform(-1.0, 1.0, (4, dim)) * _ROWS * rng.uniform(0.5, 2.0)
        s = scale if not mixed else [scale, 1.0, scale, 1e-3][step]
        seq.append(np.asarray(g * s, dtype))
    return seq


def _assert_norms_overflow(seq, dtype):
    """Every entry finite, some row norm above the dtype's largest finite value."""
    assert all(np.all(np.isfinite(g)) for g in seq)
    big = max(np.linalg.norm(np.asarray(g, np.float64) / 2.0 ** 600, axis=1).max() for g in seq)
    assert big > float(np.finfo(dtype).max) / 2.0 ** 600


def _check_db_mtl_against_exact(dtype, seq, beta=0.9, beta_sigma=0.5):
    outs = _run(db_mtl_weighting(beta=beta, beta_sigma=beta_sigma), seq, [np.ones(4)] * 4, dtype)
    want_w, want_n = db_mtl_exact(seq, beta, beta_sigma)
    # float32: beta and b_k rounded to float32 (~6e-8 relative each), norms and sums over 10
    # entries; float64 the same at 2^-52.
    tol = 3e-6 if dtype == np.float32 else 1e-13
    D = decimal.Decimal
    for out, w in zip(outs, want_w):
        got = np.asarray(out.weights)
        assert got.dtype == dtype and np.all(np.isfinite(got)), got
        assert _rel_err(got, w) <= tol, (got, [float(x) for x in w])
    state = outs[-1].state
    exact_n = [D(float(m)) * D(2) ** int(k)
               for m, k in zip(np.asarray(state.norm_ema), np.asarray(state.norm_exponent))]
    assert _rel_err(exact_n, want_n) <= tol


@pytest.mark.parametrize("label", list(DB_SCALES["float32"]))
def test_db_mtl_float32_extreme_scales_match_exact_oracle(label):
    """1e-30, subnormal gradients (XLA's CPU backend reads them as 0 in arithmetic: before the
    power-of-two state every weight was 0 there, a zero update) and entries near 3e38 whose row
    norms overflow float32: the weights and the norm EMA of the exact recurrence."""
    seq = _scaled_seq(np.float32, DB_SCALES["float32"][label])
    if label.startswith("subnormal"):
        assert all(np.max(np.abs(g)) < np.finfo(np.float32).tiny for g in seq)
    if label == "3e38":
        _assert_norms_overflow(seq, np.float32)
    _check_db_mtl_against_exact(np.float32, seq)


@pytest.mark.parametrize("label", list(DB_SCALES["float64"]))
def test_db_mtl_float64_extreme_scales_match_exact_oracle(label):
    with x64():
        seq = _scaled_seq(np.float64, DB_SCALES["float64"][label])
        if label.startswith("subnormal"):
            assert all(np.max(np.abs(g)) < np.finfo(np.float64).tiny for g in seq)
        if label == "1.7e308":
            _assert_norms_overflow(seq, np.float64)
        _check_db_mtl_against_exact(np.float64, seq)


def test_db_mtl_scale_jumps_between_steps_match_exact_oracle():
    """The EMA across steps whose gradients jump between subnormal and normal scales (one
    exponent for the whole state, the smaller terms shifted exactly)."""
    _check_db_mtl_against_exact(np.float32, _scaled_seq(np.float32, 1e-40, mixed=True))


def test_db_mtl_with_beta_zero_is_the_paper_update():
    """beta = 0: the paper's gradient balancing exactly (the EMA of vectors and of norms are both
    the current gradient): every rescaled gradient has the largest norm."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((3, 6)) * np.array([[1e-3], [1.0], [1e3]])
    with x64():
        w = np.asarray(_run(db_mtl_weighting(beta=0.0), [g], [np.ones(3)], np.float64)[0].weights)
    norms = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(np.linalg.norm(w[:, None] * g, axis=1), norms.max(), rtol=1e-14)
    np.testing.assert_allclose(w, norms.max() / norms, rtol=1e-14)


def test_db_mtl_zero_gradient_history_gets_zero_weight_and_args_validated():
    g = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
    out = _run(db_mtl_weighting(), [g], [np.ones(2)], np.float32)[0]
    np.testing.assert_array_equal(np.asarray(out.weights), [1.0, 0.0])
    for kwargs in ({"beta": 1.0}, {"beta": -0.1}, {"beta_sigma": -1.0}):
        with pytest.raises(ValueError, match="beta"):
            db_mtl_weighting(**kwargs)


def test_db_mtl_in_the_training_step_balances_log_losses():
    """mtl_step with "db_mtl": heads get grad log(L_t + 1e-8), the shared feature the rescaled
    sum of the gradients of the log-losses; multiplying a loss by 1e3 changes nothing."""
    k = jax.random.split(jax.random.key(5), 4)
    batch = {"x": jax.random.normal(k[0], (16, 3)), "y": jax.random.normal(k[1], (16, 2))}
    params = imtl_jax.MTLParams(shared=jax.random.normal(k[2], (3, 4)),
                                heads=jax.random.normal(k[3], (2, 4)), log_scales=jnp.zeros(2))

    def encoder(w, b):
        return jnp.tanh(b["x"] @ w)

    def make(scales):
        def head_loss(v, z, b, t):
            return jnp.asarray(scales)[t] * jnp.mean((z @ v - b["y"][:, t]) ** 2)
        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "db_mtl")
        return head_loss, jit(lambda p: step(p, step.init(p), batch))(params)

    head_loss, (grads, state, aux) = make([1.0, 1.0])
    z = encoder(params.shared, batch)
    for t in range(2):
        direct = jax.grad(lambda v, t=t: log_scale(head_loss(v, z, batch, t), None))(params.heads[t])
        np.testing.assert_allclose(np.asarray(grads.heads[t]), np.asarray(direct), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(jnp.min(aux.weights)), 1.0, rtol=1e-6)   # the largest norm keeps 1
    _, (scaled_grads, _, _) = make([1e3, 1.0])
    np.testing.assert_allclose(np.asarray(scaled_grads.shared), np.asarray(grads.shared), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grads.log_scales), 0.0)


# ---------------------------------------------------------------------------------------------
# STCH


def stch_weights_numpy(losses, mu, pref, ref):
    """T lambda_t softmax(lambda (L - z) / mu)_t: T times the gradient of the paper's Eq. 9
    mu log sum_t exp(lambda_t (L_t - z_t) / mu) with respect to L (float64)."""
    y = pref * (np.asarray(losses, np.float64) - ref) / mu
    e = np.exp(y - y.max())
    return len(losses) * pref * e / e.sum()


@pytest.mark.parametrize("mu", [0.05, 1.0, 20.0])
def test_stch_raw_losses_match_the_paper_gradient(fdtype, mu):
    rng = np.random.default_rng(2)
    losses = rng.uniform(0.1, 5.0, 5)
    pref = rng.uniform(0.1, 1.0, 5)
    ref = rng.uniform(-0.5, 0.0, 5)
    w = stch_weighting(mu=mu, warmup_steps=0, log_losses=False, preference=pref, reference=ref)
    out = _run(w, [None], [losses], fdtype)[0]
    l64 = np.asarray(np.asarray(losses, fdtype), np.float64)
    tol = 1e-12 if fdtype == np.float64 else 2e-5
    np.testing.assert_allclose(np.asarray(out.weights, np.float64), stch_weights_numpy(l64, mu, pref, ref),
                               rtol=tol, atol=tol)
    y = pref * (l64 - ref)
    value = mu * np.log(np.sum(np.exp((y - y.max()) / mu))) + y.max()
    np.testing.assert_allclose(float(out.info["objective"]), value, rtol=tol)
    # The smooth max bounds the Tchebycheff value: max y <= g_mu <= max y + mu log T.
    assert y.max() - tol <= float(out.info["objective"]) <= y.max() + mu * np.log(5) + tol


def test_stch_log_recipe_over_steps():
    """warmup_steps steps of SI weights (1/L) whose mean loss is the nadir, then
    T softmax(log(L / nadir) / mu) / L."""
    rng = np.random.default_rng(3)
    seq = [rng.uniform(0.2, 4.0, 3) * np.array([1.0, 100.0, 0.01]) for _ in range(5)]
    with x64():
        outs = _run(stch_weighting(mu=0.5, warmup_steps=2), [None] * 5, seq, np.float64)
    nadir = (seq[0] + seq[1]) / 2
    for i, (losses, out) in enumerate(zip(seq, outs)):
        w = np.asarray(out.weights)
        if i < 2:
            np.testing.assert_allclose(w, 1.0 / losses, rtol=1e-14)
            assert bool(out.info["warm_up"])
        else:
            f = np.log(losses / nadir)
            np.testing.assert_allclose(w, stch_weights_numpy(f, 0.5, np.ones(3), np.zeros(3)) / losses, rtol=1e-12)
            assert not bool(out.info["warm_up"])


def test_stch_small_mu_is_tchebycheff_and_large_mu_is_si():
    losses = np.array([1.0, 10.0, 3.0])
    with x64():
        first = stch_weighting(mu=1e-3, warmup_steps=1)
        state = first.init(3, jnp.float64)
        state = first.weigh(None, jnp.asarray(losses), state, None, None).state       # nadir = losses
        later = jnp.asarray(losses * np.array([2.0, 1.1, 1.5]))                       # task 0 worst
        w_small = np.asarray(first.weigh(None, later, state, None, None).weights)
        big = stch_weighting(mu=1e6, warmup_steps=1)
        w_big = np.asarray(big.weigh(None, later, state, None, None).weights)
    np.testing.assert_allclose(w_small * np.asarray(later), [3.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(w_big, 1.0 / np.asarray(later), rtol=1e-5)


def test_stch_arguments_are_validated():
    with pytest.raises(ValueError, match="mu"):
        stch_weighting(mu=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        stch_weighting(warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        stch_weighting(log_losses=False, warmup_steps=2)
    w = stch_weighting(preference=[1.0, 2.0])
    with pytest.raises(ValueError, match="preference"):
        w.weigh(None, jnp.ones(3), w.init(3), None, None)
