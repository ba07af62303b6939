"""The QM9-MPNN accelerator command: ``python -m experiments qm9_mpnn`` plus a throughput report.

    python -m experiments.mpnn_run --epochs 2 --seeds 0 --methods equal imtl_h imtl_g nash_mtl \\
        --data-dir qm9_graphs.npz --out runs/qm9_mpnn_slice          # a bounded slice on one GPU
    python -m experiments.mpnn_run ... --resume                      # continue it after an interruption

Every flag is that of ``python -m experiments qm9_mpnn`` (``--help`` lists them): seeds of a
method train as one vmapped program, checkpoints are written as the suite writes them and
``--resume`` continues. After the runs it prints, per method, the step time, the throughput
(molecules/s = batch x vmapped seeds / step time) and the estimated wall time of the full
protocol (300 epochs x 923 steps, 3 seeds, one evaluation of the 10,000 + 10,000
validation/test molecules per epoch), plus Δm% against the published single-task MAEs. The
estimate scales the measured step time linearly from the measured number of vmapped seeds
to 3 (an upper bound where the device is not yet busy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FULL_EPOCHS = 300
STEPS_PER_EPOCH = 110_831 // 120
PROTOCOL_SEEDS = 3
EVAL_MOLECULES = 20_000  # validation + test, evaluated once per epoch

__all__ = ["throughput_report", "main"]


def _out_dir(argv) -> Path:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--out="):
            return Path(a.split("=", 1)[1])
    return Path("runs/qm9_mpnn")


def throughput_report(results: dict) -> str:
    """Per-method step time, molecules/s and the full-protocol estimate from ``results.json``.

    Estimate per method: ``300 x (923 + 20,000 / 120 / 3) x step time at 3 seeds`` -- the
    training steps plus one evaluation of 20,000 molecules per epoch counted as forward
    passes (1/3 of a training step each); the step time at 3 seeds is the measured one
    scaled by ``3 / measured seeds``.
    """
    from experiments.suites.qm9_mpnn import delta_m_published

    lines = ["", "qm9_mpnn throughput (measured) and full-protocol estimate:"]
    total_h = 0.0
    by_method: dict[str, list] = {}
    for r in results.get("runs", []):
        key = "single_task" if r.get("single_task") is not None else r["method"]
        by_method.setdefault(key, []).append(r)
    machine = None
    for method, runs in by_method.items():
        r = runs[0]
        machine = r.get("machine", machine)
        cfg = r["config"]
        step_ms = r.get("step_time_ms")
        k = max(int(r.get("group_size") or 1), 1)
        if not step_ms:
            lines.append(f"  {method}: no timed steps (run more than one step)")
            continue
        mol_s = cfg["batch_size"] * k / (step_ms / 1e3)
        n_runs = PROTOCOL_SEEDS * (11 if method == "single_task" else 1)  # the protocol's runs of it
        step3_ms = step_ms * n_runs / k  # all of the method's protocol runs, scaled linearly from k
        # one evaluation = 20,000 molecules forward; a forward is ~1/3 of a training step (XLA's
        # count: forward + backward = 2.99 x forward, python -m experiments.models_mpnn)
        eval3_s = EVAL_MOLECULES / cfg["batch_size"] * step3_ms / 3 / 1e3
        full_s = FULL_EPOCHS * (STEPS_PER_EPOCH * step3_ms / 1e3 + eval3_s)
        total_h += full_s / 3600
        dm = ""
        try:
            if method == "single_task":
                raise ValueError("single-task runs: one task each")
            dm = f"; Δm vs published STL {delta_m_published(r['test']):+.1f}%"
        except (ValueError, KeyError, TypeError):
            pass
        if cfg["batch_size"] != 120:
            dm += f" [measured at batch {cfg['batch_size']}, not the protocol's 120: the estimate does not apply]"
        lines.append(f"  {method}: {step_ms:.1f} ms/step for {k} seed(s) x batch {cfg['batch_size']} = "
                     f"{mol_s:,.0f} molecules/s; full protocol "
                     f"({n_runs} runs vmapped, {FULL_EPOCHS} epochs) ~ {full_s / 3600:.1f} h{dm}")
    if machine:
        lines.append(f"  machine: {machine.get('backend')} {machine.get('devices')}, {machine.get('cpus')} CPUs, "
                     f"load {machine.get('load_1min') or 0:.1f}")
    lines.append(f"  all of them: ~ {total_h:.1f} h (estimate; excludes compilation"
                 + ("" if "single_task" in by_method else " and the 11 x 3 single-task baseline runs") + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs ``python -m experiments qm9_mpnn ARGV``, then prints :func:`throughput_report`."""
    from experiments import suites
    from experiments.__main__ import main as experiments_main

    argv = list(sys.argv[1:] if argv is None else argv)
    suites.REGISTRY.setdefault("qm9_mpnn", "experiments.suites.qm9_mpnn")
    rc = experiments_main(["qm9_mpnn", *argv])
    if rc != 0 or any(a in ("-h", "--help") for a in argv):
        return rc
    path = _out_dir(argv) / "results.json"
    if not path.is_file():
        print(f"mpnn_run: no {path}; nothing to report", file=sys.stderr)
        return rc
    results = json.loads(path.read_text())
    print(throughput_report(results))
    return rc


if __name__ == "__main__":
    sys.exit(main())
