"""Cost of the IMTL training step against equal weighting (EW), measured side by side.

    python -m benchmarks.step_cost              # ~4 minutes on a 2-core CPU (more when loaded)
    python -m benchmarks.step_cost --quick      # fewer configurations and repetitions, ~1 minute
    python -m benchmarks.step_cost --all-exact  # + exact IMTL-G on the 2.1M-parameter trunk, T >= 3

Prints, for models shaped like the experiments (see ``benchmarks/_models.py``):

1. the jitted training step (``mtl_step`` + an optax SGD-momentum update), median wall time of
   repeated calls after warm-up (``block_until_ready``), all variants of one model interleaved
   round by round so that machine noise hits them alike:
   EW; IMTL-H at the representation level with heads stacked by ``stacked_task_losses`` (the
   fast path); exact parameter-level IMTL-G (``imtl_g_exact``); and IMTL-H through a generic
   ``task_losses(heads, z, batch) -> (T,)`` function (T backward passes through the heads);
2. the number of traces of each jitted step over several calls with fresh batches (must be 1);
3. peak memory of the compiled step, ``argument + output + temp - alias`` bytes from
   ``jax.jit(f).lower(...).compile().memory_analysis()``;
4. the IMTL-G weight solve alone at T = 40, D = 4096 float32: ``imtl_jax.imtl_g_weights``
   (jitted) against a NumPy implementation of the paper's D/U system (Eq. 2) and the
   Gramian/pinv route (``jnp.linalg.pinv(J J^T)``, jitted), with each one's float32 accuracy;
5. the same step with encoder, heads and batch in bfloat16 (rows "lenet bfloat16",
   "mlp bfloat16"): its time against bfloat16 EW, the z-gradients summed and the weights
   solved in float32 by ``mtl_step``;
6. the ratios against the targets: IMTL-H/EW <= 1.02 at T <= 3 and <= 1.05 at T = 40 (float32
   and bfloat16), step time
   T = 40 / T = 2 on the same trunk <= 2, peak memory IMTL-H/EW <= 1.2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import imtl_jax
from benchmarks import _models

# variant name -> (method, losses path)
VARIANTS = {
    "ew": ("equal", "stacked"),
    "imtl_h": ("imtl_h", "stacked"),
    "exact": ("imtl_g_exact", "stacked"),
    "generic": ("imtl_h", "generic"),
    "plain": ("equal", "plain"),  # no imtl_jax: jax.grad of sum_t L_t (a sanity floor)
}


class Built(NamedTuple):
    fn: Callable
    args: tuple
    traces: list
    make_args: Callable[[int], tuple]


def build_step(case: _models.Case, method: str, path: str) -> Built:
    """The jitted train step of ``case`` for ``method``, with a Python trace counter."""
    losses: Any = imtl_jax.stacked_task_losses(case.head_loss)
    if path == "generic":
        stacked = losses

        def generic(heads, z, batch):  # the same losses, but opaque to mtl_step
            return stacked(heads, z, batch)

        losses = generic
    if path == "plain":
        stacked = losses

        class _Plain:  # jax.value_and_grad of sum_t L_t, nothing from imtl_jax
            def init(self, params):
                return ()

            def __call__(self, params, mstate, batch):
                def total(p):
                    ls = stacked(p.heads, case.encoder(p.shared, batch), batch)
                    return jnp.sum(ls), ls
                (_, ls), grads = jax.value_and_grad(total, has_aux=True)(params)
                return grads, mstate, imtl_jax.StepAux(ls, ls, ls, ls, {}, True)

        step = _Plain()
    else:
        step = imtl_jax.mtl_step(case.encoder, losses, method)
    opt = optax.sgd(1e-3, momentum=0.9)
    traces = [0]

    def train(params, opt_state, mstate, batch):
        traces[0] += 1  # runs at trace time only
        grads, mstate, aux = step(params, mstate, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mstate, aux.losses

    params = case.params
    opt_state, mstate = opt.init(params), step.init(params)

    def make_args(seed):
        return (params, opt_state, mstate, case.make_batch(seed))

    return Built(jax.jit(train), make_args(0), traces, make_args)


def peak_bytes(fn, args) -> int:
    """argument + output + temp - alias bytes of the compiled executable."""
    stats = fn.lower(*args).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def time_interleaved(fns: dict, reps: dict, min_time: float) -> tuple[dict, dict, dict]:
    """Median seconds per call of each ``fn(*args)``, and the median per-round ratios to "ew"
    of wall time and of process CPU time.

    Calls are interleaved round by round (every variant once per round, back to back, in a new
    random order each round), so that load from other processes hits all variants alike; the ratio
    of a variant to EW is the median over rounds of ``t_variant / t_ew`` within the same round.
    ``reps[name]`` is the minimum number of calls; cheap variants keep being sampled until
    ``min_time`` has passed. The CPU-time ratio (all threads of this process) is less sensitive to
    other processes competing for the cores than wall time, and is printed next to it.
    """
    times = {k: {} for k in fns}  # variant -> {round: wall seconds}
    cpu = {k: {} for k in fns}  # variant -> {round: process CPU seconds}
    start = time.perf_counter()
    rnd = 0
    while True:
        active = [k for k in fns if len(times[k]) < reps[k]]
        if not active:
            if time.perf_counter() - start > min_time:
                break
            active = [k for k in fns if min(times[k].values()) < 0.2]
            if not active:
                break
        # A new order each round, so that no variant always follows the same neighbour (the call
        # after a heavy one pays for its cache misses; a fixed order biases the ratios).
        for i in np.random.default_rng(rnd).permutation(len(active)):
            k = active[i]
            fn, args = fns[k]
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k][rnd] = time.perf_counter() - t0
            cpu[k][rnd] = time.process_time() - c0
        rnd += 1
    medians = {k: statistics.median(v.values()) for k, v in times.items()}
    def paired_ratios(d):
        return {k: statistics.median(t / d["ew"][r] for r, t in v.items() if r in d["ew"])
                for k, v in d.items()}

    return medians, paired_ratios(times), paired_ratios(cpu)


class Row(NamedTuple):
    model: str
    num_tasks: int
    ms: dict  # variant -> median milliseconds
    ratio: dict  # variant -> median per-round wall-time ratio to EW
    cpu_ratio: dict  # variant -> median per-round process-CPU-time ratio to EW
    mb: dict  # variant -> peak MB
    traces: dict  # variant -> number of traces
    fns: dict  # variant -> (jitted step, args), for later side-by-side comparisons


def measure_case(case: _models.Case, variants, quick: bool, calls_for_traces: int = 3) -> Row:
    built = {v: build_step(case, *VARIANTS[v]) for v in variants}
    fns = {}
    for v, b in built.items():
        # warm-up (compile) and the trace count over several calls with fresh batches
        for seed in range(calls_for_traces):
            jax.block_until_ready(b.fn(*b.make_args(seed)))
        fns[v] = (b.fn, b.args)
    traces = {v: b.traces[0] for v, b in built.items()}
    probe = {}
    for v, (fn, args) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        probe[v] = time.perf_counter() - t0
    base = 5 if quick else 15
    # a slow variant (exact parameter level at large T) gets fewer calls
    reps = {v: base if probe[v] < 0.3 else 3 for v in fns}
    secs, ratios, cpu_ratios = time_interleaved(fns, reps, min_time=0.5 if quick else 2.0)
    mb = {v: peak_bytes(b.fn, b.args) / 2**20 for v, b in built.items()}
    return Row(case.name, case.num_tasks, {v: 1e3 * x for v, x in secs.items()}, ratios,
               cpu_ratios, mb, traces, fns)


# --- the weight solve alone ---------------------------------------------------------------------

def paper_du_numpy(J: np.ndarray) -> np.ndarray:
    """The paper's Eq. 2 in NumPy: alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum."""
    u = J / np.linalg.norm(J, axis=1, keepdims=True)
    D = J[:1] - J[1:]
    U = u[:1] - u[1:]
    # row-vector system a (D U^T) = g_1 U^T  <=>  (D U^T)^T a^T = U g_1^T
    a = np.linalg.solve((D @ U.T).T, U @ J[0])
    return np.concatenate([[1.0 - a.sum()], a]).astype(J.dtype)


