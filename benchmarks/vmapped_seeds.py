"""Throughput of K seeds trained as one vmapped program vs one by one (issue 12).

    python -m benchmarks.vmapped_seeds                         # MultiMNIST LeNet, IMTL-H, K = 1, 3, 5
    python -m benchmarks.vmapped_seeds --benchmark qm9 --method equal --steps 30

Uses the experiment suite's own program (``experiments/program.py``: ``imtl_jax.mtl_step`` ->
Adam -> non-finite skip, ``jax.vmap`` over the runs' parameters, optimizer and method states,
batches, keys and learning rates). Each K is compiled and warmed up first; then rounds of
``--steps`` training steps run **interleaved** (K = 1, 3, 5, 1, 3, 5, ...) so machine load hits
every K alike. Printed per K: the median time of one vmapped step (K runs advance by one step),
run-steps per second, and the speed-up over running the K seeds one by one
(``K · t(K=1) / t(K)``, median over rounds of the within-round ratio). Batch preparation (numpy
indexing and stacking of K batches) is included, as in the training loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vmapped_seeds", description=__doc__.split("\n")[0])
    ap.add_argument("--benchmark", default="multimnist", help="experiment benchmark (default: multimnist)")
    ap.add_argument("--method", default="imtl_h", help="method (default: imtl_h)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5], help="numbers of runs K (default: 1 3 5)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per round and K (default: 20)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    ap.add_argument("--batch-size", type=int, default=128, help="batch size per run (default: 128)")
    ap.add_argument("--tiny", action="store_true", help="the benchmark's tiny data (seconds; for CI)")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from experiments import suites
    from experiments.data import BatchIterator
    from experiments.options import Options
    from experiments.program import Program, stack
    from experiments.runs import RunConfig

    o = Options(benchmark=a.benchmark, tiny=a.tiny)
    load0 = os.getloadavg()[0]
    with suites.build(a.benchmark, o) as bench:
        bs = min(a.batch_size, len(bench.train))
        prog = Program(bench, a.method, RunConfig(steps=1, batch_size=bs, lr=1e-3), with_priorities=False)
        kmax = max(a.ks)
        init = [prog.init_state(s) for s in range(kmax)]
        iters = [BatchIterator(bench.train, bs, seed=s) for s in range(kmax)]
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in range(kmax)])
        states = {k: stack(init[:k]) for k in a.ks}
        step_no = {k: 0 for k in a.ks}

        def run(k, n):
            st = states[k]
            t0 = time.perf_counter()
            for _ in range(n):
                i = step_no[k]
                batch = stack([iters[s].batch_at(i) for s in range(k)])
                st, out, ok = prog.train_step(st, batch, jnp.asarray(keys[:k]), jnp.asarray(i, jnp.uint32),
                                              jnp.full((k,), 1e-3, jnp.float32), None, jnp.ones((k,), bool))
                step_no[k] += 1
            jax.block_until_ready(st)
            states[k] = st
            return (time.perf_counter() - t0) / n

        for k in a.ks:  # compile and warm up
            run(k, 3)
        times = {k: [] for k in a.ks}
        for _ in range(a.rounds):
            for k in a.ks:
                times[k].append(run(k, a.steps))
    load1 = os.getloadavg()[0]
    base = times[a.ks[0]] if a.ks[0] == 1 else None
    print(f"{bench.name}, {a.method}, batch {bs} per run, {a.steps} steps x {a.rounds} interleaved rounds; "
          f"{jax.default_backend()} ({os.cpu_count()} CPUs), jax {jax.__version__}; "
          f"load average {load0:.1f} at start, {load1:.1f} at end")
    print("| K | ms per vmapped step | run-steps / s | speed-up vs K one-by-one |")
    print("|---|---|---|---|")
    rows = {}
    for k in a.ks:
        med = statistics.median(times[k])
        speed = statistics.median([k * b / t for b, t in zip(base, times[k])]) if base else float("nan")
        rows[k] = {"ms": 1e3 * med, "run_steps_per_s": k / med, "speedup": speed}
        print(f"| {k} | {1e3 * med:.1f} | {k / med:.1f} | {speed:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
