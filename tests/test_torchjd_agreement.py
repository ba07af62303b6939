"""Agreement with TorchJD 0.18 on the same float64 inputs for the methods TorchJD also has:
ConFIG, DualProj, GradVac (T = 2, where the task order is fixed, over a sequence of steps) and the
STCH, PBI and COSMOS scalarizers and ExcessMTL (over recorded sequences), and GradDrop (its
uniform draws fixed: TorchJD's ``torch.rand`` returns the U our key drew). Slow step only; skipped
when torch/torchjd are not installed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64

import inputs
from imtl_jax.methods import get_method
from imtl_jax.methods.config import CONFIG
from imtl_jax.methods.cr_mogm import cr_mogm_weighting
from imtl_jax.methods.dualproj import DUALPROJ
from imtl_jax.methods.excess_mtl import excess_mtl_weighting
from imtl_jax.methods.fairgrad import fairgrad_weighting
from imtl_jax.methods.graddrop import graddrop_uniforms, graddrop_weighting
from imtl_jax.methods.gradvac import gradvac_weighting
from imtl_jax.methods.modo import MODO
from imtl_jax.methods.preference import cosmos_weighting, pbi_weighting
from imtl_jax.methods.sdmgrad import SDMGRAD
from imtl_jax.methods.stch import stch_weighting

pytestmark = pytest.mark.slow
torch = aggregation = scalarization = None


@pytest.fixture(autouse=True)
def _torchjd():
    """Imports torch/torchjd only when a test runs (the default suite deselects this file's
    tests without paying torch's import at collection); skips when they are absent."""
    global torch, aggregation, scalarization
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    scalarization = pytest.importorskip("torchjd.scalarization")


def _ours(weighting, g, state=None, key=None):
    with x64():
        state = weighting.init(g.shape[0], jnp.float64) if state is None else state
        out = weighting.weigh(jnp.asarray(g), jnp.zeros(g.shape[0]), state, key, None)
        return np.asarray(out.weights) @ g, out


CASES = [("random", s, t, d, 2) for s, (t, d) in enumerate([(2, 5), (3, 8), (6, 20), (10, 32)])] + \
    [(f, 3, t, d, k) for f, t, d, k in inputs.HARD]


def _draw(family, seed, num_tasks, dim, decades):
    if family == "random":
        rng = np.random.default_rng(seed)
        return rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-decades, decades, (num_tasks, 1))
    return inputs.draw(family, seed, num_tasks, dim, decades)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_config_agrees_with_torchjd(case):
    g = _draw(*case)
    theirs = aggregation.ConFIG()(torch.tensor(g, dtype=torch.float64)).numpy()
    ours, _ = _ours(CONFIG, g)
    cond = np.linalg.cond(g / np.linalg.norm(g, axis=1, keepdims=True))
    # Closed form: 1e-8 relative where the unit rows are well conditioned; our cosine-matrix
    # route loses cond(U)^2 eps, TorchJD's SVD cond(U) eps.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=max(1e-8, 1e-15 * cond ** 2) * np.linalg.norm(theirs))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_dualproj_agrees_with_torchjd(case):
    """Against TorchJD's DualProj with its quadprog projector unregularised (norm_eps = reg_eps =
    0): the same projection to 1e-8. TorchJD's default adds reg_eps = 1e-4 to the normalised
    Gramian's diagonal, a different problem by design: with norms spread over 1e+-2 its update
    conflicts with some task (g_t . update < 0, measured down to -3 on these draws), ours never
    does (its certificate)."""
    quadprog = pytest.importorskip("quadprog")  # noqa: F841  (TorchJD's projector needs it)
    from torchjd._linalg import QuadprogProjector
    g = _draw(*case)
    theirs = aggregation.DualProj(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(
        torch.tensor(g, dtype=torch.float64)).numpy()
    ours, out = _ours(DUALPROJ, g)
    assert bool(out.info["converged"])
    scale = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-8 * max(np.linalg.norm(theirs), 1e-8 * scale.max()))
    assert np.all(g @ ours >= -1e-12 * scale * np.linalg.norm(ours))


