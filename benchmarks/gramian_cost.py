"""The shared Gramian helper of the baseline methods (``methods._common.normalized_gramian``):
its lean route (per-row maxima and one Gram matmul of the raw rows, ``lax.cond`` to the
exact-scaling route when a test on T-sized quantities fails) against the exact-scaling route
alone (the helper before issue 25: bit-level power-of-two rescale, maximum, division, matmul).

    python -m benchmarks.gramian_cost                 # kernel counts and accuracy (no timing)
    python -m benchmarks.gramian_cost --time          # + interleaved timing, T = 10, 40, D = 4096
    python -m benchmarks.gramian_cost --draws 3 --dim 256   # quick (tests)

1. Kernel-launching HLO ops of the compiled helper (``benchmarks.solve_cost.hlo_op_counts``:
   every computation reached, a ``conditional``'s cheapest branch on the regular path).
2. Accuracy against a NumPy float64 oracle of the float32 input, ``M = (G/s)(G/s)^T``,
   ``s = max|G|``: the largest error relative to ``sqrt(M_ii M_jj)`` (the cosine scale; rows
   that are zero in the oracle skipped) and relative to ``max|M|``, over random rows, row norms
   spread over 1e-4..1e4, near-parallel rows, every third row zero and extreme scales (1e-30,
   3e38 / max: the exact-scaling route's cases), with the share of draws the lean route took.
3. ``--time``: median and minimum ms of each jitted helper and of three methods' weightings
   built on it (MGDA, UPGrad, Nash-MTL; the exact-scaling route swapped in at trace time), calls
   interleaved round by round, with the median per-round ratio new / old.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.solve_cost import hlo_op_counts
from imtl_jax.methods import _common

NEW = _common.normalized_gramian
OLD = _common._normalized_gramian_exact


def oracle(g: np.ndarray) -> np.ndarray:
    g = g.astype(np.float64)
    s = np.max(np.abs(g))
    h = g / (s if s > 0 else 1.0)
    return h @ h.T


def family(name: str, num_tasks: int, dim: int, rng) -> np.ndarray:
    g = rng.standard_normal((num_tasks, dim))
    if name == "spread":
        g *= 10.0 ** rng.uniform(-4, 4, (num_tasks, 1))
    elif name == "parallel":
        g = g[:1] * (1.0 + 1e-6 * rng.standard_normal((num_tasks, 1))) + 1e-7 * g
    elif name == "zero rows":
        g[::3] = 0.0
    elif name == "1e-30":
        g *= 1e-30 / np.max(np.abs(g))
    elif name == "3e38":
        g *= 3e38 / np.max(np.abs(g))
    return g.astype(np.float32)


FAMILIES = ("random", "spread", "parallel", "zero rows", "1e-30", "3e38")


def errors(fn, g: np.ndarray) -> tuple[float, float]:
    m, _ = fn(jnp.asarray(g))
    ref = oracle(g)
    d = np.diag(ref)
    keep = np.outer(d > 0, d > 0)
    err = np.abs(np.asarray(m, np.float64) - ref)
    scale = np.sqrt(np.outer(d, d))
    rel = float(np.max(np.where(keep, err / np.where(keep, scale, 1.0), 0.0)))
    return rel, float(np.max(err) / max(np.max(np.abs(ref)), np.finfo(np.float64).tiny))


def lean_taken(g: np.ndarray) -> bool:
    """Whether the helper's lean route runs for ``g`` (its own test)."""
    return bool(_common._lean_gramian_test(jnp.asarray(g))[0])


def counts_table(tasks, dim):
    print(f"HLO ops of the compiled helper, (T, {dim}) float32, backend {jax.default_backend()}")
    print(f"{'T':>3} {'helper':<22} {'regular path':>12} {'slowest':>8} {'module':>7} {'entry only':>10}")
    for t in tasks:
        arg = jax.ShapeDtypeStruct((t, dim), jnp.float32)
        for name, fn in (("lean (new)", NEW), ("exact scaling (old)", OLD)):
            c = hlo_op_counts(fn, arg)
            print(f"{t:>3} {name:<22} {c['taken']:>12} {c['slowest']:>8} {c['kernels']:>7} {c['entry']:>10}")
    print("  regular path: the entry plus the cheapest branch of each conditional; slowest: the")
    print("  fallback branch; module: every kernel-launching op in the module.\n")