def gramian_pinv(J: jax.Array) -> jax.Array:
    """TorchJD's route: v = pinv(J J^T) |g|, alpha = v / sum(v)."""
    G = J @ J.T
    v = jnp.linalg.pinv(G) @ jnp.linalg.norm(J, axis=1)
    return v / jnp.sum(v)


def projection_spread(J: np.ndarray, alpha: np.ndarray) -> float:
    """(max - min) / |mean| of the projections g . u_t, evaluated in float64."""
    J64 = J.astype(np.float64)
    g = np.asarray(alpha, np.float64) @ J64
    p = (J64 @ g) / np.linalg.norm(J64, axis=1)
    return float((p.max() - p.min()) / abs(p.mean()))


def _route_solver(route: str):
    """imtl_g_weights jitted on one float32 route ("lean": the float32 Gram matrix refined in
    float64, the default off TPU from 4 tasks on; "wide": the float64 Gram matrix, its fallback;
    "compensated": the (T, D) error-free route TPUs take)."""
    from imtl_jax import _imtl_g

    def traced(J):
        old, _imtl_g._FLOAT32_ROUTE = _imtl_g._FLOAT32_ROUTE, route
        try:
            return imtl_jax.imtl_g_weights(J)
        finally:
            _imtl_g._FLOAT32_ROUTE = old
    return jax.jit(traced)


