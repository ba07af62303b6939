"""Where the IMTL-H step's extra time over equal weighting goes: the gradient plumbing or the solve.

    python -m benchmarks.imtl_h_profile [--tasks 40]

Times, interleaved round by round on the CelebA-like MLP (``benchmarks/_models.py``), the jitted
training steps of EW, IMTL-L (the loss scaling alone), IMTL-H, and IMTL-H with its weight solve
replaced by uniform weights (the same per-task gradient pass, matrix and encoder cotangent, no
solve), plus the weight solve alone on a (T, 512) matrix. Ratios are to EW within a round.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

import imtl_jax
from imtl_jax._method import Method, Weighting, WeightingOutput, stateless_init
from imtl_jax.methods.imtl import IMTL_L
from benchmarks import _models
from benchmarks.step_cost import build_step, time_interleaved


def _uniform(grads, losses, state, key, priorities):
    del losses, key, priorities
    t = grads.shape[0]  # depends on the matrix, so the per-task pass is not optimized away
    return WeightingOutput(jnp.full((t,), 1.0 / t, grads.dtype) + 0 * jnp.sum(grads), state,
                           {"common_projection": jnp.sum(grads)})


NO_SOLVE = Method("imtl_h_without_solve", IMTL_L,
                  Weighting("uniform_from_grads", stateless_init, _uniform, True, False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--reps", type=int, default=15)
    opts = parser.parse_args(argv)
    case = _models.celeba(opts.tasks)
    fns = {}
    for name, method in [("EW", "equal"), ("IMTL-L", "imtl_l"), ("IMTL-H", "imtl_h"),
                         ("IMTL-H without the solve", NO_SOLVE)]:
        b = build_step(case, method, "stacked")
        for seed in range(2):
            jax.block_until_ready(b.fn(*b.make_args(seed)))
        fns[name] = (b.fn, b.args)
    matrix = jax.random.normal(jax.random.key(0), (opts.tasks, 512))
    solve = jax.jit(imtl_jax.imtl_g_weights)
    jax.block_until_ready(solve(matrix))
    fns[f"solve alone ({opts.tasks}, 512)"] = (solve, (matrix,))
    fns = {"ew": fns.pop("EW"), **fns}
    med, ratio, cpu = time_interleaved(fns, {k: opts.reps for k in fns}, 2.0)
    print(f"CelebA-like MLP, T = {opts.tasks}, batch 256: median wall ms, ratio to EW (wall, CPU)")
    for k in fns:
        print(f"  {'EW' if k == 'ew' else k:<28} {1e3 * med[k]:9.2f} ms {ratio[k]:6.3f}x {cpu[k]:6.3f}c")
    print(f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
