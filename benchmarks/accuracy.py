"""Accuracy of the IMTL-G solve: relative projection spread of the weights, per route.

Prints, for random Jacobians (T = 2..8, D in {8, 32, 256}, row norms spread over 1e-3..1e3,
directions with cond(U) <= 10), the largest and 99th-percentile relative spread
(max_t g.u_t - min_t g.u_t) / max_t |g.u_t| measured in float64 on the float32 (or float64)
input, for: imtl_jax (its default route: normalized, refined in float64), the paper's D/U system
solved directly, and pinv of the raw Gramian (TorchJD's route). Also the floor: the exact
weights rounded to float32.

Then, per iterative solver (MGDA, CAGrad, UPGrad, Nash-MTL), the worst certificate and the
iterations used on the hard families of tests/inputs.py (conflicting rows, norms over 1e+-2 and
1e+-4, T in {5, 10, 20}, D up to 512), in float32 and float64; for IMTL-G the per-case ratio
of our float32 spread to the floor (distribution over the draws); and the kernel count of the
compiled IMTL-G solve (benchmarks/solve_cost.py).

    python -m benchmarks.accuracy [--cases N] [--hard-draws K]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import os  # noqa: E402
import sys  # noqa: E402

import imtl_jax  # noqa: E402
from benchmarks.solve_cost import solve_op_counts  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import inputs  # noqa: E402


def _directions(rng, t, d):
    while True:
        u = rng.standard_normal((t, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        if np.linalg.cond(u) <= 10:
            return u


def _spread(grads64, alpha):
    u = grads64 / np.linalg.norm(grads64, axis=1, keepdims=True)
    p = u @ (np.asarray(alpha, np.float64) @ grads64)
    return (p.max() - p.min()) / np.abs(p).max()


def _paper_du(g):
    """Eq. 2 solved directly in the input's precision (numpy)."""
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d_mat, u_mat = g[0] - g[1:], u[0] - u[1:]
    rest = np.linalg.solve((d_mat @ u_mat.T).T, u_mat @ g[0])
    return np.concatenate([[1 - rest.sum()], rest])


@jax.jit
def _gramian_pinv(g):
    v = jnp.linalg.pinv(g @ g.T) @ jnp.linalg.norm(g, axis=1)
    return v / v.sum()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--hard-draws", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    solve = jax.jit(imtl_jax.imtl_g_weights)
    ratios = []
    rows = {k: [] for k in ("imtl_jax f32", "imtl_jax f64", "paper D/U f32", "gramian pinv f32",
                            "floor: exact alpha rounded to f32")}
    start = time.perf_counter()
    for _ in range(args.cases):
        t = int(rng.integers(2, 9))
        d = int(rng.choice([8, 32, 256]))
        grads = _directions(rng, t, d) * (10.0 ** rng.uniform(-3, 3, t))[:, None]
        g32 = grads.astype(np.float32)
        g32_64 = g32.astype(np.float64)
        rows["imtl_jax f32"].append(_spread(g32_64, solve(jnp.asarray(g32))))
        rows["imtl_jax f64"].append(_spread(grads, solve(jnp.asarray(grads))))
        with np.errstate(all="ignore"):
            rows["paper D/U f32"].append(_spread(g32_64, _paper_du(g32)))
        rows["gramian pinv f32"].append(_spread(g32_64, _gramian_pinv(jnp.asarray(g32))))
        exact = _paper_du(g32_64)
        rows["floor: exact alpha rounded to f32"].append(_spread(g32_64, exact.astype(np.float32)))
        ratios.append(rows["imtl_jax f32"][-1] / max(rows["floor: exact alpha rounded to f32"][-1], 1e-300))
    print(f"{args.cases} random Jacobians, {time.perf_counter() - start:.0f} s, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}")
    print(f"{'route':38s} {'max spread':>12s} {'p99':>12s} {'median':>12s}")
    for name, vals in rows.items():
        v = np.nan_to_num(np.asarray(vals), nan=np.inf)
        print(f"{name:38s} {v.max():12.3g} {np.percentile(v, 99):12.3g} {np.median(v):12.3g}")
    r = np.asarray(ratios)
    below_2eps = np.asarray(rows['imtl_jax f32']) <= 2 * np.finfo(np.float32).eps
    print(f"IMTL-G f32 spread / floor per case: median {np.median(r):.3g}, p99 {np.percentile(r, 99):.3g}, "
          f"max {r.max():.3g}; within 2x of the floor on {100 * np.mean(r <= 2):.1f}% of draws, "
          f"within 2x or below 2 eps on {100 * np.mean((r <= 2) | below_2eps):.1f}%")
    _hard_families(args.hard_draws)
    for t in (2, 10, 40):
        c = solve_op_counts(t, 4096)
        print(f"IMTL-G solve T={t} D=4096: {c['taken']} kernel-launching HLO ops on a regular input's path "
              f"(one refinement step counted: {c['loop_step']}), {c['slowest']} on the slowest path "
              f"(eigh only off the regular path: {c['eigh_in_fallback_only']}), backend {c['backend']}")


def _hard_families(draws):
    from imtl_jax.methods.cagrad import cagrad_weighting
    from imtl_jax.methods.mgda import mgda_weighting
    from imtl_jax.methods.nash_mtl import nash_mtl_weighting
    from imtl_jax.methods.upgrad import upgrad_weighting
    methods = {"mgda": mgda_weighting(), "cagrad": cagrad_weighting(), "upgrad": upgrad_weighting(),
               "nash_mtl": nash_mtl_weighting()}
    print(f"\nHard families ({len(inputs.HARD_STRESS)} (family, T, D, decades) cases x {draws} draws): "
          "worst certificate, iterations (median / max)")
    for dt in (np.float32, np.float64):
        for name, wt in methods.items():
            fn = jax.jit(lambda g, wt=wt: wt.weigh(g, jnp.zeros(g.shape[:1], g.dtype), (), None, None).info)
            certs, iters = [], []
            for case in inputs.HARD_STRESS:
                for seed in range(draws):
                    info = fn(jnp.asarray(inputs.draw(case[0], seed, *case[1:]).astype(dt)))
                    certs.append(float(info["certificate"]))
                    iters.append(int(info["iterations"]))
            eps = np.finfo(dt).eps
            print(f"  {name:9s} {dt.__name__}: worst certificate {max(certs):.3g} ({max(certs) / eps:.1f} eps), "
                  f"iterations median {int(np.median(iters))} max {max(iters)}")


if __name__ == "__main__":
    main()
