"""The accelerator benchmark: one command, one table, about 8 minutes at most on one GPU.

    python -m benchmarks.gpu                 # on the default JAX backend (a GPU when present)
    python -m benchmarks.gpu --tiny          # tiny shapes, one row, on any backend (tested on CPU)
    python -m benchmarks.gpu --budget-s 420  # stop starting new rows after this many seconds

Prints, for the CelebA-like MLP trunk (3072-512-512-512, batch 256, float32) at T = 2, 3, 11, 40
and the MultiMNIST LeNet at T = 2 (``benchmarks/_models.py``), then EW and IMTL-H with model and
batch in bfloat16 (the trunk at T = 3, 40; LeNet at T = 2):

1. the jitted training step (``mtl_step`` + SGD-momentum update) of equal weighting (EW), IMTL-H
   (representation level, stacked heads), exact parameter-level IMTL-G (``imtl_g_exact``) and
   IMTL-H through a generic ``task_losses`` function: median ms over interleaved rounds, the
   ratio to EW (median of per-round ratios), throughput (examples/s), and the number of traces;
2. peak memory of each compiled step (``memory_analysis()``: arguments + outputs + temporaries)
   and, where the backend reports it, the device's peak bytes in use after the row;
3. the weight solve alone: ``imtl_g_weights`` on a (T, 512) matrix (what IMTL-H solves), the
   exact route's T x T Gramian solve and the baselines' Gramian helper ``normalized_gramian``,
   median ms, with the number of kernels (fusions, custom calls and library calls in every
   computation of the compiled HLO that the regular path reaches, loop bodies and conditional
   branches included: ``benchmarks.solve_cost.hlo_op_counts``), and the IMTL-G solve's kernels
   per float32 route (lean, wide, compensated) at T = 2, 10, 40;
4. with the ``[compare]`` extra installed (torch + torchjd): TorchJD's IMTLG step and torch's EW
   step on the same device (``cuda`` when JAX runs on a GPU and torch sees one, else CPU).

Nothing here asserts a speed: the numbers are printed for the record (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import imtl_jax
from imtl_jax import _exact
from benchmarks import _models
from benchmarks.solve_cost import hlo_op_counts, solve_op_counts
from benchmarks.step_cost import VARIANTS, build_step, peak_bytes, time_interleaved
from imtl_jax.methods._common import normalized_gramian

STEP_VARIANTS = ("ew", "imtl_h", "exact", "generic")
BF16_VARIANTS = ("ew", "imtl_h")  # encoder, heads and batch in bfloat16; /EW is to bfloat16 EW


def _configs(tiny: bool):
    if tiny:
        mlp = lambda t: _models.celeba(t, batch_size=16, in_features=48, width=32)  # noqa: E731
        return [("mlp", 2, mlp(2), STEP_VARIANTS),
                ("mlp-bf", 2, _models.cast(mlp(2), jnp.bfloat16), BF16_VARIANTS)]
    return ([("mlp", t, _models.celeba(t), STEP_VARIANTS) for t in (2, 3, 11, 40)] +
            [("lenet", 2, _models.lenet(2), STEP_VARIANTS)] +
            [("mlp-bf", t, _models.cast(_models.celeba(t), jnp.bfloat16), BF16_VARIANTS) for t in (3, 40)] +
            [("lenet-bf", 2, _models.cast(_models.lenet(2), jnp.bfloat16), BF16_VARIANTS)])


def _device_peak() -> float | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def kernel_count(fn, *args) -> dict:
    """Kernels of the compiled ``fn`` (:func:`benchmarks.solve_cost.hlo_op_counts`): fusions,
    custom calls (cuSOLVER, cuBLAS, ...), dots, reductions and other instructions that launch
    work, counted in every computation reached from the entry (a ``while`` loop's body and
    condition once, a ``conditional``'s cheapest branch on the regular path, its costliest on
    the slowest), and the passes over the (T, D) data on the regular path."""
    return hlo_op_counts(fn, *args)


def measure_solves(num_tasks: int, dim: int, reps: int):
    rng = np.random.default_rng(0)
    matrix = jnp.asarray(rng.standard_normal((num_tasks, dim)).astype(np.float32))
    gram = matrix @ matrix.T
    solvers = {
        f"imtl_g_weights on ({num_tasks}, {dim})": (imtl_jax.imtl_g_weights, (matrix,)),
        f"Gramian solve ({num_tasks} x {num_tasks}), exact route":
            (lambda g: _exact.imtl_g_from_gramian(g, jnp.int32(0))[0], (gram,)),
        f"normalized_gramian on ({num_tasks}, {dim})": (normalized_gramian, (matrix,)),
    }
    rows = []
    for name, (fn, args) in solvers.items():
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(*args))
            ts.append(time.perf_counter() - t0)
        rows.append((name, 1e3 * statistics.median(ts), kernel_count(fn, *args)))
    return rows


def route_counts(tasks, dim: int):
    """The IMTL-G solve's kernels per float32 route (static: compiled, not run)."""
    rows = []
    for num_tasks in tasks:
        for route in ("lean", "wide", "compensated"):
            rows.append((num_tasks, route, solve_op_counts(num_tasks, dim, route=route)))
    return rows


