"""Cost of tracking task affinity in the training step (``imtl_jax.with_affinity``).

    python -m benchmarks.affinity_cost            # lenet T=2, QM9-like T=11, CelebA-like T=40
    python -m benchmarks.affinity_cost --quick    # QM9-like only, fewer rounds

For each model of ``benchmarks/_models.py`` the jitted train step (``mtl_step`` + optax SGD with
momentum) is timed for four variants, interleaved round by round (each variant once per round,
back to back, after warm-up), so load from other processes hits them alike:

* ``imtl_h`` and ``imtl_h+affinity`` -- the fast path with and without the accumulator (the
  (T, F) matrix exists already; the tracker adds a (T, T) cosine matrix and its running
  statistics);
* ``equal`` and ``equal+affinity`` -- equal weighting skips the per-task gradients; wrapped, the
  step must compute them (the representation-level gradient path), so this is the price of
  measuring affinity under a loss-only method.

Printed: median ms per step, and the median over rounds of the within-round ratio
(wrapped / unwrapped), for wall time and for this process's CPU time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import optax

import imtl_jax
from benchmarks import _models


def build(case: _models.Case, method):
    step = imtl_jax.mtl_step(case.encoder, imtl_jax.stacked_task_losses(case.head_loss), method)
    opt = optax.sgd(1e-3, momentum=0.9)

    @jax.jit
    def train(params, opt_state, mstate, batch):
        grads, mstate, aux = step(params, mstate, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mstate, aux.losses

    params = case.params
    args = (params, opt.init(params), step.init(params), case.make_batch(0))
    jax.block_until_ready(train(*args))  # compile + warm-up
    jax.block_until_ready(train(*args))
    return train, args


def measure(case: _models.Case, rounds: int) -> dict:
    variants = {"imtl_h": "imtl_h", "imtl_h+affinity": imtl_jax.with_affinity("imtl_h"),
                "equal": "equal", "equal+affinity": imtl_jax.with_affinity("equal")}
    built = {k: build(case, m) for k, m in variants.items()}
    wall = {k: [] for k in built}
    cpu = {k: [] for k in built}
    for _ in range(rounds):
        for k, (fn, args) in built.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)

    def ratio(d, a, b):
        return statistics.median(x / y for x, y in zip(d[a], d[b]))

    return {
        "ms": {k: 1e3 * statistics.median(v) for k, v in wall.items()},
        "imtl_h": (ratio(wall, "imtl_h+affinity", "imtl_h"), ratio(cpu, "imtl_h+affinity", "imtl_h")),
        "equal": (ratio(wall, "equal+affinity", "equal"), ratio(cpu, "equal+affinity", "equal")),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="QM9-like model only, 30 rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per model (default: 30 with --quick, else 60)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (30 if args.quick else 60)
    cases = [_models.qm9()] if args.quick else [_models.lenet(), _models.qm9(), _models.celeba()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}; {rounds} interleaved rounds")
    print("| model | T | imtl_h ms | +affinity ms | ratio wall (cpu) | equal ms | +affinity ms | ratio wall (cpu) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        r = measure(case, rounds)
        ms = r["ms"]
        print(f"| {case.name} | {case.num_tasks} | {ms['imtl_h']:.2f} | {ms['imtl_h+affinity']:.2f} | "
              f"{r['imtl_h'][0]:.3f} ({r['imtl_h'][1]:.3f}) | {ms['equal']:.2f} | "
              f"{ms['equal+affinity']:.2f} | {r['equal'][0]:.3f} ({r['equal'][1]:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