def _numpy_blas_on_one_thread():
    """NumPy's BLAS limited to one thread while the solves are timed: after each call OpenBLAS's
    idle threads spin for a while, and on a 2-core machine they take the cores from the jitted
    solve timed next (its median tripled, its minimum unchanged). One thread is also the faster
    setting for the NumPy solve at these sizes. Needs ``threadpoolctl``; without it, a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def measure_solve(num_tasks: int, dim: int, reps: int, norm_spread: float):
    """Median and minimum wall ms of each solve, timed interleaved (one call of each per round),
    with NumPy's BLAS on one thread (:func:`_numpy_blas_on_one_thread`)."""
    with _numpy_blas_on_one_thread():
        return _measure_solve(num_tasks, dim, reps, norm_spread)


def _measure_solve(num_tasks: int, dim: int, reps: int, norm_spread: float):
    rng = np.random.default_rng(0)
    J = rng.standard_normal((num_tasks, dim)).astype(np.float32)
    J *= np.logspace(0, np.log10(norm_spread), num_tasks, dtype=np.float32)[:, None]
    Jj = jnp.asarray(J)
    ours = jax.jit(imtl_jax.imtl_g_weights)
    wide = _route_solver("wide")
    compensated = _route_solver("compensated")
    pinv = jax.jit(gramian_pinv)
    impls = {
        "imtl_jax.imtl_g_weights (jit)": (lambda: ours(Jj), lambda: np.asarray(ours(Jj))),
        "  its float64 Gram route (the fallback)": (lambda: wide(Jj), lambda: np.asarray(wide(Jj))),
        "  its compensated (T, D) route (TPU)": (lambda: compensated(Jj), lambda: np.asarray(compensated(Jj))),
        "numpy paper D/U system (Eq. 2)": (lambda: paper_du_numpy(J), lambda: paper_du_numpy(J)),
        "jnp.linalg.pinv(J J^T) (jit)": (lambda: pinv(Jj), lambda: np.asarray(pinv(Jj))),
    }
    times: dict = {name: [] for name in impls}
    for run, _ in impls.values():
        jax.block_until_ready(run())
        jax.block_until_ready(run())
    for _ in range(reps):
        for name, (run, _) in impls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - t0)
    return [(name, 1e3 * statistics.median(times[name]), 1e3 * min(times[name]), projection_spread(J, get()))
            for name, (_, get) in impls.items()]


# --- report -------------------------------------------------------------------------------------

