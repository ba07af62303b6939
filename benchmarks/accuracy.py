"""Accuracy of the IMTL-G solve: relative projection spread of the weights, per route.

Prints, for random Jacobians (T = 2..8, D in {8, 32, 256}, row norms spread over 1e-3..1e3,
directions with cond(U) <= 10), the largest and 99th-percentile relative spread
(max_t g.u_t - min_t g.u_t) / max_t |g.u_t| measured in float64 on the float32 (or float64)
input, for: imtl_jax (normalized route + one compensated refinement), the paper's D/U system
solved directly, and pinv of the raw Gramian (TorchJD's route). Also the floor: the exact
weights rounded to float32.

    python -m benchmarks.accuracy [--cases N]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import imtl_jax  # noqa: E402


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
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    solve = jax.jit(imtl_jax.imtl_g_weights)
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
    print(f"{args.cases} random Jacobians, {time.perf_counter() - start:.0f} s, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}")
    print(f"{'route':38s} {'max spread':>12s} {'p99':>12s} {'median':>12s}")
    for name, vals in rows.items():
        v = np.nan_to_num(np.asarray(vals), nan=np.inf)
        print(f"{name:38s} {v.max():12.3g} {np.percentile(v, 99):12.3g} {np.median(v):12.3g}")


if __name__ == "__main__":
    main()