def accuracy_table(tasks, dim, draws):
    new_j, old_j = jax.jit(NEW), jax.jit(OLD)
    eps = float(np.finfo(np.float32).eps)
    print(f"Accuracy against NumPy float64, {draws} draws per cell, D = {dim}; errors in units of "
          f"float32 eps ({eps:.3g})")
    print(f"{'T':>3} {'family':<10} {'lean taken':>10} {'new cos-rel':>11} {'old cos-rel':>11} "
          f"{'new max-rel':>11} {'old max-rel':>11}")
    worst = {"new": 0.0, "old": 0.0}
    for t in tasks:
        for fam in FAMILIES:
            rng = np.random.default_rng(1000 * t + FAMILIES.index(fam))
            taken, e_new, e_old = 0, [], []
            for _ in range(draws):
                g = family(fam, t, dim, rng)
                taken += lean_taken(g)
                e_new.append(errors(new_j, g))
                e_old.append(errors(old_j, g))
            cn, co = max(e[0] for e in e_new) / eps, max(e[0] for e in e_old) / eps
            mn, mo = max(e[1] for e in e_new) / eps, max(e[1] for e in e_old) / eps
            worst["new"], worst["old"] = max(worst["new"], cn), max(worst["old"], co)
            print(f"{t:>3} {fam:<10} {taken:>6}/{draws:<3} {cn:11.2f} {co:11.2f} {mn:11.2f} {mo:11.2f}")
    print("  cos-rel: max |M - M_ref| / sqrt(M_ref_ii M_ref_jj) over non-zero rows; max-rel: max |M -")
    print(f"  M_ref| / max|M_ref|. Worst cos-rel: new {worst['new']:.2f} eps, old {worst['old']:.2f} eps.\n")
    return worst


_METHODS = {"mgda": "imtl_jax.methods.mgda", "upgrad": "imtl_jax.methods.upgrad",
            "nash_mtl": "imtl_jax.methods.nash_mtl"}


def _method_fns(name, grads):
    """The method's jitted weights with the new helper and with the old one (patched into its
    module while the second one is traced)."""
    from imtl_jax.methods import get_method
    weighting = get_method(name).weighting
    state = weighting.init(grads.shape[0], grads.dtype)
    losses = jnp.ones(grads.shape[:1], grads.dtype)
    key = jax.random.PRNGKey(0)

    def make():
        return jax.jit(lambda g: weighting.weigh(g, losses, state, key, None).weights)
    # The old helper is patched into the method's module while the second function traces and
    # compiles; the caches are cleared around it, so that jitted inner functions of the method
    # (traced once per signature) are traced afresh with each helper. The compiled executables
    # are returned (a later cache clear cannot make either retrace with the other helper).
    module = importlib.import_module(_METHODS[name])
    saved = module.normalized_gramian
    jax.clear_caches()
    module.normalized_gramian = OLD
    try:
        old = make().lower(grads).compile()
    finally:
        module.normalized_gramian = saved
    jax.clear_caches()
    new = make().lower(grads).compile()
    if old.as_text() == new.as_text():
        raise RuntimeError(f"{name}: the old helper was not traced in")
    return new, old


def time_table(tasks, dim, min_s):
    print(f"Time (ms, jitted, float32, D = {dim}, random rows: the lean route), calls interleaved "
          f"round by round for >= {min_s:.0f} s per T")
    print(f"{'T':>3} {'what':<22} {'new median':>10} {'old median':>10} {'new min':>8} {'old min':>8} "
          f"{'new/old':>8}")
    for t in tasks:
        g = jnp.asarray(family("random", t, dim, np.random.default_rng(t)))
        fns = {"normalized_gramian": (jax.jit(NEW), jax.jit(OLD))}
        for name in _METHODS:
            fns[f"{name} weights"] = _method_fns(name, g)
        for new, old in fns.values():
            jax.block_until_ready(new(g))
            jax.block_until_ready(old(g))
        times = {k: ([], []) for k in fns}
        start = time.perf_counter()
        while time.perf_counter() - start < min_s:
            for k, pair in fns.items():
                for i in (0, 1) if len(times[k][0]) % 2 == 0 else (1, 0):
                    t0 = time.perf_counter()
                    jax.block_until_ready(pair[i](g))
                    times[k][i].append(time.perf_counter() - t0)
        for k, (tn, to) in times.items():
            ratio = statistics.median(a / b for a, b in zip(tn, to))
            print(f"{t:>3} {k:<22} {1e3 * statistics.median(tn):10.4f} {1e3 * statistics.median(to):10.4f} "
                  f"{1e3 * min(tn):8.4f} {1e3 * min(to):8.4f} {ratio:8.3f}")
    print(f"  {len(times['normalized_gramian'][0])} rounds at the last T; new/old: median of the")
    print("  per-round ratios (order alternated each round).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--time", action="store_true", help="also time old vs new (T = 10, 40)")
    parser.add_argument("--min-s", type=float, default=20.0, help="seconds of timing per T")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores\n")
    counts_table(args.tasks, args.dim)
    accuracy_table(args.tasks, args.dim, args.draws)
    if args.time:
        time_table([t for t in args.tasks if t >= 10] or args.tasks, args.dim, args.min_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
