"""Kernel count of the compiled IMTL-G weight solve, read from the optimized HLO.

``solve_op_counts(T, D)`` compiles ``imtl_g_solve`` for a (T, D) float32 input on the default
backend and counts, in the optimized HLO module, the top-level instructions of every
computation that launch work: fusions, custom calls (Cholesky/eigh/triangular-solve kernels),
dots, whiles and conditionals; per path: a regular input's (the cheapest branch of every
``conditional``: the lean route's own answer, Cholesky) and the slowest (the lean route handing
over to the float64 Gram route, then its eigh fallback).

    python -m benchmarks.solve_cost [--tasks 2 10 40] [--dim 4096]
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

import imtl_jax

_KERNEL_OPS = ("fusion", "custom-call", "dot", "while", "conditional", "sort", "reduce",
               "convolution", "scatter", "gather")


def solve_op_counts(num_tasks: int, dim: int, dtype=jnp.float32, route: str = "auto") -> dict:
    """Kernel-launching HLO instructions in the compiled solve (:func:`hlo_op_counts` of
    ``imtl_g_solve`` on a (T, D) input, the float32 ``route`` forced: "auto", "lean", "wide"
    (float64 Gram matrix) or "compensated")."""
    from imtl_jax import _imtl_g

    def traced(grads):
        old, _imtl_g._FLOAT32_ROUTE = _imtl_g._FLOAT32_ROUTE, route
        try:
            return imtl_jax.imtl_g_solve(grads)
        finally:
            _imtl_g._FLOAT32_ROUTE = old
    return hlo_op_counts(traced, jax.ShapeDtypeStruct((num_tasks, dim), dtype))


def hlo_op_counts(fn, *args) -> dict:
    """Kernel-launching HLO instructions in the compiled ``jax.jit(fn)(*args)`` (``args``: arrays
    or ``jax.ShapeDtypeStruct``), counted in every computation the entry reaches.

    ``kernels``: over the whole module (fusions and the computations called from fusions are not
    descended into); ``taken``: on the path a regular (well-conditioned, full-rank) input runs,
    i.e. the entry computation plus, at every ``conditional``, its cheapest branch (for the
    IMTL-G solve: the lean route's answer; the Cholesky inverse instead of the eigh fallback),
    with a ``while`` loop's body and condition counted once; ``loop_step``: the kernels of one
    pass of the loops (one refinement step of the lean route; a regular input takes two);
    ``slowest``: the most expensive branch everywhere (the lean route handing over to the
    float64 Gram route, which then needs the eigendecomposition); ``fallback = kernels -
    taken``; ``data_passes``: the kernels on the regular path that read or write an array as
    large as the largest argument (passes over the (T, D) data); ``entry``: the entry
    computation's own (what a count of the entry alone sees: a loop or conditional once, its
    body and branches not); and whether every eigh custom call sits off the taken path."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    big = max(int(np.prod(a.shape)) for a in args)       # the data's size (T x D)
    sizes = {}                                           # instruction -> elements
    data = collections.Counter()                         # per computation: passes over the data
    own = collections.defaultdict(collections.Counter)   # kernel ops per computation
    children = collections.defaultdict(list)             # per computation: branch lists
    eigh_comps, fused, entry, current, loops = set(), set(), None, None, []
    for line in hlo.splitlines():
        head = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            entry = current if head.group(1) else entry
            continue
        m = re.search(r"=\s*\S.*?\s([a-z][a-z\-]*)\(", line)
        if not m or current is None:
            continue
        op = m.group(1)
        define = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s[a-z][a-z\-]*\(([^)]*)\)", line)
        touched = 0
        if define:
            sizes[define.group(1)] = max([int(np.prod([int(d) for d in dims.split(",") if d]))
                                          for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", define.group(2))]
                                         or [0])
            touched = max([sizes[define.group(1)]] + [sizes.get(o, 0) for o in
                                                      re.findall(r"%([\w.\-]+)", define.group(3))])
        if op in _KERNEL_OPS and op not in ("while", "conditional") and touched >= big:
            data[current] += 1
        for target in re.findall(r"calls=%?([\w.\-]+)", line):
            fused.add(target)
        if op == "conditional":
            children[current].append(re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[1]))
        elif op == "while":   # body and condition, counted once (one refinement step)
            loops.append(re.findall(r"(?:body|condition)=%?([\w.\-]+)", line))
            children[current].append(["+".join(loops[-1])])
        if op in _KERNEL_OPS:
            own[current][op] += 1
        if op == "custom-call" and re.search(r"syevd|eigh|heevd", line):
            eigh_comps.add(current)

    def path(comp, pick):
        if "+" in comp:
            return sum(path(c, pick) for c in comp.split("+"))
        total = sum(own[comp].values())
        for branches in children[comp]:
            total += pick(path(b, pick) for b in branches)
        return total

    def data_path(comp):   # passes over the data on the regular path (cheapest branches)
        if "+" in comp:
            return sum(data_path(c) for c in comp.split("+"))
        return data[comp] + sum(data_path(min(branches, key=lambda b: path(b, min)))
                                for branches in children[comp])

    def on_taken_path(comp):
        if "+" in comp:
            return set().union(*(on_taken_path(c) for c in comp.split("+")))
        reached = {comp}
        for branches in children[comp]:
            cheapest = min(branches, key=lambda b: path(b, min))
            reached |= on_taken_path(cheapest)
        return reached

    counts = collections.Counter()
    for comp, c in own.items():
        if comp not in fused:
            counts.update(c)
    total = sum(counts.values())
    taken = path(entry, min)
    return {"kernels": total, "taken": taken, "entry": sum(own[entry].values()),
            "data_passes": data_path(entry),
            "slowest": path(entry, max), "fallback": total - taken,
            "loop_step": sum(path("+".join(lp), min) for lp in loops), "by_op": dict(counts),
            "eigh_in_fallback_only": bool(eigh_comps) and not (eigh_comps & on_taken_path(entry)),
            "backend": jax.default_backend()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--dim", type=int, default=4096)
    args = parser.parse_args(argv)
    for t, route in [(t, r) for t in args.tasks for r in ("lean", "wide", "compensated")]:
        c = solve_op_counts(t, args.dim, route=route)
        print(f"T={t:3d} D={args.dim} float32, {route} route: {c['taken']} kernel-launching HLO ops "
              f"on the path of a regular input (a loop step counted once: {c['loop_step']}; "
              f"{c['data_passes']} of them read or write the (T, D) data), "
              f"{c['slowest']} on the slowest path "
              f"({c['kernels']} in the module; eigh only off the regular path: "
              f"{c['eigh_in_fallback_only']}); {c['by_op']}; backend {c['backend']}")


if __name__ == "__main__":
    main()
