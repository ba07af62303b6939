"""Kernel count of the compiled IMTL-G weight solve, read from the optimized HLO.

``solve_op_counts(T, D)`` compiles ``imtl_g_solve`` for a (T, D) float32 input on the default
backend and counts, in the optimized HLO module, the top-level instructions of every
computation that launch work: fusions, custom calls (Cholesky/eigh/triangular-solve kernels),
dots, whiles and conditionals; ``eigh`` calls are reported separately with the branch they sit
in (inside the ``conditional``'s fallback branch = run only when Cholesky fails its test).

    python -m benchmarks.solve_cost [--tasks 2 10 40] [--dim 4096]
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp

import imtl_jax

_KERNEL_OPS = ("fusion", "custom-call", "dot", "while", "conditional", "sort", "reduce",
               "convolution", "scatter", "gather")


def solve_op_counts(num_tasks: int, dim: int, dtype=jnp.float32, route: str = "auto") -> dict:
    """Kernel-launching HLO instructions in the compiled solve: ``kernels`` over the whole module
    (fusions and other computations called from fusions are not descended into), ``fallback``
    those inside the branch of the ``conditional`` that holds the eigendecomposition (run only
    when the Cholesky route fails its conditioning test), ``taken`` = ``kernels - fallback``
    (the well-conditioned path), and the eigh custom calls."""
    from imtl_jax import _imtl_g

    def traced(grads):  # route: "auto", "wide" (float64 Gram matrix) or "compensated" (TPU)
        old, _imtl_g._FLOAT32_ROUTE = _imtl_g._FLOAT32_ROUTE, route
        try:
            return imtl_jax.imtl_g_solve(grads)
        finally:
            _imtl_g._FLOAT32_ROUTE = old
    hlo = jax.jit(traced).lower(jax.ShapeDtypeStruct((num_tasks, dim), dtype)).compile().as_text()
    per_comp = collections.defaultdict(collections.Counter)
    eigh_comps, fused, called, current = set(), set(), {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            continue
        m = re.search(r"=\s*\S.*?\s([a-z][a-z\-]*)\(", line)
        if not m or current is None:
            continue
        op = m.group(1)
        for target in re.findall(r"calls=%?([\w.\-]+)", line):
            fused.add(target)
        if op == "conditional":
            called[current] = re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[1])
        if op in _KERNEL_OPS:
            per_comp[current][op] += 1
        if op == "custom-call" and re.search(r"syevd|eigh|heevd", line):
            eigh_comps.add(current)
    counts = collections.Counter()
    for comp, c in per_comp.items():
        if comp not in fused:
            counts.update(c)
    fallback = sum(sum(per_comp[b].values()) for branches in called.values() for b in branches
                   if b in eigh_comps)
    total = sum(counts.values())
    return {"kernels": total, "taken": total - fallback, "fallback": fallback,
            "by_op": dict(counts), "eigh_in_fallback_only": bool(eigh_comps) and all(
                any(e in branches for branches in called.values()) for e in eigh_comps),
            "backend": jax.default_backend()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--dim", type=int, default=4096)
    args = parser.parse_args(argv)
    for t, route in [(t, r) for t in args.tasks for r in ("wide", "compensated")]:
        c = solve_op_counts(t, args.dim, route=route)
        print(f"T={t:3d} D={args.dim} float32, {route} route: {c['taken']} kernel-launching HLO ops "
              "on the Cholesky path "
              f"({c['kernels']} in the module, {c['fallback']} in the eigh fallback branch; "
              f"eigh only in the fallback: {c['eigh_in_fallback_only']}); {c['by_op']}; "
              f"backend {c['backend']}")


if __name__ == "__main__":
    main()
