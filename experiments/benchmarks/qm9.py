"""QM9: 11 molecular property regressions (mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv).

Model: MLP on sorted Coulomb-matrix eigenvalues + 11 stacked linear heads; MSE on
standardized targets. Metric: MAE per target in original units (lower is better).
Data: the PyPI package ``qm9pack`` (or ``--data-dir`` with qm9pack-format CSVs).
``--targets mu homo`` trains on a subset of the targets (the priorities sweep uses two).
"""

from __future__ import annotations

import numpy as np

from experiments import losses as L
from experiments import metrics as M
from experiments.benchmarks import Benchmark, tmpdir
from experiments.errors import CLIError

DEFAULT_MAX_TRAIN = 20_000  # CPU default; --max-train 110000 for the full training split
DEFAULTS = {"qm9": dict(methods=["imtl_h", "equal"], seeds=[0], steps=2000, batch_size=128, lr=1e-3,
                        eval_every=250, max_train=DEFAULT_MAX_TRAIN)}
TINY = dict(seeds=[0], steps=6, batch_size=4, eval_every=2, max_train=None)


def add_flags(parser, name):
    g = parser.add_argument_group("qm9")
    g.add_argument("--max-eval", type=int, default=None,
                   help="evaluate on at most this many validation/test molecules (default: all)")
    g.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help="train on these targets only (default: all 11)")


def build(name: str, o) -> Benchmark:
    from flax import nnx
    from experiments import pure_model
    from experiments.data import qm9 as Q
    from experiments.models import MLPMTL

    cleanup = None
    if o.tiny:
        root, cleanup = tmpdir("qm9")
        Q.write_fixture(root / "csv", n=60, seed=0)
        data = Q.load_qm9(data_dir=root / "csv", n_train=30, n_val=12, max_test=12,
                          cache_dir=root / "cache", seed=0)
        hidden = (16, 16)
    else:
        data = Q.load_qm9(data_dir=o.data_dir, seed=0, max_train=o.max_train, max_val=o.max_eval,
                          max_test=o.max_eval)
        hidden = (256, 256, 256)
    all_targets = tuple(data.target_names)
    targets = tuple(o.targets) if o.targets else all_targets
    unknown = [t for t in targets if t not in all_targets]
    if unknown:
        raise CLIError(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join(all_targets)}")
    idx = np.asarray([all_targets.index(t) for t in targets])
    std = np.asarray(data.target_std, np.float32)[idx]
    splits = {}
    for split in ("train", "val", "test"):
        ds = data.split(split)
        splits[split] = type(ds)(x=ds.arrays["x"], y=ds.arrays["y"][:, idx])
    specs = tuple(M.MetricSpec(f"{t}_mae", t, False) for t in targets)
    nf, T = data.num_features, len(targets)

    def make_model(seed):
        return MLPMTL(nf, T, hidden=hidden, rngs=nnx.Rngs(seed))

    def pure(model, loss_factors=None):
        return pure_model.stacked(model, name=name, num_tasks=T, input_key="x", target_key="y",
                                  loss=L.regression_losses, loss_factors=loss_factors)

    def stats(preds, batch):
        return M.regression_stats(preds, batch["y"], std)

    def finalize(totals):
        return {s.name: float(v) for s, v in zip(specs, M.mae_from_stats(totals))}

    n = {k: len(v) for k, v in splits.items()}
    return Benchmark(
        name=name, task_names=targets, train=splits["train"], val=splits["val"], test=splits["test"],
        make_model=make_model, pure_model=pure, metrics=specs, stats=stats, finalize=finalize,
        eval_batch_size=2048, cleanup=cleanup,
        notes=[f"QM9 ({'generated fixture' if o.tiny else 'qm9pack'}): {n['train']} train / {n['val']} val / "
               f"{n['test']} test molecules; {nf} Coulomb-eigenvalue features; MLP {hidden} + {T} linear "
               "heads; MSE on standardized targets; metric: MAE in original units (lower is better)"],
        fingerprint={"data": "qm9", "n_train": n["train"], "targets": list(targets), "tiny": o.tiny})
