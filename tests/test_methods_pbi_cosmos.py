"""PBI (Zhang & Li 2007) and COSMOS (Ruchte & Grabocka 2021) against NumPy float64 formulas written
from the papers' equations (each oracle's gradient checked by central differences of its own
scalarization), their invariants, the preference passed as the step's ``priorities`` (traced),
partial labels with a preference, and the training step: its update is the gradient of the
scalarized loss. TorchJD 0.18 agreement: tests/test_torchjd_agreement.py (slow step)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64  # noqa: F401  (fdtype fixture: tests/conftest.py)

import imtl_jax
from imtl_jax.methods.preference import cosmos_weighting, pbi_weighting
from marks import slow

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ----------------------------------------------------------------------------- NumPy oracles


def pbi_numpy(losses, pref, ref, theta):
    """MOEA/D's PBI, Zhang & Li 2007 Sec. II-C (float64): d1 = (F - z)^T lambda / |lambda|,
    d2 = |F - (z + d1 lambda / |lambda|)|; returns (d1 + theta d2, d1, d2)."""
    f = np.asarray(losses, np.float64) - ref
    lam = np.asarray(pref, np.float64)
    d1 = f @ lam / np.linalg.norm(lam)
    d2 = np.linalg.norm(f - d1 * lam / np.linalg.norm(lam))
    return d1 + theta * d2, d1, d2


def pbi_grad_numpy(losses, pref, ref, theta):
    """d(d1 + theta d2)/dF = lambda/|lambda| + theta (F - z - d1 lambda/|lambda|) / d2 (d2 > 0)."""
    lam = np.asarray(pref, np.float64) / np.linalg.norm(pref)
    f = np.asarray(losses, np.float64) - ref
    off = f - (f @ lam) * lam
    return lam + theta * off / np.linalg.norm(off)


def cosmos_numpy(losses, pref, lam):
    """COSMOS, Ruchte & Grabocka 2021 Eq. 5 (float64): r^T L - lambda r^T L / (|r| |L|)."""
    x, r = np.asarray(losses, np.float64), np.asarray(pref, np.float64)
    return r @ x - lam * (r @ x) / (np.linalg.norm(r) * np.linalg.norm(x))


def cosmos_grad_numpy(losses, pref, lam):
    """The quotient rule on Eq. 5: r - lambda (r / (|r||L|) - (r^T L) L / (|r| |L|^3))."""
    x, r = np.asarray(losses, np.float64), np.asarray(pref, np.float64)
    nr, nx = np.linalg.norm(r), np.linalg.norm(x)
    return r - lam * (r / (nr * nx) - (r @ x) * x / (nr * nx ** 3))


def _central_difference(fn, x, h=1e-6):
    return np.array([(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def _draw(seed, num_tasks):
    rng = np.random.default_rng(seed)
    losses = rng.uniform(0.1, 4.0, num_tasks) * 10.0 ** rng.uniform(-1, 1, num_tasks)
    pref = rng.dirichlet(1.2 * np.ones(num_tasks))
    ref = -rng.uniform(0.0, 0.2, num_tasks)
    return losses, pref, ref


_JITTED: dict = {}


def _weigh(weighting, losses, dtype, priorities=None):
    """One jitted weigh per weighting (cached: the scale loops compile once)."""
    if weighting not in _JITTED:
        _JITTED[weighting] = jit(lambda x, p: weighting.weigh(None, x, (), None, p))
    return _JITTED[weighting](jnp.asarray(losses, dtype),
                              None if priorities is None else jnp.asarray(priorities, dtype))


def test_oracle_gradients_are_the_scalarizations_gradients():
    """The oracles' closed-form gradients against central differences of their own values."""
    for seed, t in [(0, 2), (1, 3), (2, 6)]:
        losses, pref, ref = _draw(seed, t)
        fd = _central_difference(lambda x, p=pref, z=ref: pbi_numpy(x, p, z, 5.0)[0], losses)
        np.testing.assert_allclose(pbi_grad_numpy(losses, pref, ref, 5.0), fd, rtol=1e-6, atol=1e-7)
        fd = _central_difference(lambda x, p=pref: cosmos_numpy(x, p, 2.0), losses)
        np.testing.assert_allclose(cosmos_grad_numpy(losses, pref, 2.0), fd, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ PBI


@pytest.mark.parametrize("theta,num_tasks", [(5.0, 3)] + [slow(th, t) for th, t in itertools.product(
    [0.0, 1.0, 5.0], [2, 3, 7]) if (th, t) != (5.0, 3)])
def test_pbi_matches_the_paper(fdtype, theta, num_tasks):
    losses, pref, ref = _draw(10 * num_tasks + int(theta), num_tasks)
    losses = np.asarray(np.asarray(losses, fdtype), np.float64)
    out = _weigh(pbi_weighting(theta=theta, preference=pref, reference=ref), losses, fdtype)
    want_w = pbi_grad_numpy(losses, pref, ref, theta)
    value, d1, d2 = pbi_numpy(losses, pref, ref, theta)
    tol = 1e-12 if fdtype == np.float64 else 3e-6
    assert out.weights.dtype == fdtype
    np.testing.assert_allclose(np.asarray(out.weights, np.float64), want_w, rtol=tol, atol=tol * np.abs(want_w).max())
    for key, want in (("objective", value), ("d1", d1), ("d2", d2)):
        np.testing.assert_allclose(float(out.info[key]), want, rtol=tol)


def test_pbi_invariants():
    """Euler: sum_t w_t (L - z)_t = S (S is positively homogeneous), so the weights do not change
    when L - z is rescaled (1e-30 .. 1e30 in float32, no underflow of |L|^2); T = 1, theta = 0 and
    losses on the preference ray give lambda_hat; permuting the tasks permutes the weights."""
    losses, pref, _ = _draw(3, 5)
    w = pbi_weighting(theta=5.0, preference=pref)
    base = _weigh(w, losses, jnp.float32)
    np.testing.assert_allclose(float(base.weights @ jnp.asarray(losses, jnp.float32)),
                               float(base.info["objective"]), rtol=1e-5)
    for scale in (1e-30, 1e-10, 1e10, 1e30):
        out = _weigh(w, losses * scale, jnp.float32)
        np.testing.assert_allclose(np.asarray(out.weights), np.asarray(base.weights), rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(float(out.info["objective"]) / scale, float(base.info["objective"]), rtol=2e-6)
    unit = pref / np.linalg.norm(pref)
    np.testing.assert_allclose(np.asarray(_weigh(pbi_weighting(theta=0.0, preference=pref), losses,
                                                 jnp.float32).weights), unit, rtol=1e-6)
    on_ray = _weigh(w, 3.0 * pref, jnp.float32)
    np.testing.assert_allclose(np.asarray(on_ray.weights), unit, rtol=1e-6)
    assert float(on_ray.info["d2"]) < 1e-6
    np.testing.assert_array_equal(np.asarray(_weigh(pbi_weighting(), [0.3], jnp.float32).weights), [1.0])
    perm = np.array([3, 0, 4, 1, 2])
    permuted = _weigh(pbi_weighting(theta=5.0, preference=pref[perm]), losses[perm], jnp.float32)
    np.testing.assert_allclose(np.asarray(permuted.weights), np.asarray(base.weights)[perm], rtol=1e-6, atol=1e-6)


def test_pbi_equal_default_and_zero_losses():
    """No preference: lambda = 1 (equal); losses all at the reference: d1 = d2 = 0, weights
    lambda_hat (finite)."""
    losses = np.array([0.5, 2.0, 1.0])
    with x64():
        out = _weigh(pbi_weighting(), losses, jnp.float64)
        zero = _weigh(pbi_weighting(), np.zeros(3), jnp.float64)
    np.testing.assert_allclose(np.asarray(out.weights), pbi_grad_numpy(losses, np.ones(3), 0.0, 5.0), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(zero.weights), np.ones(3) / np.sqrt(3), rtol=1e-15)


# --------------------------------------------------------------------------------------- COSMOS


@pytest.mark.parametrize("lam,num_tasks", [(2.0, 3)] + [slow(la, t) for la, t in itertools.product(
    [0.0, 0.5, 2.0, 8.0], [2, 3, 7]) if (la, t) != (2.0, 3)])
def test_cosmos_matches_the_paper(fdtype, lam, num_tasks):
    losses, pref, _ = _draw(20 * num_tasks + int(lam), num_tasks)
    losses = np.asarray(np.asarray(losses, fdtype), np.float64)
    out = _weigh(cosmos_weighting(lam=lam, preference=pref), losses, fdtype)
    want_w = cosmos_grad_numpy(losses, pref, lam)
    tol = 1e-12 if fdtype == np.float64 else 3e-6
    assert out.weights.dtype == fdtype
    np.testing.assert_allclose(np.asarray(out.weights, np.float64), want_w, rtol=tol, atol=tol * np.abs(want_w).max())
    np.testing.assert_allclose(float(out.info["objective"]), cosmos_numpy(losses, pref, lam), rtol=tol,
                               atol=tol * lam)
    cos = pref @ losses / (np.linalg.norm(pref) * np.linalg.norm(losses))
    np.testing.assert_allclose(float(out.info["cosine"]), cos, rtol=tol)


def test_cosmos_invariants():
    """The cosine's gradient is orthogonal to L: sum_t w_t L_t = r^T L for every lambda; it scales
    as 1/|L| (w(kL) - r = (w(L) - r)/k, 1e-30 .. 1e30 in float32); L = 0 gives w = r; the default
    preference is 1/T."""
    losses, pref, _ = _draw(4, 4)
    w = cosmos_weighting(lam=3.0, preference=pref)
    base = _weigh(w, losses, jnp.float32)
    np.testing.assert_allclose(float(base.weights @ jnp.asarray(losses, jnp.float32)), pref @ losses, rtol=1e-5)
    for scale in (1e-30, 1e-10, 1e10, 1e30):
        got = np.asarray(_weigh(w, losses * scale, jnp.float32).weights, np.float64) - np.float32(pref)
        want = np.asarray(base.weights, np.float64) - np.float32(pref)
        # float32 weights: the penalty part (w - r) to its relative round-off, or r's (large scales)
        np.testing.assert_allclose(got * scale, want, rtol=1e-5,
                                   atol=1e-6 + 2 * float(np.finfo(np.float32).eps) * scale)
    np.testing.assert_array_equal(np.asarray(_weigh(w, np.zeros(4), jnp.float32).weights), np.float32(pref))
    with x64():
        default = _weigh(cosmos_weighting(lam=3.0), losses, jnp.float64)
    np.testing.assert_allclose(np.asarray(default.weights), cosmos_grad_numpy(losses, np.full(4, 0.25), 3.0),
                               rtol=1e-13)


# ----------------------------------------------------------------- preferences as priorities


@pytest.mark.parametrize("make", [slow(pbi_weighting), cosmos_weighting], ids=["pbi", "cosmos"])
def test_priorities_are_the_preference_traced_once(make):
    """The step's priorities are the preference (the paper's gradient for it, and the same as the
    constructor's preference, and eagerly); jitted once for several preferences; a traced invalid
    preference gives NaN weights, a concrete one raises; a fixed preference and priorities
    together raise."""
    rng = np.random.default_rng(5)
    losses = jnp.asarray(rng.uniform(0.5, 3.0, 3), jnp.float32)
    w = make()
    oracle = ((lambda p: pbi_grad_numpy(losses, p, 0.0, 5.0)) if make is pbi_weighting
              else (lambda p: cosmos_grad_numpy(losses, p, 2.0)))
    traces = []

    def weigh(p):
        traces.append(1)
        return w.weigh(None, losses, (), None, p).weights

    run = jit(weigh)
    for i in range(3):
        p = rng.dirichlet(np.ones(3)).astype(np.float32)
        got = run(jnp.asarray(p))
        np.testing.assert_allclose(got, oracle(np.float64(p)), rtol=3e-6, atol=3e-6)
        if i == 0 and make is pbi_weighting:   # eagerly: the slow step's parametrization only
            np.testing.assert_allclose(got, weigh(jnp.asarray(p)), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got, _weigh(make(preference=p), losses, jnp.float32).weights,
                                       rtol=1e-6, atol=1e-7)
    assert len(traces) == 1 + (make is pbi_weighting)   # one trace under jit (+ the eager call)
    for bad in ([-0.1, 0.5, 0.6], [0.0, 0.0, 0.0], [np.nan, 0.5, 0.5]):
        assert np.all(np.isnan(np.asarray(run(jnp.asarray(bad, jnp.float32)))))
        with pytest.raises(ValueError, match="priorities"):
            w.weigh(None, losses, (), None, jnp.asarray(bad, jnp.float32))
    with pytest.raises(ValueError, match="priorities"):
        w.weigh(None, losses, (), None, jnp.ones(4))
    with pytest.raises(ValueError, match="preference"):
        make(preference=[1.0, 1.0, 1.0]).weigh(None, losses, (), None, jnp.ones(3))


@pytest.mark.slow
@pytest.mark.parametrize("make", [pbi_weighting, cosmos_weighting], ids=["pbi", "cosmos"])
def test_masked_weights_with_a_preference_equal_the_present_tasks(make):
    """All 15 masks at T = 4, jitted once: with priorities p the present tasks get the weights of
    the T'-task problem with p restricted to them (NaN losses and preferences of absent tasks
    ignored); without, the equal preference of T' tasks."""
    rng = np.random.default_rng(6)
    losses = rng.uniform(0.2, 3.0, 4)
    p = rng.dirichlet(np.ones(4))
    w = make()
    with x64():
        run = jit(lambda x, pr, m: w.weigh(None, x, (), None, pr, task_mask=m).weights)
        run_plain = jit(lambda x, m: w.weigh(None, x, (), None, None, task_mask=m).weights)
        for mask in itertools.product([False, True], repeat=4):
            mask = np.array(mask)
            if not mask.any():
                continue
            idx = np.flatnonzero(mask)
            garbage_l = np.where(mask, losses, np.nan)
            garbage_p = np.where(mask, p, np.nan)
            got = np.asarray(run(jnp.asarray(garbage_l), jnp.asarray(garbage_p), jnp.asarray(mask)))
            sub = np.asarray(w.weigh(None, jnp.asarray(losses[idx]), (), None, jnp.asarray(p[idx])).weights)
            np.testing.assert_allclose(got[idx], sub, rtol=1e-12, atol=1e-14, err_msg=str(mask))
            np.testing.assert_array_equal(got[~mask], 0.0)
            got = np.asarray(run_plain(jnp.asarray(garbage_l), jnp.asarray(mask)))
            sub = np.asarray(w.weigh(None, jnp.asarray(losses[idx]), (), None, None).weights)
            np.testing.assert_allclose(got[idx], sub, rtol=1e-12, atol=1e-14, err_msg=str(mask))


def test_arguments_are_validated():
    for kwargs in ({"theta": -1.0}, {"theta": np.inf}):
        with pytest.raises(ValueError, match="theta"):
            pbi_weighting(**kwargs)
    with pytest.raises(ValueError, match="lam"):
        cosmos_weighting(lam=-0.5)
    for make in (pbi_weighting, cosmos_weighting):
        for bad in ([-1.0, 2.0], [0.0, 0.0], [np.nan, 1.0], []):
            with pytest.raises(ValueError, match="preference"):
                make(preference=bad)
        with pytest.raises(ValueError, match="preference"):
            make(preference=[1.0, 2.0]).weigh(None, jnp.ones(3), (), None, None)
    with pytest.raises(ValueError, match="reference"):
        pbi_weighting(reference=[0.0, 0.0]).weigh(None, jnp.ones(3), (), None, None)


# ------------------------------------------------------------------------------ training step


def _scalarized_pbi(losses, pref, theta):
    unit = pref / jnp.linalg.norm(pref)
    d1 = losses @ unit
    return d1 + theta * jnp.linalg.norm(losses - d1 * unit)


def _scalarized_cosmos(losses, pref, lam):
    return pref @ losses - lam * (pref @ losses) / (jnp.linalg.norm(pref) * jnp.linalg.norm(losses))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pbi", "cosmos"])
def test_step_update_is_the_gradient_of_the_scalarized_loss(name):
    """mtl_step(name) with priorities r: every gradient (shared and heads) equals jax.grad of the
    scalarization of the task losses written directly (autodiff, not the weights' formula)."""
    with x64():
        k = jax.random.split(jax.random.key(3), 5)
        batch = {"x": jax.random.normal(k[0], (16, 3), jnp.float64),
                 "y": jax.random.normal(k[1], (16, 3), jnp.float64)}
        params = imtl_jax.MTLParams(shared=jax.random.normal(k[2], (3, 4), jnp.float64),
                                    heads=jax.random.normal(k[3], (3, 4), jnp.float64),
                                    log_scales=jnp.zeros(3, jnp.float64))
        pref = jax.random.dirichlet(k[4], 1.2 * jnp.ones(3)).astype(jnp.float64)

        def encoder(w, b):
            return jnp.tanh(b["x"] @ w)

        def head_loss(v, z, b, t):
            return jnp.mean((z @ v - b["y"][:, t]) ** 2)

        def losses_of(p):
            z = encoder(p.shared, batch)
            return jnp.stack([head_loss(p.heads[t], z, batch, t) for t in range(3)])

        scalarize = _scalarized_pbi if name == "pbi" else _scalarized_cosmos
        const = 5.0 if name == "pbi" else 2.0
        step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), name)
        grads, _, aux = jit(lambda p, r: step(p, step.init(p), batch, priorities=r))(params, pref)
        want = jax.grad(lambda p: scalarize(losses_of(p), pref, const))(params)
        np.testing.assert_allclose(grads.shared, want.shared, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(grads.heads, want.heads, rtol=1e-11, atol=1e-13)
        np.testing.assert_array_equal(grads.log_scales, 0.0)
        np.testing.assert_allclose(float(aux.info["objective"]), float(scalarize(losses_of(params), pref, const)),
                                   rtol=1e-13)
