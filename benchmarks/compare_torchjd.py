"""imtl-jax against TorchJD (PyTorch) on the same architectures, batch and number of tasks.

    pip install -e ".[compare]"        # torch==2.13.0 (CPU) and torchjd
    python -m benchmarks.compare_torchjd [--quick]

TorchJD's IMTL-G is parameter level ("exact"): ``torchjd.autojac.mtl_backward`` fills the
Jacobian of the T losses w.r.t. the shared parameters, then ``jac_to_grad`` aggregates it with
``torchjd.aggregation.IMTLG``. Its equal weighting (EW) is ``sum(losses).backward()``. Every
step ends with the same SGD-momentum update. Ours: ``mtl_step`` with equal weighting, IMTL-H at
the representation level (stacked heads) and ``imtl_g_exact`` (the same math as TorchJD's), all
jitted. All steps of one model are interleaved round by round; times are medians.

Read the cross-framework column with care: XLA's CPU convolutions are several times slower than
PyTorch's CPU kernels, so the LeNet rows compare kernels as much as methods; the MLP rows (plain
matmuls in both) are the equal-footing comparison. Each framework's IMTL/EW ratio is free of this.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time

try:
    import torch
    from torchjd.aggregation import IMTLG
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError as e:  # pragma: no cover - optional comparison
    sys.exit(f"compare_torchjd needs torch and torchjd: pip install -e '.[compare]' ({e})")

import jax

from benchmarks import _models
from benchmarks.step_cost import VARIANTS, build_step, time_interleaved


# --- the same models in PyTorch -----------------------------------------------------------------

class LeNetTrunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 10, 9)
        self.conv2 = torch.nn.Conv2d(10, 20, 5)
        self.fc = torch.nn.Linear(180, 50)

    def forward(self, x):
        h = torch.relu(torch.nn.functional.max_pool2d(self.conv1(x), 2))
        h = torch.relu(torch.nn.functional.max_pool2d(self.conv2(h), 2))
        return torch.relu(self.fc(h.flatten(1)))


def mlp_trunk(dims):
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def torch_case(kind: str, num_tasks: int, batch_size: int = 256, in_features: int = 3072,
               width: int = 512):
    """(trunk, heads, loss_fn(outputs_t, y_t), x, y) shaped like ``benchmarks/_models.py``
    (``in_features`` and ``width``: the CelebA-like trunk only)."""
    g = torch.Generator().manual_seed(0)
    if kind == "lenet":
        trunk = LeNetTrunk()
        heads = [torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
                 for _ in range(num_tasks)]
        x = torch.rand(batch_size, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch_size, num_tasks), generator=g)
        loss = lambda out, yt: torch.nn.functional.cross_entropy(out, yt)  # noqa: E731
    elif kind == "qm9":
        trunk = mlp_trunk([64, 256, 256, 256])
        heads = [torch.nn.Linear(256, 1) for _ in range(num_tasks)]
        x = torch.randn(batch_size, 64, generator=g)
        y = torch.randn(batch_size, num_tasks, generator=g)
        loss = lambda out, yt: torch.mean((out[:, 0] - yt) ** 2)  # noqa: E731
    else:  # celeba
        trunk = mlp_trunk([in_features, width, width, width])
        heads = [torch.nn.Linear(width, 1) for _ in range(num_tasks)]
        x = torch.rand(batch_size, in_features, generator=g)
        y = torch.randint(0, 2, (batch_size, num_tasks), generator=g).float()
        loss = lambda out, yt: torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], yt)  # noqa: E731
    return trunk, torch.nn.ModuleList(heads), loss, x, y


def torch_steps(kind: str, num_tasks: int, device: str = "cpu", **sizes):
    trunk, heads, loss_fn, x, y = torch_case(kind, num_tasks, **sizes)
    trunk, heads, x, y = trunk.to(device), heads.to(device), x.to(device), y.to(device)
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    aggregator = IMTLG()

    def losses():
        z = trunk(x)
        return z, [loss_fn(h(z), y[:, t]) for t, h in enumerate(heads)]

    def ew():
        opt.zero_grad()
        _, ls = losses()
        torch.stack(ls).sum().backward()
        opt.step()

    def imtlg():
        opt.zero_grad()
        z, ls = losses()
        mtl_backward(ls, features=z)
        jac_to_grad(list(trunk.parameters()), aggregator)
        opt.step()

    return ew, imtlg


# --- run ----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer models and repetitions")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores; on a loaded machine 1 "
                             "is faster, OpenMP threads stall when the cores are shared)")
    parser.add_argument("--all-exact", action="store_true",
                        help="also time our imtl_g_exact on the CelebA-like trunk at T = 40")
    opts = parser.parse_args(argv)
    quick = opts.quick
    torch.set_num_threads(opts.torch_threads)
    print(f"imtl-jax (jax {jax.__version__}) vs TorchJD {importlib.metadata.version('torchjd')} "
          f"(torch {torch.__version__}); {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch "
          f"threads; batch 256, float32; median wall ms{', --quick' if quick else ''}\n")
    configs = [("lenet", 2), ("celeba", 2), ("celeba", 40)] if quick else \
        [("lenet", 2), ("lenet", 3), ("qm9", 11), ("celeba", 2), ("celeba", 40)]
    factories = {"lenet": _models.lenet, "qm9": _models.qm9, "celeba": _models.celeba}
    rows = []
    for kind, num_tasks in configs:
        case = factories[kind](num_tasks)
        t_ew, t_imtlg = torch_steps(kind, num_tasks)
        fns = {"ew": (t_ew, ()), "torch_imtlg": (t_imtlg, ())}
        ours = ("ew", "imtl_h", "exact") if (kind != "celeba" or num_tasks < 3 or opts.all_exact) \
            else ("ew", "imtl_h")
        for v in ours:
            b = build_step(case, *VARIANTS[v])
            for seed in range(2):
                jax.block_until_ready(b.fn(*b.make_args(seed)))
            fns["jax_" + v] = (b.fn, b.args)
        for _name, (fn, args) in fns.items():  # warm-up
            jax.block_until_ready(fn(*args))
        probe = {}
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            probe[name] = time.perf_counter() - t0
        base = 5 if quick else 12
        reps = {k: base if p < 0.3 else 3 for k, p in probe.items()}
        med, _, _ = time_interleaved(fns, reps, min_time=0.5 if quick else 2.0)
        ms = {k: 1e3 * v for k, v in med.items()}
        rows.append((case.name, num_tasks, ms))
        print(f"  measured {case.name} T={num_tasks}", file=sys.stderr, flush=True)

    hdr = (f"{'model':<18} {'T':>3} | {'torch EW':>8} {'TorchJD IMTLG':>13} {'/EW':>6} | "
           f"{'jax EW':>7} {'IMTL-H':>7} {'/EW':>6} {'exact':>8} {'/EW':>6} | "
           f"{'IMTL-H/TorchJD':>14} {'exact/TorchJD':>13} {'EW jax/torch':>12}")
    print(hdr)
    print("-" * len(hdr))
    for model, num_tasks, ms in rows:
        if "jax_exact" in ms:
            exact = (f"{ms['jax_exact']:8.1f} {ms['jax_exact'] / ms['jax_ew']:5.2f}x",
                     f"{ms['jax_exact'] / ms['torch_imtlg']:12.2f}x")
        else:
            exact = (f"{'-':>8} {'-':>6}", f"{'-':>13}")
        print(f"{model:<18} {num_tasks:>3} | {ms['ew']:8.1f} {ms['torch_imtlg']:13.1f} "
              f"{ms['torch_imtlg'] / ms['ew']:5.2f}x | {ms['jax_ew']:7.1f} {ms['jax_imtl_h']:7.1f} "
              f"{ms['jax_imtl_h'] / ms['jax_ew']:5.2f}x {exact[0]} | "
              f"{ms['jax_imtl_h'] / ms['torch_imtlg']:13.2f}x {exact[1]} {ms['jax_ew'] / ms['ew']:11.2f}x")
    print("\n  TorchJD IMTLG: mtl_backward + jac_to_grad(IMTLG()) (parameter level, exact).")
    print("  IMTL-H: ours at the representation level (the paper's default); exact: ours,")
    print("  method='imtl_g_exact' (the same parameter-level problem as TorchJD's).")
    print("  /EW: each framework against its own equal-weighting step (free of kernel speed).")
    print("  NOTE: XLA's CPU convolutions are several times slower than PyTorch's CPU kernels (see")
    print("  'EW jax/torch' on the LeNet rows); compare across frameworks on the MLP rows, where")
    print("  both run plain matmuls. On a GPU the picture differs.")
    print("  '-': our exact step on the 2.1M-parameter CelebA-like trunk at T = 40 not run (--all-exact).")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
