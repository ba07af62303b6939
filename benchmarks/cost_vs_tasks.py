"""How the cost of balancing grows with the number of tasks T: step time and peak memory.

    python -m benchmarks.cost_vs_tasks                         # T in 2 .. 128, ~15 min idle
    python -m benchmarks.cost_vs_tasks --tiny                  # T in 2, 4 on a small trunk (CI)
    python -m benchmarks.cost_vs_tasks --out results/perf/cost_vs_tasks   # + json, md, png

On the CelebA-like trunk of ``benchmarks/_models.py`` (flattened 32x32x3 images, 3072-512-512-512
ReLU MLP, one logistic head per task, batch 256), for every T the jitted training step
(``mtl_step`` + SGD momentum) of each method: EW, IMTL-H (z), exact IMTL-G (θ), MGDA, CAGrad
(both at z) and FAMO; with the ``[compare]`` extra installed, TorchJD's ``IMTLG`` through
``mtl_backward`` on the same trunk in PyTorch (1 thread) beside them. Calls are interleaved
round by round within each T; the table gives the median milliseconds and the compiled step's
peak memory (``argument + output + temp - alias`` from XLA's memory analysis; not measured for
PyTorch). The growth exponent per method is the least-squares slope of log(time) on log(T).
Run on an idle machine: the 1-minute load is printed and stored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import _models
from benchmarks.step_cost import build_step, peak_bytes

METHODS = ("equal", "imtl_h", "imtl_g_exact", "mgda", "cagrad", "famo")
TASKS = (2, 4, 8, 16, 32, 64, 128)


def _torchjd_step(num_tasks: int, batch_size: int, width: int, in_dim: int):
    """TorchJD's IMTLG through ``mtl_backward`` on the same trunk, or None without torchjd."""
    try:
        import torch
        from torchjd.aggregation import IMTLG
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(in_dim, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU())
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 1) for _ in range(num_tasks)])  # one per task
    opt = torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=1e-3, momentum=0.9)
    x = torch.randn(batch_size, in_dim, generator=g)
    y = (torch.rand(batch_size, num_tasks, generator=g) > 0.5).float()
    agg = IMTLG()

    def step():
        opt.zero_grad()
        z = trunk(x)
        losses = [torch.nn.functional.binary_cross_entropy_with_logits(h(z)[:, 0], y[:, t])
                  for t, h in enumerate(heads)]
        mtl_backward(losses, features=z)   # heads' gradients, and the Jacobian w.r.t. the trunk

        jac_to_grad(list(trunk.parameters()), agg)
        opt.step()

    return step


def measure(tasks, methods, *, tiny: bool, rounds: int) -> dict:
    batch = 32 if tiny else 256
    rows = {}
    for t in tasks:
        case = (_models.celeba(num_tasks=t, batch_size=batch, in_features=192, width=64) if tiny
                else _models.celeba(num_tasks=t, batch_size=batch))
        fns, mem = {}, {}
        for m in methods:
            b = build_step(case, m, "stacked")
            jax.block_until_ready(b.fn(*b.args))
            fns[m] = (b.fn, b.args)
            mem[m] = peak_bytes(b.fn, b.args) / 2**20
        tj = _torchjd_step(t, batch, 64, 192) if tiny else _torchjd_step(t, batch, 512, 3072)
        if tj is not None:
            tj()
            fns["torchjd_imtlg"] = (lambda *_, step=tj: step(), ())
        times: dict = {k: [] for k in fns}
        names = list(fns)
        for r in range(rounds):
            for i in np.random.default_rng(r).permutation(len(names)):  # a new order each round
                k = names[i]
                fn, args = fns[k]
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[k].append((time.perf_counter() - t0) * 1e3)
        rows[t] = {k: {"median_ms": statistics.median(v), "peak_mb": mem.get(k)} for k, v in times.items()}
        print(f"T = {t}: " + ", ".join(f"{k} {r['median_ms']:.1f} ms" for k, r in rows[t].items()), flush=True)
    return rows


def exponents(rows: dict) -> dict:
    """Least-squares slope of log(median ms) against log(T), per method."""
    names = sorted({k for r in rows.values() for k in r})
    out = {}
    for k in names:
        pts = [(t, r[k]["median_ms"]) for t, r in rows.items() if k in r]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[k] = float(np.polyfit(x, y, 1)[0])
    return out


def markdown(payload: dict) -> str:
    rows, methods = payload["rows"], payload["methods"]
    lines = [f"Command: `{payload['command']}`; {payload['machine']}; 1-minute load {payload['load_before']:.2f} "
             f"before, {payload['load_after']:.2f} after. Median ms per training step (peak MB of the compiled step).",
             "", "| T | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for t, r in rows.items():
        cells = []
        for m in methods:
            if m not in r:
                cells.append("–")
                continue
            mb = r[m]["peak_mb"]
            cells.append(f"{r[m]['median_ms']:.1f}" + (f" ({mb:.0f})" if mb is not None else ""))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    ex = payload["exponents"]
    lines.append("| growth exponent | " + " | ".join(f"{ex[m]:.2f}" if m in ex else "–" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in payload["methods"]:
        pts = [(int(t), r[m]) for t, r in payload["rows"].items() if m in r]
        if not pts:
            continue
        ts = [p[0] for p in pts]
        slope = payload["exponents"].get(m, float("nan"))
        axes[0].loglog(ts, [p[1]["median_ms"] for p in pts], "o-", label=f"{m} (slope {slope:.2f})")
        if pts[0][1]["peak_mb"] is not None:
            axes[1].loglog(ts, [p[1]["peak_mb"] for p in pts], "o-", label=m)
    axes[0].set_ylabel("training step (ms, median)")
    axes[1].set_ylabel("peak memory of the compiled step (MB)")
    for ax in axes:
        ax.set_xlabel("number of tasks T")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"Cost against T ({payload['machine']}, load {payload['load_before']:.1f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_vs_tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=None,
                   help=f"values of T (default: {' '.join(map(str, TASKS))})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="methods (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per T (default: 7)")
    p.add_argument("--tiny", action="store_true",
                   help="T in 2, 4, a 192-64-64-64 trunk, batch 32, 2 rounds (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write cost_vs_tasks.{json,md,png} into this folder")
    a = p.parse_args(argv)
    tasks = a.tasks or ([2, 4] if a.tiny else list(TASKS))
    rounds = 2 if a.tiny else a.rounds
    load0 = os.getloadavg()[0]
    rows = measure(tasks, a.methods, tiny=a.tiny, rounds=rounds)
    load1 = os.getloadavg()[0]
    methods = list(a.methods) + (["torchjd_imtlg"] if any("torchjd_imtlg" in r for r in rows.values()) else [])
    args = argv if argv is not None else os.sys.argv[1:]
    payload = {"command": "python -m benchmarks.cost_vs_tasks " + " ".join(args),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
                          f"({jax.default_backend()})",
               "load_before": load0, "load_after": load1, "methods": methods,
               "rows": {str(t): r for t, r in rows.items()}, "exponents": exponents(rows)}
    text = markdown(payload)
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "cost_vs_tasks.json").write_text(json.dumps(payload, indent=1))
        (a.out / "cost_vs_tasks.md").write_text(text)
        plot(payload, a.out / "cost_vs_tasks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
