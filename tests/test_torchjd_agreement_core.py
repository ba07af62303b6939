"""Agreement with TorchJD 0.18 on the same float64 inputs for the methods imtl-jax had before
issue 24 that TorchJD also ships: IMTL-G, MGDA, PCGrad, CAGrad, Nash-MTL, Aligned-MTL, UPGrad
(aggregators; compared through TorchJD's exposed ``*Weighting`` objects on the Gramian, or on
the aggregate ``w @ J``), and the scalarizers DWA, FAMO, GLS (``GeometricMean``), UW and IMTL-L
(compared through the gradient of the scalarization with respect to the losses, by autograd).

Closed forms agree to 1e-8 relative where the problem is well conditioned; iterative solvers
are checked by our certificate and by an objective evaluated independently in NumPy (ours no
worse than TorchJD's); stateful methods over a recorded sequence. Each by-design difference is
stated in its test. Slow step only; skipped when torch/torchjd (and, for CAGrad and Nash-MTL,
cvxpy with the Clarabel/ECOS solvers: ``torchjd[cagrad,nash_mtl]``) are not installed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import x64

import inputs
from imtl_jax.methods.aligned_mtl import ALIGNED_MTL
from imtl_jax.methods.cagrad import cagrad_weighting
from imtl_jax.methods.imtl import IMTL_G, IMTL_L
from imtl_jax.methods.loss_weighting import GLS, UNCERTAINTY, dwa_weighting, famo_weighting
from imtl_jax.methods.mgda import MGDA
from imtl_jax.methods.nash_mtl import NASH_MTL
from imtl_jax.methods.pcgrad import PCGRAD
from imtl_jax.methods.upgrad import UPGRAD

pytestmark = pytest.mark.slow
torch = aggregation = scalarization = None
EPS = np.finfo(np.float64).eps


@pytest.fixture(autouse=True)
def _torchjd():
    """Imports torch/torchjd only when a test runs; skips when they are absent."""
    global torch, aggregation, scalarization
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    scalarization = pytest.importorskip("torchjd.scalarization")


def _near_parallel(rng, num_tasks, dim, decades):
    """Unit rows within ~1e-3 rad of a shared direction (pairwise cosines ~1 - 1e-6), norms
    10^U(-k, k): the Gramian's conditioning is at its worst."""
    shared = rng.standard_normal(dim)
    rows = shared / np.linalg.norm(shared) + 1e-3 * rng.standard_normal((num_tasks, dim)) / np.sqrt(dim)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * 10.0 ** rng.uniform(-decades, decades, (num_tasks, 1))


def _draw(family, seed, num_tasks, dim, decades):
    rng = np.random.default_rng(seed)
    if family == "random":
        return rng.standard_normal((num_tasks, dim)) * 10.0 ** rng.uniform(-decades, decades, (num_tasks, 1))
    if family == "near_parallel":
        return _near_parallel(rng, num_tasks, dim, decades)
    return inputs.draw(family, seed, num_tasks, dim, decades)


# Random (T = 2..20), the default suite's hard families, and T = 20 / near-parallel / 1e+-4.
CASES = [("random", s, t, d, 2) for s, t, d in [(0, 2, 5), (2, 6, 20), (4, 20, 64)]] + \
    [(f, 3, t, d, k) for f, t, d, k in inputs.HARD] + \
    [("mixed", 4, 20, 64, 4), ("simplex", 5, 20, 40, 2), ("near_parallel", 6, 5, 16, 2),
     ("near_parallel", 7, 10, 32, 4), ("random", 8, 6, 20, 4)]
IDS = ["-".join(map(str, c)) for c in CASES]


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def _ours(weighting, g, state=None, key=None, losses=None):
    with x64():
        num_tasks = g.shape[0] if g is not None else losses.shape[0]
        state = weighting.init(num_tasks, jnp.float64) if state is None else state
        out = weighting.weigh(None if g is None else jnp.asarray(g),
                              jnp.asarray(np.zeros(num_tasks) if losses is None else losses), state, key, None)
        return np.asarray(out.weights), out


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------------------------
# Closed forms