def torch_row(kind: str, num_tasks: int, tiny: bool, reps: int):
    """TorchJD's IMTLG and torch's EW step on the same device; None without the extra."""
    try:
        import torch

        from benchmarks.compare_torchjd import torch_steps
    except (ImportError, SystemExit):
        return None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sizes = dict(batch_size=16, in_features=48, width=32) if tiny else {}
    ew, imtlg = torch_steps(kind, num_tasks, device=device, **sizes)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {"ew": [], "imtlg": []}
    for fn in (ew, imtlg):
        fn()
        fn()
    sync()
    for _ in range(reps):
        for name, fn in (("ew", ew), ("imtlg", imtlg)):
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return device, {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few repetitions (tests)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no new model row is started after this many seconds (default 420)")
    opts = parser.parse_args(argv)
    t_start = time.perf_counter()
    reps = 3 if opts.tiny else 20
    dev = jax.devices()[0]
    print(f"imtl-jax accelerator benchmark -- jax {jax.__version__}, backend {jax.default_backend()}, "
          f"device {getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()}){', --tiny' if opts.tiny else ''}")
    print("step = mtl_step + optax.sgd(momentum) update, jitted, float32 (-bf rows: bfloat16); median of interleaved "
          "rounds after warm-up\n")

    head = (f"{'model':<8} {'T':>3} {'variant':<15} {'ms':>9} {'/EW':>6} {'examples/s':>11} "
            f"{'peak MB':>9} {'traces':>6}")
    print(head)
    print("-" * len(head))
    skipped = []
    torch_rows = []
    for kind, num_tasks, case, variants in _configs(opts.tiny):
        if time.perf_counter() - t_start > opts.budget_s:
            skipped.append(f"{kind} T={num_tasks}")
            continue
        batch_size = case.make_batch(0)["x"].shape[0]
        built = {v: build_step(case, *VARIANTS[v]) for v in variants}
        fns = {}
        for v, b in built.items():
            for seed in range(3):  # compile, then two fresh batches: the trace counter stays 1
                jax.block_until_ready(b.fn(*b.make_args(seed)))
            fns[v] = (b.fn, b.args)
        med, ratio, _ = time_interleaved(fns, {v: reps for v in fns}, min_time=0.2 if opts.tiny else 1.0)
        for v in variants:
            ms = 1e3 * med[v]
            print(f"{kind:<8} {num_tasks:>3} {v:<15} {ms:9.3f} {ratio[v]:5.2f}x "
                  f"{batch_size / med[v]:11.0f} {peak_bytes(built[v].fn, built[v].args) / 2**20:9.1f} "
                  f"{built[v].traces[0]:>6}")
        device_peak = _device_peak()
        if device_peak is not None:
            print(f"{'':<8} {'':>3} device peak bytes in use so far: {device_peak:.1f} MB")
        row = torch_row(kind, num_tasks, opts.tiny, reps) if variants == STEP_VARIANTS else None
        if row is not None:
            torch_rows.append((kind, num_tasks, *row))
        print(f"  ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    if skipped:
        print(f"  not run (over --budget-s {opts.budget_s:.0f}): {', '.join(skipped)}")
    print("  /EW: median over rounds of the step time divided by EW's in the same round.")
    print("  exact: imtl_g_exact (T encoder VJPs, per-leaf Gramian, T x T solve); generic: IMTL-H")
    print("  through an opaque task_losses(heads, z, batch) -> (T,) function. -bf rows: encoder,")
    print("  heads and batch in bfloat16 (z-gradients summed and weights solved in float32), /EW")
    print("  against bfloat16 EW.\n")

    print(f"{'weight solve':<48} {'median ms':>10} {'kernels':>8} {'slowest':>8} {'TxD passes':>10}")
    for num_tasks in ((2, 10, 40) if not opts.tiny else (2, 3)):
        for name, ms, kernels in measure_solves(num_tasks, 32 if opts.tiny else 512, reps):
            passes = "-" if name.startswith("Gramian") else kernels["data_passes"]  # no (T, D) input
            print(f"{name:<48} {ms:10.3f} {kernels['taken']:>8} {kernels['slowest']:>8} {passes:>10}")
    print("  kernels: fusions, custom calls, dots, reductions and other launching instructions of the")
    print("  compiled HLO in every computation reached (loop bodies once, the cheapest branch of each")
    print("  conditional: a regular input's path); slowest: the costliest branch everywhere (the")
    print("  fallbacks); TxD passes: kernels on the regular path that read or write the (T, D) data.")
    print("  imtl_g_weights takes the wide route at T <= 3 and the lean route from T = 4 on;")
    print("  normalized_gramian is the Gramian helper of MGDA, CAGrad, Nash-MTL, UPGrad, ...\n")

    dim = 32 if opts.tiny else 512
    print(f"{'IMTL-G solve route (float32, D = ' + str(dim) + ')':<40} {'kernels':>8} {'loop step':>9} "
          f"{'slowest':>8} {'module':>7} {'TxD passes':>10}")
    for num_tasks, route, c in route_counts((2, 3) if opts.tiny else (2, 10, 40), dim):
        print(f"{'T = ' + str(num_tasks) + ', ' + route:<40} {c['taken']:>8} {c['loop_step']:>9} "
              f"{c['slowest']:>8} {c['kernels']:>7} {c['data_passes']:>10}")
    print("  (static counts of the compiled solve per route, forced; loop step: one refinement")
    print("  step of the lean route, which a regular input runs twice)\n")

    if torch_rows:
        print(f"{'model':<8} {'T':>3} {'torch device':<12} {'torch EW ms':>12} {'TorchJD IMTLG ms':>17} {'/EW':>6}")
        for kind, num_tasks, device, ms in torch_rows:
            print(f"{kind:<8} {num_tasks:>3} {device:<12} {ms['ew']:12.3f} {ms['imtlg']:17.3f} "
                  f"{ms['imtlg'] / ms['ew']:5.2f}x")
    else:
        print("TorchJD: not installed (pip install -e '.[compare]') -- no comparison row.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; 1-minute load average {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