@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_gradvac_agrees_with_torchjd_over_steps(beta):
    """T = 2 (each task has one other: the order is fixed), six steps of a recorded sequence;
    TorchJD's eps = 1e-8 in the denominators is the only difference (gradients of norm ~1)."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((2, 9))
    seq = [base * rng.uniform(0.5, 2.0, (2, 1)) + 0.9 * rng.standard_normal((2, 9)) for _ in range(6)]
    agg = aggregation.GradVac(beta=beta)
    ours_w = gradvac_weighting(beta=beta)
    state = None
    for g in seq:
        theirs = agg(torch.tensor(g, dtype=torch.float64)).numpy()
        ours, out = _ours(ours_w, g, state, jax.random.key(0))
        state = out.state
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7 * np.linalg.norm(theirs))


@pytest.mark.parametrize("mu", [0.01, 0.5, 1.0])
def test_stch_agrees_with_torchjd_scalarizer(mu):
    """TorchJD's STCH(mu) with its default preference 1/T: our raw-loss weights with
    preference 1/T are T times the gradient of their scalarization."""
    rng = np.random.default_rng(int(mu * 100))
    losses = rng.uniform(0.1, 3.0, 5)
    ref = rng.uniform(-0.2, 0.0, 5)
    x = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    value = scalarization.STCH(mu, reference=torch.tensor(ref, dtype=torch.float64))(x)
    (grad,) = torch.autograd.grad(value, x)
    w = stch_weighting(mu=mu, warmup_steps=0, log_losses=False, preference=[0.2] * 5, reference=ref)
    with x64():
        out = w.weigh(None, jnp.asarray(losses), w.init(5, jnp.float64), None, None)
    np.testing.assert_allclose(np.asarray(out.weights), 5 * grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(out.info["objective"]), float(value), rtol=1e-12)


def _fairness_error(m, w, alpha):
    """The backward error of ``M w = w^{-1/alpha}`` (numpy float64, raw Gramian)."""
    target = w ** (-1.0 / alpha)
    return np.max(np.abs(m @ w - target) / (np.abs(m) @ w + target))


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("case", CASES + [("mixed", 3, 20, 64, 2), ("simplex", 3, 20, 64, 4)],
                         ids=lambda c: "-".join(map(str, c)))
def test_fairgrad_agrees_with_torchjd(case, alpha):
    """TorchJD's FairGrad runs scipy's least_squares (bounds w >= 0, default tolerances) on the
    raw equation G G^T w = w^{-1/alpha}, which has one solution. Our certificate (the backward
    error) is within 16 eps and never worse than TorchJD's beyond that; where TorchJD's solve
    reached 1e-12, the weights agree to 1e-8 relative. Where it did not (norms over 1e+-4,
    near-simplex conflicts: measured up to 0.9 on these draws, weights off by 100 %), the
    difference is TorchJD's solver stopping short, by design of its tolerances."""
    g = _draw(*case)
    m = g @ g.T
    theirs = aggregation.FairGradWeighting(alpha)(torch.tensor(m)).numpy()
    _, out = _ours(fairgrad_weighting(alpha=alpha), g)
    ours = np.asarray(out.weights)
    tol = 16 * np.finfo(np.float64).eps
    assert bool(out.info["converged"]) and float(out.info["certificate"]) <= tol
    mine, their_error = _fairness_error(m, ours, alpha), _fairness_error(m, theirs, alpha)
    assert mine <= max(their_error, tol)
    if their_error <= 1e-12:
        np.testing.assert_allclose(ours, theirs, rtol=1e-8)


SEQUENCE_CASES = [("random", 0, 3, 8, 1), ("random", 1, 6, 20, 1), ("mixed", 3, 5, 16, 4),
                  ("opposed_pairs", 3, 10, 10, 2), ("simplex", 3, 10, 16, 4), ("mixed", 3, 20, 64, 2)]


def _recorded(case, steps=5):
    """A recorded sequence of Jacobians: the case's draw plus per-step noise."""
    g = _draw(*case)
    rng = np.random.default_rng(99)
    return [g * (1.0 + 0.3 * rng.standard_normal(g.shape)) for _ in range(steps)]