NAMES = {"ew": "EW", "imtl_h": "IMTL-H", "exact": "IMTL-G exact", "generic": "IMTL-H generic",
         "plain": "plain-jax EW"}


def _cell(row: Row, v: str, which: str) -> str:
    if v not in row.ms:
        return f"{'-':>19}"
    if which == "time":
        return f"{row.ms[v]:7.1f} {row.ratio[v]:4.2f}x {row.cpu_ratio[v]:4.2f}c"
    return f"{row.mb[v]:7.1f} {row.mb[v] / row.mb['ew']:4.2f}x      "


def print_tables(rows, variants):
    head = f"{'model':<18} {'T':>3} | " + " | ".join(f"{NAMES[v]:>19}" for v in variants)
    print("Step time: median wall ms, then the ratio to EW of wall time (x) and of process CPU")
    print("time (c), each the median over rounds of the ratio within a round")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.model:<18} {r.num_tasks:>3} | " + " | ".join(_cell(r, v, "time") for v in variants))
    print("\nPeak memory of the compiled step: MB, then the ratio to EW")
    print(head + " | traces")
    print("-" * (len(head) + 9))
    for r in rows:
        traces = ",".join(str(r.traces[v]) for v in variants if v in r.traces)
        print(f"{r.model:<18} {r.num_tasks:>3} | "
              + " | ".join(_cell(r, v, "mem") for v in variants) + f" | {traces}")
    print("  EW: mtl_step(method='equal'). plain-jax EW: jax.value_and_grad of sum_t L_t, no imtl_jax.")
    print("  IMTL-H: representation level, heads stacked with stacked_task_losses (the fast path).")
    print("  IMTL-G exact: method='imtl_g_exact' (parameter level: T encoder VJPs, vmapped).")
    print("  IMTL-H generic: the same losses through a plain task_losses(heads, z, batch) -> (T,)")
    print("    function, which mtl_step differentiates with T cotangents through all T heads.")
    print("  memory: argument + output + temp - alias bytes of jit(step).lower(...).compile().")
    print("  traces: Python trace counter per variant over 3 calls with fresh batches (1 = compiled once).")
    print("  '-': not run (IMTL-G exact on the 2.1M-parameter CelebA-like trunk at T >= 3: --all-exact).\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repetitions")
    parser.add_argument("--all-exact", action="store_true",
                        help="also time IMTL-G exact on the CelebA-like trunk at T = 3, 11, 40 "
                             "(2.1M shared parameters: seconds to minutes per step on a CPU)")
    args = parser.parse_args(argv)
    quick = args.quick
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"imtl-jax step cost -- jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), python {platform.python_version()}"
          f"{', --quick' if quick else ''}")
    print("step = mtl_step + optax.sgd(momentum) update, jitted, batch 256, float32 (rows named "
          "bfloat16: model and batch in\nbfloat16, ratios to bfloat16 EW); median of repeated calls "
          "after warm-up, variants of one model\ninterleaved round by round.\n")

    all_v = ("ew", "imtl_h", "exact", "generic", "plain")
    if quick:
        cases = [(_models.lenet(2), all_v),
                 (_models.lenet(3), ("ew", "imtl_h")),
                 (_models.celeba(2), ("ew", "imtl_h")),
                 (_models.celeba(40), ("ew", "imtl_h", "generic")),
                 (_models.cast(_models.lenet(2), jnp.bfloat16), ("ew", "imtl_h")),
                 (_models.cast(_models.celeba(40), jnp.bfloat16), ("ew", "imtl_h"))]
    else:
        big = all_v if args.all_exact else tuple(v for v in all_v if v != "exact")
        cases = [(_models.lenet(2), all_v), (_models.lenet(3), all_v), (_models.qm9(11), all_v),
                 (_models.celeba(2), all_v), (_models.celeba(3), big),
                 (_models.celeba(11), big), (_models.celeba(40), big),
                 (_models.cast(_models.lenet(2), jnp.bfloat16), ("ew", "imtl_h")),
                 (_models.cast(_models.celeba(3), jnp.bfloat16), ("ew", "imtl_h")),
                 (_models.cast(_models.celeba(40), jnp.bfloat16), ("ew", "imtl_h"))]

    rows = []
    for case, variants in cases:
        rows.append(measure_case(case, variants, quick))
        print(f"  measured {case.name} T={case.num_tasks} "
              f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    print_tables(rows, all_v)

    solve_rows = measure_solve(40, 4096, reps=10 if quick else 30, norm_spread=1e3)
    print("Weight solve alone: T = 40, D = 4096, float32, row norms spread over 1..1e3")
    print(f"{'implementation':<34} {'median ms':>9} {'/ours':>7} {'min ms':>8}   projection spread of the result")
    ours_ms = solve_rows[0][1]
    for name, ms, ms_min, spread in solve_rows:
        print(f"{name:<34} {ms:9.3f} {ms / ours_ms:6.2f}x {ms_min:8.3f}   {spread:.1e}")
    print("  projection spread: (max - min) / |mean| of g . u_t (float64 evaluation); 0 = impartial.")
    print("  NumPy's BLAS on one thread while timing (its idle threads would spin on the cores XLA needs).\n")

    # ---- targets ---------------------------------------------------------------------------
    by = {(r.model, r.num_tasks): r for r in rows}
    results = []

    def check(label, value, limit, cpu_value=None):
        ok = value <= limit
        results.append(ok)
        extra = f"  [CPU time: {cpu_value:.2f}]" if cpu_value is not None else ""
        print(f"  {label:<56} {value:5.2f}  (target <= {limit:.2f})  {'met' if ok else 'MISSED'}{extra}")

    print("Targets")
    for key, label, limit in [
            (("lenet (MultiMNIST)", 2), "IMTL-H/EW step time, T=2 (lenet)", 1.02),
            (("lenet (MultiMNIST)", 3), "IMTL-H/EW step time, T=3 (lenet)", 1.02),
            (("mlp (CelebA-like)", 2), "IMTL-H/EW step time, T=2 (CelebA-like mlp)", 1.02),
            (("mlp (CelebA-like)", 3), "IMTL-H/EW step time, T=3 (CelebA-like mlp)", 1.02),
            (("mlp (CelebA-like)", 40), "IMTL-H/EW step time, T=40 (CelebA-like mlp)", 1.05),
            (("lenet bfloat16", 2), "bfloat16 IMTL-H/bfloat16 EW, T=2 (lenet)", 1.02),
            (("mlp bfloat16", 40), "bfloat16 IMTL-H/bfloat16 EW, T=40 (CelebA-like mlp)", 1.05)]:
        if key in by:
            check(label, by[key].ratio["imtl_h"], limit, by[key].cpu_ratio["imtl_h"])
    c2, c40 = by.get(("mlp (CelebA-like)", 2)), by.get(("mlp (CelebA-like)", 40))
    if c2 and c40:  # measured again side by side, T = 2 and T = 40 interleaved
        for v in ("imtl_h", "ew"):
            fns = {"ew": c2.fns[v], "t40": c40.fns[v]}
            _, wall, cpu = time_interleaved(fns, {"ew": 5 if quick else 15, "t40": 5 if quick else 15}, 1.0)
            check(f"{NAMES[v]} step time T=40 / T=2 (CelebA-like mlp)", wall["t40"], 2.0, cpu["t40"])
    worst = max(rows, key=lambda r: r.mb["imtl_h"] / r.mb["ew"])
    check(f"peak memory IMTL-H/EW, worst row ({worst.model} T={worst.num_tasks})",
          worst.mb["imtl_h"] / worst.mb["ew"], 1.2)
    bad = [(r.model, r.num_tasks, v, t) for r in rows for v, t in r.traces.items() if t != 1]
    print(f"  {'one compile per configuration':<56} {'met' if not bad else bad}")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; 1-minute load average {load0:.1f} at "
          f"start, {load1:.1f} at end (> {os.cpu_count()} means other processes shared the cores)")
    return 0 if all(results) and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