def _impartiality_gap(w, g):
    """IMTL-G's defining property, evaluated in NumPy: the spread of the projections of
    ``d = w @ g`` on the unit task gradients, relative to ``|d|``, and ``|sum(w) - 1|``."""
    d = w @ g
    p = g @ d / np.linalg.norm(g, axis=1)
    return (p.max() - p.min()) / np.linalg.norm(d), abs(w.sum() - 1.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_imtl_g_agrees_with_torchjd(case):
    """TorchJD's ``IMTLGWeighting``: ``pinv(M) sqrt(diag M)``, normalised to sum 1. Where the
    Gramian's condition number stays below ``1e-2 / (T eps)`` (TorchJD's ``pinv`` keeps every
    singular value) the two agree to ``max(1e-8, 10 eps cond(M))`` relative (measured <= 9e-10).
    Beyond, by design, TorchJD's pseudo-inverse truncates the small singular values (its
    ``rtol = T eps``) and returns another vector (measured 95% and 100% relative difference at
    cond 6e14 and 7e15); there, ours is checked on IMTL-G's defining property (equal projections
    on every unit gradient, sum 1) and found no worse than TorchJD's."""
    g = _draw(*case)
    gram = g @ g.T
    theirs_w = aggregation.IMTLGWeighting()(_t(gram)).numpy()
    ours_w, _ = _ours(IMTL_G, g)
    cond = np.linalg.cond(gram)
    ours_gap, ours_sum = _impartiality_gap(ours_w, g)
    assert ours_sum <= 1e-12 and ours_gap <= max(
        1e-8, 1e-15 * np.linalg.cond(g / np.linalg.norm(g, axis=1, keepdims=True)) ** 2)
    if cond < 1e-2 / (g.shape[0] * EPS):
        assert _rel(ours_w @ g, theirs_w @ g) <= max(1e-8, 10 * EPS * cond)
    else:
        assert ours_gap <= max(_impartiality_gap(theirs_w, g)[0], 1e-8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_aligned_mtl_agrees_with_torchjd(case):
    """TorchJD's ``AlignedMTLWeighting`` with its default ``scale_mode="min"`` (the paper's
    ``sqrt(lambda_min)``, as ours) and its default preference ``1/T``: ours is ``B 1``, theirs
    ``B 1 / T`` (ours = T x theirs), with the same rank cutoff ``lambda > lambda_max T eps``.
    Both diagonalise the Gramian, whose small eigenvalues carry an absolute error ~eps
    lambda_max: the agreement is ``max(1e-8, eps cond(M))`` relative (1e-8 on the well-conditioned
    draws; measured up to 8e-4 at cond 2e14, inside that bound)."""
    g = _draw(*case)
    gram = g @ g.T
    theirs_w = g.shape[0] * aggregation.AlignedMTLWeighting()(_t(gram)).numpy()
    ours_w, _ = _ours(ALIGNED_MTL, g)
    assert _rel(ours_w @ g, theirs_w @ g) <= max(1e-8, EPS * np.linalg.cond(gram))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pcgrad_agrees_with_torchjd_same_orders(case):
    """TorchJD's ``PCGradWeighting`` with its ``torch.randperm`` replaced by our orders (from
    ``info["order"]``: task i is projected on the others in the order ``order[i]``; TorchJD skips
    i in its permutation, appended here): the same weights to 1e-12 relative (measured 1e-15)."""
    g = _draw(*case)
    num_tasks = g.shape[0]
    ours_w, out = _ours(PCGRAD, g, key=jax.random.key(case[1]))
    orders = np.asarray(out.info["order"])
    calls = iter(range(num_tasks))

    def randperm(n, *args, **kwargs):
        i = next(calls)
        assert n == num_tasks
        return torch.tensor([*orders[i].tolist(), i])

    real = torch.randperm
    torch.randperm = randperm
    try:
        theirs_w = aggregation.PCGradWeighting()(_t(g @ g.T)).numpy()
    finally:
        torch.randperm = real
    np.testing.assert_allclose(ours_w, theirs_w, rtol=0, atol=1e-12 * np.abs(theirs_w).max())


def test_pcgrad_agrees_with_torchjd_two_tasks_unpatched():
    """T = 2: the order does not matter, TorchJD's own random permutations are used."""
    rng = np.random.default_rng(11)
    for k in range(6):
        g = rng.standard_normal((2, 7)) * 10.0 ** rng.uniform(-2, 2, (2, 1))
        theirs = aggregation.PCGrad()(_t(g)).numpy()
        ours_w, _ = _ours(PCGRAD, g, key=jax.random.key(k))
        np.testing.assert_allclose(ours_w @ g, theirs, rtol=0, atol=1e-12 * np.linalg.norm(theirs))


# ---------------------------------------------------------------------------------------------
# Iterative solvers


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_upgrad_agrees_with_torchjd(case):
    """Against TorchJD's UPGrad with its quadprog projector unregularised (``norm_eps = reg_eps =
    0``): the same projections to 1e-8 relative (measured <= 2e-13). TorchJD's default adds
    ``reg_eps = 1e-4`` to the trace-normalised Gramian, a different problem by design (as for
    DualProj in test_torchjd_agreement.py). Ours also stops on its certificate and never
    conflicts (``g_t . update >= 0``)."""
    pytest.importorskip("quadprog")
    from torchjd._linalg import QuadprogProjector
    g = _draw(*case)
    theirs_w = aggregation.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(
        _t(g @ g.T)).numpy()
    ours_w, out = _ours(UPGRAD, g)
    assert bool(out.info["converged"])
    ours, theirs = ours_w @ g, theirs_w @ g
    assert _rel(ours, theirs) <= 1e-8
    assert np.all(g @ ours >= -1e-12 * np.linalg.norm(g, axis=1) * np.linalg.norm(ours))


def _mgda_objective(w, g):
    return float(np.linalg.norm(w @ g) ** 2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mgda_no_worse_than_torchjd(case):
    """TorchJD's MGDA is the paper's Frank-Wolfe with ``epsilon = 1e-3`` and ``max_iters = 100``
    (also run with 1e-12 and 10000): an approximate solver by design. Ours (Wolfe's
    min-norm-point, certified) is on the simplex, certified, and its objective ``|w @ J|^2``
    (NumPy) is no worse than TorchJD's (measured: equal where TorchJD's first vertex is optimal,
    otherwise smaller, down to ~0 where TorchJD's is still far from the minimum)."""
    g = _draw(*case)
    gram = _t(g @ g.T)
    ours_w, out = _ours(MGDA, g)
    assert bool(out.info["converged"])
    assert ours_w.min() >= 0 and abs(ours_w.sum() - 1) <= 1e-12
    fo = _mgda_objective(ours_w, g)
    scale = np.max(np.sum(g * g, axis=1))
    for kwargs in ({}, {"epsilon": 1e-12, "max_iters": 10000}):
        theirs_w = aggregation.MGDAWeighting(**kwargs)(gram).numpy()
        assert fo <= _mgda_objective(theirs_w, g) * (1 + 1e-10) + 1e-14 * scale


def _cagrad_dual(w, gram, c):
    """CAGrad's dual objective, NumPy: ``w . (M 1/T) + c |g_0| |g_w|`` on the trace-normalised
    Gramian (as TorchJD's)."""
    m = gram / np.trace(gram)
    return float(w @ m.mean(axis=1) + c * np.sqrt(m.mean()) * np.sqrt(max(w @ m @ w, 0.0)))


@pytest.mark.parametrize("c", [0.5, 0.1])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cagrad_no_worse_than_torchjd(case, c):
    """TorchJD's ``CAGradWeighting(c, norm_eps=0)`` solves the same dual with cvxpy/Clarabel
    (interior point, ~1e-8 accurate) and returns ``1/T + lam w``; ours with ``rescale=0`` returns
    T times that (ours' default ``rescale=1`` further divides by ``1 + c^2``, the authors' code).
    Checked: our certificate, and our dual objective (NumPy) no worse than TorchJD's recovered
    dual ``w``; the aggregates then agree to 1e-3 relative unless the dual is nearly flat
    (measured <= 3e-4, and 8e-2 on mixed-20-64-1e+-4 where the dual optimum is 1e-9)."""
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    g = _draw(*case)
    gram = g @ g.T
    num_tasks = g.shape[0]
    theirs_w = aggregation.CAGradWeighting(c=c, norm_eps=0.0)(_t(gram)).numpy()
    ours_w, out = _ours(cagrad_weighting(c=c, rescale=0), g)
    assert bool(out.info["converged"])
    ours_w = ours_w / num_tasks
    extra = theirs_w - 1.0 / num_tasks                      # lam w, lam > 0, sum(w) = 1
    theirs_dual = np.maximum(extra, 0.0) / np.maximum(extra, 0.0).sum()
    ours_dual = np.asarray(out.info["dual_weights"])
    assert ours_dual.min() >= 0 and abs(ours_dual.sum() - 1) <= 1e-12
    fo, ft = _cagrad_dual(ours_dual, gram, c), _cagrad_dual(theirs_dual, gram, c)
    assert fo <= ft + 1e-12 * abs(ft) + 1e-15
    if ft - fo <= 1e-4 * abs(fo):       # TorchJD's solve accurate relative to the optimum
        assert _rel(ours_w @ g, theirs_w @ g) <= 1e-3


def _nash_residual(alpha, gram):
    """Scale-free residual of ``alpha (M alpha) = const`` (NumPy): the two libraries' alphas
    differ by the constant factor ``sqrt(|G G^T|_F)`` by design (TorchJD's constraint is
    ``alpha (G G^T alpha) >= 1``, ours ``alpha (M alpha) = 1``)."""
    p = alpha * (gram @ alpha)
    return float(np.max(np.abs(p / p.mean() - 1.0)))


@pytest.mark.parametrize("case", [("random", 1, 3, 8, 1), ("opposed_pairs", 2, 4, 16, 1),
                                  ("mixed", 3, 5, 16, 2), ("random", 4, 10, 32, 2)],
                         ids=lambda c: "-".join(map(str, c)))
def test_nash_mtl_no_worse_than_torchjd_over_steps(case):
    """TorchJD's NashMTL (``update_weights_every=1``, ``optim_niter=20``, ``max_norm=0``: the
    norm clip disabled, ours has none) solves ``M alpha = 1/alpha`` on ``M = G G^T / |G G^T|_F``
    by sequential convex programs with ECOS, warm-started from the previous step's alpha (its
    state), over a recorded sequence of six Jacobians. Ours solves the same equation from scratch
    by damped Newton (plus an ``eps I`` ridge). Checked at each step: our certificate, our residual
    (NumPy) no worse than TorchJD's, and the weights equal to TorchJD's (times ``sqrt(|G G^T|_F)``)
    within twice TorchJD's residual. Measured: ours <= 1e-12; TorchJD's 3e-8..2e-4 on about half
    the steps (weights then agree to ~its residual) and O(1) on the others (0.9..7.4: its ECOS
    subproblems stop early, warm-started from a previous step's alpha), where the weights differ
    by 16-86%."""
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    rng = np.random.default_rng(case[1])
    base = _draw(*case)
    agg = aggregation.NashMTL(n_tasks=base.shape[0], max_norm=0.0)
    for _ in range(6):
        g = (base * rng.uniform(0.5, 2.0, (base.shape[0], 1))
             + 0.3 * np.abs(base).mean() * rng.standard_normal(base.shape))
        gram = g @ g.T
        theirs = agg(_t(g)).numpy()
        theirs_w = np.linalg.lstsq(g.T, theirs, rcond=None)[0]
        ours_w, out = _ours(NASH_MTL, g)
        assert bool(out.info["converged"])
        ro, rt = _nash_residual(ours_w, gram), _nash_residual(theirs_w, gram)
        assert ro <= max(rt, 1e-12)
        theirs_w = theirs_w * np.sqrt(np.linalg.norm(gram))
        assert _rel(ours_w, theirs_w) <= 2 * max(rt, 1e-10)


# ---------------------------------------------------------------------------------------------
# Scalarizers (loss weightings): weights = gradient of TorchJD's scalarization w.r.t. the losses


def _scalarizer_grad(scalarizer, losses):
    x = _t(losses).requires_grad_(True)
    value = scalarizer(x)
    (grad,) = torch.autograd.grad(value, x)
    return float(value), grad.numpy()


@pytest.mark.parametrize("decades", [0, 2, 4])
def test_gls_agrees_with_torchjd_geometric_mean(decades):
    """TorchJD's ``GeometricMean`` scalarizer: our weights are the gradient of the geometric mean
    of the losses, ``GM / (T L_t)``, and ``info["geometric_mean"]`` its value (1e-12 relative)."""
    rng = np.random.default_rng(decades)
    for num_tasks in (2, 5, 20):
        losses = 10.0 ** rng.uniform(-decades, decades, num_tasks) * rng.uniform(0.5, 2.0, num_tasks)
        value, grad = _scalarizer_grad(scalarization.GeometricMean(), losses)
        ours_w, out = _ours(GLS, None, losses=losses)
        np.testing.assert_allclose(ours_w, grad, rtol=1e-12, atol=0)
        np.testing.assert_allclose(float(out.info["geometric_mean"]), value, rtol=1e-12)


def _scaling_value_and_grads(scale, losses, s):
    with x64():
        f = lambda L, v: jnp.sum(scale(L, v))  # noqa: E731
        value = f(jnp.asarray(losses), jnp.asarray(s))
        gl, gs = jax.grad(f, argnums=(0, 1))(jnp.asarray(losses), jnp.asarray(s))
    return float(value), np.asarray(gl), np.asarray(gs)


@pytest.mark.parametrize("name", ["uncertainty", "imtl_l"])
def test_uw_and_imtl_l_agree_with_torchjd(name):
    """TorchJD's ``UW`` is Kendall's ``sum_t (e^{-s_t} L_t + s_t) / 2``; ours drops the common 1/2
    (documented: only the learning rate's scale): value and both gradients (losses, log-variances)
    are exactly twice TorchJD's. TorchJD's ``IMTLL`` is ``sum_t e^{s_t} L_t - s_t``, as ours.
    Compared (1e-12 relative) at scales from 0 (both libraries' start) to +-5 and losses over
    1e+-3, and over 20 SGD steps of the scales on a recorded loss sequence."""
    scale, factor = (UNCERTAINTY.scale, 2.0) if name == "uncertainty" else (IMTL_L.scale, 1.0)
    rng = np.random.default_rng(3)
    num_tasks = 6
    module = (scalarization.UW if name == "uncertainty" else scalarization.IMTLL)(num_tasks).double()
    param = next(module.parameters())
    for s in (np.zeros(num_tasks), rng.uniform(-5, 5, num_tasks)):
        losses = 10.0 ** rng.uniform(-3, 3, num_tasks)
        with torch.no_grad():
            param.copy_(_t(s))
        x = _t(losses).requires_grad_(True)
        value = module(x)
        gl, gs = torch.autograd.grad(value, (x, param))
        ov, ogl, ogs = _scaling_value_and_grads(scale, losses, s)
        np.testing.assert_allclose(ov, factor * float(value), rtol=1e-12)
        np.testing.assert_allclose(ogl, factor * gl.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ogs, factor * gs.numpy(), rtol=1e-12, atol=1e-12)
    # A trajectory: SGD on the scales alone (lr / factor on ours, so both take the same step).
    with torch.no_grad():
        param.zero_()
    opt = torch.optim.SGD([param], lr=0.1)
    s = np.zeros(num_tasks)
    for _ in range(20):
        losses = rng.uniform(0.1, 3.0, num_tasks)
        opt.zero_grad()
        module(_t(losses)).backward()
        opt.step()
        s = s - (0.1 / factor) * _scaling_value_and_grads(scale, losses, s)[2]
        np.testing.assert_allclose(s, param.detach().numpy(), rtol=1e-12, atol=1e-14)


def _loss_sequence(seed, steps, num_tasks):
    rng = np.random.default_rng(seed)
    return np.exp(np.cumsum(rng.normal(-0.05, 0.2, (steps, num_tasks)), axis=0)) * rng.uniform(0.1, 10.0, num_tasks)


@pytest.mark.parametrize("window", [1, 3])
def test_dwa_agrees_with_torchjd_over_steps(window):
    """TorchJD's ``DWA`` (temperature 2, the paper's) averages the losses per epoch (``step()`` at
    each epoch's end) and keeps the weights fixed within an epoch; ours slides a window of
    ``window`` steps (documented: a step function knows no epochs). With epochs of ``window``
    batches the two agree (1e-12) at every epoch's first batch, which for ``window = 1`` is every
    step; within an epoch they differ by design (ours moves each step). 24 recorded steps."""
    num_tasks = 4
    seq = _loss_sequence(window, 8 * window, num_tasks)
    theirs = scalarization.DWA(temperature=2.0)
    ours_w = dwa_weighting(temperature=2.0, window=window)
    state = None
    compared = 0
    for k, losses in enumerate(seq):
        _, grad = _scalarizer_grad(theirs, losses)
        w, out = _ours(ours_w, None, state, losses=losses)
        state = out.state
        if k % window == 0:
            np.testing.assert_allclose(w, grad, rtol=1e-12, atol=0)
            compared += 1
        if (k + 1) % window == 0:
            theirs.step()
    assert compared == 8


@pytest.mark.parametrize("lr,decay", [(0.025, 1e-3), (0.5, 0.0)])
def test_famo_agrees_with_torchjd_over_steps(lr, decay):
    """TorchJD's ``FAMO`` (Adam with coupled L2 ``weight_decay`` on the logits, as ours: ours is
    set to the same decay, its default 0.01 is the authors' code's, TorchJD's 1e-3 the paper's)
    over 15 recorded steps: TorchJD's ``update`` is fed the next step's losses (ours takes the
    change of log-loss between consecutive steps, documented), its ``min_losses`` set to 1e-8 so
    that ``L - min + 1e-8 = L`` (no epsilon shift). Weights on the losses (autograd of TorchJD's
    scalarization: ``c z_t / L_t``) and logits agree to 1e-10 relative."""
    num_tasks = 5
    seq = _loss_sequence(5, 15, num_tasks)
    theirs = scalarization.FAMO(num_tasks, min_losses=torch.full((num_tasks,), 1e-8), lr=lr,
                                weight_decay=decay).double()
    ours_w = famo_weighting(lr=lr, gamma=decay)
    state = None
    for k, losses in enumerate(seq):
        if k > 0:
            theirs.update(_t(losses))
        _, grad = _scalarizer_grad(theirs, losses)
        w, out = _ours(ours_w, None, state, losses=losses)
        state = out.state
        np.testing.assert_allclose(w, grad, rtol=1e-10, atol=0)
        np.testing.assert_allclose(np.asarray(out.info["task_logits"]), theirs._w.detach().numpy(),
                                   rtol=1e-10, atol=1e-13)