@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sdmgrad_agrees_with_torchjd_over_steps(case):
    """TorchJD's SDMGradWeighting (lr 10, momentum 0.5, 20 steps, lambda 0.3: our defaults) fed
    A = G G^T of each step, five steps (its inner weights are the state). TorchJD adds 1e-8 to
    the normalising scale^2; our weights are scale-free, so the rows are first scaled to a mean
    norm of 1e4, where that 1e-8 is 1e-16 relative: the only difference left is round-off,
    grown by the inner steps (lr * lambda_max(A) each, see test_methods_sdmgrad_modo)."""
    seq = _recorded(case)
    theirs_w = aggregation.SDMGradWeighting()
    state = None
    for g in seq:
        g = g * (1e4 / np.mean(np.linalg.norm(g, axis=1)))
        theirs = theirs_w(torch.tensor(g @ g.T)).numpy()
        _, out = _ours(SDMGRAD, g, state)
        state = out.state
        np.testing.assert_allclose(np.asarray(out.weights), theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", SEQUENCE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_modo_agrees_with_torchjd_over_steps(case):
    """TorchJD's MoDoWeighting (gamma 0.1, rho 0.1: our defaults) fed A = G G^T of each step,
    five steps. gamma is relative to the squared norms, so the rows are scaled to a largest
    squared norm of 5 (a step that moves the weights without jumping to a vertex each time)."""
    seq = _recorded(case)
    theirs_w = aggregation.MoDoWeighting()
    state = None
    for g in seq:
        g = g * np.sqrt(5.0 / np.max(np.sum(g * g, axis=1)))
        theirs = theirs_w(torch.tensor(g @ g.T)).numpy()
        _, out = _ours(MODO, g, state)
        state = out.state
        np.testing.assert_allclose(np.asarray(out.weights), theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_cr_mogm_agrees_with_torchjd_over_steps(alpha):
    """TorchJD's CRMOGMWeighting and ours, both wrapping IMTL-G (a closed form on which the two
    libraries agree to 1e-12, tests/test_torchjd_agreement_core.py), over six recorded steps
    with T = 5: the same moving average, lambda_0 = the first wrapped weights."""
    rng = np.random.default_rng(int(alpha * 10))
    base = rng.standard_normal((5, 12))
    seq = [base + 0.7 * rng.standard_normal(base.shape) for _ in range(6)]
    theirs_w = aggregation.CRMOGMWeighting(aggregation.IMTLGWeighting(), alpha=alpha)
    ours_w = cr_mogm_weighting("imtl_g", alpha=alpha)
    state = None
    for g in seq:
        theirs = theirs_w(torch.tensor(g @ g.T)).numpy()
        _, out = _ours(ours_w, g, state)
        state = out.state
        np.testing.assert_allclose(np.asarray(out.weights), theirs, rtol=0, atol=1e-12 * np.abs(theirs).max())


# PBI and COSMOS: (T, loss decades, Dirichlet concentration of the preference, seed). The losses
# spread over 10^+-decades; a concentration of 0.2 puts the preference near a corner of the
# simplex, "equal" is 1/T.
SCALARIZER_CASES = [(2, 0, 1.2, 0), (3, 1, 1.2, 1), (6, 2, 0.2, 2), (10, 4, 1.2, 3), (20, 2, "equal", 4),
                    (20, 4, 0.2, 5)]


def _scalarizer_draw(num_tasks, decades, concentration, seed):
    rng = np.random.default_rng(seed)
    losses = rng.uniform(0.5, 2.0, num_tasks) * 10.0 ** rng.uniform(-decades, decades, num_tasks)
    pref = (np.full(num_tasks, 1.0 / num_tasks) if concentration == "equal"
            else rng.dirichlet(np.full(num_tasks, concentration)))
    return losses, pref, rng


def _torch_grad(scalarizer, losses):
    x = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    value = scalarizer(x)
    (grad,) = torch.autograd.grad(value, x)
    return grad.numpy(), float(value.detach())


def _ours_loss_weighting(weighting, losses, pref):
    """Our weights with the preference passed as the step's priorities (traced)."""
    with x64():
        out = jax.jit(lambda x, p: weighting.weigh(None, x, (), None, p))(jnp.asarray(losses), jnp.asarray(pref))
        return np.asarray(out.weights), {k: float(v) for k, v in out.info.items()}


@pytest.mark.parametrize("theta", [0.0, 5.0, 20.0])
@pytest.mark.parametrize("case", SCALARIZER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pbi_agrees_with_torchjd_scalarizer(case, theta):
    """TorchJD's PBI(theta, weights=lambda, reference=z): our weights are the gradient of its
    value, to 1e-8 relative, and the values d1 + theta d2 agree. TorchJD adds 1e-12 under the
    square root of d2 (an absolute epsilon), which changes its gradient by ~1e-12 / (2 d2^2)
    relative: below 1e-9 at the d2 >= 0.05 of these draws (asserted)."""
    losses, pref, rng = _scalarizer_draw(*case)
    ref = -rng.uniform(0.0, 0.1, len(losses)) * losses.min()
    theirs, value = _torch_grad(scalarization.PBI(theta, torch.tensor(pref), torch.tensor(ref)), losses)
    ours, info = _ours_loss_weighting(pbi_weighting(theta=theta, reference=ref), losses, pref)
    assert info["d2"] >= 0.05
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-12 * np.abs(theirs).max())
    np.testing.assert_allclose(info["objective"], value, rtol=1e-12)


def test_pbi_on_the_preference_ray_differs_from_torchjd_by_design():
    """Losses within 1e-7 of the preference ray: the paper's gradient (ours, the NumPy oracle's)
    has the full penalty theta (L - z - d1 lambda_hat) / d2; TorchJD's 1e-12 under the square root
    shrinks it to d2 / sqrt(d2^2 + 1e-12), ~10 % here. On the ray exactly (d2 = 0 to
    round-off), ours takes the subgradient 0 and TorchJD's tends to it."""
    from test_methods_pbi_cosmos import pbi_grad_numpy
    pref = np.array([0.2, 0.3, 0.5])
    losses = 4.0 * pref + np.array([3e-7, -2e-7, 0.0])
    theirs, _ = _torch_grad(scalarization.PBI(5.0, torch.tensor(pref)), losses)
    ours, info = _ours_loss_weighting(pbi_weighting(theta=5.0), losses, pref)
    oracle = pbi_grad_numpy(losses, pref, 0.0, 5.0)
    np.testing.assert_allclose(ours, oracle, rtol=1e-6)   # d2 ~ 3e-7: its own round-off ~ eps / d2
    unit = pref / np.linalg.norm(pref)
    shrink = info["d2"] / np.sqrt(info["d2"] ** 2 + 1e-12)
    np.testing.assert_allclose(theirs, unit + shrink * (oracle - unit), rtol=1e-6)
    assert np.max(np.abs(theirs - ours)) > 0.05 * np.max(np.abs(ours - unit))
    theirs, _ = _torch_grad(scalarization.PBI(5.0, torch.tensor(pref)), 4.0 * pref)
    ours, _ = _ours_loss_weighting(pbi_weighting(theta=5.0), 4.0 * pref, pref)
    np.testing.assert_allclose(ours, unit, rtol=1e-15)
    np.testing.assert_allclose(theirs, unit, rtol=0, atol=1e-3)


@pytest.mark.parametrize("lam", [0.0, 0.01, 2.0, 8.0])
@pytest.mark.parametrize("case", SCALARIZER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cosmos_agrees_with_torchjd_scalarizer(case, lam):
    """TorchJD's COSMOS(lambda, weights=r): our weights are the gradient of its value to 1e-8
    relative (closed form), and the values agree."""
    losses, pref, _ = _scalarizer_draw(*case)
    theirs, value = _torch_grad(scalarization.COSMOS(lam, torch.tensor(pref)), losses)
    ours, info = _ours_loss_weighting(cosmos_weighting(lam=lam), losses, pref)
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-12 * np.abs(theirs).max())
    np.testing.assert_allclose(info["objective"], value, rtol=1e-12, atol=1e-15 * lam)


def test_cosmos_at_zero_losses_differs_from_torchjd_by_design():
    """All losses 0: the cosine is undefined. TorchJD's cosine_similarity divides by
    max(|r||L|, 1e-8), so its weights are r - lambda r_hat / 1e-8 (~-1e8); ours take the cosine's
    gradient as 0 there (weights r, finite)."""
    pref = np.array([0.5, 0.5])
    theirs, _ = _torch_grad(scalarization.COSMOS(2.0, torch.tensor(pref)), np.zeros(2))
    ours, _ = _ours_loss_weighting(cosmos_weighting(lam=2.0), np.zeros(2), pref)
    np.testing.assert_array_equal(ours, pref)
    assert np.all(theirs < -1e7)


def _excess_sequence(seed, num_tasks, dim, scale, steps=6):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-0.5, 0.5, (num_tasks, 1))
    rates = rng.uniform(0.6, 0.95, (num_tasks, 1))
    return [scale * (base * rates ** k + 0.3 * np.abs(base) * rng.standard_normal(base.shape))
            for k in range(steps)]


def _excess_ours(seq, step_size, warmup):
    # The registered form (needs_dim: F from init_state) with these settings; the default
    # settings are the registered "excess_mtl" itself.
    w = (get_method("excess_mtl").weighting if (step_size, warmup) == (1.0, 0)
         else excess_mtl_weighting(step_size=step_size, warmup_steps=warmup))
    assert w.needs_dim
    weights, infos = [], []
    with x64():
        run = jax.jit(lambda g, s: w.weigh(g, jnp.zeros(g.shape[0]), s, None, None))
        state = w.init_state(seq[0].shape[0], jnp.float64, dim=seq[0].shape[1])
        for g in seq:
            out = run(jnp.asarray(g), state)
            state = out.state
            weights.append(np.asarray(out.weights))
            infos.append({k: np.asarray(v) for k, v in out.info.items()})
    return weights, infos


def _excess_theirs(seq, step_size, warmup):
    theirs = aggregation.ExcessMTLWeighting(robust_step_size=step_size, n_warmup_steps=warmup)
    return [theirs(torch.tensor(g)).numpy() for g in seq]


@pytest.mark.parametrize("case", [(0, 3, 8, 1.0, 1), (1, 5, 16, 0.5, 2), (2, 10, 32, 2.0, 3), (3, 20, 64, 1.0, 1)],
                         ids=lambda c: "-".join(map(str, c)))
def test_excess_mtl_agrees_with_torchjd_over_steps(case):
    """TorchJD's ExcessMTLWeighting with a warm-up (n_warmup_steps >= 1: the baseline is the
    warm-up mean for both) over six recorded steps: the same weights to 1e-10 relative. TorchJD
    adds 1e-7 under the square root and to the baseline (absolute epsilons); the gradients are
    scaled to entries ~1e4, where those change the estimates by < 1e-12 relative."""
    seed, num_tasks, dim, step_size, warmup = case
    seq = _excess_sequence(seed, num_tasks, dim, 1e4)
    ours, _ = _excess_ours(seq, step_size, warmup)
    theirs = _excess_theirs(seq, step_size, warmup)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"step {k}")


