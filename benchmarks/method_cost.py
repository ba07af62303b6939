"""Training cost of every method on the experiment benchmarks, relative to equal weighting.

    python -m benchmarks.method_cost --benchmark qm9            # every registered method + @params
    python -m benchmarks.method_cost --benchmark multifashion --methods equal imtl_h imtl_g_exact
    python -m benchmarks.method_cost --tiny                     # seconds: a smoke test (CI)
    python -m benchmarks.method_cost --benchmark qm9 --methods graddrop --update --out results/qm9_converged

For each method, the benchmark's own compiled training step (:class:`experiments.program.Program`:
``mtl_step`` + Adam, one run, the benchmark's batch size and model) is timed on the same batch:
median wall time of repeated calls after warm-up (``block_until_ready``), every method timed
round by round, interleaved (a new random order each round), so that machine noise hits them
alike. Prints the table and, with ``--out``, writes ``<out>/method_cost.json`` (step ms and the
ratio to EW per method, the machine and its 1-minute load before and after), which the results
tables read for their compute-matched column. Run it on an idle machine (no training queue): the load is printed.
``--update`` times the listed methods beside EW (their ratios are to that run's EW) and replaces
only their rows of an existing record, which lists every such run under ``updates``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_EXTRA = ("imtl_g_exact", "nash_mtl@params")


def _load() -> float:
    return os.getloadavg()[0]


def measure(benchmark: str, methods: list, *, tiny: bool, rounds: int, calls: int) -> dict:
    import jax
    import jax.numpy as jnp
    from experiments import suites
    from experiments.data import BatchIterator
    from experiments.program import Program, stack
    from experiments.runs import RunConfig
    o = suites.options(benchmark, tiny=tiny, quiet=True)
    with suites.build(benchmark, o) as bench:
        cfg = RunConfig.from_options(o, bench)
        batch = stack([BatchIterator(bench.train, cfg.batch_size, seed=0).batch_at(0)])
        keys = jnp.asarray(np.stack([np.asarray(jax.random.key_data(jax.random.key(0)))]))
        lr, active = jnp.asarray([1e-3], jnp.float32), jnp.asarray([True])
        built = {}
        for m in methods:
            prog = Program(bench, m, cfg, with_priorities=False)
            state = stack([prog.init_state(0)])

            def call(prog=prog, state=state):
                out = prog.train_step(state, batch, keys, jnp.asarray(0, jnp.uint32), lr, None, active)
                jax.block_until_ready(out)
            call()  # compile
            call()
            built[m] = call
        times: dict = {m: [] for m in methods}
        for r in range(rounds):
            # A fresh order each round: in a fixed (or rotated) order every method follows the same
            # neighbour each round, and the step after the heaviest one pays for its cache misses
            # (EW, listed first, followed nash_mtl@params and timed ~10 % slower than RLW).
            for m in np.random.default_rng(r).permutation(methods):
                t0 = time.perf_counter()
                for _ in range(calls):
                    built[m]()
                times[m].append((time.perf_counter() - t0) / calls * 1e3)
        return {"batch_size": cfg.batch_size, "times_ms": times}


def main(argv=None) -> int:
    import imtl_jax
    p = argparse.ArgumentParser(prog="python -m benchmarks.method_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="qm9", help="an experiment benchmark (default: qm9)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods to time (default: every registered method + {' '.join(DEFAULT_EXTRA)})")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--calls", type=int, default=10, help="calls per method and round (default: 10)")
    p.add_argument("--tiny", action="store_true", help="the benchmark's --tiny data, 2 rounds of 2 calls")
    p.add_argument("--out", type=Path, default=None, help="write <out>/method_cost.json")
    p.add_argument("--update", action="store_true",
                   help="replace only the listed methods' rows of <out>/method_cost.json (a method added since it "
                        "was measured), each ratio taken to the EW timed in this run")
    a = p.parse_args(argv)
    old = None
    if a.update:
        path = a.out / "method_cost.json" if a.out is not None else None
        if path is None or not path.exists() or not a.methods:
            p.error("--update needs --methods and an --out folder holding method_cost.json")
        old = json.loads(path.read_text())
        if old.get("benchmark") != a.benchmark or old.get("tiny", False) != a.tiny:
            p.error(f"--update: {path} was measured on {old.get('benchmark')}{' --tiny' if old.get('tiny') else ''}")
    methods = a.methods or [m for m in imtl_jax.methods.method_names()] + list(DEFAULT_EXTRA)
    if "equal" not in methods:
        methods = ["equal"] + methods
    rounds, calls = (2, 2) if a.tiny else (a.rounds, a.calls)
    load0 = _load()
    res = measure(a.benchmark, methods, tiny=a.tiny, rounds=rounds, calls=calls)
    load1 = _load()
    ew = statistics.median(res["times_ms"]["equal"])
    rows = {m: {"median_ms": statistics.median(t), "min_ms": min(t), "ratio_to_equal": statistics.median(t) / ew}
            for m, t in res["times_ms"].items()}
    print(f"{a.benchmark}: training step (mtl_step + Adam, batch {res['batch_size']}, one run), median over "
          f"{rounds} interleaved rounds of {calls} calls; 1-minute load {load0:.2f} before, {load1:.2f} after")
    print(f"{'method':<20} {'median ms':>10} {'min ms':>9} {'/ EW':>7}")
    for m, r in sorted(rows.items(), key=lambda kv: kv[1]["ratio_to_equal"]):
        print(f"{m:<20} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['ratio_to_equal']:>7.2f}")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.method_cost " + " ".join(argv if argv is not None else os.sys.argv[1:])
        machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
        if old is not None:
            added = [m for m in rows if m != "equal"]
            payload = dict(old, methods={**old["methods"], **{m: rows[m] for m in added}},
                           updates=old.get("updates", []) + [
                               {"command": command, "methods": added, "rounds": rounds, "calls": calls,
                                "equal_median_ms": rows["equal"]["median_ms"], "load_1min_before": load0,
                                "load_1min_after": load1, "machine": machine}])
        else:
            payload = {"benchmark": a.benchmark, "tiny": a.tiny, "rounds": rounds, "calls": calls, "command": command,
                       "load_1min_before": load0, "load_1min_after": load1, "machine": machine, "methods": rows}
        (a.out / "method_cost.json").write_text(json.dumps(payload, indent=1))
        print(f"written: {a.out / 'method_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