def test_excess_mtl_without_warm_up_differs_from_torchjd_by_design():
    """n_warmup_steps = 0: the first step sets the baseline. Ours (as LibMTL and the official
    code) leaves the weights there (the normalised estimate is 1 for every task); TorchJD 0.18
    updates them with the raw estimate E^1 once, so its weights are ours times exp(eta E^1),
    renormalised, at every later step, and depend on the gradients' scale (ours do not)."""
    seq = _excess_sequence(4, 4, 12, 0.3)
    ours, infos = _excess_ours(seq, 1.0, 0)
    theirs = _excess_theirs(seq, 1.0, 0)
    first = infos[0]["excess_risk"]
    for k, (a, b) in enumerate(zip(ours, theirs)):
        shifted = a * np.exp(first)
        # TorchJD's 1e-7 under the root and beside the baseline, at entries ~0.3: 2.3e-5 relative
        np.testing.assert_allclose(b, shifted / shifted.sum(), rtol=1e-4, err_msg=f"step {k}")
    ours_scaled, _ = _excess_ours([10.0 * g for g in seq], 1.0, 0)
    theirs_scaled = _excess_theirs([10.0 * g for g in seq], 1.0, 0)
    for a, b in zip(ours_scaled, ours):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert np.max(np.abs(theirs_scaled[0] - theirs[0])) > 1e-2


@pytest.mark.parametrize("variant", ["default", "leak", "f"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_graddrop_agrees_with_torchjd(case, variant, monkeypatch):
    """The same U on both sides (TorchJD's one ``torch.rand(F)`` is replaced by the U our key
    draws); some zero columns (TorchJD's 0/0 purity is NaN, so nothing passes there: ours sets
    P = 1/2 and nothing passes either, since every entry is 0). Same vector to round-off."""
    g = _draw(*case)
    g[:, ::5] = 0.0
    num_tasks, dim = g.shape
    key = jax.random.key(case[1])
    with x64():
        u = np.asarray(graddrop_uniforms(key, dim, jnp.float64))
    leak = tuple(np.linspace(0.0, 0.5, num_tasks)) if variant == "leak" else None
    f_jax = (lambda p: p ** 3) if variant == "f" else None
    f_torch = (lambda p: p ** 3) if variant == "f" else (lambda p: p)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(u, dtype=torch.float64))
    agg = aggregation.GradDrop(f=f_torch, leak=None if leak is None else torch.tensor(leak, dtype=torch.float64))
    theirs = agg(torch.tensor(g, dtype=torch.float64)).numpy()
    with x64():
        w = graddrop_weighting(leak=leak, purity_fn=f_jax)
        out = w.weigh(jnp.asarray(g), jnp.zeros(num_tasks), w.init(num_tasks), key, None)
        ours = np.asarray(jnp.sum(out.coordinate_weights * jnp.asarray(g), axis=0))
    scale = np.abs(g).sum(axis=0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-14 * np.max(scale))
    assert np.all(ours[::5] == 0.0)
